"""``ctfm concept-map``: the CT-FM features of one or more CTs as colours (one joint PCA), as RGB volumes on each
input's grid and pictures."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctfm_engine.cli.common import (
    WEIGHTS_HELP,
    device,
    output_stem,
    progress_bar,
    scan_source,
    weights_lines,
    write_together,
)


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    concept = commands.add_parser("concept-map", parents=[common, inputs],
                                  help="PCA concept map: CT-FM features of one or more CTs as colours (one joint PCA)")
    concept.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    concept.add_argument("--out-dir", required=True, type=Path, metavar="DIR",
                         help="writes <input>_concept_map.nrrd (RGB on the input's grid) and .png per input")
    concept.add_argument("--weights", help=WEIGHTS_HELP)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.pipelines.insight import ConceptMapRequest, run_concept_maps

    with progress_bar(args, "features", "scan", total=len(args.inputs), shown=len(args.inputs) > 1) as progress:
        outcome = run_concept_maps(ConceptMapRequest([scan_source(path, args) for path in args.inputs],
                                                     weights=args.weights, device=device(args), progress=progress))
    stems: list[str] = []
    for path in args.inputs:
        stem = output_stem(path)
        stems.append(stem if stem not in stems else f"{stem}_{len(stems) + 1}")
    writers: list[tuple[Callable[[Path], Path], Path]] = []
    results = []
    for index, (path, stem) in enumerate(zip(args.inputs, stems, strict=True)):
        volume_path, png_path = args.out_dir / f"{stem}_concept_map.nrrd", args.out_dir / f"{stem}_concept_map.png"
        writers += [(lambda target, index=index: outcome.write_volume(index, target), volume_path),
                    (lambda target, index=index: outcome.draw(index, target), png_path)]
        results.append({"input": str(path), "volume": str(volume_path), "png": str(png_path),
                        "body_voxels": int(outcome.maps[index].body.sum())})
    write_together(writers)
    fit = outcome.fit
    return {
        "command": "concept-map",
        "weights": outcome.weights,
        "device": outcome.device,
        "results": results,
        "pca": {"components": 3, "samples": fit.samples, "fitted_on": fit.fitted_on, "seed": outcome.seed,
                "explained_variance_ratio": [float(r) for r in fit.explained_variance_ratio]},
        "colour": "L = 100 PC0, a = 255 PC1 - 128, b = 255 PC2 - 128 (joint min-max), CIELAB -> sRGB D65",
        "seconds": round(outcome.seconds, 2),
    }


def human_lines(document: dict[str, Any]) -> list[str]:
    ratios = ", ".join(f"{100 * r:.1f}%" for r in document["pca"]["explained_variance_ratio"])
    return [*weights_lines(document),
            f"joint PCA over {document['pca']['samples']} feature cells of {len(document['results'])} scan(s); "
            f"explained variance {ratios}",
            *(f"{item['input']}: concept map (RGB, input's grid) -> {item['volume']}; picture -> {item['png']}"
              for item in document["results"])]
