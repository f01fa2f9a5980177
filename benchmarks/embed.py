"""Scan-embedding speed and peak memory: ours (slab-tiled exact forward) vs the reference (one whole-volume forward).

The reference is the Hugging Face card recipe: the whole preprocessed volume through the encoder at once, last
feature map, global average pool.  Both run side by side in this one process on the same inputs; peak memory is
the process RSS sampled every 5 ms (after returning freed memory to the OS before each run).

    .venv/bin/python benchmarks/embed.py                 # full-width CT-FM encoder, real scans + a 512x512x300 CT
    .venv/bin/python benchmarks/embed.py --device cuda   # the same on a GPU (peak = torch.cuda.max_memory_allocated)

Weights: random full-width weights unless --weights is given (timings and memory do not depend on the values;
BatchNorm statistics are randomised so the eval-mode network is not an identity).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import SimpleITK as sitk
import torch

from ctfm_engine.models.encoder import (
    CTFM_ENCODER_CONFIG,
    DEFAULT_MEMORY_BUDGET_BYTES,
    build_encoder,
    scan_embedding,
)
from ctfm_engine.models.registry import load_encoder
from ctfm_engine.preprocess import preprocess
from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
REAL_SCANS = [
    SHARED / "totalsegmentator" / "example_ct_sm.nii.gz",
    SHARED / "ct-nifti" / "s0335.nii.gz",
    SHARED / "ct-nifti" / "TotalSegmentator_0002_0000.nii.gz",
    SHARED / "ct-nifti" / "TotalSegmentator_0003_0000.nii.gz",
    SHARED / "ct-nifti" / "TotalSegmentator_0009_0000.nii.gz",
]
GiB = 1 << 30


class PeakMemory:
    """Peak resident memory of this process (CPU) or peak CUDA allocation while the block runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.baseline = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return self
        _release_freed_memory()
        process = psutil.Process()
        self.baseline = self.peak = process.memory_info().rss
        self._running = True

        def sample() -> None:
            while self._running:
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


def _release_freed_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def randomise_batchnorm_statistics(network: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm running statistics, so a random-weight network of a published width computes what a trained
    one would cost (its outputs mean nothing)."""
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return network


def stretched_ct(size_xyz: tuple[int, int, int], spacing_xyz_mm: tuple[float, float, float], source: str) -> CTVolume:
    """A real scan (TotalSegmentator_0009, lumbar spine/pelvis) resampled to ``size_xyz`` voxels, then labelled with
    ``spacing_xyz_mm``: stretched so that the body fills the field of view like a clinical scan instead of sitting
    in air that the foreground crop would remove."""
    image = sitk.ReadImage(str(SHARED / "ct-nifti" / "TotalSegmentator_0009_0000.nii.gz"), sitk.sitkFloat32)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(size_xyz)
    resampler.SetOutputSpacing(tuple(s * o / n for s, o, n in zip(image.GetSpacing(), image.GetSize(), size_xyz,
                                                                  strict=True)))
    resampler.SetOutputOrigin(image.GetOrigin())
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(-1024)
    stretched = resampler.Execute(image)
    stretched.SetSpacing(spacing_xyz_mm)
    return CTVolume.from_sitk(stretched, source=source)


def large_ct() -> CTVolume:
    """A 512x512x300 CT at 0.8x0.8x1.0 mm made from a real scan (see :func:`stretched_ct`)."""
    return stretched_ct((512, 512, 300), (0.8, 0.8, 1.0), "512x512x300 CT (TotalSegmentator_0009 stretched)")


def reference_embedding(encoder: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The Hugging Face card recipe: whole volume at once, last map, global average pool."""
    return encoder(image)[-1].mean(dim=(2, 3, 4))


def measure(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, int, int, np.ndarray]:
    with PeakMemory(device) as memory, torch.inference_mode():
        start = time.perf_counter()
        vector = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, memory.peak, memory.peak - memory.baseline, vector.float().cpu().numpy()[0]


def compare(encoder: torch.nn.Module, image: torch.Tensor, budget: int, device: torch.device, repeat: int,
            with_reference: bool) -> tuple[tuple, tuple | None]:
    """Ours and the reference on one input, alternating ``repeat`` times so neither profits from going second."""
    ours_runs, reference_runs = [], []
    for _ in range(repeat):
        ours_runs.append(measure(lambda: scan_embedding(encoder, image, memory_budget_bytes=budget), device))
        if with_reference:
            reference_runs.append(measure(lambda: reference_embedding(encoder, image), device))
    return fastest(ours_runs), fastest(reference_runs) if reference_runs else None


def fastest(runs: list[tuple[float, int, int, np.ndarray]]) -> tuple[float, int, int, np.ndarray]:
    """The fastest run's time with the highest peak seen over all runs."""
    best = min(runs, key=lambda run: run[0])
    return best[0], max(run[1] for run in runs), max(run[2] for run in runs), best[3]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", help="a checkpoint folder; default: random full-width CT-FM weights")
    parser.add_argument("--budget-gib", type=float, default=DEFAULT_MEMORY_BUDGET_BYTES / GiB,
                        help="slab memory budget of ours (default: the engine's)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per method, alternating; the fastest counts")
    parser.add_argument("--skip-reference-large", action="store_true", help="do not run the reference on 512^2x300")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    if args.weights:
        encoder, checkpoint = load_encoder(args.weights)
        weights_name = checkpoint.name
    else:
        torch.manual_seed(0)
        encoder = build_encoder(CTFM_ENCODER_CONFIG)
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        weights_name = "random full-width CT-FM encoder (77.8 M parameters)"
    encoder = encoder.eval().to(device)
    budget = int(args.budget_gib * GiB)
    print(f"device: {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}; "
          f"weights: {weights_name}")
    print(f"ours: slab-tiled exact forward, budget {args.budget_gib} GiB; reference: one whole-volume forward\n")

    with torch.inference_mode():  # warm-up: one-time kernel selection is not part of either method's time
        scan_embedding(encoder, torch.zeros(1, 1, 32, 64, 64, device=device))
    header = f"{'scan':<44} {'model input':>14} {'ours s':>8} {'ref s':>8} {'speed':>6} " \
             f"{'ours peak':>10} {'ref peak':>10} {'mem ratio':>9} {'cosine':>9}"
    print(header)
    print("-" * len(header))
    ours_total = ref_total = 0.0
    cases = [(path.name, lambda path=path: read_volume(path)) for path in REAL_SCANS]
    cases.append(("512x512x300 CT (0.8x0.8x1 mm)", large_ct))
    for name, load in cases:
        start = time.perf_counter()
        model_input = preprocess(load())
        preprocessing_seconds = time.perf_counter() - start
        image = torch.from_numpy(model_input.image)[None, None].to(device)
        is_large = name.startswith("512")
        ours, reference = compare(encoder, image, budget, device, args.repeat,
                                  with_reference=not (is_large and args.skip_reference_large))
        shape = "x".join(map(str, model_input.image.shape))
        if reference is None:
            print(f"{name:<44} {shape:>14} {ours[0]:8.1f} {'-':>8} {'-':>6} {ours[1] / GiB:9.2f}G {'-':>10}")
        else:
            print(f"{name:<44} {shape:>14} {ours[0]:8.1f} {reference[0]:8.1f} {reference[0] / ours[0]:5.2f}x "
                  f"{ours[1] / GiB:9.2f}G {reference[1] / GiB:9.2f}G {reference[2] / max(ours[2], 1):8.2f}x "
                  f"{cosine(ours[3], reference[3]):9.6f}")
        if not is_large:
            ours_total += ours[0] + preprocessing_seconds
            ref_total += (reference[0] if reference else 0.0) + preprocessing_seconds
        del image
    print(f"\nreal scans (read + preprocess + embed): ours {len(REAL_SCANS) * 60 / ours_total:.1f} scans/min, "
          f"reference {len(REAL_SCANS) * 60 / ref_total:.1f} scans/min")
    print("peak = process RSS (CPU) or CUDA peak allocation (GPU) during the embedding, weights and input included;"
          " mem ratio = reference / ours, both above the same baseline")


if __name__ == "__main__":
    main()
