"""What the per-structure measurements (:func:`ctfm_engine.tasks.measure.structure_statistics`) cost on a
512x512x300 CT, next to SimpleITK's LabelStatisticsImageFilter, and how far their numbers lie apart.

The CT is the real abdomen series (ts_abdomen_20slices_j2k, 20 slices of 512x512) resampled linearly to 300 slices,
its label map TotalSegmentator's 31-structure result resampled (nearest) with it; a second, denser map labels every
voxel above -500 HU with one of 117 labels by slab, as a whole-body result would.

    .venv/bin/python benchmarks/measure.py      # about half a minute on 2 cores
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.tasks.measure import structure_statistics
from ctfm_engine.volume import CTVolume

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SLICES = 300


def stretched() -> tuple[CTVolume, np.ndarray]:
    series = read_dicom_series(SHARED / "dicom" / "ts_abdomen_20slices_j2k").to_sitk()
    grid = sitk.Image(512, 512, SLICES, sitk.sitkFloat32)
    grid.SetSpacing((*series.GetSpacing()[:2], series.GetSpacing()[2] * (series.GetSize()[2] - 1) / (SLICES - 1)))
    grid.SetOrigin(series.GetOrigin())
    grid.SetDirection(series.GetDirection())
    ct = sitk.Resample(series, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    labels = sitk.Resample(sitk.ReadImage(str(SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz")), grid,
                           sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return CTVolume.from_sitk(ct, "512x512x300 CT (ts_abdomen_20slices_j2k stretched)"), sitk.GetArrayFromImage(labels)


def best_of(work, repeat: int = 3) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        value = work()
        best = min(best, time.perf_counter() - started)
    return best, value


def compare(volume: CTVolume, labels: np.ndarray, what: str) -> None:
    ours_s, rows = best_of(lambda: structure_statistics(labels, volume))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(volume.to_sitk())
    image = volume.to_sitk()

    def simpleitk() -> sitk.LabelStatisticsImageFilter:
        statistics = sitk.LabelStatisticsImageFilter()
        statistics.Execute(image, label_image)
        return statistics

    reference_s, reference = best_of(simpleitk)
    deviation = max(max(abs(row.hu_mean - reference.GetMean(row.value)),
                        abs(row.hu_sd - reference.GetSigma(row.value))) for row in rows)
    exact = all(row.voxels == reference.GetCount(row.value) and row.hu_min == reference.GetMinimum(row.value)
                and row.hu_max == reference.GetMaximum(row.value) for row in rows)
    print(f"{what}: {len(rows)} structures, {np.count_nonzero(labels) / labels.size:.0%} of the voxels labelled")
    print(f"  structure_statistics {ours_s:.2f} s (with median and 4 percentiles), SimpleITK {reference_s:.2f} s "
          f"(histogram median): {reference_s / ours_s:.1f}x; counts/min/max equal: {exact}; largest mean/SD "
          f"difference {deviation:.1e} HU")


def main() -> None:
    volume, labels = stretched()
    print(f"{volume.source}: {volume.shape_zyx} voxels (z, y, x)")
    compare(volume, labels, "TotalSegmentator's 31 structures")
    slab = np.minimum(np.arange(SLICES) * 117 // SLICES + 1, 117).astype(np.uint8)
    dense = np.where(volume.voxels > -500, slab[:, None, None], 0).astype(np.uint8)
    compare(volume, dense, "every voxel above -500 HU, 117 labels")


if __name__ == "__main__":
    main()
