"""Semantic search speed and peak memory: `exact` (the reference app's per-window method) vs `fast` (dense, cached).

The query is a point in the real TotalSegmentator sample CT (liver centroid, then spleen centroid for the repeated
query); the targets are real scans.  Each method runs in its own child process of this one run (so memory one
method freed does not count against the next), answering the same two queries on the same target:

- first query: nothing cached -- preprocess, embed, compare, top-k matches and the heatmap on the target's grid;
- repeated query: a second point on the same target.  `fast` answers it from its feature cache; `exact` has no
  cache (the reference app embeds every window again for each query), so its repeated query costs the same.

    .venv/bin/python benchmarks/search.py                    # a 300x300x100-voxel target (model space), real scans
    .venv/bin/python benchmarks/search.py --targets large    # only the 300x300x100 target
    .venv/bin/python benchmarks/search.py --model published  # CT-FM's full width (random weights, timing only)
    .venv/bin/python benchmarks/search.py --device cuda      # on a GPU

``--model shipped`` is the trained ctfm-mini (init_filters 8, 128-d); ``--model published`` builds the published
CT-FM encoder's architecture (init_filters 32, 512-d) with random weights and randomised BatchNorm statistics:
its timings and memory are those of the published model, its matches mean nothing.

The 300x300x100 target is real CT (TotalSegmentator_0009, lumbar spine and pelvis) resampled to 300x300x100
voxels at 1x1x3 mm -- exactly the CT-FM model grid (3x1x1 mm), so the model sees 100x300x300 voxels -- stretched
so the body fills the field of view as in a clinical scan.
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
from embed import PeakMemory, randomise_batchnorm_statistics, stretched_ct

from ctfm_engine.models.checkpoint import save_checkpoint
from ctfm_engine.models.encoder import build_encoder, encoder_config
from ctfm_engine.models.registry import load_encoder
from ctfm_engine.preprocess import preprocess
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks.search import FeatureCache, SearchSettings, SemanticSearch
from ctfm_engine.training.evaluation import LabelledScan
from ctfm_engine.volume import CTVolume

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = ROOT / "ctfm_engine" / "weights" / "ctfm-mini"
GiB = 1 << 30
TARGETS = {
    "large": None,
    "0009": SHARED / "ct-nifti" / "TotalSegmentator_0009_0000.nii.gz",
    "0003": SHARED / "ct-nifti" / "TotalSegmentator_0003_0000.nii.gz",
    "s0335": SHARED / "ct-nifti" / "s0335.nii.gz",
}
LIVER, SPLEEN = 5, 1


def large_target() -> CTVolume:
    """Real CT resampled to 300x300x100 voxels at 1x1x3 mm (the CT-FM model grid), body filling the view."""
    return stretched_ct((300, 300, 100), (1.0, 1.0, 3.0), "300x300x100 CT (0009 resampled)")


def published_width_weights() -> Path:
    """The published CT-FM encoder architecture (init_filters 32) with random weights, as a checkpoint folder."""
    folder = Path(tempfile.mkdtemp(prefix="ctfm-bench-")) / "ctfm-published-width-random"
    torch.manual_seed(0)
    config = encoder_config(init_filters=32)
    encoder = randomise_batchnorm_statistics(build_encoder(config))
    save_checkpoint(encoder, folder, config)
    return folder


def target_volume(name: str) -> CTVolume:
    return large_target() if name == "large" else read_volume(TARGETS[name])


# The reference app's per-window method, and ours (dense, cached) with its dense pass in fp32 and in bf16 (the
# default on CPUs with native bf16 where its features keep a cosine >= 0.999 with fp32's; see runtime/selection.py).
METHODS = ("exact", "fast", "fast-bf16")


def run_child(args: argparse.Namespace) -> None:
    """One method on one target in this process: two queries, their times and the peak memory."""
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    encoder, checkpoint = load_encoder(WEIGHTS if args.model == "shipped" else published_width_weights())
    source = LabelledScan.read(SHARED / "totalsegmentator" / "example_ct_sm.nii.gz",
                               SHARED / "totalsegmentator" / "example_seg.nii.gz")
    target = target_volume(args.target)
    method, _, precision = args.child.partition("-")  # "fast-bf16": the fast method, its dense pass in bf16
    searcher = SemanticSearch(encoder, checkpoint.sha256, device=device, settings=SearchSettings(overlap=args.overlap),
                              cache=FeatureCache(), precision=precision or "fp32")
    seconds, best = [], []
    with PeakMemory(device) as memory:
        for organ in (LIVER, SPLEEN):
            started = time.perf_counter()
            result = searcher.search(source.volume, source.centroid_lps(organ), [target], method=method)
            seconds.append(time.perf_counter() - started)
            best.append(list(result.targets[0].matches[0].point_lps))
    print(json.dumps({"method": args.child, "target": args.target, "first_s": round(seconds[0], 3),
                      "repeated_s": round(seconds[1], 3), "windows": result.targets[0].windows,
                      "peak_rss_gib": round(memory.peak / GiB, 3),
                      "peak_increase_gib": round((memory.peak - memory.baseline) / GiB, 3), "best": best}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", choices=tuple(TARGETS), default=list(TARGETS))
    parser.add_argument("--overlap", type=float, default=0.625, help="exact method's window overlap")
    parser.add_argument("--model", choices=("shipped", "published"), default="shipped")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--target", choices=tuple(TARGETS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    settings = SearchSettings(overlap=args.overlap)
    model_name = WEIGHTS.name if args.model == "shipped" else "published CT-FM width (init_filters 32), random"
    print(f"device: {args.device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}; weights "
          f"{model_name}; patch {settings.patch_voxels_zyx} voxels (z,y,x) at "
          f"{settings.preprocessing.spacing_zyx_mm} mm, exact overlap {args.overlap}")
    print("each method on each target runs in its own process; times include preprocessing, the query embedding, "
          "top-k matches and the heatmap on the target's grid; peak mem is the process's peak resident memory on CPU, "
          "the peak CUDA allocation on a GPU\n", flush=True)
    print(f"{'target':<44} {'model z,y,x':>14} {'method':>6} {'windows':>7} {'first':>9} {'repeated':>9} "
          f"{'peak mem':>9}")
    rows = []
    for name in args.targets:
        volume = target_volume(name)
        shape = preprocess(volume, settings.preprocessing).image.shape
        pair = {}
        for method in METHODS:
            command = [sys.executable, __file__, "--child", method, "--target", name, "--overlap", str(args.overlap),
                       "--device", args.device, "--model", args.model]
            child = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            if child.returncode != 0 or not lines:
                print(f"{name} {method}: failed (exit {child.returncode})\n{child.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(lines[-1]) | {"source": volume.source, "model_shape_zyx": list(shape)}
            pair[method] = row
            rows.append(row)
            print(f"{volume.source[-44:]:<44} {','.join(map(str, shape)):>14} {method:>6} {row['windows']:>7} "
                  f"{row['first_s']:>7.2f} s {row['repeated_s']:>7.3f} s {row['peak_rss_gib']:>6.2f} GiB", flush=True)
        for fast_method in METHODS[1:]:
            if "exact" not in pair or fast_method not in pair:
                continue
            exact, fast = pair["exact"], pair[fast_method]
            offset = np.abs(volume.lps_to_zyx_index(np.array(exact["best"]))
                            - volume.lps_to_zyx_index(np.array(fast["best"]))).max(axis=1)
            print(f"{'':<44} {'':>14} {'exact/' + fast_method:>6} {'':>7} {exact['first_s'] / fast['first_s']:>7.1f} x "
                  f"{exact['repeated_s'] / fast['repeated_s']:>7.0f} x   (best matches {offset.round(0).tolist()} "
                  f"source voxels apart)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
