"""Sliding-window segmentation speed, peak memory and label agreement: the MONAI reference and every runtime ours runs.

Every method segments the same CT, one after the other, each in a child process of this one run (so memory one
method freed does not count against the next), and its label map is compared with the reference's: all voxels,
the foreground voxels (a structure in either map, as ``--backend auto`` judges a runtime) and the smallest
per-structure Dice over the structures of at least 1000 voxels in the reference (how much any organ's outline moves).

- ``reference``: PyTorch eager fp32 through MONAI ``sliding_window_inference`` (Gaussian blend, the whole-volume
  fp32 logit buffer), arg-max, labels back on the source grid -- what the CT-FM recipe does;
- ``torch-fp32``, ``torch-bf16`` (channels-last autocast), ``onnx-fp32``, ``openvino-fp32``, ``openvino-bf16``:
  ours, windows streamed slab by slab along z, each backend built by the engine's own
  ``segmentation_backend`` for that runtime (export and compile happen before the clock starts);
- ``auto``: what ``ctfm segment --backend auto`` runs: ``runtime_choice`` measures this machine with a fresh, empty
  CTFM_CACHE (its one-off seconds, export and compile included, are reported apart), then the chosen runtime segments;
- ``onnx-int8`` (with ``--methods ... onnx-int8``): dynamic INT8 quantisation of the ONNX export, if the engine
  offers it.

    .venv/bin/python benchmarks/segment.py                      # shipped model, 512x512x300 CT (default)
    .venv/bin/python benchmarks/segment.py --model published    # CT-FM whole-body width (random weights, timing only)
    .venv/bin/python benchmarks/segment.py --scan sample        # the small real sample CT, quick
    .venv/bin/python benchmarks/segment.py --model published --scan 512x512x1000 --methods openvino-fp32
    .venv/bin/python benchmarks/segment.py --device cuda --methods reference torch-fp32 auto   # on a GPU

``--model shipped`` is the trained ctfm-mini-wholebody-seg (init_filters 8, 118 classes, 32x128x128 windows at
3x1x1 mm); ``--model published`` builds the architecture of project-lighter/whole_body_segmentation (init_filters 32,
118 classes) with random weights and its recipe (1.5 mm isotropic, 96x160x160 windows, overlap 0.625): its timings
and memory are those of the published model, its labels mean nothing (random logits are near-ties, so any rounding
difference flips them: agreement measured on it says nothing about the trained model's).  Labels are the raw
arg-max (no largest-component clean-up) for every method.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from embed import PeakMemory, randomise_batchnorm_statistics, stretched_ct
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNetDS

from ctfm_engine.models.checkpoint import save_checkpoint
from ctfm_engine.pipelines.segmentation import SegmentationRequest, runtime_choice, segmentation_backend
from ctfm_engine.preprocess import preprocess
from ctfm_engine.readers import read_volume
from ctfm_engine.runtime.selection import Runtime
from ctfm_engine.tasks.segment import (
    PUBLISHED_WHOLE_BODY,
    SegmentationModel,
    open_segmentation_model,
    segment,
    to_source,
    write_inference_settings,
)
from ctfm_engine.volume import CTVolume

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
SHIPPED = ROOT / "ctfm_engine" / "weights" / "ctfm-mini-wholebody-seg"
GiB = 1 << 30
RUNTIMES = {
    "torch-fp32": Runtime("torch", "fp32"),
    "torch-bf16": Runtime("torch", "bf16"),
    "onnx-fp32": Runtime("onnx", "fp32"),
    "openvino-fp32": Runtime("openvino", "fp32"),
    "openvino-bf16": Runtime("openvino", "bf16"),
}
METHODS = ("reference", *RUNTIMES, "auto", "onnx-int8")
DEFAULT_METHODS = ("reference", *RUNTIMES, "auto")
STREAMED_FP32 = "torch-fp32"
DICE_MIN_VOXELS = 1000  # structures smaller than this in the reference are left out of the smallest Dice
# CT made from a real scan at 0.8x0.8x1.0 mm (x, y, z), named by its size in voxels (x, y, z)
STRETCHED_SCANS = {"512x512x300": (512, 512, 300), "512x512x150": (512, 512, 150), "512x512x1000": (512, 512, 1000)}


def published_width_model(folder: Path) -> SegmentationModel:
    """The whole_body_segmentation architecture with random weights (BatchNorm statistics randomised)."""
    torch.manual_seed(0)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 118, "init_filters": 32,
              "blocks_down": [1, 2, 2, 4, 4], "dsdepth": 4}
    network = randomise_batchnorm_statistics(SegResNetDS(**config))
    save_checkpoint(network, folder, config)
    write_inference_settings(folder, PUBLISHED_WHOLE_BODY)
    return open_segmentation_model(folder)


def reference_labels(volume: CTVolume, model: SegmentationModel, device: torch.device, overlap: float) -> np.ndarray:
    """PyTorch eager, MONAI sliding_window_inference over the whole volume, arg-max, back on the source grid."""
    model_input = preprocess(volume, model.preprocessing)
    image = torch.from_numpy(model_input.image)[None, None]
    network = model.network.to(device)
    with torch.inference_mode():
        logits = sliding_window_inference(image, model.roi_size_zyx, 1, network, overlap=overlap, mode="gaussian",
                                          sw_device=device, device=torch.device("cpu"))
        labels = logits.argmax(dim=1)[0].numpy().astype(np.uint8)
    del logits
    return to_source(model_input, labels, volume).labels


def int8_request(model: SegmentationModel, volume: CTVolume) -> SegmentationRequest:
    """A request naming the INT8-quantised ONNX export (ValueError when the engine has no INT8 path)."""
    from ctfm_engine.models.segmentation import inference_network
    from ctfm_engine.runtime import onnx_export

    quantise = getattr(onnx_export, "quantise_int8", None)
    if quantise is None:
        raise ValueError("no INT8 path in ctfm_engine.runtime.onnx_export (measured: slower and not identical)")
    task = "segmentation-trunk" if inference_network(model.network)[1] is not None else "segmentation"
    sample = onnx_export.validation_sample(volume, task, model.preprocessing, model.roi_size_zyx)
    return SegmentationRequest(volume, batch_size=1,
                               onnx_file=quantise(onnx_export.onnx_for(model.checkpoint, task, model.network, sample)))


def build_backend(method: str, model: SegmentationModel, volume: CTVolume, device: torch.device) -> tuple:
    """(backend, head, extra row fields) for ``method``, built by the engine exactly as ``ctfm segment`` builds it;
    for ``auto`` after measuring this machine with an empty cache (the caller set CTFM_CACHE)."""
    request = SegmentationRequest(volume, batch_size=1, device=str(device))
    if method == "auto":
        started = time.perf_counter()
        choice = runtime_choice(model, request, device, model.roi_size_zyx)
        runtime = choice.runtime
        extra = {"chose": str(runtime), "how": choice.how, "trials": choice.describe()["trials"]}
        backend, head = segmentation_backend(model, volume, request, device, model.roi_size_zyx, runtime)
        extra["one_off_seconds"] = round(time.perf_counter() - started, 2)
        return backend, head, extra
    if method == "onnx-int8":
        request = int8_request(model, volume)
    runtime = RUNTIMES.get(method, Runtime("onnx", "fp32"))
    started = time.perf_counter()
    backend, head = segmentation_backend(model, volume, request, device, model.roi_size_zyx, runtime)
    return backend, head, {"build_seconds": round(time.perf_counter() - started, 2)}


def run_method(args: argparse.Namespace) -> None:
    """One method in this (child) process: time, peak memory and the label map (saved for the parent to compare)."""
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    model, volume, overlap = setup(args)
    backend, head, extra = None, None, {}
    if args.child != "reference":
        try:
            backend, head, extra = build_backend(args.child, model, volume, device)
        except Exception as error:  # a runtime that cannot run this model here is reported, and the run goes on
            print(json.dumps({"method": args.child, "skipped": f"{type(error).__name__}: {str(error)[:300]}"}))
            return
    with PeakMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        if args.child == "reference":
            labels = reference_labels(volume, model, device, overlap)
        else:
            labels = segment(volume, preprocessing=model.preprocessing, roi_size_zyx=model.roi_size_zyx,
                             overlap=overlap, backend=backend, head=head).labels
        seconds = time.perf_counter() - start
    np.save(args.labels_out, labels)
    print(json.dumps({"method": args.child, "backend": getattr(backend, "name", f"torch:{device} (MONAI)"),
                      "seconds": round(seconds, 2), "peak_rss_gib": round(memory.peak / GiB, 3),
                      "peak_increase_gib": round((memory.peak - memory.baseline) / GiB, 3), **extra}))


def setup(args: argparse.Namespace) -> tuple[SegmentationModel, CTVolume, float]:
    model = published_width_model(args.scratch / "published") if args.model == "published" else \
        open_segmentation_model(SHIPPED)
    overlap = model.overlap if args.overlap is None else args.overlap
    if args.scan == "sample":
        volume = read_volume(SHARED / "totalsegmentator" / "example_ct_sm.nii.gz")
    else:
        volume = stretched_ct(STRETCHED_SCANS[args.scan], (0.8, 0.8, 1.0),
                              f"{args.scan} CT (TotalSegmentator_0009 stretched to 0.8x0.8x1.0 mm)")
    return model, volume, overlap


def agreement(labels: np.ndarray, reference: np.ndarray, names: dict[int, str]) -> dict:
    """All-voxel and foreground (a structure in either map) agreement, and the smallest per-structure Dice over the
    reference's structures of at least DICE_MIN_VOXELS voxels."""
    equal = labels == reference
    foreground = (reference != 0) | (labels != 0)
    count = int(max(reference.max(), labels.max())) + 1
    in_reference = np.bincount(reference.ravel(), minlength=count)
    in_labels = np.bincount(labels.ravel(), minlength=count)
    in_both = np.bincount(reference[equal], minlength=count)
    dice = {label: 2 * in_both[label] / (in_reference[label] + in_labels[label])
            for label in range(1, count) if in_reference[label] >= DICE_MIN_VOXELS}
    worst = min(dice, key=dice.get) if dice else None
    return {"agreement": float(equal.mean()),
            "foreground_agreement": float(equal[foreground].mean()) if foreground.any() else 1.0,
            "min_dice": None if worst is None else float(dice[worst]),
            "min_dice_structure": None if worst is None else names.get(worst, str(worst)),
            "dice_structures": len(dice)}


def run_children(args: argparse.Namespace, names: dict[int, str]) -> tuple[list[dict], list[dict]]:
    """Each method in its own child process: (measured rows, skipped rows with the reason)."""
    results, skipped, reference = [], [], None
    for method in args.methods:
        labels_out = args.scratch / f"{method}.npy"
        environment = dict(os.environ)
        if method == "auto":  # measure as a first run on this machine does, whatever was cached or pinned
            environment["CTFM_CACHE"] = str(args.scratch / "empty-cache")
            environment.pop("CTFM_BACKEND", None)
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", method, "--scratch",
                                str(args.scratch), "--labels-out", str(labels_out)], capture_output=True, text=True,
                               env=environment)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode != 0 or not lines:
            why = (child.stderr.strip().splitlines() or ["no output"])[-1][:300]
            skipped.append({"method": method, "skipped": f"exit {child.returncode}: {why}"})
            print(f"{method}: failed (exit {child.returncode})\n{child.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(lines[-1])
        if "skipped" in row:
            skipped.append(row)
            print(f"{method}: skipped -- {row['skipped']}", flush=True)
            continue
        labels = np.load(labels_out)
        if method == "reference":
            reference = labels
        row.update(agreement(labels, reference, names) if reference is not None else {})
        row["structures"] = int(len(np.unique(labels)) - 1)
        results.append(row)
        print(f"{method}: {row['backend']}, {row['seconds']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB"
              + (f", chose {row['chose']} after {row['one_off_seconds']:.1f} s" if "chose" in row else "")
              + (f", foreground agreement {row['foreground_agreement']:.6f}" if "agreement" in row else ""),
              flush=True)
    return results, skipped


def ratio(base: dict | None, row: dict) -> str:
    return "—" if base is None else f"{base['seconds'] / row['seconds']:.2f}×"


def print_tables(results: list[dict], skipped: list[dict]) -> None:
    """The speed/memory table and the agreement table, as markdown."""
    reference = next((row for row in results if row["method"] == "reference"), None)
    streamed = next((row for row in results if row["method"] == STREAMED_FP32), None)
    print("\n| method | runtime | seconds | vs reference | vs torch fp32 streamed | peak RSS | run +GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        runtime = row["backend"] + (f" (chose {row['chose']}; measuring: {row['one_off_seconds']:.1f} s once)"
                                    if "chose" in row else "")
        print(f"| {row['method']} | {runtime} | {row['seconds']:.1f} | {ratio(reference, row)} | "
              f"{ratio(streamed, row)} | {row['peak_rss_gib']:.2f} GiB | {row['peak_increase_gib']:.2f} |")
    for row in skipped:
        print(f"| {row['method']} | skipped: {row['skipped']} | | | | | |")
    print(f"\n| method | voxels equal to the reference | foreground voxels equal | smallest Dice (structures >= "
          f"{DICE_MIN_VOXELS} voxels) | structures |")
    print("|---|---|---|---|---|")
    for row in results:
        if row["method"] == "reference" or "agreement" not in row:
            continue
        dice = "—" if row["min_dice"] is None else \
            f"{row['min_dice']:.4f} ({row['min_dice_structure']}, of {row['dice_structures']})"
        print(f"| {row['method']} | {100 * row['agreement']:.4f} % | {100 * row['foreground_agreement']:.4f} % | "
              f"{dice} | {row['structures']} |")
    for row in results:
        for trial in row.get("trials", []):
            outcome = trial["error"] or (f"{trial['seconds']:.3f} s/window, foreground agreement "
                                         f"{trial['foreground_agreement']:.5f}"
                                         + (", qualifies" if trial["qualifies"] else ""))
            print(f"auto trial {trial['backend']} {trial['precision']}: {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("shipped", "published"), default="shipped")
    parser.add_argument("--scan", choices=(*STRETCHED_SCANS, "sample"), default="512x512x300",
                        help="a CT of this many voxels (x,y,z) made from a real scan at 0.8x0.8x1.0 mm; sample: the "
                             "122x101x30 real sample")
    parser.add_argument("--overlap", type=float, help="window overlap (default: the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_method(args)
        return
    with tempfile.TemporaryDirectory(prefix="ctfm-bench-segment-") as scratch:  # label maps, checkpoint, auto's cache
        args.scratch = Path(scratch)
        compare_methods(args)


def compare_methods(args: argparse.Namespace) -> None:
    """The header, every method in its own child process, the tables (and the JSON with ``--json``)."""
    model, volume, overlap = setup(args)
    model_shape = preprocess(volume, model.preprocessing).image.shape
    print(f"device: {args.device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
    print(f"model: {model.checkpoint.name} ({args.model}), windows {'x'.join(map(str, model.roi_size_zyx))}, "
          f"overlap {overlap}, spacing {model.preprocessing.spacing_zyx_mm} mm (z,y,x)")
    print(f"scan: {volume.source}, {'x'.join(map(str, volume.shape_zyx[::-1]))} voxels (x,y,z); "
          f"model space {'x'.join(map(str, model_shape))} (z,y,x)")
    print("each method runs in its own process, one after the other (so freed memory of one does not count "
          "against the next); peak = that process's RSS\n", flush=True)
    scan_name, names = volume.source, dict(model.names)
    del model, volume
    started = time.perf_counter()
    results, skipped = run_children(args, names)
    print_tables(results, skipped)
    print(f"\nwall time of the run: {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "scan": scan_name, "overlap": overlap,
                                         "model_shape_zyx": list(model_shape), "results": results,
                                         "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
