"""Evaluation of the CT-FM paper's downstream tasks on local copies of their datasets.

The runners in ``training/`` (``evaluate_totalseg.py``, ``evaluate_msd.py``, ``evaluate_triage.py``,
``evaluate_retrieval.py``) are thin command lines over this module: it finds and pairs cases, reads them, computes
the metrics of :mod:`ctfm_engine.training.metrics` and writes the results atomically.  Missing or malformed data
raise :class:`~ctfm_engine.errors.InputError` (exit code 3) with one sentence naming the path.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ctfm_engine.errors import CTFMError, InputError, UsageError
from ctfm_engine.io import atomic_output
from ctfm_engine.models.encoder import patch_embeddings
from ctfm_engine.preprocess import read_labels_on
from ctfm_engine.training import metrics
from ctfm_engine.volume import Grid

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Endings that prediction writers add to a case id (Auto3DSeg, nnU-Net style exports, hand-made folders).
CASE_ID_ENDINGS = ("_seg", "_pred", "_prediction", "_label", "_labels")
TOTALSEG_NAMES_FILE = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator_v2_total.json"
ASD_MODES = ("symmetric", "pred_to_gt", "both", "none")


# --- command-line plumbing -------------------------------------------------------------------------------------


def run_command(program: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], None],
                argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run ``body``; a user-caused error becomes one line on stderr and its exit code."""
    args = parser.parse_args(argv)
    try:
        body(args)
    except CTFMError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{program}: error: interrupted; no partial result was written", file=sys.stderr)
        return 130
    return 0


def require_folder(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{path}: {what} folder does not exist; see --help for the expected layout")
    if not path.is_dir():
        raise InputError(f"{path}: {what} must be a folder, not a file; see --help for the expected layout")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise InputError(f"{path}: {what} {state}; see --help for where to obtain it")
    return path


def write_results(path: Path, document: dict, rows: Sequence[dict] = ()) -> list[Path]:
    """Write ``document`` as JSON at ``path`` and ``rows`` (per case or query) as CSV beside it, each atomically."""
    written = []
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(_finite_or_none(document), indent=1) + "\n")
    written.append(path)
    if rows:
        table = path.with_suffix(".cases.csv")
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with atomic_output(table) as temporary, open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows(_finite_or_none(list(rows)))
        written.append(table)
    return written


def _finite_or_none(value: object) -> object:
    """NaN and infinity become None (JSON null, empty CSV cell): JSON has no NaN and a reader should see a gap."""
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain fixed-width text table; floats with 4 decimals, None as '-'."""

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    body = [[cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in body)) if body else len(str(h)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def estimate_text(estimate: dict | None) -> str:
    if not estimate:
        return "-"
    return f"{estimate['value']:.4f} ({estimate['low']:.4f}-{estimate['high']:.4f})"


# --- label maps and cases --------------------------------------------------------------------------------------


def _strip_suffix(name: str) -> str | None:
    lowered = name.lower()
    for suffix in LABEL_SUFFIXES:
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return None


def case_id(path: Path) -> str | None:
    """The case a label-map file belongs to: its name without the image suffix and a writer's ending
    (``liver_3_seg.nii.gz`` → ``liver_3``); None for a file that is not a label map."""
    stem = _strip_suffix(path.name)
    if stem is None:
        return None
    for ending in CASE_ID_ENDINGS:
        if stem.endswith(ending) and len(stem) > len(ending):
            return stem[: -len(ending)]
    return stem


def label_files(folder: Path, what: str) -> dict[str, Path]:
    """Case id → label-map file for every NIfTI/NRRD/MetaImage file under ``folder`` (any depth).

    When files share a name (``case/seg.nii.gz``), the case id is the folder holding each file.
    """
    require_folder(folder, what)
    files = sorted(path for path in folder.rglob("*") if path.is_file() and case_id(path) is not None
                   and not path.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: no label maps ({', '.join(LABEL_SUFFIXES)}) in the {what} folder")
    for naming in (case_id, lambda path: path.parent.name):
        cases: dict[str, Path] = {}
        for path in files:
            cases.setdefault(str(naming(path)), path)
        if len(cases) == len(files):
            return cases
    raise InputError(f"{folder}: two {what} files map to the same case id; give one label map per case")


def read_label_map(path: Path) -> tuple[np.ndarray, Grid]:
    """A 3-D integer label map (z, y, x) and its grid; InputError for anything else."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"{path}: cannot be read as a label map (corrupt, truncated or not an image)") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: a label map must be a 3-D single-component image")
    return _integer_labels(sitk.GetArrayFromImage(image), path), Grid.of_image(image)


def _integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        if array.size and array.min() < 0:
            raise InputError(f"{path}: holds negative values; a label map holds class indices 0, 1, 2, ...")
        return array
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)) or array.min() < 0:
        raise InputError(f"{path}: holds non-integer values; a label map holds class indices 0, 1, 2, ...")
    return array.astype(np.int32)


def label_map_on(path: Path, grid: Grid) -> np.ndarray:
    """The label map at ``path`` sampled nearest-neighbour on ``grid`` (identity when the grids agree)."""
    try:
        return _integer_labels(read_labels_on(path, grid), path)
    except RuntimeError:
        raise InputError(f"{path}: cannot be read as a label map (corrupt, truncated or not an image)") from None


def totalseg_names(path: Path | None = None) -> dict[int, str]:
    """TotalSegmentator v2 ``total`` class names by label id (a JSON object {"1": "spleen", ...})."""
    path = path or TOTALSEG_NAMES_FILE
    try:
        names = json.loads(require_file(path, "label-name map").read_text())
    except json.JSONDecodeError:
        raise InputError(f"{path}: is not JSON; expected an object mapping label ids to names") from None
    if isinstance(names, dict) and "total" in names and isinstance(names["total"], dict):
        names = names["total"]  # the shared label_map_totalsegmentator_v2.json nests the task
    try:
        return {int(key): str(value) for key, value in names.items()}
    except (AttributeError, ValueError):
        raise InputError(f"{path}: expected a JSON object mapping integer label ids to names") from None


def totalseg_ground_truth_cases(folder: Path) -> dict[str, Path]:
    """Case id → ground truth: a ``<case>/segmentations/`` folder (the TotalSegmentator dataset as downloaded)
    or a label-map file (``<case>.nii.gz``, the combined maps CT-FM trained on)."""
    require_folder(folder, "ground-truth")
    raw = {path.name: path for path in sorted(folder.iterdir()) if (path / "segmentations").is_dir()}
    return raw if raw else label_files(folder, "ground-truth")


def read_totalseg_ground_truth(source: Path, names: dict[int, str]) -> tuple[np.ndarray, Grid]:
    """One case's ground truth as a label map; a ``segmentations/`` folder is combined from its per-structure
    binary masks (``<name>.nii.gz``) on the grid of the first mask."""
    if source.is_file():
        return read_label_map(source)
    folder = source / "segmentations"
    labels: np.ndarray | None = None
    grid: Grid | None = None
    for label, name in sorted(names.items()):
        mask_path = folder / f"{name}.nii.gz"
        if not mask_path.is_file():
            raise InputError(
                f"{mask_path}: missing; a TotalSegmentator v2 case folder holds one mask per structure "
                f"(pass --label-map for other structure names)"
            )
        if grid is None:
            mask, grid = read_label_map(mask_path)
            labels = np.zeros(mask.shape, dtype=np.uint8 if max(names) < 256 else np.uint16)
        else:
            mask = label_map_on(mask_path, grid)
        labels[mask > 0] = label
    assert labels is not None and grid is not None  # names is non-empty (checked by the caller)
    return labels, grid


@dataclass(frozen=True)
class CasePair:
    case: str
    prediction: Path
    ground_truth: Path


def pair_cases(predictions: dict[str, Path], ground_truth: dict[str, Path],
               predictions_folder: Path, ground_truth_folder: Path) -> tuple[list[CasePair], list[str]]:
    """Cases with both a prediction and a ground truth, and the prediction ids that have no ground truth.

    Ground-truth cases without a prediction are not evaluated (a ground-truth folder usually holds every split).
    """
    pairs = [CasePair(case, predictions[case], ground_truth[case]) for case in sorted(predictions)
             if case in ground_truth]
    if not pairs:
        example = next(iter(sorted(predictions)))
        raise InputError(
            f"{predictions_folder}: no prediction matches a ground-truth case in {ground_truth_folder} (e.g. "
            f"{example!r}); name each prediction after its case"
        )
    return pairs, sorted(set(predictions) - set(ground_truth))


def segmentation_case_rows(
    case: str,
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    spacing_zyx_mm: Sequence[float],
    names: dict[int, str],
    asd: str = "symmetric",
) -> list[dict]:
    """One row per label: Dice, ASD in mm (per ``asd``: symmetric, pred_to_gt, both or none), voxel counts and
    the empty-mask status of the pair (:attr:`metrics.Overlap.status`)."""
    if asd not in ASD_MODES:
        raise UsageError(f"--asd {asd}: choose one of {', '.join(ASD_MODES)}")
    rows = []
    for label, overlap in metrics.overlaps(prediction, ground_truth, names).items():
        row: dict = {
            "case": case,
            "label": label,
            "structure": names[label],
            "dice": overlap.dice,
            "prediction_voxels": overlap.prediction_voxels,
            "ground_truth_voxels": overlap.ground_truth_voxels,
            "status": overlap.status,
        }
        if asd != "none":
            predicted, truth = None, None
            if overlap.status == "both":
                predicted, truth = prediction == label, ground_truth == label
            for mode, symmetric in (("assd_mm", True), ("asd_pred_to_gt_mm", False)):
                if asd == "both" or (asd == "symmetric") == symmetric:
                    row[mode] = (
                        metrics.average_surface_distance(predicted, truth, spacing_zyx_mm, symmetric=symmetric)
                        if predicted is not None else float("nan")
                    )
        rows.append(row)
    return rows


def evaluate_segmentation_pairs(
    pairs: Sequence[CasePair],
    names: dict[int, str],
    read_truth: Callable[[Path], tuple[np.ndarray, Grid]],
    asd: str,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows of :func:`segmentation_case_rows` for every pair; each prediction is sampled on its ground truth's
    grid (nearest neighbour), so a prediction stored in another orientation or crop is still compared voxel by
    voxel, and ASD uses the ground truth's spacing."""
    rows = []
    for pair in pairs:
        truth, grid = read_truth(pair.ground_truth)
        predicted = label_map_on(pair.prediction, grid)
        rows += segmentation_case_rows(pair.case, predicted, truth, grid.spacing_xyz_mm[::-1], names, asd)
        if progress is not None:
            progress(pair.case)
    return rows


def case_table(rows: Sequence[dict], labels: Sequence[int], column: str) -> np.ndarray:
    """(cases, labels) array of ``column`` from per-case rows, NaN where undefined or absent."""
    cases = list(dict.fromkeys(row["case"] for row in rows))
    index = {case: i for i, case in enumerate(cases)}
    position = {label: j for j, label in enumerate(labels)}
    table = np.full((len(cases), len(labels)), np.nan)
    for row in rows:
        if column in row and row["label"] in position:
            table[index[row["case"]], position[row["label"]]] = row[column]
    return table


def summarise_segmentation(rows: Sequence[dict], names: dict[int, str], *, resamples: int, seed: int) -> dict:
    """Per-structure means and empty-mask counts, and macro Dice / macro ASD with bootstrap CIs over cases."""
    labels = sorted(names)
    dice = case_table(rows, labels, "dice")
    distance_columns = [c for c in ("assd_mm", "asd_pred_to_gt_mm") if any(c in row for row in rows)]
    per_structure = []
    for label in labels:
        own = [row for row in rows if row["label"] == label]
        statuses = [row["status"] for row in own]
        entry: dict = {
            "label": label,
            "structure": names[label],
            "dice": _mean_or_none([row["dice"] for row in own]),
            "dice_cases": int(sum(np.isfinite(row["dice"]) for row in own)),
            **{status: statuses.count(status) for status in ("empty_prediction", "empty_ground_truth")},
        }
        for column in distance_columns:
            entry[column] = _mean_or_none([row[column] for row in own])
        per_structure.append(entry)
    summary: dict = {
        "cases": len({row["case"] for row in rows}),
        "labels_evaluated": len(labels),
        "labels_scored": int(np.isfinite(dice).any(axis=0).sum()),
        "macro_dice": metrics.macro_mean_ci(dice, resamples=resamples, seed=seed).as_dict()
        if np.isfinite(dice).any() else None,
        "empty_prediction_pairs": sum(row["status"] == "empty_prediction" for row in rows),
        "empty_ground_truth_pairs": sum(row["status"] == "empty_ground_truth" for row in rows),
        "per_structure": per_structure,
    }
    summary["asd_columns"] = distance_columns
    for column in distance_columns:
        distances = case_table(rows, labels, column)
        summary[f"macro_{column}"] = (
            metrics.macro_mean_ci(distances, resamples=resamples, seed=seed).as_dict()
            if np.isfinite(distances).any() else None
        )
    return summary


def _mean_or_none(values: Iterable[float]) -> float | None:
    finite = [value for value in values if value is not None and math.isfinite(value)]
    return float(np.mean(finite)) if finite else None


# --- MSD tumour tasks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MSDTask:
    """An MSD task evaluated by the paper: the class index of its tumour and the largest label index."""

    tumour_index: int
    largest_label: int
    description: str


# From each task's dataset.json "labels" (MSD): Task06 Lung has only background 0 and cancer 1, so the paper's
# hard-coded index 2 ("cancer") cannot be its tumour.
MSD_TASKS = {
    "Task03_Liver": MSDTask(2, 2, "liver tumour (0 background, 1 liver, 2 cancer)"),
    "Task06_Lung": MSDTask(1, 1, "lung tumour (0 background, 1 cancer)"),
    "Task07_Pancreas": MSDTask(2, 2, "pancreas tumour/mass (0 background, 1 pancreas, 2 cancer)"),
    "Task08_HepaticVessel": MSDTask(2, 2, "hepatic-vessel tumour (0 background, 1 vessel, 2 tumour)"),
}


def msd_label_names(ground_truth_folder: Path) -> dict[int, str] | None:
    """The task's ``labels`` from ``dataset.json`` beside or above the labels folder, when there is one."""
    for candidate in (ground_truth_folder / "dataset.json", ground_truth_folder.parent / "dataset.json"):
        if candidate.is_file():
            try:
                return {int(k): str(v) for k, v in json.loads(candidate.read_text())["labels"].items()}
            except (json.JSONDecodeError, KeyError, AttributeError, ValueError):
                raise InputError(f"{candidate}: not an MSD dataset.json (no \"labels\" object)") from None
    return None


def msd_case_rows(pairs: Sequence[CasePair], tumour_index: int, largest_label: int,
                  progress: Callable[[str], None] | None = None) -> list[dict]:
    """Per-case tumour Dice and both ASDs (pred→GT as the paper, symmetric); ground truths with label values
    above ``largest_label`` are refused, which catches a wrong ``--task``."""

    def read_truth(path: Path) -> tuple[np.ndarray, Grid]:
        labels, grid = read_label_map(path)
        if labels.size and int(labels.max()) > largest_label:
            raise InputError(
                f"{path}: holds label {int(labels.max())} but this task's labels end at {largest_label}; "
                f"check --task (or --class-index)"
            )
        return labels, grid

    return evaluate_segmentation_pairs(pairs, {tumour_index: "tumour"}, read_truth, "both", progress)


def summarise_msd(rows: Sequence[dict], *, resamples: int, seed: int) -> dict:
    """Tumour Dice (our convention and the paper's) and ASD summaries with bootstrap CIs and empty counts."""
    statuses = [row["status"] for row in rows]
    dice = np.array([row["dice"] for row in rows], dtype=np.float64)
    defined = np.isfinite(dice)
    paper = np.array([row["ground_truth_voxels"] > 0 for row in rows])

    def mean(values: np.ndarray) -> dict | None:
        return metrics.bootstrap_mean_ci(values, resamples=resamples, seed=seed).as_dict() if values.size else None

    return {
        "cases": len(rows),
        "cases_by_status": {status: statuses.count(status) for status in
                            ("both", "empty_prediction", "empty_ground_truth", "empty_both")},
        "dice": mean(dice[defined]),
        "dice_paper_convention": mean(dice[paper]),
        "asd_pred_to_gt_mm": metrics.surface_distance_summary(
            [row["asd_pred_to_gt_mm"] for row in rows], statuses, resamples=resamples, seed=seed),
        "assd_mm": metrics.surface_distance_summary(
            [row["assd_mm"] for row in rows], statuses, resamples=resamples, seed=seed),
        "definitions": {
            "dice": "over every case where the tumour is in the prediction or the ground truth; a predicted "
                    "tumour in a tumour-free case scores 0",
            "dice_paper_convention": "over cases with tumour in the ground truth only (the paper skipped the rest)",
            "asd": "mean over cases with tumour in both masks; empty_prediction cases are counted, not averaged",
        },
    }


def paired_comparison(rows: Sequence[dict], other: Sequence[dict], columns: Sequence[str]) -> dict:
    """Paired Wilcoxon per column between two models' per-case rows, on the cases both evaluated."""
    mine = {row["case"]: row for row in rows}
    theirs = {row["case"]: row for row in other}
    shared = sorted(set(mine) & set(theirs))
    if not shared:
        raise InputError("the two prediction folders share no evaluated case")
    result: dict = {"shared_cases": len(shared)}
    for column in columns:
        first = [mine[case][column] for case in shared]
        second = [theirs[case][column] for case in shared]
        try:
            test = metrics.paired_wilcoxon(first, second)
        except ModuleNotFoundError as error:
            raise UsageError(f"--compare: {error}") from None
        except ValueError as error:
            result[column] = {"error": str(error)}
            continue
        result[column] = {"statistic": test.statistic, "p_value": test.p_value, "pairs": test.pairs,
                          "dropped_pairs": test.dropped_pairs}
    return result


# --- head-CT triage --------------------------------------------------------------------------------------------


def read_csv_rows(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    require_file(path, what)
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot be read as CSV ({error})") from None
    if not columns or not rows:
        raise InputError(f"{path}: the {what} is empty; expected a header row and one row per case")
    return columns, rows


def _require_columns(path: Path, columns: Sequence[str], needed: Iterable[str]) -> None:
    missing = [name for name in needed if name not in columns]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(columns)}); see --help")


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"{path}: line {line}, column {column!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{path}: line {line}, column {column!r}: {text!r} is not a finite number")
    return value


def _binary_label(path: Path, line: int, column: str, text: str) -> int:
    """0/1, or SinoCT's one-hot "1,0" (normal → 0) / "0,1" (abnormal → 1), as SinoCT's ``labels.csv`` writes them."""
    cleaned = text.strip().replace(" ", "")
    onehot = {"1,0": 0, "0,1": 1, "[1,0]": 0, "[0,1]": 1}
    if cleaned in onehot:
        return onehot[cleaned]
    value = _number(path, line, column, cleaned)
    if value not in (0.0, 1.0):
        raise InputError(f"{path}: line {line}, column {column!r}: label {text!r} is not 0/1 (or \"1,0\"/\"0,1\")")
    return int(value)


def read_triage_predictions(path: Path, id_column: str, probability_column: str, label_column: str | None,
                            logits: bool = False) -> dict[str, tuple[float, int | None]]:
    """Case id → (probability, label or None) from a predictions CSV; ``logits`` applies the sigmoid."""
    columns, rows = read_csv_rows(path, "predictions CSV")
    _require_columns(path, columns, [id_column, probability_column] + ([label_column] if label_column else []))
    table: dict[str, tuple[float, int | None]] = {}
    for line, row in enumerate(rows, start=2):
        case = row[id_column].strip()
        if case in table:
            raise InputError(f"{path}: line {line}: case {case!r} appears twice; give one prediction per case")
        score = _number(path, line, probability_column, row[probability_column])
        probability = 1.0 / (1.0 + math.exp(-score)) if logits else score
        if not 0.0 <= probability <= 1.0:
            raise InputError(f"{path}: line {line}: probability {score} is outside [0, 1]; pass --logits for logits")
        label = _binary_label(path, line, label_column, row[label_column]) if label_column else None
        table[case] = (probability, label)
    return table


def read_sinoct_labels(path: Path, id_column: str, label_column: str = "label") -> dict[str, int]:
    """SinoCT ``labels.csv``: ``label`` "1,0" = normal (0), "0,1" = abnormal (1), or plain 0/1."""
    columns, rows = read_csv_rows(path, "SinoCT labels CSV")
    _require_columns(path, columns, [id_column, label_column])
    return {row[id_column].strip(): _binary_label(path, line, label_column, row[label_column])
            for line, row in enumerate(rows, start=2)}


def read_cq500_reads(path: Path, id_column: str = "name") -> dict[str, int]:
    """CQ500 ``reads.csv``: a scan is abnormal (1) when any reader marked any finding, i.e. any column except the
    id and ``Category`` holds 1 (the paper's rule: any finding by any reader)."""
    columns, rows = read_csv_rows(path, "CQ500 reads CSV")
    _require_columns(path, columns, [id_column])
    findings = [name for name in columns if name not in (id_column, "Category")]
    if not findings:
        raise InputError(f"{path}: no reader-finding columns (e.g. 'R1:ICH') besides {id_column!r} and 'Category'")
    labels = {}
    for line, row in enumerate(rows, start=2):
        values = [_number(path, line, name, row[name]) for name in findings if (row[name] or "").strip() != ""]
        labels[row[id_column].strip()] = int(any(value == 1.0 for value in values))
    return labels


def join_triage(predictions: dict[str, tuple[float, int | None]], labels: dict[str, int] | None,
                source: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Cases, labels and probabilities of the predictions that have a label, and the ids left without one."""
    cases, truth, scores, unlabelled = [], [], [], []
    for case, (probability, own_label) in sorted(predictions.items()):
        label = labels.get(case) if labels is not None else own_label
        if label is None:
            unlabelled.append(case)
            continue
        cases.append(case)
        truth.append(label)
        scores.append(probability)
    if not cases:
        raise InputError(f"{source}: no prediction has a label; the case ids of predictions and labels must match")
    truth_array = np.array(truth)
    if truth_array.min() == truth_array.max():
        raise InputError(f"{source}: every labelled case is {'abnormal' if truth_array[0] else 'normal'}; AUC "
                         f"needs both classes")
    return cases, truth_array, np.array(scores), unlabelled


# --- retrieval -------------------------------------------------------------------------------------------------

MEDMNIST_SPLITS = ("train", "val", "test")


def read_medmnist(path: Path, max_per_split: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split → (images (N, D, H, W) uint8, labels (N,)) of a MedMNIST 3-D ``.npz`` (``train_images``,
    ``train_labels``, ``val_…``, ``test_…``); the first ``max_per_split`` of each split when given."""
    require_file(path, "MedMNIST npz file")
    try:
        archive = np.load(path)
    except (OSError, ValueError):
        raise InputError(f"{path}: not a numpy .npz archive; expected a MedMNIST 3-D dataset file") from None
    with archive:
        needed = [f"{split}_{kind}" for split in MEDMNIST_SPLITS for kind in ("images", "labels")]
        missing = [key for key in needed if key not in archive.files]
        if missing:
            raise InputError(f"{path}: no array {missing[0]!r} (has {', '.join(archive.files)}); not a MedMNIST "
                             f"npz")
        splits = {}
        for split in MEDMNIST_SPLITS:
            images = archive[f"{split}_images"][:max_per_split]
            labels = archive[f"{split}_labels"][:max_per_split].reshape(-1)
            if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
                raise InputError(f"{path}: {split}_images has shape {images.shape} for {len(labels)} labels; "
                                 f"expected (N, D, H, W) volumes, one label each")
            splits[split] = (images, labels)
    return splits


@torch.inference_mode()
def medmnist_embeddings(encoder: torch.nn.Module, images: np.ndarray, device: torch.device,
                        batch_size: int = 16) -> np.ndarray:
    """Pooled last-feature-map embeddings of MedMNIST volumes, as the OrganMNIST3D notebook fed them (facts
    §5.1): intensities / 255 (binary masks or 8-bit images, not HU, so no HU window), the whole volume, spatial
    axes reversed (the notebook's ``transpose(0, 3, 2, 1)`` of a (C, D, H, W) sample)."""
    vectors = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size].astype(np.float32) / 255.0)
        batch = batch[:, None].permute(0, 1, 4, 3, 2).contiguous().to(device)
        vectors.append(patch_embeddings(encoder, batch).float().cpu().numpy())
    return np.concatenate(vectors)


def medmnist_retrieval(corpus: tuple[np.ndarray, np.ndarray], queries: dict[str, tuple[np.ndarray, np.ndarray]],
                       ks: Sequence[int]) -> tuple[dict, list[dict]]:
    """Cosine retrieval of each query embedding in the corpus (relevant = same label): summary and per-query rows.

    ``corpus`` and each query split are (embeddings, labels); the paper's corpus is train and its queries are
    val + test (971 and 161 + 610 = 771 volumes for OrganMNIST3D).
    """
    corpus_vectors, corpus_labels = corpus
    query_vectors = np.concatenate([vectors for vectors, _ in queries.values()])
    query_labels = np.concatenate([labels for _, labels in queries.values()])
    relevance = metrics.ranked_relevance(metrics.cosine_similarity(query_vectors, corpus_vectors), query_labels,
                                         corpus_labels)
    per_query = metrics.retrieval_per_query(relevance, ks)
    rows, position = [], 0
    for split, (_, labels) in queries.items():
        for index, label in enumerate(labels):
            rows.append({"split": split, "index": index, "label": int(label),
                         **{name: float(values[position]) for name, values in per_query.items()}})
            position += 1
    return metrics.summarise_retrieval(per_query), rows


QUERY_SPLITS = {"query", "queries", "test", "testing"}
CORPUS_SPLITS = {"corpus", "train", "training", "database"}


@dataclass(frozen=True)
class ScanEmbeddings:
    """Precomputed scan embeddings with their split, optional cohort and label columns (3D-MIR)."""

    source: Path
    ids: list[str]
    is_query: np.ndarray
    cohorts: list[str]
    vectors: np.ndarray
    labels: dict[str, list[str]]


def read_scan_embeddings(path: Path, id_column: str, split_column: str, label_columns: Sequence[str],
                         cohort_column: str | None, embedding_prefix: str) -> ScanEmbeddings:
    """Rows of a CSV: id, split (query/test or corpus/train), label columns, optional cohort, and the embedding
    as columns ``<prefix>0``, ``<prefix>1``, … in index order."""
    columns, rows = read_csv_rows(path, "embeddings CSV")
    _require_columns(path, columns, [id_column, split_column, *label_columns]
                     + ([cohort_column] if cohort_column else []))
    vector_columns = sorted((name for name in columns if name.startswith(embedding_prefix)
                             and name[len(embedding_prefix):].isdigit()), key=lambda n: int(n[len(embedding_prefix):]))
    if not vector_columns:
        raise InputError(f"{path}: no embedding columns named {embedding_prefix}0, {embedding_prefix}1, ...; "
                         f"see --embedding-prefix")
    splits = [row[split_column].strip().lower() for row in rows]
    unknown = sorted(set(splits) - QUERY_SPLITS - CORPUS_SPLITS)
    if unknown:
        raise InputError(f"{path}: split {unknown[0]!r} is neither a query (query, test) nor a corpus (corpus, "
                         f"train) split")
    vectors = np.array([[_number(path, line, name, row[name]) for name in vector_columns]
                        for line, row in enumerate(rows, start=2)])
    return ScanEmbeddings(
        source=path,
        ids=[row[id_column].strip() for row in rows],
        is_query=np.array([split in QUERY_SPLITS for split in splits]),
        cohorts=[row[cohort_column].strip() if cohort_column else "all" for row in rows],
        vectors=vectors,
        labels={name: [row[name].strip() for row in rows] for name in label_columns},
    )


def scan_retrieval(scans: ScanEmbeddings, label_column: str, ks: Sequence[int]) -> tuple[dict, list[dict]]:
    """3D-MIR retrieval for one label column: every query against the corpus of its own cohort by cosine
    similarity; relevant = same label.  Scans with an empty label are left out (counted).  Returns the pooled
    summary (unweighted over all queries, as the notebook's "overall"), per-cohort summaries and per-query rows.
    """
    labels = np.array(scans.labels[label_column], dtype=object)
    labelled = labels != ""
    pooled: dict[str, list[np.ndarray]] = {}
    per_cohort, rows = {}, []
    for cohort in sorted(set(scans.cohorts)):
        in_cohort = np.array([c == cohort for c in scans.cohorts]) & labelled
        queries, corpus = np.flatnonzero(in_cohort & scans.is_query), np.flatnonzero(in_cohort & ~scans.is_query)
        if len(queries) == 0 or len(corpus) < max(ks):
            raise InputError(f"{scans.source}: cohort {cohort!r}, label {label_column!r} has {len(queries)} "
                             f"queries and {len(corpus)} corpus scans; need queries and at least {max(ks)} corpus "
                             f"scans")
        similarity = metrics.cosine_similarity(scans.vectors[queries], scans.vectors[corpus])
        per_query = metrics.retrieval_per_query(metrics.ranked_relevance(similarity, labels[queries],
                                                                         labels[corpus]), ks)
        per_cohort[cohort] = metrics.summarise_retrieval(per_query)
        for name, values in per_query.items():
            pooled.setdefault(name, []).append(values)
        for position, index in enumerate(queries):
            rows.append({"label_column": label_column, "cohort": cohort, "id": scans.ids[index],
                         "label": labels[index], **{name: float(v[position]) for name, v in per_query.items()}})
    summary = metrics.summarise_retrieval({name: np.concatenate(parts) for name, parts in pooled.items()})
    summary["scans_without_label"] = int((~labelled).sum())
    return {"overall": summary, "per_cohort": per_cohort}, rows
