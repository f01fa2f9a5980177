"""The ``ctfm`` command: embed, segment, triage, export, search, ocd, index, saliency, concept-map, dicom, pacs,
weights, pretrain, finetune, demo.

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
from ctfm_engine.dicom.pacs_cli import add_pacs_parser, run_pacs
from ctfm_engine.errors import CTFMError, UsageError
from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume

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
    search.add_argument("--weights", help="encoder checkpoint folder or hub repo id (default: as for embed)")
    search.add_argument("--no-cache", action="store_true",
                        help="fast method: do not read or write feature maps in the cache folder")
    search.add_argument("--batch-size", type=int, default=8, help="exact method: windows per forward pass (8)")

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
    ocd.add_argument("--weights", help="encoder checkpoint folder or hub repo id (default: as for embed)")

    weights = commands.add_parser("weights", help="find, inspect and download CT-FM checkpoints")
    weight_commands = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    pull = weight_commands.add_parser("pull", parents=[common], help="download a hub repo into the cache")
    pull.add_argument("repo", help="hub repo id, e.g. project-lighter/ct_fm_feature_extractor")
    pull.add_argument("--revision", help="branch, tag or commit")
    weight_commands.add_parser("list", parents=[common], help="checkpoints in the cache")
    info = weight_commands.add_parser("info", parents=[common], help="config, size and sha256 of a checkpoint")
    info.add_argument("weights", nargs="?", help="folder or hub repo id (default: the one `embed` would use)")

    _add_index_parser(commands, common, inputs)
    dicom = commands.add_parser("dicom", parents=[common], help="list the series of a DICOM folder (any number of "
                                "studies) and which one the selection rules pick, with why the others are skipped")
    dicom.add_argument("folder", metavar="FOLDER", type=Path)
    dicom.add_argument("--rules", type=Path, metavar="FILE.json", help="selection rules (default: CT, axial, "
                       "ORIGINAL, no localisers, >= 10 slices; the keys of deploy_app/selection_rules.json)")
    add_pacs_parser(commands, common)

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
    segment.add_argument("--dicom-seg", type=Path, metavar="FILE.dcm", help="also write the result as DICOM-SEG "
                         "referencing the input series (INPUT must be a DICOM series folder)")
    segment.add_argument("--seg-encoding", default="binary", choices=("binary", "binary-j2k", "labelmap",
                         "labelmap-rle", "labelmap-jpegls"), help="DICOM-SEG encoding: binary (most compatible, "
                         "default), binary-j2k (BINARY, lossless JPEG 2000), labelmap (+rle/-jpegls: smallest)")

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

    saliency = commands.add_parser("saliency", parents=[common, inputs],
                                   help="occlusion saliency (OFD): where the CT-FM embedding of a CT comes from")
    saliency.add_argument("input", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    saliency.add_argument("--out-dir", required=True, type=Path, metavar="DIR",
                          help="writes <input>_saliency.nii.gz (on the input's grid) and <input>_saliency.png")
    saliency.add_argument("--weights", help="checkpoint folder or hub repo id (default: as for embed)")
    saliency.add_argument("--mask-size", type=int, default=10, metavar="N",
                          help="occlusion cube edge in voxels at 3 mm (default 10 = 30 mm, the paper's script)")
    saliency.add_argument("--overlap", type=float, default=0.25, help="occlusion overlap fraction (default 0.25)")
    saliency.add_argument("--batch-size", type=int, default=12, help="occluded volumes per forward pass (12)")
    saliency.add_argument("--smooth-mm", type=float, default=12.0, metavar="MM",
                          help="3-D Gaussian sigma applied to the map (default 12 mm; 0: none)")
    saliency.add_argument("--occlusion", choices=("gaussian", "zero"), default="gaussian",
                          help="gaussian: darken the box towards its centre (MONAI's, the paper's); zero: fill the "
                          "box with air (-1024 HU)")

    concept = commands.add_parser("concept-map", parents=[common, inputs],
                                  help="PCA concept map: CT-FM features of one or more CTs as colours (one joint PCA)")
    concept.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    concept.add_argument("--out-dir", required=True, type=Path, metavar="DIR",
                         help="writes <input>_concept_map.nrrd (RGB on the input's grid) and .png per input")
    concept.add_argument("--weights", help="checkpoint folder or hub repo id (default: as for embed)")

    demo = commands.add_parser("demo", parents=[common], help="the main job end to end on the bundled sample CT")
    demo.add_argument("--out-dir", type=Path, default=Path("ctfm-demo"), help="where results go (ctfm-demo)")
    demo.add_argument("--weights", help="checkpoint folder or hub repo id (default: as for embed)")
    demo.add_argument("--seg-weights", help="segmentation checkpoint folder, e.g. a local copy of "
                      "project-lighter/whole_body_segmentation (default: the shipped ctfm-mini-wholebody-seg)")
    return parser


def _add_index_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    index = commands.add_parser("index", help="scan retrieval: an index of CT-FM scan embeddings searched by cosine "
                                "similarity (exact, or FAISS HNSW/IVF for large archives)")
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    kinds = ("exact", "hnsw", "ivf")
    embedding = argparse.ArgumentParser(add_help=False)
    embedding.add_argument("index", type=Path, metavar="INDEX", help="index folder (created by the first batch)")
    embedding.add_argument("--weights", help="checkpoint folder or hub repo id (default: CTFM_WEIGHTS, then the "
                           "weights that built the index, then the cache)")
    embedding.add_argument("--kind", choices=kinds, help="how queries search: exact (default for a new index), or "
                           "FAISS hnsw / ivf, built and stored beside the vectors")
    embedding.add_argument("--level", choices=("scan", "patch"), help="scan (default for a new index) or sliding "
                           "patches aggregated per scan; an existing index keeps its own")
    embedding.add_argument("--aggregation", choices=("min", "mean", "max"), help="patch level: how patches combine "
                           "(default min, the 3D-MIR recipe)")
    embedding.add_argument("--batch-size", type=int, default=8, metavar="N",
                           help="scans per committed batch (and per Ray task); an interrupted run loses at most one")

    build = actions.add_parser("build", parents=[common, embedding], help="embed the scans of a manifest into "
                               "INDEX, resuming where an interrupted run stopped")
    build.add_argument("--manifest", required=True, type=Path, metavar="FILE.csv|txt", help="one NIfTI/NRRD/MHA "
                       "file or DICOM series folder a line, or a CSV with a 'path' column (optional 'id', "
                       "'series_instance_uid'); relative paths are relative to the manifest")
    build.add_argument("--hu-offset", type=float, metavar="HU", help="add this to every voxel of every scan (as for "
                       "`ctfm embed`)")
    build.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: here, one scan after another; ray: Ray Data actors "
                       "(pip install 'ctfm-engine[ray]')")
    build.add_argument("--ray-address", default="", metavar="ADDR", help="with --engine ray: empty starts a Ray "
                       "cluster on this machine; 'auto' or ray://HOST:10001 joins a running one")
    build.add_argument("--workers", type=int, metavar="N", help="with --engine ray: embedding actors (default: as "
                       "many as the cluster's CPUs, or GPUs with --device cuda, hold)")
    build.add_argument("--cpus-per-worker", type=int, default=1, metavar="N",
                       help="with --engine ray: CPU threads per actor (default 1); --device cuda gives each one GPU")

    add = actions.add_parser("add", parents=[common, inputs, embedding], help="embed scans into INDEX")
    add.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder "
                     "(its id in the index: the path as given)")

    remove = actions.add_parser("remove", parents=[common], help="remove entries from INDEX by id")
    remove.add_argument("index", type=Path, metavar="INDEX", help="index folder")
    remove.add_argument("ids", nargs="+", metavar="ID", help="ids of the entries to remove")

    query = actions.add_parser("query", parents=[common, inputs], help="the scans of INDEX most similar to a scan")
    query.add_argument("index", type=Path, metavar="INDEX", help="index folder")
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--scan", metavar="INPUT", help="a CT (NIfTI/NRRD/MHA file or DICOM series folder), embedded "
                      "with the index's weights and recipe")
    what.add_argument("--id", help="an entry of the index (itself left out of the matches)")
    what.add_argument("--embedding", type=Path, metavar="FILE.npz", help="an embedding from `ctfm embed --out`")
    query.add_argument("--row", type=int, default=0, help="with --embedding: which row of the file (default 0)")
    query.add_argument("--top-k", type=int, default=10, metavar="K", help="matches to return (default 10)")
    query.add_argument("--kind", choices=kinds, help="search method (default: the index's)")
    query.add_argument("--weights", help="with --scan: checkpoint folder (default: CTFM_WEIGHTS, then the weights "
                       "that built the index, then the cache)")

    info = actions.add_parser("info", parents=[common], help="size, provenance and search structures of INDEX")
    info.add_argument("index", type=Path, metavar="INDEX", help="index folder")


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


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.models.registry import cache_dir, load_encoder
    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.search import (
        FeatureCache,
        SearchSettings,
        SemanticSearch,
        check_point_inside,
        heatmap_stem,
        write_heatmap,
        write_search_figure,
    )

    settings = SearchSettings(tuple(args.patch_mm), args.overlap, args.top_k, batch_size=args.batch_size)
    if args.heatmap_dir is not None and args.heatmap_dir.exists() and not args.heatmap_dir.is_dir():
        raise UsageError(f"--heatmap-dir {args.heatmap_dir}: exists and is not a folder")
    source = read_volume(args.source, series_uid=args.series, hu_offset=args.hu_offset)
    check_point_inside(source, args.point)
    targets = read_inputs(args.target, args)
    device = resolve_device(args.device or "cpu")
    encoder, checkpoint = load_encoder(args.weights)
    log.info("weights %s (sha256 %s) on %s, method %s", checkpoint.name, checkpoint.sha256[:12], device, args.method)
    cache = FeatureCache(None if args.no_cache else cache_dir() / "features")
    searcher = SemanticSearch(encoder, checkpoint.sha256, device=device, settings=settings, cache=cache)
    targets = [volume or read_volume(path, series_uid=args.series, hu_offset=args.hu_offset)
               for path, volume in zip(args.target, targets, strict=True)]
    bar = _progress_bar(args, "searching", "step", total=len(targets) + 1)
    try:
        result = searcher.search(source, args.point, targets, method=args.method,
                                 heatmaps=args.heatmap_dir is not None,
                                 progress=None if bar is None else _tqdm_progress(bar))
    finally:
        if bar is not None:
            bar.close()
    for note in result.notes:
        log.warning("%s", note)
    written: list[tuple[str | None, str | None]] = []
    for index, target in enumerate(result.targets):
        if args.heatmap_dir is None:
            written.append((None, None))
            continue
        stem = heatmap_stem(index, target.input)
        heatmap = write_heatmap(target, args.heatmap_dir / f"{stem}_similarity.nii.gz")
        figure = write_search_figure(source, result, index, targets[index], args.heatmap_dir / f"{stem}_search.png",
                                     weights_name=checkpoint.name)
        written.append((str(heatmap), str(figure)))
    return {
        "command": "search",
        "weights": checkpoint.identity,
        "device": str(device),
        "method": result.method,
        "settings": settings.describe(),
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


def run_ocd(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.labels import totalsegmentator_names
    from ctfm_engine.models.registry import load_encoder
    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.ocd import organ_centroid_distances, read_label_map, write_ocd_figure
    from ctfm_engine.tasks.search import FeatureCache, SearchSettings, SemanticSearch
    from ctfm_engine.training.metrics import ocd_summary

    settings = SearchSettings(tuple(args.patch_mm), args.overlap, top_k=1)
    if args.figure is not None and args.figure.suffix.lower() != ".png":
        raise UsageError(f"--figure {args.figure}: the figure is written as PNG")
    source = read_volume(args.source, series_uid=args.series, hu_offset=args.hu_offset)
    target = read_volume(args.target, series_uid=args.series, hu_offset=args.hu_offset)
    source_labels = read_label_map(args.source_labels, source)
    target_labels = read_label_map(args.target_labels, target)
    device = resolve_device(args.device or "cpu")
    encoder, checkpoint = load_encoder(args.weights)
    searcher = SemanticSearch(encoder, checkpoint.sha256, device=device, settings=settings, cache=FeatureCache())
    bar = _progress_bar(args, "structures", "structure")
    try:
        results = organ_centroid_distances(
            searcher, source, source_labels, target, target_labels, names=totalsegmentator_names(),
            organs=args.organs, minimum_voxels=args.min_voxels, method=args.method,
            progress=None if bar is None else _tqdm_progress(bar))
    finally:
        if bar is not None:
            bar.close()
    summary = ocd_summary(results)
    figure = None
    if args.figure is not None:
        title = (f"{output_stem(args.source)} -> {output_stem(args.target)}, {args.method} search "
                 f"[{checkpoint.name}; not for clinical use]")
        figure = str(write_ocd_figure(results, summary, args.figure, title))
    return {
        "command": "ocd",
        "weights": checkpoint.identity,
        "device": str(device),
        "method": args.method,
        "settings": settings.describe(),
        "source": args.source,
        "target": args.target,
        "structures": [vars(result) | {"query_lps": list(result.query_lps), "match_lps": list(result.match_lps),
                                       "centroid_lps": list(result.centroid_lps)} for result in results],
        "summary": summary,
        "figure": figure,
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
    if args.dicom_seg is not None and args.dicom_seg.suffix.lower() != ".dcm":
        raise UsageError(f"--dicom-seg {args.dicom_seg}: write the DICOM-SEG as a .dcm file")
    (volume,) = read_inputs([args.input], args)
    volume = volume or read_volume(args.input, series_uid=args.series, hu_offset=args.hu_offset)
    if args.dicom_seg is not None and not volume.dicom.get("files"):
        from ctfm_engine.errors import InputError

        raise InputError(f"{args.input}: --dicom-seg needs the DICOM series it describes, and this input is an image "
                         f"file; give the series folder")
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
        if args.dicom_seg is not None and result.labels.any():
            from ctfm_engine.dicom.seg import Algorithm, SegEncoding, write_dicom_seg
            from ctfm_engine.labels import label_table

            algorithm = Algorithm(name=model.checkpoint.name, version=__version__,
                                  weights_sha256=model.checkpoint.sha256)
            seg_info = write_dicom_seg(result.labels, volume, label_table(model.names), args.dicom_seg,
                                       algorithm=algorithm, encoding=SegEncoding(args.seg_encoding))
            written.append(args.dicom_seg)
        elif args.dicom_seg is not None:
            log.warning("no structure found: no DICOM-SEG written (a DICOM-SEG needs at least one segment)")
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
        "dicom_seg": None if args.dicom_seg is None or not result.labels.any() else {
            "path": str(args.dicom_seg), "encoding": args.seg_encoding, "sop_instance_uid": seg_info.sop_instance_uid,
            "series_instance_uid": seg_info.series_instance_uid, "frames": seg_info.frames,
            "bytes": seg_info.bytes},
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
    from ctfm_engine.models.segmentation import feature_head, inference_network
    from ctfm_engine.runtime.backends import OnnxBackend, TorchBackend

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
    if command.startswith("pacs "):
        from ctfm_engine.dicom.pacs_cli import human_lines

        print("\n".join(human_lines(document)))
    elif command == "dicom":
        chosen = document.get("chosen")
        for row in document["series"]:
            mark = "*" if chosen and row["series_id"] == chosen["series_id"] else " "
            print(f"{mark} {row['series_id']}  {row['modality']:<3} {row['instances']:>4} images  "
                  f"{row.get('description') or ''!s:<28} {row.get('reason') or ''}")
        print("* = the series the MONAI Deploy app would process (other commands: pass its id to --series)"
              if chosen else "no series meets the rules")
    elif command == "embed":
        for item in document["results"]:
            vector = np.asarray(item["embedding"])
            print(f"{item['input']}: {vector.size}-d embedding, norm {np.linalg.norm(vector):.3f}, "
                  f"model space {'x'.join(map(str, item['model_shape_zyx']))} (z,y,x at 3x1x1 mm)"
                  + (f", {item['patches']} patches" if item["patches"] else ""))
        if document["output"]:
            print(f"wrote {document['output']}")
    elif command == "search":
        query = document["query"]
        print("query: ({:.1f}, {:.1f}, {:.1f}) LPS mm in {} ({} method)".format(*query["point_lps"], query["source"],
                                                                          document["method"]))
        for target in document["targets"]:
            state = "cached features" if target["cached"] else f"{target['windows']} windows"
            print(f"{target['input']}: {state}, {target['seconds']:.2f} s" + (" (flat map)" if target["flat"] else ""))
            for rank, match in enumerate(target["matches"], 1):
                print("  {}. ({:.1f}, {:.1f}, {:.1f}) LPS mm  similarity {:.3f}".format(
                    rank, *match["point_lps"], match["similarity"]))
            if target["heatmap"]:
                print(f"  heatmap {target['heatmap']}; figure {target['figure']}")
    elif command == "ocd":
        print(f"{document['source']} -> {document['target']} ({document['method']} method)")
        for row in sorted(document["structures"], key=lambda row: row["distance_mm"]):
            print(f"  {row['name']:<32} {row['distance_mm']:7.1f} mm  {'inside' if row['hit'] else 'elsewhere':<9}"
                  f"  similarity {row['similarity']:.3f}")
        summary = document["summary"]
        distance = summary["distance_mm"]
        print(f"OCD mean {distance['value']:.1f} mm (95% CI {distance['low']:.1f}-{distance['high']:.1f}), median "
              f"{summary['distance_median_mm']:.1f} mm; inside the structure {summary['inside_organ_count']}/"
              f"{summary['pairs']}" + (f"; figure {document['figure']}" if document["figure"] else ""))
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
        if document.get("dicom_seg"):
            seg = document["dicom_seg"]
            print(f"DICOM-SEG ({seg['encoding']}, {seg['frames']} frames, {seg['bytes'] / 1e6:.2f} MB) -> "
                  f"{seg['path']}")
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
    elif command == "saliency":
        x, y, z = document["most_salient_lps"]
        print(f"{document['input']}: saliency from {document['occlusions']} occlusions ({document['occlusion']}) of "
              f"{'x'.join(map(str, document['mask_size_zyx']))} voxels (overlap {document['overlap']:g}); max "
              f"{document['max_saliency']:.3g} at LPS ({x:.1f}, {y:.1f}, {z:.1f}) mm; {document['seconds']:.1f} s")
        print(f"saliency volume (input's grid) -> {document['volume']}\npicture -> {document['png']}")
    elif command == "concept-map":
        ratios = ", ".join(f"{100 * r:.1f}%" for r in document["pca"]["explained_variance_ratio"])
        print(f"joint PCA over {document['pca']['samples']} feature cells of {len(document['results'])} scan(s); "
              f"explained variance {ratios}")
        for item in document["results"]:
            print(f"{item['input']}: concept map (RGB, input's grid) -> {item['volume']}; picture -> {item['png']}")
    elif command == "demo":
        print("\n".join(document["summary"]))
    elif command in ("index build", "index add"):
        for item in document["skipped"]:
            print(f"skipped {item['id']}: {item['reason']}")
        print(f"{document['index']}: {document['added']} added, {document['already_indexed']} already indexed, "
              f"{len(document['skipped'])} skipped; {document['entries']} entries, {document['kind']} search "
              f"({document['seconds']:.1f} s)")
    elif command == "index query":
        for rank, match in enumerate(document["matches"], start=1):
            print(f"{rank:>3}  similarity {match['similarity']:.4f}  {match['id']}  ({match['source']})")
        if not document["matches"]:
            print(f"no matches: {document['index']} holds no other entries")
    elif command == "index remove":
        print(f"removed {len(document['removed'])} from {document['index']}; {document['entries']} entries left")
    elif command == "index info":
        provenance = document["provenance"]
        print(f"{document['index']}: {document['entries']} entries, {document['dimension']}-d {provenance['level']}-"
              f"level embeddings" + (f" ({provenance['aggregation']} of patches)" if provenance["aggregation"] else "")
              + f", {document['kind']} search, {document['segments']} segments, {document['tombstones']} tombstones,"
              f" {document['bytes'] / 1e6:.1f} MB")
    else:
        print(json.dumps({k: v for k, v in document.items() if k != "command"}, indent=2))


def output_stem(path: str | Path) -> str:
    """A result's name prefix: the input file's name without its image suffix, or the DICOM folder's name."""
    from ctfm_engine.volume import FILE_SUFFIXES

    name = Path(path).resolve().name
    suffix = next((suffix for suffix in FILE_SUFFIXES if name.lower().endswith(suffix)), "")
    return name[: len(name) - len(suffix)] or "input"


def _write_together(writers: Sequence[tuple[Callable[[Path], Path], Path]]) -> list[Path]:
    """Run each (writer, path); if one fails, remove the files the others wrote, so a run leaves all or nothing."""
    written: list[Path] = []
    try:
        for write, path in writers:
            written.append(write(path))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def run_saliency(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.models.registry import load_encoder
    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.saliency import check_settings, saliency

    try:
        check_settings(args.mask_size, args.overlap, args.batch_size)
    except ValueError as error:
        raise UsageError(f"--mask-size/--overlap/--batch-size: {error}") from None
    if not args.smooth_mm >= 0:
        raise UsageError(f"--smooth-mm {args.smooth_mm}: give 0 (no smoothing) or a positive sigma in mm")
    (volume,) = read_inputs([args.input], args)
    volume = volume or read_volume(args.input, series_uid=args.series, hu_offset=args.hu_offset)
    device = resolve_device(args.device or "cpu")
    encoder, checkpoint = load_encoder(args.weights)
    log.info("saliency of %s with %s (sha256 %s) on %s", Path(args.input).name, checkpoint.name,
             checkpoint.sha256[:12], device)
    bar = _progress_bar(args, "occlusions", "volume")
    try:
        result = saliency(volume, encoder, mask_size=args.mask_size, overlap=args.overlap,
                          occlusion="gaussian" if args.occlusion == "gaussian" else 0.0,
                          batch_size=args.batch_size, smooth_mm=args.smooth_mm, device=device,
                          progress=None if bar is None else _tqdm_progress(bar))
    finally:
        if bar is not None:
            bar.close()
    stem = output_stem(args.input)
    volume_path, png_path = (args.out_dir / f"{stem}_saliency.nii.gz", args.out_dir / f"{stem}_saliency.png")
    _write_together([(result.write, volume_path), (lambda path: result.draw(path, checkpoint.name), png_path)])
    return {
        "command": "saliency",
        "input": str(args.input),
        "weights": checkpoint.identity,
        "device": str(device),
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


def run_concept_map(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from ctfm_engine.models.registry import load_encoder
    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.concept_map import DEFAULT_SEED, concept_maps

    volumes = read_inputs(args.inputs, args)
    device = resolve_device(args.device or "cpu")
    encoder, checkpoint = load_encoder(args.weights)
    log.info("concept map of %d scan(s) with %s (sha256 %s) on %s", len(args.inputs), checkpoint.name,
             checkpoint.sha256[:12], device)
    volumes = [volume or read_volume(path, series_uid=args.series, hu_offset=args.hu_offset)
               for path, volume in zip(args.inputs, volumes, strict=True)]
    bar = _progress_bar(args, "features", "scan", total=len(volumes)) if len(volumes) > 1 else None
    started = time.perf_counter()
    try:
        maps, fit = concept_maps(volumes, encoder, device=device, progress=None if bar is None else
                                 _tqdm_progress(bar))
    finally:
        if bar is not None:
            bar.close()
    stems: list[str] = []
    for path in args.inputs:
        stem = output_stem(path)
        stems.append(stem if stem not in stems else f"{stem}_{len(stems) + 1}")
    writers: list[tuple[Callable[[Path], Path], Path]] = []
    results = []
    for path, stem, concept in zip(args.inputs, stems, maps, strict=True):
        volume_path, png_path = args.out_dir / f"{stem}_concept_map.nrrd", args.out_dir / f"{stem}_concept_map.png"
        writers += [(concept.write, volume_path),
                    (lambda target, concept=concept: concept.draw(target, checkpoint.name), png_path)]
        results.append({"input": str(path), "volume": str(volume_path), "png": str(png_path),
                        "body_voxels": int(concept.body.sum())})
    _write_together(writers)
    return {
        "command": "concept-map",
        "weights": checkpoint.identity,
        "device": str(device),
        "results": results,
        "pca": {"components": 3, "samples": fit.samples, "fitted_on": fit.fitted_on, "seed": DEFAULT_SEED,
                "explained_variance_ratio": [float(r) for r in fit.explained_variance_ratio]},
        "colour": "L = 100 PC0, a = 255 PC1 - 128, b = 255 PC2 - 128 (joint min-max), CIELAB -> sRGB D65",
        "seconds": round(time.perf_counter() - started, 2),
    }


def run_index(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.tasks.scan_index import ScanIndex

    command = f"index {args.index_command}"
    if args.index_command in ("build", "add"):
        return {"command": command, **_index_scans(args)}
    if args.index_command == "query":
        return {"command": command, **_query_index(args)}
    if args.index_command == "info":
        with ScanIndex.open(args.index) as index:
            return {"command": command, **index.info()}
    with ScanIndex.open(args.index, writable=True) as index:
        index.remove(args.ids)
        return {"command": command, "index": str(args.index), "weights": index.weights, "removed": args.ids,
                "entries": len(index)}


def _index_scans(args: argparse.Namespace) -> dict[str, Any]:
    """``index build`` (rows from a manifest) and ``index add`` (rows from the command line)."""
    import time

    from ctfm_engine.tasks.archive_builder import (
        EmbeddingRecipe,
        RayOptions,
        index_scans,
        read_manifest,
        rows_from_inputs,
    )

    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    engine = getattr(args, "engine", "local")
    if engine == "ray" and args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")
    if engine == "ray" and args.cpus_per_worker < 1:
        raise UsageError(f"--cpus-per-worker {args.cpus_per_worker}: must be at least 1")
    if args.index_command == "build":
        rows = read_manifest(args.manifest)
    else:
        rows = rows_from_inputs(args.inputs, args.series)
    recipe = None
    if args.level is not None or args.aggregation is not None:
        recipe = EmbeddingRecipe(args.level or "scan", args.aggregation or "min")
    device = args.device or "cpu"
    ray_options = None
    if engine == "ray":
        ray_options = RayOptions(address=args.ray_address or None, workers=args.workers,
                                 cpus_per_worker=args.cpus_per_worker,
                                 gpus_per_worker=1.0 if device.startswith("cuda") else 0.0)
    bar = _progress_bar(args, "indexing", "scan")
    started = time.perf_counter()
    try:
        # Ray may print on stdout, which belongs to the --json document.
        with contextlib.redirect_stdout(sys.stderr) if engine == "ray" else contextlib.nullcontext():
            report = index_scans(args.index, rows, weights=args.weights, recipe=recipe, hu_offset=args.hu_offset,
                                 kind=args.kind, engine=engine, device=device, batch_size=args.batch_size,
                                 ray_options=ray_options, progress=None if bar is None else _tqdm_progress(bar))
    finally:
        if bar is not None:
            bar.close()
    return {
        "index": str(args.index),
        "engine": engine,
        "weights": report.weights,
        "kind": report.kind,
        "rows": len(rows),
        "added": report.added,
        "already_indexed": report.already_indexed,
        "skipped": [item.as_dict() for item in report.skipped],
        "entries": report.entries,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _query_index(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.tasks.archive_builder import embed_for_index, read_embedding_file
    from ctfm_engine.tasks.scan_index import ScanIndex

    if args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: must be at least 1")
    with ScanIndex.open(args.index) as index:
        kind = args.kind or index.kind
        weights = index.weights
        if args.id is not None:
            query: dict[str, Any] = {"id": args.id}
            matches = index.neighbours(args.id, args.top_k, kind=kind)
        elif args.embedding is not None:
            query = {"embedding": str(args.embedding), "row": args.row}
            matches = index.query(read_embedding_file(args.embedding, args.row, index), args.top_k, kind=kind)
        else:
            volume = read_volume(args.scan, series_uid=args.series, hu_offset=args.hu_offset)
            vector, checkpoint = embed_for_index(index, volume, weights=args.weights, device=args.device or "cpu")
            query = {"scan": str(args.scan), "series_instance_uid": volume.series_instance_uid}
            matches = index.query(vector, args.top_k, kind=kind)
            weights = checkpoint.identity
        if kind != "exact":
            index.save_structure_if_free(kind)  # a structure the query had to bring up to date, for the next one
        return {
            "index": str(args.index),
            "weights": weights,
            "kind": kind,
            "top_k": args.top_k,
            "query": query,
            "matches": [match.as_dict() for match in matches],
        }


def run_dicom(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.dicom.selection import SelectionRules, list_series, reasons_against, select_candidates
    from ctfm_engine.errors import InputError

    if not args.folder.is_dir():
        raise UsageError(f"{args.folder}: not a folder; give the folder that holds the DICOM files")
    rules = SelectionRules.from_file(args.rules) if args.rules is not None else SelectionRules()
    candidates = list_series(args.folder)
    try:
        selection = select_candidates(candidates, rules, source=str(args.folder))
        chosen, reasons = selection.chosen, {id(candidate): reason for candidate, reason in selection.skipped}
    except InputError as error:
        log.warning("%s", error)
        chosen = None
        reasons = {id(candidate): ", ".join(reasons_against(candidate, rules)) for candidate in candidates}
    rows = [{**{key: value for key, value in candidate.as_dict().items() if key != "files"},
             "reason": None if candidate is chosen else reasons.get(id(candidate))} for candidate in candidates]
    return {"command": "dicom", "folder": str(args.folder), "rules": rules.as_dict(), "series": rows,
            "chosen": None if chosen is None else {key: value for key, value in chosen.as_dict().items()
                                                   if key != "files"}}


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.training.runner import run_recipe

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
    "search": run_search,
    "ocd": run_ocd,
    "weights": run_weights,
    "segment": run_segment,
    "triage": run_triage,
    "export": run_export,
    "saliency": run_saliency,
    "concept-map": run_concept_map,
    "pretrain": run_training,
    "finetune": run_training,
    "demo": run_demo_command,
    "index": run_index,
    "pacs": run_pacs,
    "dicom": run_dicom,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO,
        format="ctfm: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied DICOM module
    try:
        document = RUNNERS[args.command](args)
    except CTFMError as error:
        return _fail(args, error.exit_code, str(error), getattr(error, "document", None))
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


def _fail(args: argparse.Namespace, code: int, message: str, document: dict[str, Any] | None = None) -> int:
    print(f"ctfm: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": {"exit_code": code, "message": message}, **(document or {})}))
    return code


if __name__ == "__main__":
    sys.exit(main())
