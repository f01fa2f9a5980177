"""The paper's evaluation metrics (hand-computed on tiny arrays, checked against sklearn/MONAI, and on real data) and
the evaluation runners in training/ (results written, malformed data exits 3)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SAMPLE_CT, SAMPLE_LABELS, SHARED, CLIResult, require_module
from monai.metrics import compute_dice, compute_roc_auc

from ctfm_engine.tasks.ocd import OrganQuery
from ctfm_engine.training import metrics, paper_evaluation
from ctfm_engine.training.evaluation import LabelledScan

ROOT = Path(__file__).resolve().parents[1]
ROI_SUBSET = SHARED / "totalsegmentator" / "example_seg_roi_subset.nii.gz"
ADRENAL_64 = SHARED / "medmnist3d" / "adrenalmnist3d_64.npz"
LIVER, SPLEEN = 5, 1
# Liver voxels in the two real TotalSegmentator runs (shared/data README) and their overlap (counted once here).
LIVER_FULL, LIVER_ROI, LIVER_BOTH = 38_634, 38_631, 38_308
FEW = {"resamples": 1000, "seed": 0}


def run_script(name: str, *args: object) -> CLIResult:
    """Run training/<name>.py's main() in-process and capture its exit code and output."""
    spec = importlib.util.spec_from_file_location(f"runner_{name}", ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = module.main([str(arg) for arg in args])
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return CLIResult(code, out.getvalue(), err.getvalue())


def one_hot(labels: np.ndarray, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(labels).long(), classes).movedim(-1, 0)[None]


def liver_masks() -> tuple[np.ndarray, np.ndarray]:
    full = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS)))
    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(ROI_SUBSET)))
    return roi == LIVER, full == LIVER


# --- Dice -------------------------------------------------------------------------------------------------------


def test_dice_per_class_by_hand_with_every_empty_case():
    prediction = np.array([[[1, 1, 0, 2, 0, 5]]], dtype=np.uint8)
    truth = np.array([[[1, 0, 0, 2, 2, 3]]], dtype=np.uint8)
    found = metrics.overlaps(prediction, truth, [1, 2, 3, 4, 5])
    assert found[1].dice == pytest.approx(2 * 1 / (2 + 1))
    assert found[2].dice == pytest.approx(2 * 1 / (1 + 2))
    assert (found[3].dice, found[3].status) == (0.0, "empty_prediction")  # missed structure
    assert (found[5].dice, found[5].status) == (0.0, "empty_ground_truth")  # false-positive structure
    assert np.isnan(found[4].dice) and found[4].status == "empty_both"  # nothing to score
    # MONAI (ignore_empty=False) agrees wherever a class is present in either mask
    monai = compute_dice(one_hot(prediction, 6), one_hot(truth, 6), include_background=False, ignore_empty=False)
    for label in (1, 2, 3, 5):
        assert found[label].dice == pytest.approx(float(monai[0, label - 1]))


def test_dice_equals_monai_on_random_label_maps():
    generator = np.random.default_rng(3)
    prediction = generator.integers(0, 6, (9, 10, 11)).astype(np.int16)
    truth = generator.integers(0, 6, (9, 10, 11)).astype(np.int16)
    ours = metrics.dice_per_class(prediction, truth, range(1, 6))
    monai = compute_dice(one_hot(prediction, 6), one_hot(truth, 6), include_background=False)
    np.testing.assert_allclose([ours[label] for label in range(1, 6)], monai[0].numpy(), rtol=1e-6)


def test_dice_of_two_real_liver_runs_is_close_to_but_not_one():
    roi, full = liver_masks()
    assert (roi.sum(), full.sum(), (roi & full).sum()) == (LIVER_ROI, LIVER_FULL, LIVER_BOTH)
    prediction = np.where(roi, LIVER, 0).astype(np.uint8)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS)))
    dice = metrics.dice_per_class(prediction, truth, [LIVER, SPLEEN])
    assert dice[LIVER] == pytest.approx(2 * LIVER_BOTH / (LIVER_ROI + LIVER_FULL))
    assert 0.99 < dice[LIVER] < 1.0
    assert dice[SPLEEN] == 0.0  # present in the ground truth, absent from the liver-only run


def test_overlaps_refuse_mismatched_or_non_integer_maps():
    with pytest.raises(ValueError, match="shape"):
        metrics.overlaps(np.zeros((2, 2, 2), int), np.zeros((2, 2, 3), int), [1])
    with pytest.raises(ValueError, match="integer"):
        metrics.overlaps(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), int), [1])


# --- surface distance --------------------------------------------------------------------------------------------


def test_average_surface_distance_by_hand_uses_spacing_per_axis():
    prediction = np.zeros((3, 3, 8), bool)
    truth = np.zeros((3, 3, 8), bool)
    prediction[1, 1, 1] = True
    truth[1, 1, 5] = truth[1, 1, 6] = True
    spacing = (2.0, 1.0, 0.5)  # the masks differ along the last axis only: 4 and 5 voxels of 0.5 mm
    assert metrics.average_surface_distance(prediction, truth, spacing, symmetric=False) == pytest.approx(2.0)
    # symmetric: pred→GT 2.0 (one surface voxel), GT→pred 2.0 and 2.5 (two) → mean of the three
    assert metrics.average_surface_distance(prediction, truth, spacing) == pytest.approx((2.0 + 2.0 + 2.5) / 3)
    assert metrics.average_surface_distance(prediction, truth, (0.5, 1.0, 2.0), symmetric=False) == pytest.approx(8.0)


def test_surface_distance_of_an_empty_mask_is_undefined_and_counted_not_dropped():
    empty, present = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    present[1:3, 1:3, 1:3] = True
    assert np.isnan(metrics.average_surface_distance(empty, present, (1, 1, 1)))
    summary = metrics.surface_distance_summary([1.0, float("nan"), 3.0, float("nan")],
                                               ["both", "empty_prediction", "both", "empty_ground_truth"], **FEW)
    assert summary["mean_mm"]["value"] == pytest.approx(2.0)
    assert (summary["cases"], summary["both"], summary["empty_prediction"], summary["empty_ground_truth"]) == (
        4, 2, 1, 1)


def test_surface_distance_of_two_real_liver_runs_is_small_in_mm():
    roi, full = liver_masks()
    spacing = sitk.ReadImage(str(SAMPLE_LABELS)).GetSpacing()[::-1]  # (z, y, x) = 3 mm
    symmetric = metrics.average_surface_distance(roi, full, spacing)
    one_way = metrics.average_surface_distance(roi, full, spacing, symmetric=False)
    assert 0.0 < symmetric < 1.0 and 0.0 < one_way < 1.0  # a few boundary voxels of 3 mm differ
    assert metrics.average_surface_distance(full, full, spacing) == 0.0


# --- statistics --------------------------------------------------------------------------------------------------


def test_macro_mean_averages_per_class_means_and_bootstraps_cases_reproducibly():
    table = np.array([[1.0, np.nan], [0.5, 0.2], [0.7, 0.4]])
    estimate = metrics.macro_mean_ci(table, **FEW)
    assert estimate.value == pytest.approx(np.mean([np.mean([1.0, 0.5, 0.7]), np.mean([0.2, 0.4])]))
    assert estimate.low <= estimate.value <= estimate.high and estimate.n == 3
    assert metrics.macro_mean_ci(table, **FEW) == estimate
    wider = np.random.default_rng(2).random((30, 3))  # enough cases for distinct resamples per seed
    assert metrics.macro_mean_ci(wider, **FEW) == metrics.macro_mean_ci(wider, **FEW)
    assert metrics.macro_mean_ci(wider, resamples=1000, seed=1) != metrics.macro_mean_ci(wider, **FEW)
    constant = metrics.bootstrap_mean_ci([0.25] * 7, **FEW)
    assert (constant.value, constant.low, constant.high) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.bootstrap_mean_ci([1.0, float("nan")])


def test_wald_interval_reproduces_the_published_sinoct_intervals():
    # the published point values are rounded to 3 decimals, so their intervals agree to within that rounding
    np.testing.assert_allclose(metrics.wald_ci(0.776, 978), [0.750, 0.802], atol=1e-3)  # F1
    np.testing.assert_allclose(metrics.wald_ci(0.836, 978), [0.812, 0.859], atol=1e-3)  # AUC
    assert metrics.wald_ci(0.999, 10)[1] == 1.0  # clipped to [0, 1]


def test_paired_wilcoxon_counts_the_pairs_it_drops():
    require_module("scipy", "SciPy (the [train] extra) is not installed")
    result = metrics.paired_wilcoxon([1.0, 2.0, 3.0, np.nan, 5.0, 6.0], [1.5, 2.5, 2.0, 4.0, 6.0, 7.5])
    assert (result.pairs, result.dropped_pairs) == (5, 1)
    # differences -0.5, -0.5, 1, -1, -1.5: ranks of |d| 1.5, 1.5, 3.5, 3.5, 5; the one positive difference has 3.5
    assert result.statistic == 3.5
    from scipy.stats import wilcoxon

    assert result.p_value == pytest.approx(wilcoxon([1.0, 2.0, 3.0, 5.0, 6.0], [1.5, 2.5, 2.0, 6.0, 7.5]).pvalue)


# --- classification ----------------------------------------------------------------------------------------------


def test_auc_and_f1_by_hand():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert metrics.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    labels, probabilities = [1, 1, 0, 0, 1], [0.9, 0.4, 0.6, 0.1, 0.5]
    counts = metrics.confusion_at_threshold(labels, probabilities, 0.5)
    assert (counts.true_positive, counts.false_positive, counts.false_negative) == (2, 1, 1)
    assert metrics.f1_at_threshold(labels, probabilities) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    with pytest.raises(ValueError, match="positive and one negative"):
        metrics.roc_auc([1, 1], [0.2, 0.3])


def test_auc_equals_sklearn_and_monai_with_ties():
    generator = np.random.default_rng(7)
    labels = generator.integers(0, 2, 300)
    scores = np.round(generator.random(300) + 0.3 * labels, 1)  # many ties
    ours = metrics.roc_auc(labels, scores)
    assert ours == pytest.approx(float(compute_roc_auc(torch.tensor(scores), torch.tensor(labels))))
    sklearn_metrics = require_module("sklearn.metrics", "scikit-learn (the [train] extra) is not installed")
    assert ours == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))
    assert metrics.f1_at_threshold(labels, scores, 0.7) == pytest.approx(sklearn_metrics.f1_score(labels,
                                                                                                   scores >= 0.7))


def test_classification_report_gives_wald_and_bootstrap_intervals():
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 2, 200)
    probabilities = np.clip(0.35 * labels + 0.65 * generator.random(200), 0, 1)
    report = metrics.classification_report(labels, probabilities, **FEW)
    for name in ("auc", "f1"):
        value = report[name]["value"]
        for interval in ("bootstrap", "wald_paper"):
            assert report[name][interval]["low"] < value < report[name][interval]["high"]
    assert report["auc"]["value"] == pytest.approx(metrics.roc_auc(labels, probabilities))
    assert sum(report["confusion"].values()) == 200 and report["positives"] == int(labels.sum())
    assert metrics.classification_report(labels, probabilities, **FEW) == report  # seeded


# --- retrieval ---------------------------------------------------------------------------------------------------


# Two queries over a corpus of 6, most similar first.  q1: relevant at ranks 1, 4, 5, 6 (R = 4); q2: rank 4 (R = 1).
RELEVANCE = np.array([[1, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=bool)


def test_paper_ap_at_k_is_normalised_by_hits_and_differs_from_standard_ap():
    # q1's top 3 holds one hit at rank 1: the paper divides by the 1 hit, the standard AP by min(k, R) = 3
    np.testing.assert_allclose(metrics.ap_at_k_paper(RELEVANCE, 3), [1.0, 0.0])
    np.testing.assert_allclose(metrics.ap_at_k(RELEVANCE, 3), [1 / 3, 0.0])
    np.testing.assert_allclose(metrics.hit_rate_at_k(RELEVANCE, 3), [1.0, 0.0])
    np.testing.assert_allclose(metrics.precision_at_k(RELEVANCE, 3), [1 / 3, 0.0])
    # paper F1 = harmonic mean of paper AP and HR; a no-hit query scores 0 (the notebook's 0/0 was NaN, dropped)
    np.testing.assert_allclose(metrics.f1_at_k_paper(RELEVANCE, 3), [1.0, 0.0])
    # standard F1@3 of q1: P = 1/3, recall = 1/4
    np.testing.assert_allclose(metrics.f1_at_k(RELEVANCE, 3), [2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4), 0.0])
    np.testing.assert_allclose(metrics.average_precision(RELEVANCE),
                               [(1 + 2 / 4 + 3 / 5 + 4 / 6) / 4, (1 / 4) / 1])


def test_full_ranking_ap_and_the_3dmir_top10_ap_match_sklearn():
    sklearn_metrics = require_module("sklearn.metrics", "scikit-learn (the [train] extra) is not installed")
    generator = np.random.default_rng(5)
    relevance = generator.random((6, 25)) < 0.3
    relevance[:, 0] = True  # every query has a hit in its top 10
    scores = np.arange(25, 0, -1)
    for row, full_ap, top10_ap in zip(relevance, metrics.average_precision(relevance),
                                      metrics.ap_at_k_paper(relevance, 10), strict=True):
        assert full_ap == pytest.approx(sklearn_metrics.average_precision_score(row, scores))
        # the 3D-MIR notebook: sklearn AP of the top-10 relevance with scores 10..1
        assert top10_ap == pytest.approx(sklearn_metrics.average_precision_score(row[:10], scores[:10]))


def test_cosine_similarity_ranks_by_direction_where_euclidean_ranks_by_norm():
    query = np.array([[1.0, 0.0]])
    corpus = np.array([[10.0, 1.0], [0.9, 0.3]])
    relevance = metrics.ranked_relevance(metrics.cosine_similarity(query, corpus), [0], [0, 1])
    assert relevance.tolist() == [[True, False]]  # corpus item 0 first by angle
    assert np.argmin(np.linalg.norm(corpus - query, axis=1)) == 1  # the notebook's Euclidean picks item 1


def test_retrieval_summary_counts_queries_without_relevant_items():
    relevance = np.vstack([RELEVANCE, np.zeros((1, 6), bool)])
    summary = metrics.summarise_retrieval(metrics.retrieval_per_query(relevance, [3]))
    assert (summary["queries"], summary["queries_without_relevant"]) == (3, 1)
    assert summary["ap_paper@3"] == pytest.approx(1 / 3)  # the paper's metrics keep it, scored 0
    assert summary["ap@3"] == pytest.approx((1 / 3 + 0.0) / 2)  # the standard ones are undefined for it


# --- semantic search ---------------------------------------------------------------------------------------------


def test_paper_inside_test_is_coordinate_wise_and_a_mask_lookup_is_not():
    mask = np.zeros((5, 5, 5), bool)
    mask[2, 2, 2] = True
    assert metrics.paper_inside_label((2, 0, 0), mask)  # shares only the z index with the organ
    assert not mask[2, 0, 0]
    assert not metrics.paper_inside_label((0, 0, 0), mask)


def test_paper_inside_test_on_real_labels_disagrees_with_the_engine_lookup():
    scan = LabelledScan.read(SAMPLE_CT, SAMPLE_LABELS)
    liver = scan.labels == LIVER
    z = int(np.argwhere(liver)[0, 0])
    corner = np.array([z, 0, 0])  # a corner voxel of a liver slice: air, not liver
    assert metrics.paper_inside_label(corner, liver)
    assert scan.label_at(scan.volume.zyx_index_to_lps(corner.astype(float))) == 0


def test_ocd_summary_is_in_mm_with_a_true_inside_fraction():
    origin = (0.0, 0.0, 0.0)
    results = [OrganQuery(51, "heart", 900, 900, origin, origin, origin, distance_mm, hit, 0.9)
               for distance_mm, hit in ((10.0, True), (20.0, False), (30.0, True))]
    summary = metrics.ocd_summary(results, **FEW)
    assert summary["distance_mm"]["value"] == pytest.approx(20.0)
    assert summary["distance_sd_mm"] == pytest.approx(10.0)
    assert summary["distance_sd_ddof0_mm"] == pytest.approx(np.std([10.0, 20.0, 30.0]))
    assert summary["inside_organ"]["value"] == pytest.approx(2 / 3) and summary["inside_organ_count"] == 2


# --- runners -----------------------------------------------------------------------------------------------------


def write_like(array: np.ndarray, reference: Path, path: Path) -> Path:
    """Save a label array with the geometry of ``reference``."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(sitk.ReadImage(str(reference)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def test_totalseg_runner_on_real_label_maps_both_ground_truth_layouts(tmp_path):
    predictions, combined, raw = tmp_path / "pred", tmp_path / "gt", tmp_path / "gt_raw"
    predictions.mkdir()
    shutil.copy(ROI_SUBSET, predictions / "s0001_seg.nii.gz")
    write_like(sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS))), SAMPLE_LABELS, combined / "s0001.nii.gz")
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS)))
    for name, label in (("spleen", SPLEEN), ("liver", LIVER)):  # the dataset's per-structure mask files
        write_like((truth == label).astype(np.uint8), SAMPLE_LABELS, raw / "s0001" / "segmentations" / f"{name}.nii.gz")
    documents = []
    for folder in (combined, raw):
        output = tmp_path / f"{folder.name}.json"
        result = run_script("evaluate_totalseg", "--predictions", predictions, "--ground-truth", folder,
                            "--labels", LIVER, SPLEEN, "--asd", "both", "--output", output, "--resamples", 500,
                            "--quiet")
        assert result.code == 0, result.stderr
        assert "macro Dice" in result.stdout and output.is_file() and output.with_suffix(".cases.csv").is_file()
        documents.append(json.loads(output.read_text()))
    assert documents[0]["per_structure"] == documents[1]["per_structure"]
    liver, spleen = sorted(documents[0]["per_structure"], key=lambda entry: entry["label"] != LIVER)
    assert liver["dice"] == pytest.approx(2 * LIVER_BOTH / (LIVER_ROI + LIVER_FULL))
    assert 0.0 < liver["assd_mm"] < 1.0 and 0.0 < liver["asd_pred_to_gt_mm"] < 1.0
    assert (spleen["dice"], spleen["empty_prediction"], spleen["assd_mm"]) == (0.0, 1, None)
    assert documents[0]["macro_dice"]["value"] == pytest.approx((liver["dice"] + 0.0) / 2)
    rows = list(csv.DictReader(open(tmp_path / "gt.cases.csv")))
    assert [(row["case"], row["structure"], row["status"]) for row in rows] == [
        ("s0001", "spleen", "empty_prediction"), ("s0001", "liver", "both")]


def test_runners_exit_3_naming_a_missing_data_folder(tmp_path):
    missing = tmp_path / "no_such_folder"
    result = run_script("evaluate_totalseg", "--predictions", missing, "--ground-truth", tmp_path,
                        "--output", tmp_path / "out.json")
    assert result.code == 3
    assert str(missing) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script("evaluate_msd", "--task", "Task03_Liver", "--ground-truth", empty, "--predictions", empty)
    assert result.code == 3 and "no label maps" in result.stderr
    result = run_script("evaluate_retrieval", "medmnist", "--npz", tmp_path / "organmnist3d_64.npz")
    assert result.code == 3 and "organmnist3d_64.npz" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_msd_runner_scores_lung_tumour_as_label_1_and_refuses_label_2(tmp_path):
    roi, full = liver_masks()  # stand-ins for a tumour: a prediction and its ground truth, on a real grid
    task = tmp_path / "Task06_Lung"
    (task / "labelsTr").mkdir(parents=True)
    (task / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "cancer"}}))
    write_like(full.astype(np.uint8), SAMPLE_LABELS, task / "labelsTr" / "lung_001.nii.gz")
    write_like(np.zeros_like(full, np.uint8), SAMPLE_LABELS, task / "labelsTr" / "lung_002.nii.gz")
    write_like(roi.astype(np.uint8), SAMPLE_LABELS, tmp_path / "pred" / "lung_001.nii.gz")
    write_like(roi.astype(np.uint8), SAMPLE_LABELS, tmp_path / "pred" / "lung_002.nii.gz")  # false positive
    output = tmp_path / "msd.json"
    result = run_script("evaluate_msd", "--task", "Task06_Lung", "--ground-truth", task, "--predictions",
                        tmp_path / "pred", "--output", output, "--resamples", 500, "--quiet")
    assert result.code == 0, result.stderr
    document = json.loads(output.read_text())
    expected = 2 * LIVER_BOTH / (LIVER_ROI + LIVER_FULL)
    assert (document["tumour_class_index"], document["tumour_class_name"]) == (1, "cancer")
    assert document["cases_by_status"] == {"both": 1, "empty_prediction": 0, "empty_ground_truth": 1,
                                           "empty_both": 0}
    assert document["dice"]["value"] == pytest.approx((expected + 0.0) / 2)  # the false positive counts as 0
    assert document["dice_paper_convention"]["value"] == pytest.approx(expected)  # the paper skipped that case
    assert 0.0 < document["asd_pred_to_gt_mm"]["mean_mm"]["value"] < 1.0
    write_like(np.where(full, 2, 0).astype(np.uint8), SAMPLE_LABELS, task / "labelsTr" / "lung_001.nii.gz")
    result = run_script("evaluate_msd", "--task", "Task06_Lung", "--ground-truth", task, "--predictions",
                        tmp_path / "pred", "--output", output, "--quiet")
    assert result.code == 3 and "--task" in result.stderr


def test_triage_runner_with_sinoct_and_cq500_label_files(tmp_path):
    generator = np.random.default_rng(1)
    labels = generator.integers(0, 2, 60)
    probabilities = np.clip(0.4 * labels + 0.6 * generator.random(60), 0.0, 1.0)
    cases = [f"CQ500-CT-{index}" for index in range(60)]
    with open(tmp_path / "predictions.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["case_id", "probability"])
        writer.writerows(zip(cases, probabilities, strict=True))
    with open(tmp_path / "labels.csv", "w", newline="") as stream:  # SinoCT one-hot labels
        writer = csv.writer(stream)
        writer.writerow(["case_id", "label"])
        writer.writerows((case, "0,1" if label else "1,0") for case, label in zip(cases, labels, strict=True))
    with open(tmp_path / "reads.csv", "w", newline="") as stream:  # CQ500: any reader, any finding
        writer = csv.writer(stream)
        writer.writerow(["name", "Category", "R1:ICH", "R2:ICH", "R3:Fracture"])
        for case, label in zip(cases, labels, strict=True):
            writer.writerow([case, "B1", 0, int(label), 0] if label else [case, "B1", 0, 0, 0])
        writer.writerow(["CQ500-CT-999", "B2", 1, 1, 1])  # a read with no prediction
    expected = metrics.roc_auc(labels, probabilities)
    for option, file in (("--sinoct-labels", "labels.csv"), ("--cq500-reads", "reads.csv")):
        output = tmp_path / f"{file}.json"
        result = run_script("evaluate_triage", "--predictions", tmp_path / "predictions.csv", option,
                            tmp_path / file, "--output", output, "--resamples", 500)
        assert result.code == 0, result.stderr
        document = json.loads(output.read_text())
        assert document["cases"] == 60 and document["auc"]["value"] == pytest.approx(expected)
        assert document["f1"]["value"] == pytest.approx(metrics.f1_at_threshold(labels, probabilities))
    assert document["labels_without_prediction"] == ["CQ500-CT-999"]
    result = run_script("evaluate_triage", "--predictions", tmp_path / "predictions.csv")
    assert result.code == 3 and "'label'" in result.stderr  # no label column and no label file


def test_3dmir_runner_on_hand_made_embeddings(tmp_path):
    # cohort "a": corpus items of label x lie along e0, of label y along e1; queries point near one axis each
    rows = [("c1", "corpus", "a", "x", 1.0, 0.0), ("c2", "corpus", "a", "x", 0.9, 0.1),
            ("c3", "corpus", "a", "y", 0.0, 1.0), ("c4", "corpus", "a", "y", 0.2, 1.0),
            ("q1", "test", "a", "x", 1.0, 0.05), ("q2", "test", "a", "y", 0.1, 1.0)]
    with open(tmp_path / "embeddings.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["scan", "split", "cohort", "lesion", "e0", "e1"])
        writer.writerows(rows)
    output = tmp_path / "mir.json"
    result = run_script("evaluate_retrieval", "3dmir", "--embeddings", tmp_path / "embeddings.csv",
                        "--label-columns", "lesion", "--cohort-column", "cohort", "--k", 2, 3, "--output", output)
    assert result.code == 0, result.stderr
    overall = json.loads(output.read_text())["results"]["lesion"]["overall"]
    assert overall["queries"] == 2
    assert overall["precision@2"] == 1.0 and overall["ap_full_ranking"] == 1.0
    assert overall["precision@3"] == pytest.approx(2 / 3)


def test_medmnist_retrieval_runner_on_real_adrenal_volumes(tmp_path, narrow_weights):
    output = tmp_path / "adrenal.json"
    result = run_script("evaluate_retrieval", "medmnist", "--npz", ADRENAL_64, "--weights", narrow_weights,
                        "--max-per-split", 12, "--batch-size", 6, "--output", output)
    assert result.code == 0, result.stderr
    summary = json.loads(output.read_text())["summary"]
    assert summary["queries"] == 24  # val + test, 12 each
    rows = list(csv.DictReader(open(output.with_suffix(".cases.csv"))))
    assert len(rows) == 24 and {row["split"] for row in rows} == {"val", "test"}
    for k in (3, 5, 10):
        for name in ("ap_paper", "ap", "hr", "f1_paper", "precision"):  # each a mean over the cases
            assert summary[f"{name}@{k}"] == pytest.approx(np.mean([float(row[f"{name}@{k}"]) for row in rows]))
        assert summary[f"hr@{k}"] >= summary[f"ap_paper@{k}"] >= summary[f"ap@{k}"]
        assert summary[f"hr@{k}"] >= summary[f"precision@{k}"]
    assert summary["hr@3"] <= summary["hr@5"] <= summary["hr@10"]
    for row in rows:
        for k in (3, 5, 10):
            ap, hr, f1 = (float(row[f"{name}@{k}"]) for name in ("ap_paper", "hr", "f1_paper"))
            assert min(ap, hr) - 1e-12 <= f1 <= max(ap, hr) + 1e-12  # a harmonic mean lies between its terms
    assert "ap_paper" in result.stdout


def test_medmnist_retrieval_by_hand_on_a_tiny_case():
    # Cosine ranking of 4 corpus items for 2 queries (angles in degrees from each query in the comments).
    corpus = (np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.2]]), np.array([0, 1, 0, 1]))
    val = (np.array([[1.0, 0.05]]), np.array([0]))  # c0 2.9, c3 8.4, c2 42.1, c1 87.1 -> relevant 1, 0, 1, 0
    test = (np.array([[0.0, 1.0]]), np.array([0]))  # c1 0, c2 45, c3 78.7, c0 90 -> relevant 0, 1, 0, 1
    summary, rows = paper_evaluation.medmnist_retrieval(corpus, {"val": val, "test": test}, [1, 3])
    ap_val, ap_test = (1 / 1 + 2 / 3) / 2, (1 / 2) / 1  # precision at each hit / hits in the top 3
    f1_val, f1_test = 2 * ap_val / (ap_val + 1), 2 * ap_test / (ap_test + 1)
    assert [(row["split"], row["ap_paper@3"], row["f1_paper@3"]) for row in rows] == [
        ("val", pytest.approx(ap_val), pytest.approx(f1_val)), ("test", pytest.approx(ap_test), pytest.approx(f1_test))]
    assert summary["ap_paper@3"] == pytest.approx((ap_val + ap_test) / 2)
    assert summary["hr@3"] == 1.0 and summary["hr@1"] == 0.5 and summary["ap_paper@1"] == 0.5
    assert summary["f1_paper@3"] == pytest.approx((f1_val + f1_test) / 2)
    assert summary["ap@3"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2) / 2) / 2)  # standard AP: / min(k, R=2)


def test_medmnist_volumes_are_fed_with_spatial_axes_reversed_as_the_notebook_did():
    from ctfm_engine.models.encoder import patch_embeddings
    from ctfm_engine.models.registry import load_encoder

    encoder, _ = load_encoder(Path(__file__).resolve().parents[1] / "ctfm_engine" / "weights" / "ctfm-mini")
    images = paper_evaluation.read_medmnist(ADRENAL_64, 1)["train"][0]
    vectors = paper_evaluation.medmnist_embeddings(encoder, images, torch.device("cpu"))
    scaled = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    with torch.inference_mode():
        reversed_axes = patch_embeddings(encoder, scaled.permute(0, 1, 4, 3, 2).contiguous()).numpy()
        as_stored = patch_embeddings(encoder, scaled).numpy()
    np.testing.assert_allclose(vectors, reversed_axes, rtol=1e-5, atol=1e-6)  # (0, 3, 2, 1) of each (1, D, H, W)
    assert np.abs(vectors - as_stored).max() > 1e-3
