"""Orthogonal slices of source-grid volumes for pictures, shown the way a radiologist reads them.

Volumes are reoriented to LPS index order (no resampling, so an oblique scan is shown along its nearest axes):
axial with anterior up and the patient's left on the right of the image, coronal and sagittal with superior up
(sagittal: anterior on the left).  Each slice carries the aspect ratio of its pixels in millimetres.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ctfm_engine.io import atomic_output
from ctfm_engine.volume import Grid

VIEW_NAMES = ("axial", "coronal", "sagittal")
# A soft-tissue window (W 400, L 40 HU) for the grey CT under overlays.
CT_DISPLAY_HU = (-160.0, 240.0)


@dataclass(frozen=True, eq=False)
class View:
    """One slice of several co-registered arrays, ready for ``imshow(..., aspect=aspect)``."""

    name: str
    planes: tuple[np.ndarray, ...]
    aspect: float


def orthogonal_views(grid: Grid, arrays: Sequence[np.ndarray], point_zyx: Sequence[float]) -> list[View]:
    """Axial, coronal and sagittal slices through ``point_zyx`` (a voxel index of ``grid``) of every array.

    ``arrays`` are (z, y, x) on ``grid``, optionally with trailing channels (e.g. RGB).
    """
    reference = grid.image(np.zeros(grid.shape_zyx, dtype=np.uint8))
    reoriented = sitk.DICOMOrient(reference, "LPS")
    point = reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in point_zyx[::-1]])
    index_xyz = np.array(reoriented.TransformPhysicalPointToContinuousIndex(point))
    size_xyz = np.array(reoriented.GetSize())
    x, y, z = np.clip(np.round(index_xyz).astype(int), 0, size_xyz - 1)
    spacing_x, spacing_y, spacing_z = reoriented.GetSpacing()
    oriented = [_to_lps(array, grid) for array in arrays]
    return [
        View("axial", tuple(array[z] for array in oriented), spacing_y / spacing_x),
        View("coronal", tuple(array[::-1, y] for array in oriented), spacing_z / spacing_x),
        View("sagittal", tuple(array[::-1, :, x] for array in oriented), spacing_z / spacing_y),
    ]


def _to_lps(array: np.ndarray, grid: Grid) -> np.ndarray:
    """``array`` (z, y, x[, channels]) permuted and flipped the way DICOMOrient(..., "LPS") reorients ``grid``."""
    channels = array.shape[3:]
    flat = array.reshape(*grid.shape_zyx, -1)
    components = []
    for channel in range(flat.shape[-1]):
        image = grid.image(np.ascontiguousarray(flat[..., channel]))
        components.append(sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS")))
    return np.stack(components, axis=-1).reshape(*components[0].shape, *channels)


def save_figure(figure: Any, path: str | Path, dpi: int) -> Path:
    """Save a matplotlib figure as PNG atomically, at exactly its size in inches times ``dpi`` pixels."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, format="png", dpi=dpi)
    finally:
        plt.close(figure)
    return path


def new_figure(rows: int, columns: int, size_px: tuple[int, int], dpi: int,
               height_ratios: Sequence[float] | None = None) -> tuple[Any, np.ndarray]:
    """A matplotlib figure (Agg backend, no screen needed) of ``size_px`` (width, height) and its axes grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, columns, figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi,
                                squeeze=False, gridspec_kw={"height_ratios": height_ratios})
    return figure, axes


def height_over_width(view: View) -> float:
    """How tall the view's picture is for its width, in millimetres."""
    rows, columns = view.planes[0].shape[:2]
    return rows * view.aspect / columns
