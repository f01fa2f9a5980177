"""Whole-body segmentation metrics (TotalSegmentator v2, 117 structures): per-structure Dice and average surface
distance, macro Dice with a bootstrap 95% CI over cases (CT-FM paper: macro Dice 0.8981, 95% CI 0.8959-0.9004).

    .venv/bin/python training/evaluate_totalseg.py --predictions runs/totalseg_paper/predictions \\
        --ground-truth /data/Totalsegmentator_dataset_v201 --output runs/evaluation/totalseg.json

Expected local data:
  --predictions DIR   one label map per case (NIfTI/NRRD/MHA, any depth), named after the case: s0011.nii.gz,
                      s0011_seg.nii.gz or s0011/<any>.nii.gz; values are TotalSegmentator v2 ids (0 = background).
                      Each is sampled nearest-neighbour onto its ground truth's grid.
  --ground-truth DIR  either the TotalSegmentator dataset as downloaded (s0011/segmentations/<structure>.nii.gz,
                      one binary mask per structure, combined here by the v2 names) or one combined label map
                      per case (s0011.nii.gz).  Only cases with a prediction are evaluated.
Obtain the dataset from Zenodo (TotalSegmentator dataset, concept DOI 10.5281/zenodo.6802613; v2.0.1 has the 117
v2 structures); the CT-FM test split is the 248-case VISTA3D fold list
(VISTA3D's TotalSegmentatorV2_5_folds.json).

Definitions: Dice is NaN (not scored) when a structure is absent from both masks, 0 when it is absent from one;
ASD (mm, ground-truth spacing) is undefined when either mask is empty and such pairs are counted, not averaged.
Outputs: the JSON summary at --output and one row per (case, structure) in <output>.cases.csv, written
atomically.  Exit code 3 when a data folder is missing or malformed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctfm_engine.errors import UsageError
from ctfm_engine.training import paper_evaluation as evaluation
from ctfm_engine.training.metrics import DEFAULT_RESAMPLES

PROGRAM = "evaluate_totalseg"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=Path, required=True, help="folder of predicted label maps")
    parser.add_argument("--ground-truth", type=Path, required=True, help="folder of ground-truth cases")
    parser.add_argument("--label-map", type=Path, help="JSON {id: name} of the structures (default: TS v2 total)")
    parser.add_argument("--labels", type=int, nargs="+", help="evaluate only these label ids")
    parser.add_argument("--asd", choices=evaluation.ASD_MODES, default="symmetric",
                        help="surface distance: symmetric ASSD (default), pred_to_gt (the paper's MSD metric), "
                             "both, or none (Dice only, faster)")
    parser.add_argument("--output", type=Path, default=Path("runs/evaluation/totalseg.json"),
                        help="results JSON (per-case CSV beside it)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--quiet", action="store_true", help="no per-case progress on stderr")
    return parser


def evaluate(args: argparse.Namespace) -> None:
    names = evaluation.totalseg_names(args.label_map)
    if args.labels:
        unknown = sorted(set(args.labels) - set(names))
        if unknown:
            raise UsageError(f"--labels {unknown[0]}: not a label id of the label map")
        names = {label: names[label] for label in sorted(set(args.labels))}
    predictions = evaluation.label_files(args.predictions, "predictions")
    truth = evaluation.totalseg_ground_truth_cases(args.ground_truth)
    pairs, unmatched = evaluation.pair_cases(predictions, truth, args.predictions, args.ground_truth)
    progress = None if args.quiet else (lambda case: print(f"{PROGRAM}: {case}", file=sys.stderr))
    rows = evaluation.evaluate_segmentation_pairs(
        pairs, names, lambda source: evaluation.read_totalseg_ground_truth(source, names), args.asd, progress)
    summary = evaluation.summarise_segmentation(rows, names, resamples=args.resamples, seed=args.seed)
    document = {
        "task": "TotalSegmentator v2 whole-body segmentation",
        "predictions": str(args.predictions),
        "ground_truth": str(args.ground_truth),
        "asd": args.asd,
        "predictions_without_ground_truth": unmatched,
        **summary,
    }
    written = evaluation.write_results(args.output, document, rows)
    print(f"cases {summary['cases']}, structures scored {summary['labels_scored']}/{summary['labels_evaluated']}, "
          f"macro Dice {evaluation.estimate_text(summary['macro_dice'])}")
    columns = summary["asd_columns"]
    for column in columns:
        print(f"macro {column} (over pairs with both masks non-empty) "
              f"{evaluation.estimate_text(summary[f'macro_{column}'])}")
    print(f"pairs with an empty prediction {summary['empty_prediction_pairs']}, with an empty ground truth "
          f"(false-positive structure) {summary['empty_ground_truth_pairs']}")
    scored = [entry for entry in summary["per_structure"] if entry["dice"] is not None]
    lowest = sorted(scored, key=lambda entry: entry["dice"])[:10]
    print(f"lowest Dice of {len(scored)} scored structures:")
    print(evaluation.format_table(["structure", "Dice", "cases", "empty pred", "empty GT", *columns], [
        [e["structure"], e["dice"], e["dice_cases"], e["empty_prediction"], e["empty_ground_truth"],
         *(e[column] for column in columns)] for e in lowest]))
    if unmatched:
        print(f"{len(unmatched)} predictions have no ground truth (e.g. {unmatched[0]}); they were not evaluated")
    print("written: " + ", ".join(str(path) for path in written))


def main(argv: list[str] | None = None) -> int:
    return evaluation.run_command(PROGRAM, build_parser(), evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
