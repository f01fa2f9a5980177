"""The model card's post-processing and the memory of a long CT, measured side by side.

Part 1, the cost of the largest-component clean-up (on by default for the published whole_body_segmentation, as its
card does) on the 512x512x300 benchmark CT (a real scan stretched, :func:`embed.large_ct`):

- the shipped model segments it once with the clean-up off (timed: the rest of the run the clean-up adds to);
- on its model-space labels, ours (:func:`keep_largest_components`) and the card's (MONAI
  ``KeepLargestConnectedComponent``) run side by side, on the shipped grid (3x1x1 mm) and on the published model's
  (the labels resampled nearest to 1.5 mm); the label maps must be equal;
- plus what the engine adds after the clean-up: counting the removed voxels on the source grid.

Part 2 (``--long``), a 512x512x1500 CT at 0.7 mm (the same real scan stretched) through
:func:`run_segmentation` in a child process: its peak resident memory against the engine's estimate (made before
anything is allocated) and against the source volume itself.

    .venv/bin/python benchmarks/postprocess.py            # part 1 (about 2 minutes on 2 cores)
    .venv/bin/python benchmarks/postprocess.py --long     # and part 2 (about 10 minutes more)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from embed import PeakMemory, large_ct, stretched_ct

from ctfm_engine.preprocess import Preprocessing, preprocess, resample, spl_grid
from ctfm_engine.tasks.segment import (
    estimate_memory,
    keep_largest_components,
    open_segmentation_model,
    predict_model_space,
)
from ctfm_engine.volume import Grid

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "ctfm_engine" / "weights" / "ctfm-mini-wholebody-seg"
GiB = 1 << 30


def card_clean_up(labels: np.ndarray) -> np.ndarray:
    from monai.transforms import KeepLargestConnectedComponent

    return np.asarray(KeepLargestConnectedComponent()(labels[None].astype(np.int64)))[0]


def timed(work, repeat: int = 2):
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = work()
        best = min(best, time.perf_counter() - start)
    return best, value


def clean_up_cost() -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    volume = large_ct()
    model = open_segmentation_model(SHIPPED)
    start = time.perf_counter()
    model_input = preprocess(volume, model.preprocessing)
    labels = predict_model_space(model.network, model_input.image, model.roi_size_zyx, model.overlap)
    back = model_input.to_source(labels, interpolation="nearest", fill=0)
    segmentation_seconds = time.perf_counter() - start
    print(f"{volume.source}: {'x'.join(map(str, volume.shape_zyx[::-1]))} voxels (x, y, z); shipped model "
          f"segmentation without clean-up {segmentation_seconds:.1f} s ({len(np.unique(back)) - 1} structures)")
    grids = {"shipped 3x1x1 mm": labels}
    published = spl_grid(volume.grid, (1.5, 1.5, 1.5))
    grids["published 1.5 mm"] = resample(back, volume.grid, published, interpolation="nearest")
    print(f"{'grid':<18} {'shape (z,y,x)':<16} {'ours s':>7} {'card s':>7} {'card/ours':>9} {'equal':>6} "
          f"{'count on source s':>17} {'ours+count / segmentation':>26}")
    for name, grid_labels in grids.items():
        ours_seconds, _ = timed(lambda g=grid_labels: keep_largest_components(g.copy()))
        cleaned = grid_labels.copy()
        removed = keep_largest_components(cleaned)
        card_seconds, card = timed(lambda g=grid_labels: card_clean_up(g), repeat=1)
        equal = bool(np.array_equal(card, cleaned))
        count_seconds = 0.0
        if name.startswith("shipped") and removed is not None:
            count_seconds, _ = timed(lambda r=removed: np.bincount(
                model_input.to_source(r, interpolation="nearest", fill=0).ravel()))
        share = (ours_seconds + count_seconds) / segmentation_seconds
        print(f"{name:<18} {'x'.join(map(str, grid_labels.shape)):<16} {ours_seconds:>7.2f} {card_seconds:>7.2f} "
              f"{card_seconds / ours_seconds:>9.2f} {str(equal):>6} {count_seconds:>17.2f} {share:>26.3f}")


def long_ct_child(out: Path) -> None:
    """Run in a child process: segment the 512x512x1500 CT, report the peak RSS and the estimate."""
    import psutil
    import torch

    from ctfm_engine.pipelines.segmentation import SegmentationRequest, run_segmentation

    volume = stretched_ct((512, 512, 1500), (0.7, 0.7, 0.7), "512x512x1500 CT at 0.7 mm (TotalSegmentator_0009 "
                          "stretched)")
    baseline = psutil.Process().memory_info().rss
    with PeakMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        outcome = run_segmentation(SegmentationRequest(volume, weights=SHIPPED))
        seconds = time.perf_counter() - start
    out.write_text(json.dumps({"seconds": seconds, "peak": memory.peak, "baseline": baseline,
                               "volume_bytes": int(volume.voxels.nbytes),
                               "estimate": outcome.memory.bytes_needed,
                               "model_shape": list(outcome.memory.model_shape_zyx),
                               "structures": len(outcome.structures())}))


def long_ct() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "long.json"
        subprocess.run([sys.executable, __file__, "--child", str(out)], check=True)
        result = json.loads(out.read_text())
    grown = result["peak"] - result["baseline"]
    print(f"512x512x1500 CT at 0.7 mm (source voxels {result['volume_bytes'] / GiB:.2f} GiB as float32): shipped "
          f"model, model grid {'x'.join(map(str, result['model_shape']))}, {result['seconds']:.0f} s, "
          f"{result['structures']} structures")
    print(f"  peak RSS {result['peak'] / GiB:.2f} GiB (grew {grown / GiB:.2f} GiB during the run); engine estimate "
          f"{result['estimate'] / GiB:.2f} GiB; measured growth / estimate = {grown / result['estimate']:.2f}")
    source = Grid((1500, 512, 512), (0.7, 0.7, 0.7), (0.0, 0.0, 0.0), np.eye(3))
    published = estimate_memory(source, Preprocessing((1.5, 1.5, 1.5), (-1024.0, 2048.0), -1024.0), 32,
                                (96, 160, 160))
    print(f"  the published model on the same CT would need about {published.bytes_needed / GiB:.2f} GiB "
          f"(estimate; model grid {'x'.join(map(str, published.model_shape_zyx))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="also the 512x512x1500 CT at 0.7 mm (part 2)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        long_ct_child(args.child)
        return
    clean_up_cost()
    if args.long:
        long_ct()


if __name__ == "__main__":
    main()
