"""Build the head-CT triage manifest (path,label,split) from local copies of SinoCT and CQ500, with CT-FM's splits.

SinoCT: patient folders sorted by name, shuffled with Python's ``random.seed(0)``, then cut 0.8/0.1/0.1
into train/val/test (7,823/978/978 of 9,779); ``labels.csv`` (columns ``patient_id``, ``label``) gives "1,0" =
normal (0) and "0,1" = abnormal (1).  Rows are written in the shuffled order, so ``data.train_volumes: k`` with
``data.subset_seed: null`` takes the same first k training scans as CT-FM's low-data runs.  CQ500 (split
``cq500``, external test): ``reads.csv`` indexed by ``name`` (``CQ500-CT-<n>``); a scan is abnormal (1) if any
column but ``Category`` is 1 (any finding by any reader); the image is the first ``scan.nrrd`` under the patient
folder (sorted; CT-FM took the first file-system hit).  Run:

    python training/build_head_ct_manifest.py --sinoct /data/SinoCT --cq500 /data/CQ500 \
        --out training/manifests/sinoct_cq500.csv
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

SPLIT_RATIO = (0.8, 0.1, 0.1)
SINOCT_LABELS = {"1,0": 0, "0,1": 1}


def sinoct_rows(root: Path, image: str = "nrrd/scan.nrrd", seed: int = 0) -> list[dict[str, str]]:
    """SinoCT rows in CT-FM's shuffled order with their split; a patient folder without ``image`` is used as a
    DICOM series folder."""
    labels = {}
    with open(root / "labels.csv", newline="") as stream:
        for record in csv.DictReader(stream):
            text = record["label"].replace(" ", "")
            if text not in SINOCT_LABELS:
                raise ValueError(f"{root / 'labels.csv'}: label {record['label']!r} is neither '1,0' nor '0,1'")
            labels[record["patient_id"]] = SINOCT_LABELS[text]
    patients = sorted(path for path in root.iterdir() if path.is_dir())
    random.seed(seed)
    random.shuffle(patients)
    train_end = int(SPLIT_RATIO[0] * len(patients))
    val_end = int((SPLIT_RATIO[0] + SPLIT_RATIO[1]) * len(patients))  # 0.9000000000000001, as CT-FM computes it
    rows = []
    for index, patient in enumerate(patients):
        if patient.name not in labels:
            raise ValueError(f"{root / 'labels.csv'}: has no label for patient folder {patient.name}")
        split = "train" if index < train_end else "val" if index < val_end else "test"
        scan = patient / image
        rows.append({"path": str(scan if scan.is_file() else patient), "label": str(labels[patient.name]),
                     "split": split})
    return rows


def cq500_rows(root: Path, image: str = "scan.nrrd") -> tuple[list[dict[str, str]], list[str]]:
    """CQ500 rows (split ``cq500``) and the patient folders skipped for want of an ``image`` file."""
    abnormal = {}
    with open(root / "reads.csv", newline="") as stream:
        for record in csv.DictReader(stream):
            findings = [value for key, value in record.items() if key not in ("name", "Category")]
            abnormal[record["name"]] = int(any(float(value or 0) == 1 for value in findings))
    rows, skipped = [], []
    for patient in sorted(path for path in root.iterdir() if path.is_dir()):
        name = f"CQ500-CT-{patient.name.split(' ')[0].replace('CQ500CT', '')}"
        scans = sorted(patient.rglob(image))
        if name not in abnormal or not scans:
            skipped.append(patient.name)
            continue
        rows.append({"path": str(scans[0]), "label": str(abnormal[name]), "split": "cq500"})
    return rows, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sinoct", type=Path, required=True, help="SinoCT folder (labels.csv + patient folders)")
    parser.add_argument("--cq500", type=Path, help="CQ500 folder (reads.csv + patient folders)")
    parser.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    parser.add_argument("--sinoct-image", default="nrrd/scan.nrrd", help="scan file inside a SinoCT patient folder")
    parser.add_argument("--cq500-image", default="scan.nrrd", help="scan file name searched under a CQ500 patient")
    args = parser.parse_args(argv)
    try:
        rows = sinoct_rows(args.sinoct, args.sinoct_image)
        skipped: list[str] = []
        if args.cq500 is not None:
            external, skipped = cq500_rows(args.cq500, args.cq500_image)
            rows += external
    except (OSError, KeyError, ValueError) as error:
        print(f"build_head_ct_manifest: {error}", file=sys.stderr)
        return 3
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    counts = {split: sum(row["split"] == split for row in rows) for split in dict.fromkeys(r["split"] for r in rows)}
    print(f"wrote {args.out}: {counts}" + (f"; {len(skipped)} CQ500 folders without a scan skipped" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
