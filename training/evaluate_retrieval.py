"""Retrieval metrics of the CT-FM paper: OrganMNIST3D (AP/HR/F1@k) and 3D-MIR (P@k, AP), by cosine similarity.

    .venv/bin/python training/evaluate_retrieval.py medmnist --npz /data/medmnist/organmnist3d_64.npz \\
        --weights ~/.cache/ctfm/models/project-lighter--ct_fm_feature_extractor
    .venv/bin/python training/evaluate_retrieval.py 3dmir --embeddings runs/mir/embeddings.csv \\
        --label-columns lesion_presence lesion_group --cohort-column cohort

medmnist: a MedMNIST 3-D .npz (keys train_images, train_labels, val_images, val_labels, test_images,
  test_labels; images (N, D, H, W) uint8).  OrganMNIST3D at 64^3 is organmnist3d_64.npz from the medmnist package
  (pip install medmnist; OrganMNIST3D(split="train", size=64, download=True)) or https://medmnist.com (CC BY 4.0).
  Every volume is embedded with the encoder (--weights: a CT-FM checkpoint folder, config.json +
  model.safetensors) as the paper's notebook did it: /255, whole volume, spatial axes reversed, last feature map
  average-pooled.  Corpus = train; queries = val + test; relevant = same class label.
3dmir: a CSV of precomputed scan embeddings, one row per scan: an id (--id-column, default scan), a split
  (--split-column, default split: query/test or corpus/train), one or more label columns (--label-columns, e.g.
  the 3D-MIR workbook's lesion presence and lesion group per cohort sheet), optionally a cohort column (queries
  search only their own cohort's corpus, as in 3D-MIR), and the embedding in columns e0, e1, ...
  (--embedding-prefix).  3D-MIR lists and annotations come from the 3D-MIR benchmark (Data/*_split.csv,
  3D_MSD_Annotations.xlsx) over Medical Segmentation Decathlon images (http://medicaldecathlon.com).

Metrics, per query then averaged: ap_paper@k (the notebooks' AP: precision at each hit in the top k divided by
the number of hits; also the 3D-MIR notebook's "AP" at k=10), ap@k (standard: divided by min(k, relevant in
corpus)), hr@k (any hit), f1_paper@k (harmonic mean of ap_paper and hr; no-hit queries score 0 instead of being
dropped as NaN), f1@k (harmonic mean of P@k and recall@k), precision@k (3D-MIR P@k), ap_full_ranking (standard AP
over the whole corpus).  Similarity is cosine (the paper's OrganMNIST3D notebook used Euclidean distance).
Outputs: JSON at --output and per-query rows in <output>.cases.csv, atomically.  Exit code 3 when the data is
missing or malformed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctfm_engine.models.registry import load_encoder
from ctfm_engine.runtime.device import resolve_device
from ctfm_engine.training import paper_evaluation as evaluation

PROGRAM = "evaluate_retrieval"
COLUMNS = ("ap_paper", "ap", "hr", "f1_paper", "f1", "precision")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    medmnist = modes.add_parser("medmnist", help="embed a MedMNIST 3-D npz and retrieve by class")
    medmnist.add_argument("--npz", type=Path, required=True, help="MedMNIST 3-D .npz file")
    medmnist.add_argument("--weights", help="encoder checkpoint folder (default: the cached CT-FM encoder)")
    medmnist.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    medmnist.add_argument("--batch-size", type=int, default=16, help="volumes per forward pass")
    medmnist.add_argument("--max-per-split", type=int, help="use only the first N volumes of each split (smoke runs)")
    medmnist.add_argument("--output", type=Path, default=Path("runs/evaluation/retrieval_medmnist.json"))
    mir = modes.add_parser("3dmir", help="retrieve with precomputed scan embeddings (3D-MIR)")
    mir.add_argument("--embeddings", type=Path, required=True, help="CSV of scan embeddings and labels")
    mir.add_argument("--label-columns", nargs="+", required=True, help="label columns, each evaluated")
    mir.add_argument("--cohort-column", help="queries search only the corpus of their own cohort")
    mir.add_argument("--id-column", default="scan")
    mir.add_argument("--split-column", default="split")
    mir.add_argument("--embedding-prefix", default="e", help="embedding columns are <prefix>0, <prefix>1, ...")
    mir.add_argument("--output", type=Path, default=Path("runs/evaluation/retrieval_3dmir.json"))
    for sub in (medmnist, mir):
        sub.add_argument("--k", type=int, nargs="+", default=[3, 5, 10], help="cut-offs k (default 3 5 10)")
    return parser


def _table(summary: dict, ks: list[int]) -> str:
    rows = [[f"@{k}", *(summary[f"{name}@{k}"] for name in COLUMNS)] for k in ks]
    return evaluation.format_table(["k", *COLUMNS], rows) + f"\nap_full_ranking {summary['ap_full_ranking']:.4f}"


def evaluate_medmnist(args: argparse.Namespace) -> None:
    splits = evaluation.read_medmnist(args.npz, args.max_per_split)
    device = resolve_device(args.device)
    encoder, checkpoint = load_encoder(args.weights)
    encoder = encoder.to(device)
    embedded = {split: (evaluation.medmnist_embeddings(encoder, images, device, args.batch_size), labels)
                for split, (images, labels) in splits.items()}
    summary, rows = evaluation.medmnist_retrieval(embedded["train"], {"val": embedded["val"],
                                                                      "test": embedded["test"]}, args.k)
    document = {
        "mode": "medmnist",
        "npz": str(args.npz),
        "weights": checkpoint.identity,
        "corpus": f"train ({len(embedded['train'][1])})",
        "queries": f"val + test ({len(embedded['val'][1])} + {len(embedded['test'][1])})",
        "max_per_split": args.max_per_split,
        "similarity": "cosine",
        "summary": summary,
    }
    written = evaluation.write_results(args.output, document, rows)
    print(f"{args.npz.name}: {document['queries']} queries against a corpus of {document['corpus']}; "
          f"weights {checkpoint.name}")
    print(_table(summary, args.k))
    print("written: " + ", ".join(str(path) for path in written))


def evaluate_mir(args: argparse.Namespace) -> None:
    scans = evaluation.read_scan_embeddings(args.embeddings, args.id_column, args.split_column, args.label_columns,
                                            args.cohort_column, args.embedding_prefix)
    results, all_rows = {}, []
    for column in args.label_columns:
        results[column], rows = evaluation.scan_retrieval(scans, column, args.k)
        all_rows += rows
    document = {"mode": "3dmir", "embeddings": str(args.embeddings), "similarity": "cosine", "results": results}
    written = evaluation.write_results(args.output, document, all_rows)
    for column, result in results.items():
        overall = result["overall"]
        print(f"{column}: {overall['queries']} queries in {len(result['per_cohort'])} cohort(s)")
        print(_table(overall, args.k))
    print("written: " + ", ".join(str(path) for path in written))


def evaluate(args: argparse.Namespace) -> None:
    (evaluate_medmnist if args.mode == "medmnist" else evaluate_mir)(args)


def main(argv: list[str] | None = None) -> int:
    return evaluation.run_command(PROGRAM, build_parser(), evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
