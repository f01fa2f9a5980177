"""``ctfm segment``: whole-body segmentation, a label map on the input's own grid (and optionally a volume table, a
DICOM-SEG of the input series, a measurement SR of its segments and a measurement table)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ctfm_engine.cli.common import (
    add_runtime_options,
    check_onnx_option,
    device,
    progress_bar,
    scan_source,
    weights_lines,
    write_together,
)
from ctfm_engine.errors import UsageError

log = logging.getLogger("ctfm")

LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    segment = commands.add_parser("segment", parents=[common, inputs],
                                  help="whole-body segmentation: a label map on the input's own grid")
    segment.add_argument("input", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    segment.add_argument("--out", required=True, type=Path, metavar="LABELMAP",
                         help="label map to write (.nii.gz, .nii, .nrrd or .mha), on the input's grid")
    segment.add_argument("--model", help="segmentation checkpoint folder or hub repo id (default: CTFM_SEG_WEIGHTS, "
                         "then project-lighter/whole_body_segmentation in the cache, then the bundled demonstration "
                         "model ctfm-mini-wholebody-seg)")
    add_runtime_options(segment, "labels agree on >= 0.999 of the foreground voxels with")
    segment.add_argument("--roi", type=int, nargs=3, metavar=("Z", "Y", "X"),
                         help="sliding-window size in model voxels (default: the checkpoint's)")
    segment.add_argument("--overlap", type=float,
                         help="window overlap fraction, 0 <= f < 1 (default: the checkpoint's)")
    segment.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    cleanup = segment.add_mutually_exclusive_group()
    cleanup.add_argument("--largest-component", dest="largest_component", action="store_true", default=None,
                         help="keep only the largest connected component of each structure (the default of the "
                         "published whole_body_segmentation, as its model card does)")
    cleanup.add_argument("--no-largest-component", dest="largest_component", action="store_false",
                         help="keep every island of every structure (the raw arg-max labels)")
    segment.add_argument("--spacing", metavar="native|MM", help="the voxel size the model sees: 'native' (the "
                         "scan's own voxels, as the model card's snippet) or MM isotropic (default: the spacing the "
                         "model was trained at, 1.5 mm for whole_body_segmentation)")
    segment.add_argument("--volumes", type=Path, metavar="FILE.csv", help="write the per-structure volume table (mL)")
    segment.add_argument("--fp16", action="store_true", help="the same as --precision fp16 (a GPU; ignored on CPU)")
    segment.add_argument("--dicom-seg", type=Path, metavar="FILE.dcm", help="also write the result as DICOM-SEG "
                         "referencing the input series (INPUT must be a DICOM series folder)")
    segment.add_argument("--seg-encoding", default="binary", choices=("binary", "binary-j2k", "labelmap",
                         "labelmap-rle", "labelmap-jpegls"), help="DICOM-SEG encoding: binary (most compatible, "
                         "default), binary-j2k (BINARY, lossless JPEG 2000), labelmap (+rle/-jpegls: smallest)")
    segment.add_argument("--measurements-sr", type=Path, metavar="FILE.dcm", help="also write each structure's "
                         "volume (mL) and HU statistics (mean, SD, median, min, max, 5/25/75/95th percentiles, on the "
                         "input's grid) as a DICOM measurement report (TID 1500, Comprehensive 3D SR) referencing the "
                         "--dicom-seg's segments and the input series (needs --dicom-seg)")
    segment.add_argument("--measurements", type=Path, metavar="FILE.csv|FILE.json", help="write the same "
                         "measurements as a research table, CSV or JSON by the suffix (any input)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.pipelines.segmentation import SegmentationRequest, run_segmentation

    if not str(args.out).lower().endswith(LABEL_MAP_SUFFIXES):
        raise UsageError(f"--out {args.out}: write the label map as one of {', '.join(LABEL_MAP_SUFFIXES)}")
    if args.volumes is not None and args.volumes.suffix.lower() != ".csv":
        raise UsageError(f"--volumes {args.volumes}: the volume table is written as .csv")
    check_onnx_option(args)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.dicom_seg is not None and args.dicom_seg.suffix.lower() != ".dcm":
        raise UsageError(f"--dicom-seg {args.dicom_seg}: write the DICOM-SEG as a .dcm file")
    check_measurement_options(args)
    with progress_bar(args, "segmenting", "window") as progress:
        outcome = run_segmentation(SegmentationRequest(
            scan_source(args.input, args), weights=args.model, backend=args.backend, onnx_file=args.onnx,
            device=device(args), fp16=args.fp16, precision=args.precision,
            roi_size_zyx=None if args.roi is None else tuple(args.roi),
            overlap=args.overlap, batch_size=args.batch_size, largest_component=args.largest_component,
            spacing=args.spacing,
            needs_dicom=args.dicom_seg is not None, progress=progress))
    writers = [] if args.volumes is None else [(outcome.write_volume_table, args.volumes)]
    writers.append((outcome.write_labels, args.out))
    dicom_seg: dict[str, Any] = {}
    seg_info: list[Any] = []  # what the DICOM-SEG writer wrote, for the measurement SR that references it
    if args.dicom_seg is not None and outcome.labels.any():
        def write_dicom_seg(path: Path) -> Path:
            info = outcome.write_dicom_seg(path, args.seg_encoding)
            seg_info.append(info)
            dicom_seg.update({"path": str(path), "encoding": args.seg_encoding,
                              "sop_instance_uid": info.sop_instance_uid,
                              "series_instance_uid": info.series_instance_uid, "frames": info.frames,
                              "bytes": info.bytes})
            return path

        writers.append((write_dicom_seg, args.dicom_seg))
    elif args.dicom_seg is not None:
        log.warning("no structure found: no DICOM-SEG written (a DICOM-SEG needs at least one segment)")
    measurements_sr: dict[str, Any] = {}
    if args.measurements_sr is not None and outcome.labels.any():
        def write_measurements_sr(path: Path) -> Path:
            info = outcome.write_measurements_sr(path, seg_info[0])
            measurements_sr.update({"path": str(path), "sop_instance_uid": info.sop_instance_uid,
                                    "series_instance_uid": info.series_instance_uid,
                                    "structures": info.structures})
            return path

        writers.append((write_measurements_sr, args.measurements_sr))
    elif args.measurements_sr is not None:
        log.warning("no structure found: no measurement SR written (it measures the DICOM-SEG's segments)")
    if args.measurements is not None:
        writers.append((outcome.write_measurements, args.measurements))
    write_together(writers)
    return {
        "command": "segment",
        "input": str(args.input),
        "output": str(args.out),
        "volumes": None if args.volumes is None else str(args.volumes),
        "dicom_seg": dicom_seg or None,
        "measurements_sr": measurements_sr or None,
        "measurements": None if args.measurements is None else str(args.measurements),
        "weights": outcome.weights,
        "backend": outcome.backend,
        "device": outcome.device,
        "model": outcome.describe_model(),
        "largest_component": outcome.largest_component,
        "grid": {"size_xyz": list(outcome.volume.shape_zyx[::-1]),
                 "spacing_xyz_mm": list(outcome.volume.spacing_xyz_mm)},
        "seconds": round(outcome.seconds, 2),
        "labels": outcome.label_rows(),
    }


def check_measurement_options(args: argparse.Namespace) -> None:
    """UsageError for --measurements-sr without --dicom-seg, or either measurement file with the wrong suffix."""
    report = args.measurements_sr
    if report is not None and args.dicom_seg is None:
        raise UsageError(f"--measurements-sr {report}: the measurement report references the segments of a DICOM-SEG; "
                         f"add --dicom-seg FILE.dcm")
    if report is not None and report.suffix.lower() != ".dcm":
        raise UsageError(f"--measurements-sr {report}: write the measurement report as a .dcm file")
    if report is not None and report.resolve() == args.dicom_seg.resolve():
        raise UsageError(f"--measurements-sr {report}: the same file as --dicom-seg; give each its own file")
    from ctfm_engine.tasks.measure import TABLE_SUFFIXES

    if args.measurements is not None and args.measurements.suffix.lower() not in TABLE_SUFFIXES:
        raise UsageError(f"--measurements {args.measurements}: write the measurement table as .csv or .json")


def human_lines(document: dict[str, Any]) -> list[str]:
    lines = weights_lines(document)
    labels = document["labels"]
    for row in labels[:15]:
        side = f" ({row['laterality']})" if row.get("laterality") else ""
        lines.append(f"{row['value']:>4}  {row['name']:<34}{side:<9} {row['volume_ml']:>10.1f} mL")
    if len(labels) > 15:
        lines.append(f"      ... and {len(labels) - 15} more" + (
            f" (all in {document['volumes']})" if document["volumes"] else " (--volumes FILE.csv lists all)"))
    lines.append(f"{len(labels)} structures; label map on the input's grid -> {document['output']} "
                 f"({document['backend']}, {document['seconds']:.1f} s)")
    if document.get("dicom_seg"):
        seg = document["dicom_seg"]
        lines.append(f"DICOM-SEG ({seg['encoding']}, {seg['frames']} frames, {seg['bytes'] / 1e6:.2f} MB) -> "
                     f"{seg['path']}")
    if document.get("measurements_sr") or document.get("measurements"):
        report, table = document.get("measurements_sr"), document.get("measurements")
        written = [f"measurement SR of {report['structures']} structures -> {report['path']}"] if report else []
        lines.append("volumes and HU statistics: " + "; ".join([*written, *([f"table -> {table}"] if table else [])]))
    return lines
