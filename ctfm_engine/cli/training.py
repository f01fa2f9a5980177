"""``ctfm pretrain`` and ``ctfm finetune``: self-supervised pre-training of the encoder and fine-tuning of a task model
(segmentation, head-CT triage), each from a recipe file."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from ctfm_engine.cli.common import document_lines, weights_lines


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    for name, text in (("pretrain", "self-supervised pre-training of the encoder from a recipe"),
                       ("finetune", "fine-tune a task model (segmentation, head-CT triage) from a recipe")):
        train = commands.add_parser(name, parents=[common], help=text)
        train.add_argument("--config", required=True, type=Path, help="recipe YAML (see training/)")
        train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a recipe key, e.g. --set trainer.max_epochs=2 (repeatable)")
        train.add_argument("--resume", metavar="CKPT", help="continue from a Lightning checkpoint (e.g. last.ckpt)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.training.runner import run_recipe

    accelerator = None if args.device is None else {"cpu": "cpu", "auto": "auto"}.get(args.device, "gpu")
    # Lightning draws progress and summaries on stdout, which belongs to the --json document.
    with contextlib.redirect_stdout(sys.stderr):
        return run_recipe(args.command, args.config, args.set, resume=args.resume, accelerator=accelerator,
                          quiet=args.quiet)


def human_lines(document: dict[str, Any]) -> list[str]:
    return [*weights_lines(document), *document_lines(document)]
