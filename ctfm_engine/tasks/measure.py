"""Per-structure measurements of a label map on its CT's own grid: volume in mL and Hounsfield-unit statistics.

Every number is computed on the source (input) grid, from the CT's voxels in HU and the label map mapped back onto
that grid, never in model space.  Statistics per structure (label value):

- ``voxels`` and ``volume_ml`` = voxels x the voxel volume (the product of the grid spacing, mm^3 / 1000);
- ``hu_mean``; ``hu_sd``, the *sample* standard deviation (divisor n - 1), as SimpleITK's
  LabelStatisticsImageFilter ``GetSigma`` (0 for a single voxel, as there too);
- ``hu_min``, ``hu_max`` and ``hu_median``, ``hu_p5``, ``hu_p25``, ``hu_p75``, ``hu_p95``: exact order statistics,
  numpy's ``percentile`` with its default linear interpolation (SimpleITK's median is read off a histogram, so it
  only approximates these).

The voxels are grouped by label once (a stable radix sort of the labelled voxels' label values), so the work grows
with the number of labelled voxels, not with voxels x structures.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_engine.io import atomic_output
from ctfm_engine.volume import CTVolume

HU_PERCENTILES = (5, 25, 75, 95)
TABLE_SUFFIXES = (".csv", ".json")


@dataclass(frozen=True)
class StructureStatistics:
    """One structure's size and attenuation on the source grid (HU; volume in mL)."""

    value: int
    name: str
    voxels: int
    volume_ml: float
    hu_mean: float
    hu_sd: float  # sample standard deviation (n - 1), 0 for one voxel
    hu_median: float
    hu_min: float
    hu_max: float
    hu_p5: float
    hu_p25: float
    hu_p75: float
    hu_p95: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(item.name for item in fields(StructureStatistics))


def structure_statistics(labels_zyx: np.ndarray, volume: CTVolume,
                         names: Mapping[int, str] | None = None) -> list[StructureStatistics]:
    """Volume and HU statistics of every structure present in ``labels_zyx``, in label-value order.

    Parameters
    ----------
    labels_zyx
        Integer label map (z, y, x) on ``volume``'s grid, 0 = background.
    volume
        The CT: voxels in HU and the spacing that gives each voxel's volume.
    names
        Label value -> structure name; a value without one is named ``label_<value>``.

    Raises
    ------
    ValueError
        When the map does not fit the volume or holds non-integer or negative values.
    """
    labels = _checked_labels(labels_zyx, volume)
    voxel_ml = float(np.prod(volume.spacing_xyz_mm)) / 1000.0
    flat = labels.ravel()
    labelled = np.flatnonzero(flat)
    if labelled.size == 0:
        return []
    label_of = flat[labelled].astype(np.uint8 if int(flat.max()) < 256 else np.uint16, copy=False)
    order = np.argsort(label_of, kind="stable")  # a radix sort for 8/16-bit keys: linear in the voxels
    hu_grouped = np.asarray(volume.voxels).ravel()[labelled[order]]
    counts = np.bincount(label_of)
    ends = np.cumsum(counts)
    rows = []
    for value in np.flatnonzero(counts):
        hu = hu_grouped[ends[value] - counts[value]: ends[value]].astype(np.float64)
        median, *percentiles = np.percentile(hu, (50, *HU_PERCENTILES))
        rows.append(StructureStatistics(
            value=int(value),
            name=(names or {}).get(int(value), f"label_{int(value)}"),
            voxels=int(hu.size),
            volume_ml=int(hu.size) * voxel_ml,
            hu_mean=float(hu.mean()),
            hu_sd=float(hu.std(ddof=1)) if hu.size > 1 else 0.0,
            hu_median=float(median),
            hu_min=float(hu.min()),
            hu_max=float(hu.max()),
            **{f"hu_p{q}": float(p) for q, p in zip(HU_PERCENTILES, percentiles, strict=True)},
        ))
    return rows


def write_measurement_table(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """``rows`` (:meth:`StructureStatistics.as_dict`, extra keys kept) as CSV or JSON by the suffix, atomically.

    The JSON is ``{"structures": rows}``; the CSV has one row per structure, the statistics' columns first, in
    full precision (``repr`` of each float) so that a reader gets back the very numbers.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: a measurement table is written as {' or '.join(TABLE_SUFFIXES)}")
    with atomic_output(path) as temporary, temporary.open("w", newline="") as handle:
        if suffix == ".json":
            json.dump({"structures": rows}, handle, indent=1)
            handle.write("\n")
            return path
        columns = [*COLUMNS, *dict.fromkeys(key for row in rows for key in row if key not in COLUMNS)]
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({key: _cell(value) for key, value in row.items()} for row in rows)
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def _checked_labels(labels_zyx: np.ndarray, volume: CTVolume) -> np.ndarray:
    labels = np.asarray(labels_zyx)
    if labels.shape != volume.shape_zyx:
        raise ValueError(f"the label map has shape {labels.shape} but {volume.source} has {volume.shape_zyx} "
                         f"(z, y, x); measure on the source grid")
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"the label map holds {labels.dtype} values; measurements need integer label values")
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"the label map holds the negative label value {int(labels.min())}; label values are >= 0")
    if labels.size and int(labels.max()) >= 2**16:
        raise ValueError(f"the label map holds the label value {int(labels.max())}; at most 65535 are measured")
    return labels
