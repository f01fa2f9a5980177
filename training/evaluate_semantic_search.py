"""Does pre-training learn anatomy? Organ semantic-search hit rate of an encoder vs the same architecture random.

Two labelled real abdominal CTs from ../shared/data, both held out from pre-training: the TotalSegmentator example
(3 mm, 41 labels) and the 20-slice JPEG 2000 DICOM series (31 labels). For each organ present in both, the
centroid patch of one scan is searched exhaustively in the other (both directions); a hit is a best match inside
the same organ. Labels are TotalSegmentator predictions (silver standard).

    .venv/bin/python training/evaluate_semantic_search.py --weights ctfm_engine/weights/ctfm-mini
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctfm_engine.models.encoder import build_encoder  # noqa: E402
from ctfm_engine.models.registry import load_encoder  # noqa: E402
from ctfm_engine.tasks.embed import Embedder  # noqa: E402
from ctfm_engine.training.evaluation import LabelledScan, organ_search, shared_organs  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
NAMES = json.loads((SHARED / "labels" / "label_map_totalsegmentator_v2.json").read_text())["total"]


def evaluate(embedder: Embedder, scans: dict[str, LabelledScan]) -> list[dict]:
    (name_a, scan_a), (name_b, scan_b) = scans.items()
    organs = shared_organs(scan_a, scan_b)
    rows = []
    for source, target, direction in ((scan_a, scan_b, f"{name_a}->{name_b}"), (scan_b, scan_a, f"{name_b}->{name_a}")):
        for result in organ_search(embedder, source, target, organs):
            rows.append({"direction": direction, "organ": NAMES[str(result.organ)], "hit": result.hit,
                         "distance_mm": result.distance_mm})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="encoder checkpoint folder to evaluate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-weights baseline")
    parser.add_argument("--json", type=Path, help="also write the per-query rows here")
    args = parser.parse_args()
    scans = {
        "example_ct_sm": LabelledScan.read(SHARED / "totalsegmentator" / "example_ct_sm.nii.gz",
                                           SHARED / "totalsegmentator" / "example_seg.nii.gz"),
        "ts_dicom": LabelledScan.read(SHARED / "dicom" / "ts_abdomen_20slices_j2k",
                                      SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz"),
    }
    trained, checkpoint = load_encoder(args.weights)
    torch.manual_seed(args.seed)
    random = build_encoder({key: value for key, value in checkpoint.config.items()}).eval()
    results = {}
    for label, encoder in ((f"{checkpoint.name} (sha256 {checkpoint.sha256[:12]})", trained),
                           (f"random init, seed {args.seed}", random)):
        rows = evaluate(Embedder(encoder), scans)
        results[label] = rows
        hits = np.array([row["hit"] for row in rows])
        distances = np.array([row["distance_mm"] for row in rows])
        print(f"{label:<48} hit rate {hits.mean():.3f} ({hits.sum()}/{hits.size})   distance to organ centroid "
              f"mean {distances.mean():.1f} mm, median {np.median(distances):.1f} mm")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
