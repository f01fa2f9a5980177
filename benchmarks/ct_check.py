"""The statistics the check that an input is CT in Hounsfield units (ctfm_engine.volume.check_hounsfield) rests on,
measured on the real data of the test suite, and what the check costs on a 512 x 512 x 1500 scan.

For each input, on the voxels the check samples: the share below -50 HU (fat or air, the rule), the darkest voxels
(0.5th percentile, the former rule refused above -200 HU), the median, the share of exact zeros and the share at
924..1124 (soft tissue of CT stored as HU+1024), and the check's verdict.  The inputs are those of
tests/test_ct_check.py: real whole scans, a 96 mm crop centred on each of the 41 structures of the sample CT, a
30 mm crop inside the liver, MR, the brain template, CT stored as HU+1024 and a probability map.

    .venv/bin/python benchmarks/ct_check.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from embed import stretched_ct  # noqa: E402
from test_ct_check import NOT_CT, SLICER_HEAD, liver_interior_crop, organ_crops  # noqa: E402

from ctfm_engine.errors import InputError  # noqa: E402
from ctfm_engine.readers import read_volume  # noqa: E402
from ctfm_engine.volume import (  # noqa: E402
    FAT_OR_AIR_BELOW_HU,
    HU_PLUS_1024_SOFT_TISSUE,
    check_hounsfield,
    hounsfield_sample,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def row(name: str, voxels: np.ndarray) -> str:
    sample = hounsfield_sample(voxels).astype(np.float64)
    low, high = HU_PLUS_1024_SOFT_TISSUE
    shares = [np.mean(sample < FAT_OR_AIR_BELOW_HU), np.mean(sample == 0), np.mean((sample >= low) & (sample <= high))]
    try:
        check_hounsfield(voxels, name)
        verdict = "read"
    except InputError as error:
        verdict = f"refused ({error.remedy})"
    p_low, median = np.percentile(sample, [0.5, 50])
    return (f"{name:44s} {shares[0]:8.2%} {p_low:8.0f} {median:8.0f} {shares[1]:7.1%} {shares[2]:7.1%}  {verdict}")


def seconds(work: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    print(f"{'input':44s} {'<-50 HU':>8s} {'p0.5':>8s} {'median':>8s} {'zeros':>7s} {'924-1124':>7s}  verdict")
    folder = Path(tempfile.mkdtemp(prefix="ct-check-"))
    for path in sorted((SHARED / "ct-nifti").glob("*.nii.gz")):
        print(row(path.name, read_volume(path, check_hu=False).voxels))
    for path in (SHARED / "totalsegmentator" / "example_ct_sm.nii.gz", SHARED / "dicom" / "ts_abdomen_20slices_j2k",
                 SLICER_HEAD):
        print(row(path.name + (" (offset detected)" if path == SLICER_HEAD else ""), read_volume(path).voxels))
    for label, path in organ_crops(folder).items():
        print(row(f"96 mm crop on structure {label}", read_volume(path, check_hu=False).voxels))
    print(row("30 mm crop inside the liver", read_volume(liver_interior_crop(folder), check_hu=False).voxels))
    for name, (make, options, _, _) in NOT_CT.items():
        print(row(name, read_volume(make(folder), check_hu=False, **options).voxels))

    scan = stretched_ct((512, 512, 300), (0.8, 0.8, 1.0), "512x512x300").voxels
    large = np.concatenate([scan] * 5)  # 1500 slices of real CT
    check = seconds(lambda: check_hounsfield(large, "512x512x1500"))
    former = seconds(lambda: np.percentile(hounsfield_sample(large), 0.5))
    print(f"\n512 x 512 x 1500 CT: the check {check * 1000:.1f} ms; the former rule (0.5th percentile of the same "
          f"sample) {former * 1000:.1f} ms; ratio {check / former:.2f}")


if __name__ == "__main__":
    main()
