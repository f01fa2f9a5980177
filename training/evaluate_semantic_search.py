"""Does pre-training learn something real? Three checks of an encoder against the same architecture with random weights.

All on real CT that pre-training never saw: the TotalSegmentator example (3 mm, 41 labels) and the 20-slice
JPEG 2000 DICOM series (31 labels); labels are TotalSegmentator predictions (silver standard).

1. Held-out view matching (label-free): the pre-training task on these unseen scans -- random crops, two augmented
   views each, a hit when a view's nearest view (cosine of pooled encoder features) is its own crop's.
2. Organ search (the engine's OCD, ``ctfm_engine.tasks.ocd``, exact method): each organ's centroid patch in one
   scan searched exhaustively in the other (both directions); a hit is a best match inside the same organ;
   distance from the match to that organ's centroid in mm.
3. Dense structure transfer: every labelled window of one scan matched to the other's windows; a hit is the same
   kind of structure.  Run on a 1.5 x 1 x 1 mm grid, because the DICOM series is only 40 mm long: at 3 mm every
   16-slice window would be a third zero padding.

    .venv/bin/python training/evaluate_semantic_search.py --weights ctfm_engine/weights/ctfm-mini
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ctfm_engine.io import atomic_output
from ctfm_engine.models.encoder import build_encoder
from ctfm_engine.models.registry import load_encoder
from ctfm_engine.preprocess import Preprocessing, preprocess
from ctfm_engine.tasks.embed import Embedder
from ctfm_engine.tasks.ocd import organ_centroid_distances
from ctfm_engine.tasks.search import SemanticSearch
from ctfm_engine.training.evaluation import (
    LabelledScan,
    TransferResult,
    patch_label_transfer,
    view_matching,
)

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
NAMES = json.loads((SHARED / "labels" / "label_map_totalsegmentator_v2.json").read_text())["total"]
TRANSFER_GRID = Preprocessing(spacing_zyx_mm=(1.5, 1.0, 1.0))


def evaluate(encoder: torch.nn.Module, identity: str, scans: dict[str, LabelledScan], rounds: int) -> dict:
    """The three checks for one encoder; ``identity`` names its weights (the search's cache key)."""
    embedder = Embedder(encoder)
    searcher = SemanticSearch(encoder, identity)
    (name_a, scan_a), (name_b, scan_b) = scans.items()
    pairs = ((scan_a, scan_b, f"{name_a}->{name_b}"), (scan_b, scan_a, f"{name_b}->{name_a}"))
    views = {name: view_matching(encoder, preprocess(scan.volume).image, rounds=rounds)
             for name, scan in scans.items()}
    names = {int(value): name for value, name in NAMES.items()}
    searches = [{"direction": label, "organ": result.name, "hit": result.hit, "distance_mm": result.distance_mm}
                for source, target, label in pairs
                for result in organ_centroid_distances(searcher, source.volume, source.labels, target.volume,
                                                       target.labels, names=names, method="exact")]
    transfers = {label: patch_label_transfer(embedder, target, source, NAMES, preprocessing=TRANSFER_GRID)
                 for source, target, label in pairs}
    return {
        "view_matching": {name: counts(result) for name, result in views.items()},
        "organ_search": searches,
        "structure_transfer": {label: counts(result) for label, result in transfers.items()},
    }


def counts(result: TransferResult) -> dict:
    return {"hits": result.hits, "queries": result.queries, "chance": result.chance}


def summary(result: dict) -> str:
    views = result["view_matching"].values()
    view_hits, view_total = sum(v["hits"] for v in views), sum(v["queries"] for v in views)
    chance = next(iter(result["view_matching"].values()))["chance"]
    hits = np.array([row["hit"] for row in result["organ_search"]])
    distances = np.array([row["distance_mm"] for row in result["organ_search"]])
    transfer = result["structure_transfer"].values()
    t_hits, t_total = sum(t["hits"] for t in transfer), sum(t["queries"] for t in transfer)
    t_chance = sum(t["chance"] * t["queries"] for t in transfer) / max(t_total, 1)
    return (f"  1. view matching      {view_hits}/{view_total} = {view_hits / view_total:.3f}  (chance {chance:.3f})\n"
            f"  2. organ search       {hits.sum()}/{hits.size} = {hits.mean():.3f}  distance to organ centroid mean "
            f"{distances.mean():.1f} mm, median {np.median(distances):.1f} mm\n"
            f"  3. structure transfer {t_hits}/{t_total} = {t_hits / t_total:.3f}  (chance {t_chance:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="encoder checkpoint folder to evaluate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-weights baseline")
    parser.add_argument("--rounds", type=int, default=8, help="view matching: rounds of 16 crops per scan")
    parser.add_argument("--json", type=Path, help="also write every query's result here")
    args = parser.parse_args()
    scans = {
        "example_ct_sm": LabelledScan.read(SHARED / "totalsegmentator" / "example_ct_sm.nii.gz",
                                           SHARED / "totalsegmentator" / "example_seg.nii.gz"),
        "ts_dicom": LabelledScan.read(SHARED / "dicom" / "ts_abdomen_20slices_j2k",
                                      SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz"),
    }
    trained, checkpoint = load_encoder(args.weights)
    torch.manual_seed(args.seed)
    random = build_encoder(dict(checkpoint.config)).eval()
    results = {}
    for label, identity, encoder in ((f"{checkpoint.name} (sha256 {checkpoint.sha256[:12]})", checkpoint.sha256,
                                      trained.eval()),
                                     (f"random init, seed {args.seed}", f"random-init-{args.seed}", random)):
        results[label] = evaluate(encoder, identity, scans, args.rounds)
        print(f"{label}\n{summary(results[label])}", flush=True)
    if args.json:
        with atomic_output(args.json) as temporary:
            temporary.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
