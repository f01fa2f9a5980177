"""Head-CT triage metrics (SinoCT test, CQ500 external test): AUC-ROC and F1 at a threshold, each with the paper's
Wald 95% CI and a stratified bootstrap 95% CI (CT-FM paper, SinoCT: F1 0.776, AUC 0.836; CQ500: 0.754, 0.794).

    .venv/bin/python training/evaluate_triage.py --predictions runs/triage/sinoct_test.csv
    .venv/bin/python training/evaluate_triage.py --predictions runs/triage/cq500.csv --cq500-reads /data/CQ500/reads.csv

Expected local data:
  --predictions CSV   a header row and one row per scan: a case id (--id-column, default case_id), the model's
                      probability of "abnormal" (--probability-column, default probability; pass --logits for raw
                      logits) and, unless a label file is given, the label (--label-column, default label: 0/1,
                      or SinoCT's "1,0" = normal / "0,1" = abnormal).
  --sinoct-labels CSV SinoCT labels.csv: a case-id column (--labels-id-column) and "label" ("1,0" normal, "0,1"
                      abnormal).  SinoCT is the head-CT dataset of the CT-FM paper (see its data availability).
  --cq500-reads CSV   CQ500 reads.csv (http://headctstudy.qure.ai/dataset): a scan is abnormal when any reader
                      marked any finding (any column but the id, default "name", and "Category" is 1), the
                      paper's rule.
Definitions: positive call = probability >= --threshold (the paper used round(), i.e. > 0.5; they differ only at
exactly 0.5).  The Wald interval p ± 1.96·sqrt(p(1-p)/n) is what the paper published for AUC and F1 although
neither is a binomial proportion; the bootstrap CI (positives and negatives resampled separately) is the one to
trust.  Predictions without a label and labels without a prediction are counted in the results.
Outputs: JSON at --output and per-case rows in <output>.cases.csv, atomically.  Exit code 3 on missing or
malformed files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctfm_engine.training import metrics
from ctfm_engine.training import paper_evaluation as evaluation

PROGRAM = "evaluate_triage"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=Path, required=True, help="predictions CSV")
    parser.add_argument("--id-column", default="case_id", help="case-id column of the predictions CSV")
    parser.add_argument("--probability-column", default="probability", help="probability (or logit) column")
    parser.add_argument("--label-column", default="label", help="label column when no label file is given")
    parser.add_argument("--logits", action="store_true", help="the probability column holds logits (sigmoid)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--sinoct-labels", type=Path, help="SinoCT labels.csv")
    labels.add_argument("--cq500-reads", type=Path, help="CQ500 reads.csv")
    parser.add_argument("--labels-id-column", help="case-id column of the label file (default: name for CQ500, "
                                                   "the predictions' --id-column for SinoCT)")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold of F1 (default 0.5)")
    parser.add_argument("--output", type=Path, default=Path("runs/evaluation/triage.json"), help="results JSON")
    parser.add_argument("--resamples", type=int, default=metrics.DEFAULT_RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def evaluate(args: argparse.Namespace) -> None:
    label_file = args.sinoct_labels or args.cq500_reads
    predictions = evaluation.read_triage_predictions(
        args.predictions, args.id_column, args.probability_column, None if label_file else args.label_column,
        logits=args.logits)
    labels = None
    if args.sinoct_labels:
        labels = evaluation.read_sinoct_labels(args.sinoct_labels, args.labels_id_column or args.id_column)
    elif args.cq500_reads:
        labels = evaluation.read_cq500_reads(args.cq500_reads, args.labels_id_column or "name")
    cases, truth, probabilities, unlabelled = evaluation.join_triage(predictions, labels, label_file or
                                                                     args.predictions)
    report = metrics.classification_report(truth, probabilities, threshold=args.threshold,
                                           resamples=args.resamples, seed=args.seed)
    document = {
        "task": "head-CT triage (normal vs abnormal)",
        "predictions": str(args.predictions),
        "labels": str(label_file) if label_file else f"{args.predictions} column {args.label_column!r}",
        "predictions_without_label": unlabelled,
        "labels_without_prediction": sorted(set(labels or {}) - set(predictions)),
        **report,
    }
    rows = [{"case": case, "label": int(label), "probability": float(probability),
             "called_abnormal": int(probability >= args.threshold)}
            for case, label, probability in zip(cases, truth, probabilities, strict=True)]
    written = evaluation.write_results(args.output, document, rows)
    print(f"{report['cases']} cases ({report['positives']} abnormal); threshold {args.threshold}")
    print(evaluation.format_table(
        ["metric", "value", "bootstrap 95% CI", "Wald 95% CI (paper)"],
        [[name, report[name]["value"],
          f"{report[name]['bootstrap']['low']:.4f}-{report[name]['bootstrap']['high']:.4f}",
          f"{report[name]['wald_paper']['low']:.4f}-{report[name]['wald_paper']['high']:.4f}"]
         for name in ("auc", "f1")]))
    print(f"sensitivity {report['sensitivity']:.4f}, specificity {report['specificity']:.4f}; "
          f"{len(unlabelled)} predictions without label, {len(document['labels_without_prediction'])} labels "
          f"without prediction")
    print("written: " + ", ".join(str(path) for path in written))


def main(argv: list[str] | None = None) -> int:
    return evaluation.run_command(PROGRAM, build_parser(), evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
