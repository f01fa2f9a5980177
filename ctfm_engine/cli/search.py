"""``ctfm search``: semantic search -- the anatomy at a point of one scan found in other scans, with heatmaps."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

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
    search = commands.add_parser(
        "search", parents=[common, inputs],
        help="semantic search: find the anatomy at a point of one scan in other scans",
    )
    search.add_argument("--source", required=True, metavar="SRC", help="the scan holding the query point")
    search.add_argument("--point", required=True, type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="the query point in patient LPS millimetres (Slicer shows RAS: negate X and Y)")
    search.add_argument("--target", required=True, nargs="+", metavar="TGT", help="scans to search in")
    search.add_argument("--method", choices=("fast", "exact"), default="fast",
                        help="fast: cached dense feature maps (default); exact: embed every window (reference app)")
    search.add_argument("--top-k", type=int, default=5, metavar="K", help="distinct matches per target (5)")
    search.add_argument("--patch-mm", type=float, nargs=3, default=(48.0, 64.0, 64.0), metavar=("S", "P", "L"),
                        help="query patch in mm along S, P, L (default 48 64 64: the app's 16x64x64 voxels)")
    search.add_argument("--overlap", type=float, default=0.625, help="exact method: window overlap (0.625)")
    search.add_argument("--heatmap-dir", type=Path, metavar="DIR",
                        help="write each target's similarity heatmap (NIfTI, on the target's grid) and a PNG here")
    search.add_argument("--weights", help=f"encoder {WEIGHTS_HELP}")
    search.add_argument("--no-cache", action="store_true",
                        help="fast method: do not read or write feature maps in the cache folder")
    search.add_argument("--batch-size", type=int, default=8, help="exact method: windows per forward pass (8)")
    add_encoder_choices(search)
    search.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="the fast method's dense pass: fp32, "
                        "bf16 (CPUs with native bf16) or fp16 (GPUs); default: the fastest whose features keep a "
                        "cosine of 0.999 with fp32's on every cell, measured once and cached")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.pipelines.search import SearchRequest, run_search

    if args.heatmap_dir is not None and args.heatmap_dir.exists() and not args.heatmap_dir.is_dir():
        raise UsageError(f"--heatmap-dir {args.heatmap_dir}: exists and is not a folder")
    request = SearchRequest(
        scan_source(args.source, args), tuple(args.point), [scan_source(path, args) for path in args.target],
        weights=args.weights, method=args.method, patch_mm_zyx=tuple(args.patch_mm), overlap=args.overlap,
        top_k=args.top_k, batch_size=args.batch_size, heatmaps=args.heatmap_dir is not None,
        disk_cache=not args.no_cache, device=device(args), preprocessing=args.preprocessing,
        allow_segmentation_encoder=args.allow_segmentation_encoder, precision=args.precision)
    settings = request.settings()  # a bad setting is refused before any scan is read
    with progress_bar(args, "searching", "step", total=len(args.target) + 1) as progress:
        outcome = run_search(replace(request, progress=progress))
    result = outcome.result
    written: list[tuple[str | None, str | None]] = [(None, None)] * len(result.targets)
    if args.heatmap_dir is not None:
        written = [(str(heatmap), str(figure)) for heatmap, figure in outcome.write_heatmaps(args.heatmap_dir)]
    return {
        "command": "search",
        "weights": outcome.weights,
        "device": outcome.searcher.device,
        "method": result.method,
        "settings": (outcome.settings or settings).describe(),
        "runtime": None if outcome.searcher.runtime is None else outcome.searcher.runtime.describe(),
        "query": {"source": result.source, "point_lps": list(result.point_lps)},
        "targets": [
            {
                "input": target.input,
                "matches": [{"point_lps": list(match.point_lps), "similarity": match.similarity}
                            for match in target.matches],
                "heatmap": heatmap,
                "figure": figure,
                "flat": target.flat,
                "cached": target.cached,
                "windows": target.windows,
                "seconds": round(target.seconds, 3),
            }
            for target, (heatmap, figure) in zip(result.targets, written, strict=True)
        ],
        "notes": result.notes,
    }


def human_lines(document: dict[str, Any]) -> list[str]:
    query = document["query"]
    lines = [*weights_lines(document), "query: ({:.1f}, {:.1f}, {:.1f}) LPS mm in {} ({} method)".format(
        *query["point_lps"], query["source"], document["method"])]
    for target in document["targets"]:
        state = "cached features" if target["cached"] else f"{target['windows']} windows"
        lines.append(f"{target['input']}: {state}, {target['seconds']:.2f} s" + (" (flat map)" if target["flat"]
                                                                                 else ""))
        for rank, match in enumerate(target["matches"], 1):
            lines.append("  {}. ({:.1f}, {:.1f}, {:.1f}) LPS mm  similarity {:.3f}".format(
                rank, *match["point_lps"], match["similarity"]))
        if target["heatmap"]:
            lines.append(f"  heatmap {target['heatmap']}; figure {target['figure']}")
    return lines
