"""Pre-training throughput: patches per second and peak memory of one intra-sample SimCLR step.

Side by side in one process, on real CT crops (TotalSegmentator_0009, CT-FM preprocessing and augmentations):
- reference: CT-FM's code path, the encoder called once per (crop, view) (``bn_per_crop_call``), fp32;
- one concatenated call over all crops and views, fp32;
- the reference under bf16 autocast (CPU) or fp16 autocast (GPU).

    .venv/bin/python benchmarks/train_throughput.py                    # full-width encoder, paper patch 24x128x128
    .venv/bin/python benchmarks/train_throughput.py --init-filters 8 --patch 16 64 64 --crops 8   # ctfm-mini
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from embed import GiB, PeakMemory

from ctfm_engine.models.encoder import encoder_config
from ctfm_engine.preprocess import preprocess
from ctfm_engine.readers import read_volume
from ctfm_engine.training.augment import CTFM_VIEW_AUGMENTATION
from ctfm_engine.training.data import random_crops
from ctfm_engine.training.pretrain import IntraSamplePretraining

ROOT = Path(__file__).resolve().parents[1]

SCAN = ROOT.parent / "shared" / "data" / "ct-nifti" / "TotalSegmentator_0009_0000.nii.gz"


def real_batch(scans: int, crops: int, patch: tuple[int, int, int]) -> torch.Tensor:
    """(scans, crops, 2, 1, z, y, x) augmented views of real CT crops."""
    image = preprocess(read_volume(SCAN)).image
    rng = np.random.default_rng(0)
    items = []
    for _ in range(scans):
        patches = torch.from_numpy(random_crops(image, patch, crops, rng))[:, None]
        items.append(torch.stack([torch.stack([CTFM_VIEW_AUGMENTATION(p, rng) for _ in range(2)]) for p in patches]))
    return torch.stack(items)


def step_time(module: IntraSamplePretraining, batch: torch.Tensor, device: torch.device, autocast: bool,
              repeat: int) -> tuple[float, int]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    times = []
    with PeakMemory(device) as memory:
        for _ in range(repeat + 1):  # the first step warms up and is not counted
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                loss = module.compute_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return min(times[1:]), memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--init-filters", type=int, default=32)
    parser.add_argument("--patch", type=int, nargs=3, default=(24, 128, 128), metavar=("Z", "Y", "X"))
    parser.add_argument("--scans", type=int, default=2, help="scans per step (CT-FM: 4 per GPU)")
    parser.add_argument("--crops", type=int, default=4, help="crops per scan (CT-FM: 20)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = real_batch(args.scans, args.crops, tuple(args.patch)).to(device)
    patches = batch.shape[0] * batch.shape[1] * 2
    print(f"device {device}, {torch.get_num_threads()} threads; encoder init_filters {args.init_filters}; "
          f"{args.scans} scans x {args.crops} crops x 2 views = {patches} patches of "
          f"{'x'.join(map(str, args.patch))}")
    rows = []
    half = "bf16" if device.type == "cpu" else "fp16"
    for name, per_call, autocast in (("reference: per (crop, view) call, fp32", True, False),
                                     ("one concatenated call, fp32", False, False),
                                     (f"per call, autocast {half}", True, True)):
        torch.manual_seed(0)
        module = IntraSamplePretraining(encoder_config(args.init_filters), bn_per_crop_call=per_call).to(device)
        seconds, peak = step_time(module, batch, device, autocast, args.repeat)
        rows.append((name, seconds, peak))
        del module
    reference = rows[0][1]
    for name, seconds, peak in rows:
        print(f"{name:<42} {seconds:7.2f} s/step  {patches / seconds:7.2f} patches/s  {reference / seconds:5.2f}x  "
              f"peak {peak / GiB:6.2f} GB")


if __name__ == "__main__":
    main()
