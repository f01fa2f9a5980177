"""DICOM-SEG encodings on a real multi-label result: file size, write and read-back time, frames, ratios vs binary.

Each encoding of :class:`ctfm_engine.dicom.seg.SegEncoding` writes the same label map as a SEG of the same series;
the SEG is read back with highdicom and compared voxel for voxel, and validated with dciodvfy when installed.
``binary`` (BINARY, uncompressed) is what the MONAI Deploy SDK's DICOMSegmentationWriterOperator emits, so its
row is the baseline of the ratios.  Write time covers reading the source headers, building the instance
(highdicom, frame compression included) and saving it; read time covers highdicom parsing and decoding plus the
mapping back onto the volume's grid.

Default pair: the real abdominal CT series ``dicom/ts_abdomen_20slices_j2k`` (512x512x20) with TotalSegmentator's
31-structure prediction ``totalsegmentator/example_seg_dicom.nii.gz`` resampled (nearest) onto its grid.

    .venv/bin/python benchmarks/dicom_seg.py
    .venv/bin/python benchmarks/dicom_seg.py --labels LABELMAP.nii.gz --dicom SERIES_DIR [--repeat 3] [--json]

Label values are named with the TotalSegmentator v2 table (``ctfm_engine.labels``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctfm_engine.dicom.seg import Algorithm, SegEncoding, read_dicom_seg, write_dicom_seg
from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.dicom.validate import dciodvfy
from ctfm_engine.errors import CTFMError
from ctfm_engine.labels import label_table, totalsegmentator_names
from ctfm_engine.volume import CTVolume

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_DICOM = SHARED / "dicom" / "ts_abdomen_20slices_j2k"
DEFAULT_LABELS = SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz"
# The benchmark names no real model: a fixed digest stands in for the weights' sha256.
ALGORITHM = Algorithm("ctfm-benchmark", "0", "0" * 64)


def labels_on_grid(labels_path: Path, volume: CTVolume) -> np.ndarray:
    """The label image resampled (nearest neighbour, 0 outside) onto the volume's grid, shape (z, y, x)."""
    image = sitk.ReadImage(str(labels_path))
    on_grid = sitk.Resample(image, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                            sitk.sitkUInt16)
    return sitk.GetArrayFromImage(on_grid)


def measure(labels: np.ndarray, volume: CTVolume, folder: Path, repeat: int) -> list[dict]:
    table = label_table(totalsegmentator_names())
    rows = []
    for encoding in SegEncoding:
        path = folder / f"{encoding.value}.dcm"
        write_s = []
        for _ in range(repeat):
            info = write_dicom_seg(labels, volume, table, path, algorithm=ALGORITHM, encoding=encoding)
            write_s.append(info.seconds)
        read_s = []
        for _ in range(repeat):
            started = time.perf_counter()
            back, _ = read_dicom_seg(path, volume)
            read_s.append(time.perf_counter() - started)
        validation = dciodvfy(path)
        rows.append({
            "encoding": encoding.value,
            "segmentation_type": encoding.segmentation_type.value,
            "transfer_syntax": encoding.transfer_syntax_uid.name,
            "segments": len(info.segments),
            "frames": info.frames,
            "bytes": info.bytes,
            "write_s": statistics.median(write_s),
            "read_s": statistics.median(read_s),
            "exact": bool(np.array_equal(back, labels)),
            "dciodvfy_errors": None if validation is None else len(validation.errors),
        })
    binary = rows[0]
    for row in rows:
        row["size_vs_binary"] = row["bytes"] / binary["bytes"]
        row["write_vs_binary"] = row["write_s"] / binary["write_s"]
        row["read_vs_binary"] = row["read_s"] / binary["read_s"]
    return rows


def print_table(rows: list[dict], volume: CTVolume, labels_path: Path, repeat: int) -> None:
    print(f"series {volume.source}: {volume.shape_zyx[2]}x{volume.shape_zyx[1]}x{volume.shape_zyx[0]} (x, y, z)")
    print(f"labels {labels_path}: {rows[0]['segments']} structures; median of {repeat} run(s) per encoding")
    print("binary = BINARY uncompressed, what the MONAI Deploy SDK's DICOM-SEG writer emits (ratio 1.00)")
    header = (f"{'encoding':<16} {'frames':>6} {'size':>10} {'x binary':>9} {'write s':>8} {'x binary':>9} "
              f"{'read s':>7} {'x binary':>9} {'exact':>6} {'dciodvfy':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        errors = row["dciodvfy_errors"]
        verdict = "n/a" if errors is None else ("ok" if errors == 0 else f"{errors} err")
        print(f"{row['encoding']:<16} {row['frames']:>6} {row['bytes'] / 1e6:>8.3f}MB {row['size_vs_binary']:>9.4f} "
              f"{row['write_s']:>8.3f} {row['write_vs_binary']:>9.2f} {row['read_s']:>7.3f} "
              f"{row['read_vs_binary']:>9.2f} {'yes' if row['exact'] else 'NO':>6} {verdict:>9}")
    smallest = min(rows, key=lambda row: row["bytes"])
    print(f"smallest: {smallest['encoding']}, {1 / smallest['size_vs_binary']:.0f}x smaller than binary")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dicom", type=Path, default=DEFAULT_DICOM, help="folder holding one DICOM CT series")
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS, help="label map covering that series")
    parser.add_argument("--repeat", type=int, default=3, help="runs per encoding (median reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)
    try:
        volume = read_dicom_series(args.dicom)
        labels = labels_on_grid(args.labels, volume)
        with tempfile.TemporaryDirectory(prefix="ctfm-seg-bench-") as folder:
            rows = measure(labels, volume, Path(folder), max(1, args.repeat))
    except (CTFMError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 3 if isinstance(error, CTFMError) else 2
    if args.json:
        print(json.dumps({"dicom": str(args.dicom), "labels": str(args.labels), "encodings": rows}, indent=2))
    else:
        print_table(rows, volume, args.labels, max(1, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
