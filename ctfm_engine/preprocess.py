"""CT-FM preprocessing (orientation SPL, 3x1x1 mm, HU window, foreground crop) and its exact inverse.

The model grid is an ITK grid whose index axes (x, y, z) point Left, Posterior, Superior: its (z, y, x) array is
exactly MONAI's channel-first SPL array (axis 0 toward S, 1 toward P, 2 toward L).  Every model-space array keeps
that grid, so any result is mapped back onto the source grid by resampling at the source voxel centres.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctfm_engine.errors import UsageError
from ctfm_engine.volume import CTVolume, Grid

_INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}


@dataclass(frozen=True)
class Preprocessing:
    """The parameters of the CT-FM pipeline; the defaults are the pre-training ones (SPL, 3x1x1 mm,
    crop to HU > 0, HU window [-1024, 2048] to [0, 1]).  ``spacing_zyx_mm`` None keeps the scan's own voxels
    (native resolution, as the model cards' snippets do: their pipelines have no Spacing step)."""

    spacing_zyx_mm: tuple[float, float, float] | None = (3.0, 1.0, 1.0)
    hu_window: tuple[float, float] = (-1024.0, 2048.0)
    # CF-raw: the crop box holds every voxel above this HU value, measured before intensity scaling.
    foreground_above_hu: float | None = 0.0

    def describe(self) -> dict:
        described = {"orientation": "SPL", **asdict(self)}
        if self.spacing_zyx_mm is None:
            described["spacing_zyx_mm"] = "native"
        return described

    def spacing_for(self, source: Grid) -> tuple[float, float, float]:
        """The model grid's spacing (z, y, x) for a scan on ``source``: the set spacing, or the scan's own
        voxel size along S, P, L when native."""
        if self.spacing_zyx_mm is not None:
            return self.spacing_zyx_mm
        axes, _ = spl_axes(source.direction)
        return tuple(float(source.spacing_xyz_mm[a]) for a in axes[::-1])  # type: ignore[return-value]


CTFM_PREPROCESSING = Preprocessing()
# The ct_fm_feature_extractor card's snippet: SPL, no Spacing, HU window to [0, 1], CropForeground on the scaled
# image (select x > 0, i.e. HU > -1024: air inside the body and the table are kept).
CARD_PREPROCESSING = Preprocessing(spacing_zyx_mm=None, foreground_above_hu=-1024.0)
PREPROCESSING_CHOICES = {"pretraining": CTFM_PREPROCESSING, "card": CARD_PREPROCESSING}


def preprocessing_named(name: str) -> Preprocessing:
    """The embedding preprocessing called ``name``: "pretraining" (CT-FM's own, the default) or "card"."""
    if name not in PREPROCESSING_CHOICES:
        raise UsageError(f"preprocessing {name!r}: choose one of {', '.join(PREPROCESSING_CHOICES)}")
    return PREPROCESSING_CHOICES[name]


@dataclass(frozen=True, eq=False)
class ModelInput:
    """A volume in model space: the network input (z, y, x) in [0, 1], its grid, and the source grid."""

    image: np.ndarray
    grid: Grid
    source_grid: Grid
    preprocessing: Preprocessing

    def to_source(self, array: np.ndarray, *, interpolation: str = "nearest", fill: float = 0.0) -> np.ndarray:
        """Map an array on the model grid onto the source grid (labels: nearest; scores: linear)."""
        return resample(array, self.grid, self.source_grid, interpolation=interpolation, fill=fill)


def spl_axes(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each world axis L, P, S: the source index axis (x, y, z = 0, 1, 2) closest to it, and its sign."""
    axis_for_world = np.abs(direction).argmax(axis=1)
    if len(set(axis_for_world.tolist())) != 3:
        # an oblique scan where two index axes are closest to the same world axis: fall back on a greedy match
        axis_for_world = _greedy_axis_match(np.abs(direction))
    return axis_for_world, np.sign(direction[np.arange(3), axis_for_world])


def spl_grid(source: Grid, spacing_zyx_mm: tuple[float, float, float] | None) -> Grid:
    """The model grid: source axes permuted/flipped to point L, P, S, resampled to ``spacing_zyx_mm`` (None: the
    source's own voxels, only reordered).

    Only axis order and sign change, so an oblique scan keeps its small rotation, as MONAI's Orientation does.
    The new grid is centred on the source field of view, which makes it independent of storage order.
    """
    direction = source.direction
    shape_xyz = np.array(source.shape_zyx[::-1])
    spacing_xyz = np.array(source.spacing_xyz_mm)
    axis_for_world, signs = spl_axes(direction)
    new_direction = direction[:, axis_for_world] * signs[None, :]
    if spacing_zyx_mm is None:
        new_spacing = spacing_xyz[axis_for_world]
        new_shape = shape_xyz[axis_for_world]
    else:
        extent_mm = shape_xyz[axis_for_world] * spacing_xyz[axis_for_world]
        new_spacing = np.array(spacing_zyx_mm[::-1], dtype=np.float64)
        new_shape = np.maximum(1, np.round(extent_mm / new_spacing)).astype(int)
    centre = source.zyx_index_to_lps((np.array(source.shape_zyx) - 1) / 2.0)
    origin = centre - new_direction @ ((new_shape - 1) / 2.0 * new_spacing)
    return Grid(tuple(new_shape[::-1]), tuple(new_spacing), tuple(origin), new_direction)


def _greedy_axis_match(weights: np.ndarray) -> np.ndarray:
    match = np.full(3, -1)
    for flat in np.argsort(-weights, axis=None):
        world, axis = divmod(int(flat), 3)
        if match[world] < 0 and axis not in match:
            match[world] = axis
    return match


def resample(
    array: np.ndarray, from_grid: Grid, to_grid: Grid, *, interpolation: str = "linear", fill: float = 0.0
) -> np.ndarray:
    """Sample ``array`` (on ``from_grid``) at every voxel centre of ``to_grid``; outside points get ``fill``."""
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATORS)}, got {interpolation!r}")
    source = from_grid.image(np.ascontiguousarray(array))
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(tuple(int(n) for n in to_grid.shape_zyx[::-1]))
    resampler.SetOutputSpacing(to_grid.spacing_xyz_mm)
    resampler.SetOutputOrigin(to_grid.origin_lps_mm)
    resampler.SetOutputDirection(tuple(float(d) for d in to_grid.direction.ravel()))
    resampler.SetInterpolator(_INTERPOLATORS[interpolation])
    resampler.SetDefaultPixelValue(float(fill))
    resampler.SetOutputPixelType(source.GetPixelID())
    return sitk.GetArrayFromImage(resampler.Execute(source))


def read_labels_on(path: str | Path, grid: Grid) -> np.ndarray:
    """A label-map file sampled nearest-neighbour at every voxel centre of ``grid`` (0 where it has no data)."""
    image = sitk.ReadImage(str(path))
    return resample(sitk.GetArrayFromImage(image), Grid.of_image(image), grid, interpolation="nearest")


def foreground_box(hu: np.ndarray, above_hu: float) -> tuple[slice, slice, slice] | None:
    """The smallest (z, y, x) box holding every voxel above ``above_hu``; None when there is none."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero((hu > above_hu).any(axis=other))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def crop_grid(grid: Grid, box: tuple[slice, slice, slice]) -> Grid:
    start_zyx = np.array([s.start for s in box], dtype=np.float64)
    shape = tuple(s.stop - s.start for s in box)
    return Grid(shape, grid.spacing_xyz_mm, tuple(grid.zyx_index_to_lps(start_zyx)), grid.direction)


def scale_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU window ``[low, high]`` to [0, 1], clipped (MONAI ScaleIntensityRange with clip)."""
    low, high = window
    return np.clip((hu - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)


def oriented_voxels(voxels: np.ndarray, source: Grid) -> np.ndarray:
    """The (z, y, x) voxels reordered onto ``spl_grid(source, None)``: a transpose and flips, values untouched
    (MONAI's Orientation("SPL"))."""
    axis_for_world, signs = spl_axes(source.direction)
    # numpy axis of index axis a is 2 - a; the new numpy axis m holds the new index axis 2 - m
    oriented = np.transpose(voxels, [2 - int(axis_for_world[2 - m]) for m in range(3)])
    flips = tuple(m for m in range(3) if signs[2 - m] < 0)
    return np.flip(oriented, axis=flips) if flips else oriented


def preprocess(volume: CTVolume, preprocessing: Preprocessing = CTFM_PREPROCESSING) -> ModelInput:
    """CT-FM's pipeline: SPL orientation, trilinear resampling (none at native spacing), foreground crop on raw HU,
    HU window."""
    grid = spl_grid(volume.grid, preprocessing.spacing_zyx_mm)
    air = float(preprocessing.hu_window[0])
    if preprocessing.spacing_zyx_mm is None:
        hu = oriented_voxels(volume.voxels.astype(np.float32, copy=False), volume.grid)
    else:
        hu = resample(volume.voxels.astype(np.float32, copy=False), volume.grid, grid, interpolation="linear",
                      fill=air)
    if preprocessing.foreground_above_hu is not None:
        box = foreground_box(hu, preprocessing.foreground_above_hu)
        if box is not None:
            hu = hu[box]
            grid = crop_grid(grid, box)
    return ModelInput(
        image=scale_hu(hu, preprocessing.hu_window),
        grid=grid,
        source_grid=volume.grid,
        preprocessing=preprocessing,
    )
