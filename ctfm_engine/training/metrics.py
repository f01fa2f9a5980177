"""The CT-FM paper's evaluation metrics, defined as the paper defines them, with its evaluation code's bugs fixed.

Segmentation (TotalSegmentator and MSD tumours): Dice per class, average surface distance in mm, macro mean with a
bootstrap CI over cases, paired Wilcoxon.  Triage (SinoCT, CQ500): AUC-ROC and F1 with the paper's Wald CI and a
bootstrap CI.  Retrieval (OrganMNIST3D, 3D-MIR): AP@k as the paper computed it and as it is usually defined, HR@k,
F1@k, P@k and full-ranking AP over cosine similarity.  Semantic search: the OCD summary in mm over
:func:`ctfm_engine.tasks.ocd.organ_centroid_distances` results, and the paper's coordinate-wise "inside" test, kept
only to show how it differs from a mask lookup.  Each deliberate departure from the paper's code is stated in the
docstring of the function that makes it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance

from ctfm_engine.tasks.ocd import OrganQuery

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
# A bootstrap draws this many resamples at a time, so a (resamples x cases) count matrix stays small.
_RESAMPLE_BLOCK = 500


# --- statistics ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided confidence interval and how it was obtained."""

    value: float
    low: float
    high: float
    n: int
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def _resample_counts(generator: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n) multiplicities of each case in ``resamples`` bootstrap resamples of ``n`` cases."""
    drawn = generator.integers(0, n, size=(resamples, n))
    offsets = np.arange(resamples)[:, None] * n
    return np.bincount((drawn + offsets).ravel(), minlength=resamples * n).reshape(resamples, n)


def macro_mean_ci(
    table: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = DEFAULT_SEED,
) -> Estimate:
    """Macro mean of a (cases, classes) table with a percentile bootstrap CI over cases.

    The macro mean is the mean over classes of each class's mean over the cases where it is defined (NaN marks
    an undefined entry, e.g. Dice of a structure absent from both masks); classes never defined are left out.
    The paper's TotalSegmentator CI came from an aggregation notebook that is lost, so its resampling
    unit is unknown; here cases are resampled, because cases, not labels, are the independent samples: each
    resample recomputes every per-class mean on the resampled cases.  A one-column table gives the ordinary mean
    of a per-case metric with its bootstrap CI (the MSD notebook's 10,000 resamples, percentiles 2.5/97.5).
    """
    values = np.asarray(table, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"need a non-empty (cases, classes) table, got shape {values.shape}")
    defined = np.isfinite(values)
    if not defined.any():
        raise ValueError("the table has no finite value")
    filled = np.where(defined, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = float(np.nanmean(filled.sum(axis=0) / defined.sum(axis=0)))
    generator = np.random.default_rng(seed)
    statistics = []
    for start in range(0, resamples, _RESAMPLE_BLOCK):
        counts = _resample_counts(generator, values.shape[0], min(_RESAMPLE_BLOCK, resamples - start)).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = (counts @ filled) / (counts @ defined)
        statistics.append(np.nanmean(per_class, axis=1))
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(np.concatenate(statistics), [tail, 100.0 - tail])
    return Estimate(value, float(low), float(high), int(values.shape[0]), f"bootstrap over cases, {resamples}x")


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = DEFAULT_SEED,
) -> Estimate:
    """Mean of finite per-case values with a percentile bootstrap CI; non-finite values are refused.

    The MSD notebook took means with NaN/inf dropped silently; here the caller decides what an
    undefined case means and reports it, so a NaN reaching this function is an error.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values to average")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{int((~np.isfinite(array)).sum())} non-finite values; filter and count them first")
    return macro_mean_ci(array, resamples=resamples, confidence=confidence, seed=seed)


def wald_ci(proportion: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The paper's 95% interval p ± z·sqrt(p(1−p)/n) (its head-CT evaluation notebook's), clipped to [0, 1].

    The paper applied it to AUC and F1 alike; neither is a binomial proportion of n trials, so this interval
    has no coverage guarantee for them.  It is kept to compare with the published numbers; prefer the bootstrap.
    """
    if n <= 0:
        raise ValueError("n must be positive")
    half = z * np.sqrt(proportion * (1.0 - proportion) / n)
    return float(max(0.0, proportion - half)), float(min(1.0, proportion + half))


@dataclass(frozen=True)
class WilcoxonResult:
    statistic: float
    p_value: float
    pairs: int
    dropped_pairs: int


def paired_wilcoxon(first: Sequence[float], second: Sequence[float]) -> WilcoxonResult:
    """Two-sided paired Wilcoxon signed-rank test (scipy), on the pairs where both values are finite.

    Dropped pairs (a model's value undefined for that case) are counted, not hidden.  scipy is optional: it
    comes with the ``train`` and ``dev`` extras; without it this raises ModuleNotFoundError saying so.
    """
    try:
        from scipy.stats import wilcoxon
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the paired Wilcoxon test needs scipy (pip install scipy)") from None
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 1:
        raise ValueError("no pair where both values are finite")
    result = wilcoxon(a[keep], b[keep])
    return WilcoxonResult(float(result.statistic), float(result.pvalue), int(keep.sum()), int((~keep).sum()))


# --- segmentation ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Overlap:
    """Voxel counts of one class in a prediction and its ground truth."""

    prediction_voxels: int
    ground_truth_voxels: int
    intersection_voxels: int

    @property
    def dice(self) -> float:
        """2|P∩G| / (|P|+|G|); NaN when the class is absent from both (nothing to score).

        Empty ground truth with a non-empty prediction scores 0 (a false-positive structure), and a non-empty
        ground truth with an empty prediction scores 0 (a missed structure).  This is MONAI's
        ``ignore_empty=False`` convention except for the both-empty case, which MONAI scores 1 and which is
        undefined here.  The paper's TotalSegmentator metric (``DiceHelper(ignore_empty=True)``) and its MSD
        notebook instead skip every empty-ground-truth case, which hides false positives.
        """
        total = self.prediction_voxels + self.ground_truth_voxels
        return float("nan") if total == 0 else 2.0 * self.intersection_voxels / total

    @property
    def status(self) -> str:
        """``both``, ``empty_prediction``, ``empty_ground_truth`` or ``empty_both``."""
        if self.prediction_voxels and self.ground_truth_voxels:
            return "both"
        if self.ground_truth_voxels:
            return "empty_prediction"
        return "empty_ground_truth" if self.prediction_voxels else "empty_both"


def overlaps(prediction: np.ndarray, ground_truth: np.ndarray, labels: Iterable[int]) -> dict[int, Overlap]:
    """Per-label voxel counts of two label maps on the same grid, from one joint histogram.

    One pass over the volume with ``np.bincount`` instead of a one-hot tensor per class: a 118-class one-hot of a
    whole-body CT does not fit in memory, and per-class comparisons cost a full pass each.  Labels not in
    ``labels`` count as background.  Equal to ``monai.metrics.compute_dice`` (tests check it).
    """
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {ground_truth.shape} differ in shape")
    if not (np.issubdtype(prediction.dtype, np.integer) and np.issubdtype(ground_truth.dtype, np.integer)):
        raise ValueError(f"label maps must be integer arrays, got {prediction.dtype} and {ground_truth.dtype}")
    labels = [int(label) for label in labels]
    if len(set(labels)) != len(labels) or any(label <= 0 for label in labels):
        raise ValueError(f"labels must be distinct positive integers, got {labels}")
    # Map every voxel value to a compact index: 0 for background or any label not asked for, i for labels[i-1].
    largest = int(max(prediction.max(initial=0), ground_truth.max(initial=0), max(labels, default=0)))
    if min(prediction.min(initial=0), ground_truth.min(initial=0)) < 0:
        raise ValueError("label maps must not hold negative values")
    lookup = np.zeros(largest + 1, dtype=np.int64)
    lookup[labels] = np.arange(1, len(labels) + 1)
    width = len(labels) + 1
    joint = np.zeros(width * width, dtype=np.int64)
    flat_prediction, flat_truth = prediction.reshape(-1), ground_truth.reshape(-1)
    block = 1 << 22  # bounds the int64 temporaries to a few tens of MB on large CTs
    for start in range(0, flat_truth.size, block):
        truth = lookup[flat_truth[start : start + block]]
        predicted = lookup[flat_prediction[start : start + block]]
        joint += np.bincount(truth * width + predicted, minlength=width * width)
    matrix = joint.reshape(width, width)  # rows: ground truth, columns: prediction
    return {
        label: Overlap(int(matrix[:, i].sum()), int(matrix[i, :].sum()), int(matrix[i, i]))
        for i, label in enumerate(labels, start=1)
    }


def dice_per_class(prediction: np.ndarray, ground_truth: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice of every label (see :attr:`Overlap.dice` for the empty cases: NaN only when absent from both)."""
    return {label: overlap.dice for label, overlap in overlaps(prediction, ground_truth, labels).items()}


def _union_box(first: np.ndarray, second: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of both masks grown by one voxel, so no surface voxel touches a new border."""
    present = np.argwhere(first | second)
    low = np.maximum(present.min(axis=0) - 1, 0)
    high = np.minimum(present.max(axis=0) + 2, first.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))


def average_surface_distance(
    prediction_mask: np.ndarray,
    ground_truth_mask: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    symmetric: bool = True,
) -> float:
    """Average surface distance in mm between two binary masks (``monai.metrics.compute_average_surface_distance``).

    ``spacing_mm`` is per array axis (for a SimpleITK (z, y, x) array: (sz, sy, sx)).  ``symmetric=True`` is the
    usual ASSD (mean over the surface voxels of both masks of the distance to the other surface);
    ``symmetric=False`` is the paper's MSD metric, prediction surface → ground-truth surface only (MONAI's default).
    Returns NaN when either mask is empty: the distance is undefined, and the caller counts such cases (see
    :func:`surface_distance_summary`) instead of dropping them silently as the paper's means did.  MONAI computes
    the distances with scipy (a KD-tree on CPU), which the ``train`` and ``dev`` extras install.
    """
    prediction_mask = np.asarray(prediction_mask, dtype=bool)
    ground_truth_mask = np.asarray(ground_truth_mask, dtype=bool)
    if prediction_mask.shape != ground_truth_mask.shape:
        raise ValueError(f"masks differ in shape: {prediction_mask.shape} vs {ground_truth_mask.shape}")
    if len(spacing_mm) != prediction_mask.ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} does not match a {prediction_mask.ndim}-D mask")
    if not prediction_mask.any() or not ground_truth_mask.any():
        return float("nan")
    box = _union_box(prediction_mask, ground_truth_mask)
    predicted = torch.from_numpy(np.ascontiguousarray(prediction_mask[box]))[None, None]
    truth = torch.from_numpy(np.ascontiguousarray(ground_truth_mask[box]))[None, None]
    with warnings.catch_warnings():
        # MONAI >= 1.5 warns about an argument its own surface-distance code still passes internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        distance = compute_average_surface_distance(
            predicted, truth, include_background=True, symmetric=symmetric, spacing=[float(s) for s in spacing_mm]
        )
    return float(distance[0, 0])


def surface_distance_summary(
    distances: Sequence[float],
    statuses: Sequence[str],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Mean ASD with a bootstrap CI over the cases where both masks are non-empty, plus counts of the others.

    ``statuses`` are :attr:`Overlap.status` values, one per case.  An empty prediction of a present structure is
    the worst possible outcome, yet its ASD is undefined; the paper's ``nanmean`` silently left such cases out
    of the mean, rewarding a model for missing a tumour entirely.  They are reported
    here as ``empty_prediction`` so a reader sees how many cases the mean does not cover.
    """
    distances = np.asarray(distances, dtype=np.float64)
    counts = {status: int(sum(1 for s in statuses if s == status)) for status in
              ("both", "empty_prediction", "empty_ground_truth", "empty_both")}
    finite = distances[np.isfinite(distances)]
    summary: dict = {"cases": int(distances.size), **counts}
    summary["mean_mm"] = bootstrap_mean_ci(finite, resamples=resamples, seed=seed).as_dict() if finite.size else None
    return summary


# --- binary classification (head-CT triage) --------------------------------------------------------------------


def _binary(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-D and of equal length")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return labels.astype(bool), scores


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve as the Mann–Whitney statistic with mid-ranks for ties.

    Equal to ``sklearn.metrics.roc_auc_score`` and ``monai.metrics.compute_roc_auc`` (tests check both); written
    with ``np.unique`` because MONAI's version loops in Python, too slow for 10,000 bootstrap resamples.
    """
    positive, scores = _binary(labels, scores)
    n_positive, n_negative = int(positive.sum()), int((~positive).sum())
    if n_positive == 0 or n_negative == 0:
        raise ValueError("AUC needs at least one positive and one negative case")
    _, group, sizes = np.unique(scores, return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(sizes) - (sizes - 1) / 2.0
    rank_sum = mid_ranks[group][positive].sum()
    return float((rank_sum - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative))


@dataclass(frozen=True)
class ConfusionCounts:
    true_positive: int
    false_positive: int
    true_negative: int
    false_negative: int

    @property
    def f1(self) -> float:
        """2TP / (2TP + FP + FN); NaN when there is no positive case and no positive prediction."""
        denominator = 2 * self.true_positive + self.false_positive + self.false_negative
        return float("nan") if denominator == 0 else 2.0 * self.true_positive / denominator

    @property
    def sensitivity(self) -> float:
        positives = self.true_positive + self.false_negative
        return float("nan") if positives == 0 else self.true_positive / positives

    @property
    def specificity(self) -> float:
        negatives = self.true_negative + self.false_positive
        return float("nan") if negatives == 0 else self.true_negative / negatives


def confusion_at_threshold(
    labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> ConfusionCounts:
    """Counts when a case is called positive at ``probability >= threshold``.

    The paper thresholded with Python ``round()``, which is ``> 0.5`` with round-half-to-even; the
    two differ only for a probability of exactly 0.5.
    """
    positive, probabilities = _binary(labels, probabilities)
    called = probabilities >= threshold
    return ConfusionCounts(
        true_positive=int((called & positive).sum()),
        false_positive=int((called & ~positive).sum()),
        true_negative=int((~called & ~positive).sum()),
        false_negative=int((~called & positive).sum()),
    )


def f1_at_threshold(
    labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> float:
    """F1 of the positive class at ``probability >= threshold`` (see :func:`confusion_at_threshold`)."""
    return confusion_at_threshold(labels, probabilities, threshold).f1


def classification_report(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    *,
    threshold: float = 0.5,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = DEFAULT_SEED,
) -> dict:
    """AUC and F1 with the paper's Wald CI and a stratified percentile bootstrap CI, plus the confusion counts.

    Bootstrap resamples draw positives and negatives separately (their counts fixed), so every resample has both
    classes and an AUC; this is the usual choice for AUC CIs and keeps the prevalence of the test set.
    """
    positive, probabilities = _binary(labels, probabilities)
    counts = confusion_at_threshold(positive.astype(int), probabilities, threshold)
    auc = roc_auc(positive.astype(int), probabilities)
    n = int(positive.size)
    generator = np.random.default_rng(seed)
    positive_index, negative_index = np.flatnonzero(positive), np.flatnonzero(~positive)
    boot_auc, boot_f1 = np.empty(resamples), np.empty(resamples)
    for draw in range(resamples):
        index = np.concatenate([
            generator.choice(positive_index, positive_index.size),
            generator.choice(negative_index, negative_index.size),
        ])
        boot_auc[draw] = roc_auc(positive[index].astype(int), probabilities[index])
        boot_f1[draw] = confusion_at_threshold(positive[index].astype(int), probabilities[index], threshold).f1
    tail = 50.0 * (1.0 - confidence)
    z = NormalDist().inv_cdf(1.0 - tail / 100.0)

    def interval(value: float, samples: np.ndarray) -> dict:
        low, high = np.nanpercentile(samples, [tail, 100.0 - tail])
        wald_low, wald_high = wald_ci(value, n, z)
        return {
            "value": value,
            "bootstrap": Estimate(value, float(low), float(high), n, f"stratified bootstrap, {resamples}x").as_dict(),
            "wald_paper": Estimate(value, wald_low, wald_high, n, "Wald p±z·sqrt(p(1-p)/n), as published").as_dict(),
        }

    return {
        "cases": n,
        "positives": int(positive.sum()),
        "threshold": threshold,
        "auc": interval(auc, boot_auc),
        "f1": interval(counts.f1, boot_f1),
        "sensitivity": counts.sensitivity,
        "specificity": counts.specificity,
        "confusion": asdict(counts),
    }


# --- retrieval -------------------------------------------------------------------------------------------------


def cosine_similarity(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """(Q, N) cosine similarities between query and corpus embeddings (rows are vectors).

    The paper says cosine; its OrganMNIST3D notebook ranked by Euclidean distance of unnormalised embeddings
    (``np.linalg.norm(query - train)``), which lets the embedding norm decide neighbours.  Cosine is used here for both
    OrganMNIST3D and 3D-MIR (whose notebook did use cosine).
    """
    queries, corpus = np.asarray(queries, dtype=np.float64), np.asarray(corpus, dtype=np.float64)
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"embeddings must be (Q, C) and (N, C), got {queries.shape} and {corpus.shape}")

    def unit(rows: np.ndarray) -> np.ndarray:
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    return unit(queries) @ unit(corpus).T


def ranked_relevance(
    similarity: np.ndarray, query_labels: Sequence | np.ndarray, corpus_labels: Sequence | np.ndarray
) -> np.ndarray:
    """(Q, N) booleans: is the corpus item at each rank (most similar first) of the query's label?

    Ties keep corpus order (stable sort), so results do not depend on the sort algorithm.
    """
    order = np.argsort(-np.asarray(similarity), axis=1, kind="stable")
    corpus_labels = np.asarray(corpus_labels)
    return corpus_labels[order] == np.asarray(query_labels)[:, None]


def _precision_at_each_rank(relevance: np.ndarray) -> np.ndarray:
    return np.cumsum(relevance, axis=1) / np.arange(1, relevance.shape[1] + 1)


def ap_at_k_paper(relevance: np.ndarray, k: int) -> np.ndarray:
    """Per-query AP@k as the CT-FM notebooks computed it: sum of precision at each hit in the top k, divided by the
    number of hits in the top k (0 when there is none).

    This is the OrganMNIST3D notebook's AP@k and equals the 3D-MIR notebook's per-query AP (sklearn
    ``average_precision_score`` on the top-10 list with scores 10…1).  Dividing by hits instead of
    by the number of relevant items makes a single hit at rank 1 score 1.0 whatever follows it, so this is an
    upper bound of :func:`ap_at_k`; kept to compare with the published numbers.
    """
    top = np.asarray(relevance, dtype=bool)[:, :k]
    hits = top.sum(axis=1)
    summed = (_precision_at_each_rank(top) * top).sum(axis=1)
    return np.divide(summed, hits, out=np.zeros(len(top)), where=hits > 0)


def ap_at_k(relevance: np.ndarray, k: int, relevant_total: np.ndarray | None = None) -> np.ndarray:
    """Per-query standard AP@k: sum of precision at each hit in the top k, divided by min(k, R).

    R (``relevant_total``) is the number of relevant corpus items of each query; by default it is counted from
    the full ``relevance`` rows, which must then cover the whole corpus.  NaN for a query with R = 0.
    """
    relevance = np.asarray(relevance, dtype=bool)
    total = relevance.sum(axis=1) if relevant_total is None else np.asarray(relevant_total)
    top = relevance[:, :k]
    summed = (_precision_at_each_rank(top) * top).sum(axis=1)
    denominator = np.minimum(k, total).astype(float)
    return np.divide(summed, denominator, out=np.full(len(top), np.nan), where=denominator > 0)


def average_precision(relevance: np.ndarray) -> np.ndarray:
    """Per-query AP over the full ranking of the corpus (divided by R); NaN for a query with no relevant item.

    This is the standard (non-interpolated) AP, equal to ``sklearn.metrics.average_precision_score`` over the
    whole corpus when similarities have no ties.  The 3D-MIR notebook's "AP" is :func:`ap_at_k_paper` at k=10.
    """
    relevance = np.asarray(relevance, dtype=bool)
    return ap_at_k(relevance, relevance.shape[1])


def hit_rate_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """Per-query HR@k: 1 when any of the top k is relevant."""
    return np.asarray(relevance, dtype=bool)[:, :k].any(axis=1).astype(float)


def precision_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """Per-query P@k: the fraction of the top k that is relevant (the 3D-MIR P@k)."""
    return np.asarray(relevance, dtype=bool)[:, :k].mean(axis=1)


def _harmonic(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    total = first + second
    return np.divide(2.0 * first * second, total, out=np.zeros_like(total, dtype=float), where=total > 0)


def f1_at_k_paper(relevance: np.ndarray, k: int) -> np.ndarray:
    """Per-query F1@k as the OrganMNIST3D notebook defined it: harmonic mean of the paper's AP@k and HR@k.

    A query with no hit has AP = HR = 0, which the notebook's formula turns into 0/0 = NaN that ``np.nanmean``
    then drops from the mean, inflating it; such a query scores 0 here.
    """
    return _harmonic(ap_at_k_paper(relevance, k), hit_rate_at_k(relevance, k))


def f1_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """Per-query standard F1@k: harmonic mean of P@k and recall@k (hits in top k / R); NaN when R = 0."""
    relevance = np.asarray(relevance, dtype=bool)
    total = relevance.sum(axis=1)
    recall = np.divide(relevance[:, :k].sum(axis=1), total, out=np.full(len(relevance), np.nan), where=total > 0)
    result = _harmonic(precision_at_k(relevance, k), np.nan_to_num(recall))
    return np.where(total > 0, result, np.nan)


def retrieval_per_query(relevance: np.ndarray, ks: Sequence[int] = (3, 5, 10)) -> dict[str, np.ndarray]:
    """Every retrieval metric of every query, as columns: ``ap_paper@k``, ``hr@k``, ``f1_paper@k``,
    ``precision@k``, ``ap@k``, ``f1@k`` for each k, and ``ap_full_ranking``.

    ``relevance`` covers the whole corpus of each query, most similar first.  The standard metrics are NaN for
    a query with no relevant corpus item; the paper's are 0 for it.
    """
    relevance = np.asarray(relevance, dtype=bool)
    columns: dict[str, np.ndarray] = {}
    for k in ks:
        if not 1 <= k <= relevance.shape[1]:
            raise ValueError(f"k={k} is outside 1..{relevance.shape[1]} (the corpus size)")
        columns[f"ap_paper@{k}"] = ap_at_k_paper(relevance, k)
        columns[f"hr@{k}"] = hit_rate_at_k(relevance, k)
        columns[f"f1_paper@{k}"] = f1_at_k_paper(relevance, k)
        columns[f"precision@{k}"] = precision_at_k(relevance, k)
        columns[f"ap@{k}"] = ap_at_k(relevance, k)
        columns[f"f1@{k}"] = f1_at_k(relevance, k)
    columns["ap_full_ranking"] = average_precision(relevance)
    return columns


def summarise_retrieval(per_query: Mapping[str, np.ndarray]) -> dict:
    """Unweighted mean over queries of each column of :func:`retrieval_per_query` (queries may be pooled from
    several corpora by concatenating columns).  Queries without a relevant corpus item are counted in
    ``queries_without_relevant`` and left out of the standard metrics only, which are undefined for them."""
    undefined = np.isnan(per_query["ap_full_ranking"])
    summary: dict = {"queries": int(undefined.size), "queries_without_relevant": int(undefined.sum())}
    for name, values in per_query.items():
        finite = values[np.isfinite(values)]
        summary[name] = float(finite.mean()) if finite.size else None
    return summary


# --- semantic search (OCD) -------------------------------------------------------------------------------------


def paper_inside_label(point_zyx: Sequence[int], mask: np.ndarray) -> bool:
    """The OCD script's "matched patch inside the heart" test, reproduced only to show its bug.

    ``torch.tensor(point) in argwhere(mask)`` compares the point with every mask voxel coordinate by coordinate
    and is true when ANY single coordinate equals that of some mask voxel in the same axis, so a point far
    outside the organ counts as inside when it shares, say, one z slice with it.  The correct test is a lookup
    of the label at the point: :func:`ctfm_engine.tasks.ocd.label_at`, which
    :func:`~ctfm_engine.tasks.ocd.organ_centroid_distances` uses for ``OrganQuery.hit``.
    """
    return bool(np.any(np.argwhere(mask) == np.asarray(point_zyx)))


def ocd_summary(
    results: Sequence[OrganQuery], *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> dict:
    """OCD over organ-search results: distance (mm, not the paper's cm) from the match to the organ centroid,
    mean with bootstrap CI, SD (sample, ddof 1; the paper printed np.std, ddof 0, also given), median, and the
    fraction of matches inside the organ by a true mask lookup (``OrganQuery.hit``)."""
    if not results:
        raise ValueError("no search results to summarise")
    distances = np.array([result.distance_mm for result in results], dtype=np.float64)
    hits = np.array([result.hit for result in results], dtype=float)
    return {
        "pairs": len(results),
        "distance_mm": bootstrap_mean_ci(distances, resamples=resamples, seed=seed).as_dict(),
        "distance_sd_mm": float(distances.std(ddof=1)) if len(distances) > 1 else None,
        "distance_sd_ddof0_mm": float(distances.std(ddof=0)),
        "distance_median_mm": float(np.median(distances)),
        "inside_organ": bootstrap_mean_ci(hits, resamples=resamples, seed=seed).as_dict(),
        "inside_organ_count": int(hits.sum()),
    }
