"""``ctfm ocd``: organ centroid distance -- each labelled structure of one scan searched in another, scored by the
labels (the CT-FM paper's semantic-search metric, in mm, with a true inside-the-structure test)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctfm_engine.cli.common import WEIGHTS_HELP, device, output_stem, progress_bar, scan_source, weights_lines
from ctfm_engine.errors import UsageError


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    ocd = commands.add_parser(
        "ocd", parents=[common, inputs],
        help="organ centroid distance: search each labelled structure of one scan in another, score by labels",
    )
    ocd.add_argument("--source", required=True, metavar="SRC", help="the scan whose structure centroids are queried")
    ocd.add_argument("--source-labels", required=True, type=Path, metavar="LABELS", help="label map of SRC")
    ocd.add_argument("--target", required=True, metavar="TGT", help="the scan searched")
    ocd.add_argument("--target-labels", required=True, type=Path, metavar="LABELS",
                     help="label map of TGT (the same label numbers)")
    ocd.add_argument("--method", choices=("fast", "exact"), default="fast", help="search method (fast)")
    ocd.add_argument("--organs", type=int, nargs="+", metavar="LABEL", help="only these label numbers")
    ocd.add_argument("--min-voxels", type=int, default=50,
                     help="structures need at least this many voxels in both scans (50)")
    ocd.add_argument("--patch-mm", type=float, nargs=3, default=(48.0, 64.0, 64.0), metavar=("S", "P", "L"),
                     help="query patch in mm along S, P, L (default 48 64 64, the app's)")
    ocd.add_argument("--overlap", type=float, default=0.625, help="exact method: window overlap (0.625)")
    ocd.add_argument("--figure", type=Path, metavar="PNG", help="write the per-structure bar chart here")
    ocd.add_argument("--weights", help=f"encoder {WEIGHTS_HELP}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.pipelines.insight import OrganCentroidRequest, run_organ_centroid_distance

    if args.figure is not None and args.figure.suffix.lower() != ".png":
        raise UsageError(f"--figure {args.figure}: the figure is written as PNG")
    with progress_bar(args, "structures", "structure") as progress:
        outcome = run_organ_centroid_distance(OrganCentroidRequest(
            scan_source(args.source, args), args.source_labels, scan_source(args.target, args), args.target_labels,
            weights=args.weights, method=args.method, organs=args.organs, minimum_voxels=args.min_voxels,
            patch_mm_zyx=tuple(args.patch_mm), overlap=args.overlap, device=device(args), progress=progress))
    figure = None
    if args.figure is not None:
        figure = str(outcome.write_figure(args.figure, output_stem(args.source), output_stem(args.target)))
    return {
        "command": "ocd",
        "weights": outcome.weights,
        "device": outcome.device,
        "method": outcome.method,
        "settings": outcome.settings.describe(),
        "source": args.source,
        "target": args.target,
        "structures": outcome.rows(),
        "summary": outcome.summary,
        "figure": figure,
    }


def human_lines(document: dict[str, Any]) -> list[str]:
    lines = [*weights_lines(document), f"{document['source']} -> {document['target']} ({document['method']} method)"]
    for row in sorted(document["structures"], key=lambda row: row["distance_mm"]):
        lines.append(f"  {row['name']:<32} {row['distance_mm']:7.1f} mm  "
                     f"{'inside' if row['hit'] else 'elsewhere':<9}  similarity {row['similarity']:.3f}")
    summary = document["summary"]
    distance = summary["distance_mm"]
    lines.append(f"OCD mean {distance['value']:.1f} mm (95% CI {distance['low']:.1f}-{distance['high']:.1f}), median "
                 f"{summary['distance_median_mm']:.1f} mm; inside the structure {summary['inside_organ_count']}/"
                 f"{summary['pairs']}" + (f"; figure {document['figure']}" if document["figure"] else ""))
    return lines
