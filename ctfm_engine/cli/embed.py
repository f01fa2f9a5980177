"""``ctfm embed``: CT-FM embeddings of CT scans, whole scan or sliding patches, as JSON and ``.npz``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_engine.cli.common import (
    WEIGHTS_HELP,
    add_encoder_choices,
    device,
    progress_bar,
    scan_source,
    weights_lines,
)
from ctfm_engine.errors import UsageError


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    embed = commands.add_parser(
        "embed", parents=[common, inputs], help="CT-FM embeddings of CT scans (512-d with the published weights)"
    )
    embed.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    embed.add_argument("--weights", help=WEIGHTS_HELP)
    embed.add_argument("--level", choices=("scan", "patch"), default="scan", help="whole scan, or sliding patches")
    embed.add_argument("--out", type=Path, metavar="FILE.npz", help="write embeddings and provenance here")
    embed.add_argument("--aggregation", choices=("min", "mean", "max"), default="min", help="patch level (min)")
    embed.add_argument(
        "--patch-size", type=int, nargs=3, default=(24, 128, 128), metavar=("Z", "Y", "X"),
        help="patch size in model voxels at 3x1x1 mm (default 24 128 128, the 3D-MIR recipe)",
    )
    embed.add_argument("--overlap", type=float, default=0.625, help="patch overlap fraction (default 0.625)")
    embed.add_argument("--batch-size", type=int, default=4, help="patches per forward pass (default 4)")
    add_encoder_choices(embed)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.pipelines.embedding import EmbeddingRequest, run_embedding

    if args.out is not None and args.out.suffix != ".npz":
        raise UsageError(f"--out {args.out}: embeddings are written as .npz (numpy.load opens them)")
    with progress_bar(args, "embedding", "scan", total=len(args.inputs), shown=len(args.inputs) > 1) as scans, \
            progress_bar(args, "patches", "patch", shown=args.level == "patch") as patches:
        outcome = run_embedding(EmbeddingRequest(
            [scan_source(path, args) for path in args.inputs], weights=args.weights, level=args.level,
            patch_size_zyx=tuple(args.patch_size), overlap=args.overlap, aggregation=args.aggregation,
            batch_size=args.batch_size, device=device(args), preprocessing=args.preprocessing,
            allow_segmentation_encoder=args.allow_segmentation_encoder, progress=scans, patch_progress=patches))
    if args.out is not None:
        outcome.write(args.out)
    return {
        "command": "embed",
        "weights": outcome.weights,
        "device": outcome.device,
        "level": outcome.level,
        "aggregation": outcome.aggregation,
        "preprocessing": {**outcome.preprocessing.describe(), "choice": outcome.preprocessing_choice},
        "output": None if args.out is None else str(args.out),
        "results": [
            {
                "input": item.input,
                "series_instance_uid": item.series_instance_uid,
                "embedding": [float(value) for value in item.vector],
                "model_shape_zyx": list(item.model_shape_zyx),
                "patches": None if item.patch_vectors is None else len(item.patch_vectors),
            }
            for item in outcome.embeddings
        ],
    }


def human_lines(document: dict[str, Any]) -> list[str]:
    lines = weights_lines(document)
    spacing = document["preprocessing"]["spacing_zyx_mm"]
    spacing = "native spacing" if spacing == "native" else "x".join(f"{mm:g}" for mm in spacing) + " mm"
    for item in document["results"]:
        vector = np.asarray(item["embedding"])
        lines.append(f"{item['input']}: {vector.size}-d embedding, norm {np.linalg.norm(vector):.3f}, "
                     f"model space {'x'.join(map(str, item['model_shape_zyx']))} (z,y,x at {spacing})"
                     + (f", {item['patches']} patches" if item["patches"] else ""))
    if document["output"]:
        lines.append(f"wrote {document['output']}")
    return lines
