"""Sliding-window segmentation speed and peak memory: PyTorch eager (MONAI reference) vs ours, side by side.

Every method segments the same CT, one after the other, each in a child process of this one run (so memory one
method freed does not count against the next), and its label map is compared voxel by voxel with the reference's:

- ``reference``: PyTorch eager through MONAI ``sliding_window_inference`` (Gaussian blend, the whole-volume fp32
  logit buffer), arg-max, labels back on the source grid -- what the CT-FM recipe does;
- ``torch-streamed``: ours, PyTorch eager, windows streamed slab by slab along z (one window depth of logits);
- ``onnx-streamed``: ours, onnxruntime (CPU provider here; CUDA/TensorRT on a GPU), streamed;
- ``onnx-int8`` (with ``--int8``): dynamic INT8 quantisation of the ONNX model, if the runtime module offers it.

    .venv/bin/python benchmarks/segment.py                      # shipped model, 512x512x300 CT (default)
    .venv/bin/python benchmarks/segment.py --model published    # CT-FM whole-body width (random weights, timing only)
    .venv/bin/python benchmarks/segment.py --scan sample        # the small real sample CT, quick
    .venv/bin/python benchmarks/segment.py --device cuda        # on a GPU (peak = CUDA allocation + RSS)

``--model shipped`` is the trained ctfm-mini-wholebody-seg (init_filters 8, 118 classes, 32x128x128 windows at
3x1x1 mm); ``--model published`` builds the architecture of project-lighter/whole_body_segmentation (init_filters 32,
118 classes) with random weights and its recipe (1.5 mm isotropic, 96x160x160 windows, overlap 0.625): its timings
and memory are those of the published model, its labels mean nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from embed import PeakMemory, large_ct
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNetDS

from ctfm_engine.models.checkpoint import save_checkpoint
from ctfm_engine.models.segmentation import inference_network
from ctfm_engine.preprocess import preprocess
from ctfm_engine.readers import read_volume
from ctfm_engine.runtime.backends import TorchBackend
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
METHODS = ("reference", "torch-streamed", "onnx-streamed", "onnx-int8")


def published_width_model(folder: Path) -> SegmentationModel:
    """The whole_body_segmentation architecture with random weights (BatchNorm statistics randomised)."""
    torch.manual_seed(0)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 118, "init_filters": 32,
              "blocks_down": [1, 2, 2, 4, 4], "dsdepth": 4}
    network = SegResNetDS(**config)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
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


def onnx_backend(model: SegmentationModel, volume: CTVolume, device: torch.device, int8: bool = False):
    """(backend, head, None) for onnxruntime on the model's trunk (exported and validated into the cache first),
    or (None, None, why)."""
    try:
        from ctfm_engine.runtime import onnx_export
        from ctfm_engine.runtime.backends import OnnxBackend
    except ImportError as error:
        return None, None, f"onnxruntime backend not available ({error})"
    _, head = inference_network(model.network)
    task = "segmentation-trunk" if head is not None else "segmentation"
    path = onnx_export.onnx_for(model.checkpoint, task, model.network,
                                onnx_export.validation_sample(volume, task, model.preprocessing, model.roi_size_zyx))
    if int8:
        quantise = getattr(onnx_export, "quantise_int8", None)
        if quantise is None:
            return None, None, "no INT8 path in ctfm_engine.runtime.onnx_export (measured: slower and not identical)"
        path = quantise(path)
    return OnnxBackend.open(path, model.checkpoint, task, device=device), head, None


def run_method(args: argparse.Namespace) -> None:
    """One method in this (child) process: time, peak memory and the label map (saved for the parent to compare)."""
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    model, volume, overlap = setup(args)
    backend, head = None, None
    if args.child == "torch-streamed":
        module, head = inference_network(model.network)
        backend = TorchBackend(module, device)
    elif args.child.startswith("onnx"):
        backend, head, why = onnx_backend(model, volume, device, int8=args.child == "onnx-int8")
        if backend is None:
            print(json.dumps({"method": args.child, "skipped": why}))
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
                      "peak_increase_gib": round((memory.peak - memory.baseline) / GiB, 3)}))


def setup(args: argparse.Namespace) -> tuple[SegmentationModel, CTVolume, float]:
    scratch = Path(tempfile.mkdtemp(prefix="ctfm-bench-"))
    model = published_width_model(scratch / "published") if args.model == "published" else \
        open_segmentation_model(SHIPPED)
    overlap = model.overlap if args.overlap is None else args.overlap
    volume = large_ct() if args.scan == "large" else read_volume(SHARED / "totalsegmentator" / "example_ct_sm.nii.gz")
    return model, volume, overlap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("shipped", "published"), default="shipped")
    parser.add_argument("--scan", choices=("large", "sample"), default="large",
                        help="large: a 512x512x300 CT made from a real scan; sample: the 122x101x30 real sample")
    parser.add_argument("--overlap", type=float, help="window overlap (default: the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=["reference", "torch-streamed", "onnx-streamed"],
                        choices=METHODS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_method(args)
        return
    model, volume, overlap = setup(args)
    model_shape = preprocess(volume, model.preprocessing).image.shape
    print(f"device: {args.device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
    print(f"model: {model.checkpoint.name} ({args.model}), windows {'x'.join(map(str, model.roi_size_zyx))}, "
          f"overlap {overlap}, spacing {model.preprocessing.spacing_zyx_mm} mm (z,y,x)")
    print(f"scan: {volume.source}, {'x'.join(map(str, volume.shape_zyx[::-1]))} voxels (x,y,z); "
          f"model space {'x'.join(map(str, model_shape))} (z,y,x)")
    print("each method runs in its own process, one after the other (so freed memory of one does not count "
          "against the next); peak = that process's RSS\n", flush=True)
    scan_name = volume.source
    del model, volume
    scratch = Path(tempfile.mkdtemp(prefix="ctfm-bench-labels-"))
    results, reference = [], None
    passed = [arg for arg in sys.argv[1:]]
    for method in args.methods:
        labels_out = scratch / f"{method}.npy"
        child = subprocess.run([sys.executable, __file__, *passed, "--child", method, "--labels-out", str(labels_out)],
                               capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode != 0 or not lines:
            print(f"{method}: failed (exit {child.returncode})\n{child.stderr[-2000:]}")
            continue
        row = json.loads(lines[-1])
        if "skipped" in row:
            print(f"{method}: skipped -- {row['skipped']}")
            continue
        labels = np.load(labels_out)
        if method == "reference":
            reference = labels
        row["agreement_with_reference"] = None if reference is None else float(np.mean(labels == reference))
        row["structures"] = int(len(np.unique(labels)) - 1)
        results.append(row)
        agreement = row["agreement_with_reference"]
        print(f"{method}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB "
              f"(+{row['peak_increase_gib']:.2f} GiB during the run)"
              + ("" if agreement is None else f", voxels equal to the reference {agreement:.6f}"), flush=True)

    print()
    header = f"{'method':<16} {'backend':<34} {'seconds':>8} {'speed-up':>9} {'peak GiB':>9} {'run +GiB':>9} " \
             f"{'mem ratio':>9} {'agreement':>10}"
    print(header)
    print("-" * len(header))
    base = next((row for row in results if row["method"] == "reference"), results[0] if results else None)
    for row in results:
        agreement = "-" if row["agreement_with_reference"] is None else f"{row['agreement_with_reference']:.6f}"
        print(f"{row['method']:<16} {row['backend']:<34} {row['seconds']:>8.1f} "
              f"{base['seconds'] / row['seconds']:>8.2f}x {row['peak_rss_gib']:>9.2f} "
              f"{row['peak_increase_gib']:>9.2f} {row['peak_rss_gib'] / base['peak_rss_gib']:>9.2f} "
              f"{agreement:>10}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "scan": scan_name, "overlap": overlap,
                                         "model_shape_zyx": list(model_shape), "results": results}, indent=2))


if __name__ == "__main__":
    main()
