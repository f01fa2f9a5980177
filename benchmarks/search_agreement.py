"""Do `fast` and `exact` semantic search find the same place?  And which finds the right organ?

Queries: the centroid of every organ (>= 50 voxels) of a labelled real CT (TotalSegmentator example, 3 mm, and the
20-slice JPEG 2000 DICOM series, each with TotalSegmentator labels).  Targets: the other labelled scan and the four
demo scans of the CT-FM semantic-search app (different orientations, spacings and fields of view; one oblique).

For every query and target it prints:

* agreement -- fast's best match within one feature-map stride (16 model voxels, per axis) of exact's best;
* exact's own stability -- exact's best when the query point moves by one model voxel (3 mm along S, 1 mm along P
  or L; six neighbours): the share of queries whose best match stays within 16 voxels for every shift.  No method
  that is not exact itself can agree with exact more often than exact agrees with itself;
* exact's own verdict on fast's match: the share of exact's windows that exact scores higher than the window at
  fast's match (how far down exact's ranking fast's choice lies), and the cosine gap to exact's best;
* on the labelled pairs, the organ hit rate (match inside the same organ, true mask lookup) and the distance from
  the match to the organ's centroid (OCD, mm) for both methods.

    .venv/bin/python benchmarks/search_agreement.py --weights ctfm_engine/weights/ctfm-mini
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ctfm_engine.io import atomic_output
from ctfm_engine.models.registry import load_encoder
from ctfm_engine.preprocess import preprocess
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks.search import APP_PATCH_MM_ZYX, SearchSettings, SemanticSearch, volume_key
from ctfm_engine.training.evaluation import LabelledScan

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
LABELLED = {
    "example_ct_sm": (SHARED / "totalsegmentator" / "example_ct_sm.nii.gz",
                      SHARED / "totalsegmentator" / "example_seg.nii.gz"),
    "ts_dicom": (SHARED / "dicom" / "ts_abdomen_20slices_j2k",
                 SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz"),
}
UNLABELLED = {name: SHARED / "ct-nifti" / f"{name}.nii.gz" for name in
              ("TotalSegmentator_0009_0000", "TotalSegmentator_0003_0000", "s0335", "TotalSegmentator_0002_0000")}
STRIDE = 16
SHIFTS = np.vstack([np.eye(3), -np.eye(3)])


def organs_of(scan: LabelledScan, minimum: int = 50) -> list[int]:
    values, counts = np.unique(scan.labels, return_counts=True)
    return [int(v) for v, c in zip(values, counts, strict=True) if v and c >= minimum]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(ROOT / "ctfm_engine" / "weights" / "ctfm-mini"))
    parser.add_argument("--patch-mm", type=float, nargs=3, default=APP_PATCH_MM_ZYX, metavar=("S", "P", "L"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every query's result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder, checkpoint = load_encoder(args.weights)
    searcher = SemanticSearch(encoder, checkpoint.sha256, settings=SearchSettings(tuple(args.patch_mm)))
    patch = searcher.settings.patch_voxels_zyx
    labelled = {name: LabelledScan.read(*paths) for name, paths in LABELLED.items()}
    targets = {name: (scan.volume, scan) for name, scan in labelled.items()}
    targets.update({name: (read_volume(path), None) for name, path in UNLABELLED.items()})
    print(f"weights {checkpoint.name} (sha256 {checkpoint.sha256[:12]}), patch {list(args.patch_mm)} mm = {patch} "
          f"voxels, overlap {searcher.settings.overlap}", flush=True)
    rows = []
    for source_name, source in labelled.items():
        source_input = preprocess(source.volume, searcher.settings.preprocessing)
        source_features = searcher.features(source.volume)
        organs = organs_of(source)
        for target_name, (target, target_labels) in targets.items():
            if target_name == source_name:
                continue
            target_input = preprocess(target, searcher.settings.preprocessing)
            started = time.perf_counter()
            windows = searcher.exact_windows(target_input)
            exact_seconds = time.perf_counter() - started
            cached = searcher.cache.get(volume_key(target, searcher.settings.preprocessing, checkpoint.sha256))
            started = time.perf_counter()
            features = searcher.features(target)
            fast_seconds = time.perf_counter() - started
            fast_time = "cached" if cached is not None else f"{fast_seconds:5.1f} s"
            grid = target_input.grid
            for organ in organs:
                point = source.centroid_lps(organ)
                exact_field = windows.field(searcher.exact_query(source_input, point))
                exact = exact_field.matches(1, patch, refine=False)[0]
                fast = searcher.fast_field(features, searcher.fast_query(source_features, point)).matches(
                    1, patch, refine=True)[0]
                exact_index = grid.lps_to_zyx_index(np.array(exact.point_lps))
                offset = np.abs(grid.lps_to_zyx_index(np.array(fast.point_lps)) - exact_index).max()
                source_index = source_input.grid.lps_to_zyx_index(point)
                moved = 0.0
                for shift in SHIFTS:
                    shifted = source_input.grid.zyx_index_to_lps(source_index + shift)
                    again = windows.field(searcher.exact_query(source_input, shifted)).matches(1, patch,
                                                                                                 refine=False)[0]
                    moved = max(moved, float(np.abs(grid.lps_to_zyx_index(np.array(again.point_lps))
                                                    - exact_index).max()))
                # exact's own score of the window at fast's match: the share of exact's windows scoring higher
                score = float(windows.at(np.array(fast.point_lps)) @ searcher.exact_query(source_input, point))
                better = float(np.mean(exact_field.values > score))
                row = {"source": source_name, "target": target_name, "organ": organ,
                       "fast_to_exact_voxels": float(offset), "exact_shift_voxels": moved,
                       "exact_score_gap": exact.similarity - score, "exact_windows_better": better,
                       "exact_spread": float(exact.similarity - np.median(exact_field.values))}
                if target_labels is not None and organ in organs_of(target_labels):
                    centroid = target_labels.centroid_lps(organ)
                    for method, match in (("exact", exact), ("fast", fast)):
                        location = np.array(match.point_lps)
                        row[f"{method}_hit"] = target_labels.label_at(location) == organ
                        row[f"{method}_ocd_mm"] = float(np.linalg.norm(location - centroid))
                rows.append(row)
            part = [r for r in rows if r["source"] == source_name and r["target"] == target_name]
            agree = np.mean([r["fast_to_exact_voxels"] <= STRIDE for r in part])
            stable = np.mean([r["exact_shift_voxels"] <= STRIDE for r in part])
            print(f"  {source_name:>13} -> {target_name:<27} model {str(target_input.image.shape):>15}  "
                  f"exact {windows.vectors.shape[0] * windows.vectors.shape[1] * windows.vectors.shape[2]:4d} "
                  f"windows {exact_seconds:6.1f} s  fast {fast_time:>7}  "
                  f"agree {agree:.2f}  exact stable {stable:.2f}", flush=True)
    offsets = np.array([r["fast_to_exact_voxels"] for r in rows])
    stable = np.array([r["exact_shift_voxels"] <= STRIDE for r in rows])
    print(f"queries {len(rows)}: fast's best within {STRIDE} voxels of exact's {np.mean(offsets <= STRIDE):.3f} "
          f"(median offset {np.median(offsets):.0f} voxels); exact's best stays within {STRIDE} voxels under a "
          f"one-voxel query shift {stable.mean():.3f}; agreement among exact-stable queries "
          f"{np.mean(offsets[stable] <= STRIDE) if stable.any() else float('nan'):.3f}")
    better = np.array([r["exact_windows_better"] for r in rows])
    gap = np.array([r["exact_score_gap"] for r in rows])
    spread = np.array([r["exact_spread"] for r in rows])
    print(f"scored by exact itself, fast's match is in exact's top {np.median(better):.1%} of windows (median; "
          f"top 10 %: {np.mean(better <= 0.10):.3f} of queries); its exact cosine is {np.median(gap):.4f} below "
          f"exact's best (median), while exact's best is {np.median(spread):.4f} above exact's median window")
    scored = [r for r in rows if "exact_hit" in r]
    for method in ("exact", "fast"):
        hits = np.array([r[f"{method}_hit"] for r in scored])
        ocd = np.array([r[f"{method}_ocd_mm"] for r in scored])
        print(f"organ search ({len(scored)} queries, labelled pairs both ways) {method:>5}: "
              f"hit rate {hits.mean():.3f}, "
              f"OCD mean {ocd.mean():.1f} mm (SD {ocd.std(ddof=1):.1f}), median {np.median(ocd):.1f} mm")
    if args.json:
        with atomic_output(args.json) as temporary:
            temporary.write_text(json.dumps({"weights": checkpoint.identity, "patch_mm": list(args.patch_mm),
                                             "rows": rows}, indent=1, default=bool))


if __name__ == "__main__":
    main()
