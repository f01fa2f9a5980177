"""``ctfm demo``: the main job end to end on the bundled sample CT (embeddings, segmentation, pictures)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    demo = commands.add_parser("demo", parents=[common], help="the main job end to end on the bundled sample CT")
    demo.add_argument("--out-dir", type=Path, default=Path("ctfm-demo"), help="where results go (ctfm-demo)")
    demo.add_argument("--weights", help="encoder checkpoint folder or hub repo id (default: CTFM_WEIGHTS, then "
                      "project-lighter/ct_fm_feature_extractor in the cache, then the bundled demonstration model "
                      "ctfm-mini)")
    demo.add_argument("--seg-weights", help="segmentation checkpoint folder or hub repo id (default: "
                      "CTFM_SEG_WEIGHTS, then project-lighter/whole_body_segmentation in the cache, then the bundled "
                      "demonstration model ctfm-mini-wholebody-seg)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.demo import run_demo

    return run_demo(args.out_dir, weights=args.weights, seg_weights=args.seg_weights,
                    device_name=args.device or "cpu", quiet=args.quiet)


def human_lines(document: dict[str, Any]) -> list[str]:
    return list(document["summary"])
