"""MSD tumour segmentation metrics (CT-FM paper, Auto3DSeg runs): per-case tumour Dice and average surface distance
in mm, means with bootstrap 95% CIs, and a paired Wilcoxon test against a second model.

    .venv/bin/python training/evaluate_msd.py --task Task03_Liver --ground-truth /data/Task03_Liver \\
        --predictions runs/msd/liver/segresnet_0/prediction_testing --compare runs/msd/liver_baseline/...

Expected local data:
  --ground-truth DIR  the MSD task folder (Task03_Liver/, holding labelsTr/ and dataset.json) or its labelsTr/
                      folder; label maps named after the case (liver_10.nii.gz).  macOS "._*" files are ignored.
  --predictions DIR   one predicted label map per case, any depth, named after the case (liver_10.nii.gz,
                      liver_10_seg.nii.gz or liver_10/<any>.nii.gz), with the task's own label values.
Obtain the data from the Medical Segmentation Decathlon (http://medicaldecathlon.com, CC-BY-SA 4.0).  MSD's test
labels are not public, so the paper's test cases are a held-out part of labelsTr.

Tumour class per task (from each task's dataset.json): Task03_Liver 2, Task07_Pancreas 2, Task08_HepaticVessel 2,
Task06_Lung 1 -- Task06 labels are 0/1, so the paper notebook's hard-coded index 2 does not apply to it.
Definitions (deliberate differences from the paper notebook): Dice is reported over every case where
the tumour is in either mask (a predicted tumour in a tumour-free case scores 0) and, as "dice_paper_convention",
over cases with tumour in the ground truth only; ASD is given both one-directional prediction→ground truth (the
paper's) and symmetric, over cases with tumour in both masks, and cases with an empty prediction are COUNTED
(the paper's means dropped them silently).  Outputs: JSON at --output, per-case rows in <output>.cases.csv,
written atomically.  Exit code 3 when a data folder is missing or malformed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctfm_engine.errors import InputError, UsageError
from ctfm_engine.training import paper_evaluation as evaluation
from ctfm_engine.training.metrics import DEFAULT_RESAMPLES

PROGRAM = "evaluate_msd"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(evaluation.MSD_TASKS), help="MSD task")
    parser.add_argument("--ground-truth", type=Path, required=True, help="MSD task folder or its labelsTr folder")
    parser.add_argument("--predictions", type=Path, required=True, help="folder of predicted label maps")
    parser.add_argument("--class-index", type=int, help="override the tumour class index of the task")
    parser.add_argument("--compare", type=Path, help="a second model's predictions: paired Wilcoxon per metric")
    parser.add_argument("--output", type=Path, help="results JSON (default runs/evaluation/msd_<task>.json)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--quiet", action="store_true", help="no per-case progress on stderr")
    return parser


def _labels_folder(folder: Path) -> Path:
    evaluation.require_folder(folder, "ground-truth")
    return folder / "labelsTr" if (folder / "labelsTr").is_dir() else folder


def evaluate(args: argparse.Namespace) -> None:
    task = evaluation.MSD_TASKS[args.task]
    labels_folder = _labels_folder(args.ground_truth)
    tumour = task.tumour_index if args.class_index is None else args.class_index
    largest = max(task.largest_label, tumour)
    if tumour < 1:
        raise UsageError(f"--class-index {tumour}: the tumour class index must be at least 1")
    names = evaluation.msd_label_names(labels_folder)
    if names is not None and tumour not in names:
        raise InputError(f"{labels_folder}: dataset.json has no label {tumour} (labels {names}); check --task")
    truth = evaluation.label_files(labels_folder, "ground-truth")
    progress = None if args.quiet else (lambda case: print(f"{PROGRAM}: {case}", file=sys.stderr))

    def run(folder: Path) -> tuple[list[dict], list[str]]:
        pairs, unmatched = evaluation.pair_cases(evaluation.label_files(folder, "predictions"), truth, folder,
                                                 labels_folder)
        return evaluation.msd_case_rows(pairs, tumour, largest, progress), unmatched

    rows, unmatched = run(args.predictions)
    document: dict = {
        "task": args.task,
        "tumour_class_index": tumour,
        "tumour_class_name": names.get(tumour) if names else task.description,
        "predictions": str(args.predictions),
        "ground_truth": str(labels_folder),
        "predictions_without_ground_truth": unmatched,
        **evaluation.summarise_msd(rows, resamples=args.resamples, seed=args.seed),
    }
    if args.compare:
        other, _ = run(args.compare)
        document["comparison"] = {
            "predictions": str(args.compare),
            **evaluation.summarise_msd(other, resamples=args.resamples, seed=args.seed),
            "paired_wilcoxon": evaluation.paired_comparison(rows, other, ["dice", "asd_pred_to_gt_mm", "assd_mm"]),
        }
    output = args.output or Path("runs/evaluation") / f"msd_{args.task}.json"
    written = evaluation.write_results(output, document, rows)
    models = [("predictions", document)] + ([("compare", document["comparison"])] if args.compare else [])
    print(f"{args.task}: tumour class {tumour} ({document['tumour_class_name']}), {document['cases']} cases, "
          f"by status {document['cases_by_status']}")
    print(evaluation.format_table(
        ["model", "Dice", "Dice (paper: GT>0)", "ASD pred->GT mm", "ASSD mm", "empty pred"],
        [[name, *(evaluation.estimate_text(estimate) for estimate in (
            d["dice"], d["dice_paper_convention"], d["asd_pred_to_gt_mm"]["mean_mm"], d["assd_mm"]["mean_mm"])),
          d["asd_pred_to_gt_mm"]["empty_prediction"]] for name, d in models]))
    if args.compare:
        for column, test in document["comparison"]["paired_wilcoxon"].items():
            if isinstance(test, dict) and "p_value" in test:
                print(f"paired Wilcoxon {column}: p = {test['p_value']:.4g} over {test['pairs']} cases")
    print("written: " + ", ".join(str(path) for path in written))


def main(argv: list[str] | None = None) -> int:
    return evaluation.run_command(PROGRAM, build_parser(), evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
