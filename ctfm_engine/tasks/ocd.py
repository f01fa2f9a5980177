"""Organ centroid distance (OCD): does semantic search land on the organ it was asked to find?

For every structure labelled in both a source and a target scan, the query is the structure's centroid in the
source; semantic search (:mod:`ctfm_engine.tasks.search`, either method) returns the best match in the target;
the OCD is the distance from that match to the structure's centroid in the target, and the match is a *hit* when
it lies inside the structure (a true mask lookup).  This is the CT-FM paper's semantic-search metric with its
bugs removed: millimetres, not centimetres; "inside" by looking up the label at the match,
not by comparing coordinates axis by axis; labels resampled nearest-neighbour onto each scan's own grid.

A centroid of a curved structure (a rib, the colon) may lie outside it; the query is still its centroid, as in
the paper, and the table says how many voxels the structure has.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfm_engine.errors import InputError, UsageError
from ctfm_engine.figures import save_figure
from ctfm_engine.preprocess import preprocess, read_labels_on
from ctfm_engine.progress import CancelCheck, Progress, check_cancelled
from ctfm_engine.tasks.search import METHODS, SemanticSearch
from ctfm_engine.volume import CTVolume

log = logging.getLogger(__name__)

MINIMUM_VOXELS = 50


@dataclass(frozen=True)
class OrganQuery:
    """One structure searched from the source in the target."""

    label: int
    name: str
    voxels_source: int
    voxels_target: int
    query_lps: tuple[float, float, float]
    match_lps: tuple[float, float, float]
    centroid_lps: tuple[float, float, float]  # the structure's centroid in the target
    distance_mm: float
    hit: bool
    similarity: float


def read_label_map(path: str | Path, volume: CTVolume) -> np.ndarray:
    """The label map at ``path`` sampled (nearest) on ``volume``'s grid; InputError naming the file if it is not
    an integer label map or does not overlap the scan."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such label-map file")
    try:
        labels = read_labels_on(path, volume.grid)
    except RuntimeError as error:
        raise InputError(f"{path}: not a readable label map ({str(error).strip().splitlines()[-1]})") from None
    if labels.dtype.kind == "f" and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise InputError(f"{path}: not a label map (it holds fractional values, like an image)")
    if labels.min() < 0:
        raise InputError(f"{path}: not a label map (it holds negative values, like a CT image)")
    labels = labels.astype(np.int32)
    if not labels.any():
        raise InputError(f"{path}: no labelled voxel falls inside {volume.source} (wrong scan or empty label map)")
    return labels


def centroid_lps(volume: CTVolume, labels: np.ndarray, label: int) -> np.ndarray:
    """The centroid (LPS mm) of the voxels of ``labels`` (on ``volume``'s grid) that hold ``label``."""
    return volume.zyx_index_to_lps(np.argwhere(labels == label).mean(axis=0))


def label_at(volume: CTVolume, labels: np.ndarray, point_lps: np.ndarray) -> int:
    """The label of the voxel nearest to ``point_lps`` (a true mask lookup); 0 when the point is outside the scan."""
    index = np.rint(volume.lps_to_zyx_index(point_lps)).astype(int)
    if np.any(index < 0) or np.any(index >= np.array(labels.shape)):
        return 0
    return int(labels[tuple(index)])


def label_counts(labels: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0}


def organ_centroid_distances(
    searcher: SemanticSearch,
    source: CTVolume,
    source_labels: np.ndarray,
    target: CTVolume,
    target_labels: np.ndarray,
    *,
    names: dict[int, str],
    organs: Sequence[int] | None = None,
    minimum_voxels: int = MINIMUM_VOXELS,
    method: str = "fast",
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
) -> list[OrganQuery]:
    """Search every structure of ``organs`` (default: all with >= ``minimum_voxels`` in both scans)."""
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    in_source, in_target = label_counts(source_labels), label_counts(target_labels)
    shared = sorted(label for label in in_source.keys() & in_target.keys()
                    if min(in_source[label], in_target[label]) >= minimum_voxels)
    if organs:
        missing = [label for label in organs if label not in shared]
        if missing:
            raise UsageError(f"structures {missing} are not labelled (>= {minimum_voxels} voxels) in both scans; "
                             f"both have {shared}")
        shared = sorted(set(organs))
    if not shared:
        raise InputError(f"{source.source} and {target.source}: no structure is labelled (>= {minimum_voxels} "
                         "voxels) in both label maps")
    settings = searcher.settings
    patch = settings.patch_voxels_zyx
    if method == "fast":
        source_features, target_features = searcher.features(source), searcher.features(target)
        windows = target_features.windows(settings.patch_cells_zyx)
    else:
        source_input = preprocess(source, settings.preprocessing)
        windows = searcher.exact_windows(preprocess(target, settings.preprocessing), cancel)
    results = []
    for done, label in enumerate(shared):
        check_cancelled(cancel)
        query_point = centroid_lps(source, source_labels, label)
        query = (searcher.fast_query(source_features, query_point) if method == "fast"
                 else searcher.exact_query(source_input, query_point))
        best = windows.field(query).matches(1, patch, refine=method == "fast")[0]
        match = np.array(best.point_lps)
        centroid = centroid_lps(target, target_labels, label)
        hit = label_at(target, target_labels, match) == label
        results.append(OrganQuery(label, names.get(label, f"label {label}"), in_source[label], in_target[label],
                                  _point(query_point), _point(match), _point(centroid),
                                  float(np.linalg.norm(match - centroid)), hit, best.similarity))
        if progress is not None:
            progress(done + 1, len(shared))
    return results


def _point(values: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def write_ocd_figure(results: Sequence[OrganQuery], summary: dict, path: str | Path, title: str) -> Path:
    """A bar per structure: distance from the match to the structure's centroid, hits and misses coloured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ordered = sorted(results, key=lambda result: result.distance_mm)
    height = max(3.0, 0.26 * len(ordered) + 1.6)
    figure, axes = plt.subplots(figsize=(8.0, height), layout="constrained")
    colours = ["#2a9d8f" if result.hit else "#e76f51" for result in ordered]
    positions = np.arange(len(ordered))
    axes.barh(positions, [result.distance_mm for result in ordered], color=colours)
    axes.set_yticks(positions, [result.name for result in ordered], fontsize=8)
    axes.invert_yaxis()
    mean = summary["distance_mm"]["value"]
    axes.axvline(mean, color="black", linestyle="--", linewidth=1)
    axes.set_xlabel("distance from the best match to the structure's centroid in the target (mm)")
    inside = summary["inside_organ"]
    axes.set_title(f"{title}\nOCD mean {mean:.1f} mm (95% CI {summary['distance_mm']['low']:.1f}-"
                   f"{summary['distance_mm']['high']:.1f}), median {summary['distance_median_mm']:.1f} mm\n"
                   f"match inside the structure {summary['inside_organ_count']}/{summary['pairs']} "
                   f"({inside['value']:.0%})", fontsize=9)
    axes.legend(handles=[Patch(color="#2a9d8f", label="match inside the structure"),
                         Patch(color="#e76f51", label="match elsewhere")], loc="lower right", fontsize=8)
    return save_figure(figure, path, dpi=110)
