"""``ctfm weights``: which checkpoint a task would use and what it holds (info), what the cache has (list), and the
download of a published checkpoint into the cache (pull)."""

from __future__ import annotations

import argparse
from typing import Any

from ctfm_engine.cli.common import document_lines, weights_lines


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    weights = commands.add_parser("weights", help="find, inspect and download CT-FM checkpoints")
    actions = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    pull = actions.add_parser("pull", parents=[common], help="download a hub repo into the cache")
    pull.add_argument("repo", help="hub repo id, e.g. project-lighter/ct_fm_feature_extractor or "
                      "project-lighter/whole_body_segmentation")
    pull.add_argument("--revision", help="branch, tag or commit")
    actions.add_parser("list", parents=[common], help="checkpoints in the cache")
    info = actions.add_parser("info", parents=[common],
                              help="config, size and sha256 of a checkpoint, and whether it is the published one")
    info.add_argument("weights", nargs="?", help="folder or hub repo id (default: the one the --kind task would use)")
    info.add_argument("--kind", choices=("encoder", "segmentation", "triage"), default="encoder",
                      help="whose default to describe when no checkpoint is given: encoder (`embed`, default), "
                      "segmentation (`segment`) or triage (`triage`)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.pipelines.weights import cached_checkpoints, describe_weights, models_folder, pull_checkpoint

    if args.weights_command == "pull":
        pulled = pull_checkpoint(args.repo, args.revision)
        return {"command": "weights pull", "folder": str(pulled.folder), "weights": pulled.weights}
    if args.weights_command == "list":
        return {"command": "weights list", "cache": str(models_folder()),
                "folders": [str(folder) for folder in cached_checkpoints()]}
    described = describe_weights(args.weights, args.kind)
    return {
        "command": "weights info",
        "folder": str(described.folder),
        "weights": described.weights,
        "config": described.config,
        "tensors": described.tensors,
        "values": described.values,
    }


def human_lines(document: dict[str, Any]) -> list[str]:
    if document["command"] == "weights list":
        return document["folders"] or [f"no checkpoints in {document['cache']}"]
    published = (document.get("weights") or {}).get("published")
    claim = [f"published: {published['repo']}: {published['statement']}"] if published else []
    return [*weights_lines(document), *claim, *document_lines(document)]
