"""``ctfm saliency``: occlusion saliency (OFD) -- where the CT-FM embedding of a CT comes from, as a volume on the
input's grid and a picture."""

from __future__ import annotations

import argparse
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
    saliency = commands.add_parser("saliency", parents=[common, inputs],
                                   help="occlusion saliency (OFD): where the CT-FM embedding of a CT comes from")
    saliency.add_argument("input", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    saliency.add_argument("--out-dir", required=True, type=Path, metavar="DIR",
                          help="writes <input>_saliency.nii.gz (on the input's grid) and <input>_saliency.png")
    saliency.add_argument("--weights", help=WEIGHTS_HELP)
    saliency.add_argument("--mask-size", type=int, default=10, metavar="N",
                          help="occlusion cube edge in voxels at 3 mm (default 10 = 30 mm, the paper's script)")
    saliency.add_argument("--overlap", type=float, default=0.25, help="occlusion overlap fraction (default 0.25)")
    saliency.add_argument("--batch-size", type=int, default=12, help="occluded volumes per forward pass (12)")
    saliency.add_argument("--smooth-mm", type=float, default=12.0, metavar="MM",
                          help="3-D Gaussian sigma applied to the map (default 12 mm; 0: none)")
    saliency.add_argument("--occlusion", choices=("gaussian", "zero"), default="gaussian",
                          help="gaussian: darken the box towards its centre (MONAI's, the paper's); zero: fill the "
                          "box with air (-1024 HU)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.pipelines.insight import SaliencyRequest, run_saliency

    with progress_bar(args, "occlusions", "volume") as progress:
        outcome = run_saliency(SaliencyRequest(
            scan_source(args.input, args), weights=args.weights, mask_size=args.mask_size, overlap=args.overlap,
            occlusion=args.occlusion, batch_size=args.batch_size, smooth_mm=args.smooth_mm, device=device(args),
            progress=progress))
    stem = output_stem(args.input)
    volume_path, png_path = args.out_dir / f"{stem}_saliency.nii.gz", args.out_dir / f"{stem}_saliency.png"
    write_together([(outcome.write_volume, volume_path), (outcome.draw, png_path)])
    result = outcome.saliency
    return {
        "command": "saliency",
        "input": str(args.input),
        "weights": outcome.weights,
        "device": outcome.device,
        "volume": str(volume_path),
        "png": str(png_path),
        "method": "occlusion feature deviation: 1 - cos(base embedding, weighted mean of occluded embeddings)",
        "occlusion": result.occlusion,
        "occlusions": result.occlusions,
        "mask_size_zyx": list(result.mask_size_zyx),
        "mask_mm_zyx": result.settings["mask_mm_zyx"],
        "overlap": result.overlap,
        "smooth_mm": result.smooth_mm,
        "max_saliency": float(result.values.max()),
        "most_salient_lps": [float(v) for v in result.most_salient_lps],
        "model_shape_zyx": list(result.model_input.grid.shape_zyx),
        "preprocessing": result.settings["preprocessing"],
        "seconds": round(result.seconds, 2),
    }


def human_lines(document: dict[str, Any]) -> list[str]:
    x, y, z = document["most_salient_lps"]
    return [*weights_lines(document),
            f"{document['input']}: saliency from {document['occlusions']} occlusions ({document['occlusion']}) of "
            f"{'x'.join(map(str, document['mask_size_zyx']))} voxels (overlap {document['overlap']:g}); max "
            f"{document['max_saliency']:.3g} at LPS ({x:.1f}, {y:.1f}, {z:.1f}) mm; {document['seconds']:.1f} s",
            f"saliency volume (input's grid) -> {document['volume']}",
            f"picture -> {document['png']}"]
