"""The ``ctfm`` command: embed, segment, triage, export, weights, pretrain, finetune, demo.

Exit codes: 0 success, 2 usage error, 3 unacceptable input data, 4 model or weights problem, 1 anything else.
With ``--json`` one JSON document goes to stdout (also on failure: ``{"error": {...}}``); logs and progress
go to stderr.  Inputs are validated before any model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_engine import __version__
from ctfm_engine.errors import CTFMError, UsageError
from ctfm_engine.volume import CTVolume, read_volume

log = logging.getLogger("ctfm")

# Volumes read for validation are kept for the run below this many voxels in total, else read again.
KEEP_VALIDATED_VOXELS = 300_000_000


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cpu; training: the recipe's accelerator)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    return common


def _input_options() -> argparse.ArgumentParser:
    inputs = argparse.ArgumentParser(add_help=False)
    inputs.add_argument("--series", metavar="UID", help="the series to use when a DICOM folder holds several")
    inputs.add_argument(
        "--hu-offset",
        type=float,
        metavar="HU",
        help="add this to every voxel (e.g. -1024 for CT stored as HU+1024 without a rescale); "
        "for DICOM CT the offset is detected, and --hu-offset 0 turns that off",
    )
    return inputs


def build_parser() -> argparse.ArgumentParser:
    common, inputs = _common_options(), _input_options()
    parser = argparse.ArgumentParser(prog="ctfm", description="CT-FM, the CT foundation model, on your CT scans.")
    parser.add_argument("--version", action="version", version=f"ctfm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed", parents=[common, inputs], help="CT-FM embeddings of CT scans (512-d with the published weights)"
    )
    embed.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    embed.add_argument("--weights", help="checkpoint folder or hub repo id (default: CTFM_WEIGHTS, then the cache)")
    embed.add_argument("--level", choices=("scan", "patch"), default="scan", help="whole scan, or sliding patches")
    embed.add_argument("--out", type=Path, metavar="FILE.npz", help="write embeddings and provenance here")
    embed.add_argument("--aggregation", choices=("min", "mean", "max"), default="min", help="patch level (min)")
    embed.add_argument(
        "--patch-size", type=int, nargs=3, default=(24, 128, 128), metavar=("Z", "Y", "X"),
        help="patch size in model voxels at 3x1x1 mm (default 24 128 128, the 3D-MIR recipe)",
    )
    embed.add_argument("--overlap", type=float, default=0.625, help="patch overlap fraction (default 0.625)")
    embed.add_argument("--batch-size", type=int, default=4, help="patches per forward pass (default 4)")

    weights = commands.add_parser("weights", help="find, inspect and download CT-FM checkpoints")
    weight_commands = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    pull = weight_commands.add_parser("pull", parents=[common], help="download a hub repo into the cache")
    pull.add_argument("repo", help="hub repo id, e.g. project-lighter/ct_fm_feature_extractor")
    pull.add_argument("--revision", help="branch, tag or commit")
    weight_commands.add_parser("list", parents=[common], help="checkpoints in the cache")
    info = weight_commands.add_parser("info", parents=[common], help="config, size and sha256 of a checkpoint")
    info.add_argument("weights", nargs="?", help="folder or hub repo id (default: the one `embed` would use)")

    for name, text in (("pretrain", "self-supervised pre-training of the encoder from a recipe"),
                       ("finetune", "fine-tune a task model (segmentation, head-CT triage) from a recipe")):
        train = commands.add_parser(name, parents=[common], help=text)
        train.add_argument("--config", required=True, type=Path, help="recipe YAML (see training/)")
        train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a recipe key, e.g. --set trainer.max_epochs=2 (repeatable)")
        train.add_argument("--resume", metavar="CKPT", help="continue from a Lightning checkpoint (e.g. last.ckpt)")

    segment = commands.add_parser("segment", parents=[common, inputs],
                                  help="whole-body segmentation: a label map on the input's own grid")
    segment.add_argument("input", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    segment.add_argument("--out", required=True, type=Path, metavar="LABELMAP",
                         help="label map to write (.nii.gz, .nii, .nrrd or .mha), on the input's grid")
    segment.add_argument("--model", help="segmentation checkpoint folder, e.g. a local copy of "
                         "project-lighter/whole_body_segmentation (default: the shipped ctfm-mini-wholebody-seg)")
    segment.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="PyTorch eager (default) "
                         "or onnxruntime (CUDA/TensorRT providers when present, else CPU)")
    segment.add_argument("--onnx", type=Path, metavar="FILE.onnx",
                         help="with --backend onnx: the file `ctfm export` wrote (default: export to the cache)")
    segment.add_argument("--roi", type=int, nargs=3, metavar=("Z", "Y", "X"),
                         help="sliding-window size in model voxels (default: the checkpoint's)")
    segment.add_argument("--overlap", type=float,
                         help="window overlap fraction, 0 <= f < 1 (default: the checkpoint's)")
    segment.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    segment.add_argument("--largest-component", action="store_true",
                         help="keep only the largest connected component of each structure")
    segment.add_argument("--volumes", type=Path, metavar="FILE.csv", help="write the per-structure volume table (mL)")
    segment.add_argument("--fp16", action="store_true", help="half precision on a GPU (ignored on CPU)")

    triage = commands.add_parser("triage", parents=[common, inputs],
                                 help="head-CT triage: probability of an abnormal finding, and a decision")
    triage.add_argument("input", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder of a head CT")
    triage.add_argument("--model", help="triage checkpoint folder exported by `ctfm finetune` (default: "
                        "CTFM_TRIAGE_WEIGHTS, then <cache>/models/triage; none ships with ctfm)")
    triage.add_argument("--threshold", type=float, help="abnormal when probability >= this (default: the one "
                        "the checkpoint records, else 0.5)")
    triage.add_argument("--accept-partial", action="store_true", help="judge a head CT that covers less than a "
                        "whole head along S (refused by default: a normal call would not cover the missing part)")
    triage.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="PyTorch eager (default) "
                        "or onnxruntime (CUDA/TensorRT providers when present, else CPU)")
    triage.add_argument("--onnx", type=Path, metavar="FILE.onnx",
                        help="with --backend onnx: the file `ctfm export` wrote (default: export to the cache)")

    export = commands.add_parser("export", parents=[common, inputs],
                                 help="export a checkpoint to ONNX, validated against PyTorch on a real CT patch")
    export.add_argument("--model", required=True, help="checkpoint folder (encoder, segmentation or triage)")
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

    demo = commands.add_parser("demo", parents=[common], help="the main job end to end on the bundled sample CT")
    demo.add_argument("--out-dir", type=Path, default=Path("ctfm-demo"), help="where results go (ctfm-demo)")
    demo.add_argument("--weights", help="checkpoint folder or hub repo id (default: as for embed)")
    demo.add_argument("--seg-weights", help="segmentation checkpoint folder, e.g. a local copy of "
                      "project-lighter/whole_body_segmentation (default: the shipped ctfm-mini-wholebody-seg)")
    return parser


def _progress_bar(args: argparse.Namespace, description: str, unit: str, total: int | None = None) -> Any:
    """A tqdm bar on stderr, or None with --quiet."""
    if args.quiet:
        return None
    from tqdm import tqdm

    return tqdm(desc=description, unit=unit, total=total, file=sys.stderr, leave=False)


def read_inputs(paths: Sequence[str], args: argparse.Namespace) -> list[CTVolume | None]:
    """Read and validate every input before any model loads; keep the volumes when they fit in memory."""
    volumes: list[CTVolume | None] = []
    kept_voxels = 0
    for path in paths:
        volume = read_volume(path, series_uid=args.series, hu_offset=args.hu_offset)
        kept_voxels += volume.voxels.size
        volumes.append(volume if kept_voxels <= KEEP_VALIDATED_VOXELS else None)
    return volumes


def run_embed(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.models.registry import load_encoder
    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.embed import Embedder, PatchWindows, write_embeddings

    if args.out is not None and args.out.suffix != ".npz":
        raise UsageError(f"--out {args.out}: embeddings are written as .npz (numpy.load opens them)")
    try:
        windows = PatchWindows(tuple(args.patch_size), args.overlap)
    except ValueError as error:
        raise UsageError(f"--patch-size/--overlap: {error}") from None
    volumes = read_inputs(args.inputs, args)
    device = resolve_device(args.device or "cpu")
    encoder, checkpoint = load_encoder(args.weights)
    log.info("weights %s (sha256 %s) on %s", checkpoint.name, checkpoint.sha256[:12], device)
    embedder = Embedder(encoder, device)
    results = []
    scans = _progress_bar(args, "embedding", "scan", total=len(args.inputs)) if len(args.inputs) > 1 else None
    for path, volume in zip(args.inputs, volumes, strict=True):
        volume = volume or read_volume(path, series_uid=args.series, hu_offset=args.hu_offset)
        patches = _progress_bar(args, Path(path).name, "patch") if args.level == "patch" else None
        results.append(
            embedder.embed(volume, args.level, windows=windows, aggregation=args.aggregation,
                           batch_size=args.batch_size, progress=None if patches is None else _tqdm_progress(patches))
        )
        if patches is not None:
            patches.close()
        if scans is not None:
            scans.update(1)
    if scans is not None:
        scans.close()
    if args.out is not None:
        write_embeddings(results, args.out, weights=checkpoint.identity, preprocessing=embedder.preprocessing)
    return {
        "command": "embed",
        "weights": checkpoint.identity,
        "device": str(device),
        "level": args.level,
        "aggregation": args.aggregation if args.level == "patch" else None,
        "preprocessing": embedder.preprocessing.describe(),
        "output": None if args.out is None else str(args.out),
        "results": [
            {
                "input": item.input,
                "series_instance_uid": item.series_instance_uid,
                "embedding": [float(value) for value in item.vector],
                "model_shape_zyx": list(item.model_shape_zyx),
                "patches": None if item.patch_vectors is None else len(item.patch_vectors),
            }
            for item in results
        ],
    }


LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def run_segment(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from ctfm_engine.models.registry import bundled_weights
    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.segment import check_window, open_segmentation_model, segment, write_volume_table

    if not str(args.out).lower().endswith(LABEL_MAP_SUFFIXES):
        raise UsageError(f"--out {args.out}: write the label map as one of {', '.join(LABEL_MAP_SUFFIXES)}")
    if args.volumes is not None and args.volumes.suffix.lower() != ".csv":
        raise UsageError(f"--volumes {args.volumes}: the volume table is written as .csv")
    if args.onnx is not None and args.backend != "onnx":
        raise UsageError("--onnx FILE goes with --backend onnx")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.roi is not None or args.overlap is not None:
        check_window(args.roi or (16, 16, 16), 0.0 if args.overlap is None else args.overlap)
    (volume,) = read_inputs([args.input], args)
    volume = volume or read_volume(args.input, series_uid=args.series, hu_offset=args.hu_offset)
    device = resolve_device(args.device or "cpu")
    weights = args.model or bundled_weights("ctfm-mini-wholebody-seg")
    if weights is None:
        from ctfm_engine.errors import ModelError

        raise ModelError("no segmentation model: pass --model with a checkpoint folder (e.g. a local copy of "
                         "project-lighter/whole_body_segmentation)")
    model = open_segmentation_model(weights)
    roi = tuple(args.roi) if args.roi is not None else model.roi_size_zyx
    overlap = model.overlap if args.overlap is None else args.overlap
    backend, head = _segmentation_backend(args, model, volume, device, roi)
    log.info("segmentation model %s (sha256 %s), %s, windows %s overlap %.3g", model.checkpoint.name,
             model.checkpoint.sha256[:12], backend.name, "x".join(map(str, roi)), overlap)
    bar = _progress_bar(args, "segmenting", "window")
    started = time.perf_counter()
    try:
        result = segment(volume, preprocessing=model.preprocessing, roi_size_zyx=roi, overlap=overlap,
                         backend=backend, head=head, batch_size=args.batch_size,
                         largest_component=args.largest_component,
                         progress=None if bar is None else _tqdm_progress(bar))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    structures = result.structures(model.names)
    table = model.labels()
    written: list[Path] = []
    try:
        if args.volumes is not None:
            written.append(write_volume_table(structures, table, args.volumes))
        written.append(result.write(args.out))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    labels = []
    for row in structures:
        described = table[row["label"]].as_dict() if row["label"] in table else {"value": row["label"]}
        labels.append({**described, "name": row["name"], "voxels": row["voxels"], "volume_ml": row["volume_ml"],
                       "removed_voxels": result.removed_voxels.get(row["label"], 0)})
    return {
        "command": "segment",
        "input": str(args.input),
        "output": str(args.out),
        "volumes": None if args.volumes is None else str(args.volumes),
        "weights": model.checkpoint.identity,
        "backend": backend.name,
        "device": str(device),
        "model": {**model.describe(), "roi_size_zyx": list(roi), "overlap": overlap},
        "largest_component": args.largest_component,
        "grid": {"size_xyz": list(volume.shape_zyx[::-1]), "spacing_xyz_mm": list(volume.spacing_xyz_mm)},
        "seconds": round(seconds, 2),
        "labels": labels,
    }


def _segmentation_backend(args: argparse.Namespace, model: Any, volume: CTVolume, device: Any, roi: Any) -> Any:
    """(backend, head): the backend runs the network's trunk and the 1x1x1 head is applied after blending, unless
    an ``--onnx`` file exported with full logits (task ``segmentation``) is given."""
    from ctfm_engine.runtime.backends import OnnxBackend, TorchBackend
    from ctfm_engine.tasks.segment import feature_head, inference_network

    module, head = inference_network(model.network)
    if args.backend == "torch":
        return TorchBackend(module, device, fp16=args.fp16), head
    from ctfm_engine.runtime.onnx_backend import TASK_KEY, read_export_metadata
    from ctfm_engine.runtime.onnx_export import onnx_for, validation_sample

    task = "segmentation-trunk" if head is not None else "segmentation"
    if args.onnx is not None:
        task = read_export_metadata(args.onnx).get(TASK_KEY, "segmentation")
        head = feature_head(model.network) if task == "segmentation-trunk" else None
        path = args.onnx
    else:
        sample = validation_sample(volume, task, model.preprocessing, roi)
        path = onnx_for(model.checkpoint, task, model.network, sample)  # the trunk is cut out by the exporter
    channels = int(model.checkpoint.config.get("in_channels", 1))
    backend = OnnxBackend.open(path, model.checkpoint, task, device, fp16=args.fp16,
                               batch_shape=(args.batch_size, channels, *roi))
    return backend, head


def run_triage(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.triage import (
        check_threshold,
        decision_threshold,
        load_triage_model,
        require_head_ct,
        resolve_triage_weights,
        triage,
        triage_input,
    )

    if args.onnx is not None and args.backend != "onnx":
        raise UsageError("--onnx FILE goes with --backend onnx")
    if args.threshold is not None:
        try:
            check_threshold(args.threshold)
        except ValueError:
            raise UsageError(f"--threshold {args.threshold}: give a probability between 0 and 1") from None
    (volume,) = read_inputs([args.input], args)
    volume = volume or read_volume(args.input, series_uid=args.series, hu_offset=args.hu_offset)
    screened = require_head_ct(volume, accept_partial=args.accept_partial)
    device = resolve_device(args.device or "cpu")
    network, checkpoint = load_triage_model(resolve_triage_weights(args.model))
    threshold, threshold_source = decision_threshold(network, args.threshold)
    started = time.perf_counter()
    model_input = triage_input(volume, network.preprocessing, screened=screened)
    for note in model_input.checks.notes:
        log.warning("%s: %s", args.input, note)
    backend = _triage_backend(args, network, checkpoint, model_input, device)
    log.info("triage model %s (sha256 %s), %s", checkpoint.name, checkpoint.sha256[:12], backend.name)
    result = triage(volume, backend, network.preprocessing, threshold, model_input=model_input,
                    accept_partial=args.accept_partial)
    return {
        "command": "triage",
        "input": str(args.input),
        "series_instance_uid": result.series_instance_uid,
        "probability": result.probability,
        "logit": result.logit,
        "decision": result.decision,
        "threshold": result.threshold,
        "threshold_source": threshold_source,
        "checks": result.checks,
        "weights": checkpoint.identity,
        "backend": backend.name,
        "device": str(device),
        "preprocessing": network.preprocessing.describe(),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _triage_backend(args: argparse.Namespace, network: Any, checkpoint: Any, model_input: Any, device: Any) -> Any:
    """PyTorch, or onnxruntime on ``--onnx FILE`` or on the cached export (made and validated on this scan)."""
    import torch

    from ctfm_engine.runtime.backends import OnnxBackend, TorchBackend

    if args.backend == "torch":
        return TorchBackend(network, device)
    from ctfm_engine.runtime.onnx_export import onnx_for

    sample = torch.from_numpy(model_input.image)[None, None]
    path = args.onnx or onnx_for(checkpoint, "triage", network, sample)
    return OnnxBackend.open(path, checkpoint, "triage", device, batch_shape=tuple(sample.shape))


BUNDLED_SAMPLE_CT = Path(__file__).resolve().parent / "data" / "sample_ct.nii.gz"
ENCODER_CHECK_WINDOW = (32, 128, 128)


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    import math

    from ctfm_engine.models.checkpoint import read_checkpoint
    from ctfm_engine.models.registry import resolve_weights
    from ctfm_engine.runtime.onnx_backend import onnx_modules
    from ctfm_engine.runtime.onnx_export import (
        DEFAULT_TOLERANCE,
        OPSET,
        cached_onnx_path,
        checkpoint_task,
        export_onnx,
        validation_sample,
    )
    from ctfm_engine.tasks.segment import check_window

    onnx_modules()
    if args.out is not None and args.out.suffix.lower() != ".onnx":
        raise UsageError(f"--out {args.out}: an ONNX export is written as .onnx")
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise UsageError(f"--tolerance {args.tolerance}: must be a positive number (default {DEFAULT_TOLERANCE:g})")
    if args.roi is not None:
        if args.task == "triage":
            raise UsageError("--roi: a triage model is validated on its own fixed input size; leave --roi out")
        check_window(args.roi, 0.0)
    check_input = args.check_input or BUNDLED_SAMPLE_CT
    volume = read_volume(check_input, series_uid=args.series, hu_offset=args.hu_offset)
    if args.device not in (None, "cpu"):
        log.info("the export and its validation run on the CPU; the ONNX file then runs on any device")
    checkpoint = read_checkpoint(resolve_weights(args.model))
    task = checkpoint_task(checkpoint) if args.task == "auto" else args.task
    if task == "triage" and args.roi is not None:
        raise UsageError(f"--roi: {checkpoint.name} is a triage model, validated on its own fixed input size; "
                         "leave --roi out")
    network, checkpoint, preprocessing, roi = _network_to_export(checkpoint, task)
    sample = validation_sample(volume, task, preprocessing, None if task == "triage" else tuple(args.roi or roi))
    out = args.out or cached_onnx_path(checkpoint, task)
    report = export_onnx(network, checkpoint, task, out, sample, tolerance)
    return {
        "command": "export",
        "weights": checkpoint.identity,
        "output": str(out),
        "task": task,
        "max_abs_difference": report.max_abs_difference,
        "label_agreement": report.label_agreement,
        "tolerance": tolerance,
        "check_input": str(check_input),
        "sample_shape": list(report.sample_shape),
        "out_channels": report.out_channels,
        "opset": OPSET,
        "bytes": out.stat().st_size,
        "seconds": {"export": report.export_seconds, "torch": report.torch_seconds,
                    "onnxruntime": report.onnxruntime_seconds},
    }


def _network_to_export(checkpoint: Any, task: str) -> tuple[Any, Any, Any, tuple[int, int, int] | None]:
    """The network of ``checkpoint`` for ``task``, the checkpoint, its preprocessing and validation window."""
    from ctfm_engine.errors import ModelError
    from ctfm_engine.models.checkpoint import CONFIG_FILE, load_state_strict

    if task in ("segmentation", "segmentation-trunk"):
        from ctfm_engine.tasks.segment import open_segmentation_model

        model = open_segmentation_model(checkpoint.folder)
        return model.network, model.checkpoint, model.preprocessing, model.roi_size_zyx
    if task == "encoder":
        from ctfm_engine.models.registry import load_encoder
        from ctfm_engine.preprocess import CTFM_PREPROCESSING

        encoder, checkpoint = load_encoder(checkpoint.folder)
        return encoder, checkpoint, CTFM_PREPROCESSING, ENCODER_CHECK_WINDOW
    from ctfm_engine.models.triage import TriageClassifier

    try:
        network = TriageClassifier(**checkpoint.config)
    except (TypeError, ValueError) as error:
        raise ModelError(f"{checkpoint.folder / CONFIG_FILE}: not a triage classifier configuration "
                         f"({error})") from None
    load_state_strict(network, checkpoint.state_dict, str(checkpoint.folder))
    return network.eval(), checkpoint, network.preprocessing, None


def _tqdm_progress(bar: Any) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update


def run_weights(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.models import registry
    from ctfm_engine.models.checkpoint import read_checkpoint

    if args.weights_command == "pull":
        folder = registry.pull_weights(args.repo, args.revision)
        checkpoint = read_checkpoint(folder)
        return {"command": "weights pull", "folder": str(folder), "weights": checkpoint.identity}
    if args.weights_command == "list":
        models = registry.cache_dir() / "models"
        found = sorted(p for p in models.iterdir() if (p / "config.json").is_file()) if models.is_dir() else []
        return {"command": "weights list", "cache": str(models), "folders": [str(p) for p in found]}
    checkpoint = read_checkpoint(registry.resolve_weights(args.weights))
    parameters = sum(int(np.prod(tensor.shape)) for tensor in checkpoint.state_dict.values())
    return {
        "command": "weights info",
        "folder": str(checkpoint.folder),
        "weights": checkpoint.identity,
        "config": checkpoint.config,
        "tensors": len(checkpoint.state_dict),
        "values": parameters,
    }


def _print_human(document: dict[str, Any]) -> None:
    command = document["command"]
    if command != "demo" and isinstance(document.get("weights"), dict):
        print(f"weights: {document['weights']['name']} (sha256 {document['weights']['sha256']})")
    if command == "embed":
        for item in document["results"]:
            vector = np.asarray(item["embedding"])
            print(f"{item['input']}: {vector.size}-d embedding, norm {np.linalg.norm(vector):.3f}, "
                  f"model space {'x'.join(map(str, item['model_shape_zyx']))} (z,y,x at 3x1x1 mm)"
                  + (f", {item['patches']} patches" if item["patches"] else ""))
        if document["output"]:
            print(f"wrote {document['output']}")
    elif command == "weights list":
        print("\n".join(document["folders"]) or f"no checkpoints in {document['cache']}")
    elif command == "segment":
        for row in document["labels"][:15]:
            side = f" ({row['laterality']})" if row.get("laterality") else ""
            print(f"{row['value']:>4}  {row['name']:<34}{side:<9} {row['volume_ml']:>10.1f} mL")
        if len(document["labels"]) > 15:
            print(f"      ... and {len(document['labels']) - 15} more" + (
                f" (all in {document['volumes']})" if document["volumes"] else " (--volumes FILE.csv lists all)"))
        print(f"{len(document['labels'])} structures; label map on the input's grid -> {document['output']} "
              f"({document['backend']}, {document['seconds']:.1f} s)")
    elif command == "triage":
        checks = document["checks"]
        print(f"{document['input']}: {document['decision'].upper()}, probability of an abnormal finding "
              f"{document['probability']:.3f} (threshold {document['threshold']:g}, {document['threshold_source']}; "
              f"{document['backend']})")
        print("head check: cranium over {:.0f} mm along S, {:.0f} mm wide inside; scan covers {:.0f} x {:.0f} x "
              "{:.0f} mm (S, P, L)".format(checks["skull_extent_mm"], checks["cranial_width_mm"],
                                           *checks["coverage_mm"]))
        for note in checks["notes"]:
            print(f"note: {note}")
    elif command == "export":
        agreement = document["label_agreement"]
        print(f"{document['task']} network -> {document['output']} ({document['bytes'] / 1e6:.1f} MB): "
              f"max |PyTorch - onnxruntime| {document['max_abs_difference']:.2g} (tolerance "
              f"{document['tolerance']:g})" + ("" if agreement is None else
                                                 f", labels agree on {100 * agreement:.3f} % of voxels"))
    elif command == "demo":
        print("\n".join(document["summary"]))
    else:
        print(json.dumps({k: v for k, v in document.items() if k != "command"}, indent=2))


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.training.recipe import run_recipe

    accelerator = None if args.device is None else {"cpu": "cpu", "auto": "auto"}.get(args.device, "gpu")
    # Lightning draws progress and summaries on stdout, which belongs to the --json document.
    with contextlib.redirect_stdout(sys.stderr):
        return run_recipe(args.command, args.config, args.set, resume=args.resume,
                          accelerator=accelerator, quiet=args.quiet)


def run_demo_command(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.demo import run_demo

    return run_demo(args.out_dir, weights=args.weights, seg_weights=args.seg_weights,
                    device_name=args.device or "cpu", quiet=args.quiet)


# Subcommand -> the function that runs it and returns the --json document.
RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "embed": run_embed,
    "weights": run_weights,
    "segment": run_segment,
    "triage": run_triage,
    "export": run_export,
    "pretrain": run_training,
    "finetune": run_training,
    "demo": run_demo_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO,
        format="ctfm: %(message)s",
        stream=sys.stderr,
    )
    try:
        document = RUNNERS[args.command](args)
    except CTFMError as error:
        return _fail(args, error.exit_code, str(error))
    except KeyboardInterrupt:
        return _fail(args, 130, "interrupted; no partial output was left behind")
    except Exception as error:  # a bug, not a user error: say so in one line, the traceback with -v
        log.debug("traceback", exc_info=True)
        return _fail(args, 1, f"unexpected {type(error).__name__}: {error} (run with -v for the traceback)")
    if args.json:
        print(json.dumps(document))
    else:
        _print_human(document)
    return 0


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    print(f"ctfm: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": {"exit_code": code, "message": message}}))
    return code


if __name__ == "__main__":
    sys.exit(main())
