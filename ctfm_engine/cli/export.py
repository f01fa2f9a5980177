"""``ctfm export``: a checkpoint to ONNX, validated against PyTorch on a real CT before the file is written."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ctfm_engine.cli.common import scan_source, weights_lines
from ctfm_engine.errors import UsageError

log = logging.getLogger("ctfm")


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    export = commands.add_parser("export", parents=[common, inputs],
                                 help="export a checkpoint to ONNX, validated against PyTorch on a real CT patch")
    export.add_argument("--model", required=True, help="checkpoint folder or hub repo id in the cache (encoder, "
                        "segmentation or triage)")
    export.add_argument("--out", type=Path, metavar="FILE.onnx", help="where to write (default: the ONNX cache, "
                        "where `ctfm segment --backend onnx` looks)")
    export.add_argument("--task", choices=("auto", "segmentation", "segmentation-trunk", "triage", "encoder"),
                        default="auto", help="what to export (auto: segmentation when the weights hold a decoder, "
                        "triage when they hold a classifier head, else the encoder's last feature map; "
                        "segmentation-trunk: decoder features, the output head applied after blending)")
    export.add_argument("--check-input", metavar="CT", help="real CT the export is validated on: NIfTI/NRRD/MHA file "
                        "or DICOM series folder (default: the bundled sample CT; a head CT suits triage best)")
    export.add_argument("--roi", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="validation window in model voxels, multiples of 16 (default: the segmentation "
                        "checkpoint's window, 32 128 128 for an encoder); triage uses its fixed input size")
    export.add_argument("--tolerance", type=float, metavar="T", help="largest accepted |PyTorch - onnxruntime| on any "
                        "output value (default 1e-3); a larger difference writes nothing and exits with code 4")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.pipelines.export import ExportRequest, run_export

    if args.out is not None and args.out.suffix.lower() != ".onnx":
        raise UsageError(f"--out {args.out}: an ONNX export is written as .onnx")
    if args.roi is not None and args.task == "triage":
        raise UsageError("--roi: a triage model is validated on its own fixed input size; leave --roi out")
    if args.device not in (None, "cpu"):
        log.info("the export and its validation run on the CPU; the ONNX file then runs on any device")
    check_input = None if args.check_input is None else scan_source(args.check_input, args)
    outcome = run_export(ExportRequest(
        args.model, out=args.out, task=args.task, check_input=check_input, series_uid=args.series,
        hu_offset=args.hu_offset, roi_size_zyx=None if args.roi is None else tuple(args.roi),
        tolerance=args.tolerance))
    report = outcome.report
    return {
        "command": "export",
        "weights": outcome.weights,
        "output": str(outcome.output),
        "task": outcome.task,
        "max_abs_difference": report.max_abs_difference,
        "label_agreement": report.label_agreement,
        "tolerance": outcome.tolerance,
        "check_input": outcome.check_input,
        "sample_shape": list(report.sample_shape),
        "out_channels": report.out_channels,
        "opset": outcome.opset,
        "bytes": outcome.output.stat().st_size,
        "seconds": {"export": report.export_seconds, "torch": report.torch_seconds,
                    "onnxruntime": report.onnxruntime_seconds},
    }


def human_lines(document: dict[str, Any]) -> list[str]:
    agreement = document["label_agreement"]
    return [*weights_lines(document),
            f"{document['task']} network -> {document['output']} ({document['bytes'] / 1e6:.1f} MB): "
            f"max |PyTorch - onnxruntime| {document['max_abs_difference']:.2g} (tolerance "
            f"{document['tolerance']:g})" + ("" if agreement is None else
                                             f", labels agree on {100 * agreement:.3f} % of voxels")]
