"""Head-CT preprocessing of CT-FM's triage recipe and a cheap report of what the scan looks like.

Order as in CT-FM's SinoCT/CQ500 configs: SPL orientation (native spacing) -> foreground crop on raw HU > 0
(CF-raw) -> trilinear resampling to 5x2x2 mm (z, y, x) -> pad to [48, 128, 128] with the minimum -> centre crop ->
four HU windows (blood, subdural, stroke, bone), each min-max scaled to [0, 1] and clipped, stacked along S into
one (192, 128, 128) channel: the windows follow each other along z, not as channels (the paper: "width-wise").
The report (:class:`HeadCTCheck`) never refuses a scan: the triage command decides what to do with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ctfm_engine.errors import InputError
from ctfm_engine.preprocess import crop_grid, foreground_box, resample, scale_hu, spl_grid
from ctfm_engine.volume import CTVolume, Grid

# (name, low HU, high HU): the paper's WL/WW 40/80, 25/300, 32/8, 600/3000.
HEAD_CT_WINDOWS: tuple[tuple[str, float, float], ...] = (
    ("blood", 0.0, 80.0),
    ("subdural", -125.0, 175.0),
    ("stroke", 28.0, 36.0),
    ("bone", -900.0, 2100.0),
)

# The head check: skull is bone above this HU; the body is everything denser than lung or padding.
SKULL_HU = 300.0
BODY_HU = -300.0
BRAIN_HU = (0.0, 100.0)
# An axial slice shows cranium when bone closes around at least this much brain-like tissue, which in turn fills
# most of the body's cross-section (a pelvic ring or a vertebral canal encloses a small share of it).
MIN_CRANIAL_AREA_MM2 = 2000.0
MIN_BRAIN_SHARE_OF_ENCLOSED = 0.6
MIN_ENCLOSED_SHARE_OF_BODY = 0.45
# Gaps in the bone ring this wide (sutures, partial volume, foramina) are bridged before filling it.
RING_GAP_MM = 8.0
MIN_SKULL_EXTENT_MM = 10.0
MAX_CRANIAL_WIDTH_MM = 200.0
# A head CT from skull base to vertex covers about 120-200 mm along S.
MIN_HEAD_COVERAGE_MM = 100.0


@dataclass(frozen=True)
class HeadCTPreprocessing:
    """Parameters of the head-CT pipeline; the defaults are CT-FM's (``evaluation/sinoct.yaml``)."""

    spacing_zyx_mm: tuple[float, float, float] = (5.0, 2.0, 2.0)
    spatial_size_zyx: tuple[int, int, int] = (48, 128, 128)
    windows: tuple[tuple[str, float, float], ...] = HEAD_CT_WINDOWS
    foreground_above_hu: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_zyx_mm", tuple(float(s) for s in self.spacing_zyx_mm))
        object.__setattr__(self, "spatial_size_zyx", tuple(int(s) for s in self.spatial_size_zyx))
        object.__setattr__(self, "windows", tuple((str(n), float(lo), float(hi)) for n, lo, hi in self.windows))
        if len(self.spacing_zyx_mm) != 3 or min(self.spacing_zyx_mm) <= 0:
            raise ValueError(f"spacing_zyx_mm must be three positive numbers, got {self.spacing_zyx_mm}")
        if len(self.spatial_size_zyx) != 3 or min(self.spatial_size_zyx) < 1:
            raise ValueError(f"spatial_size_zyx must be three positive whole numbers, got {self.spatial_size_zyx}")
        if not self.windows or any(high <= low for _, low, high in self.windows):
            raise ValueError("every HU window needs low < high")

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.spatial_size_zyx, self.spacing_zyx_mm, strict=True))  # type: ignore[return-value]

    def describe(self) -> dict:
        return {"orientation": "SPL", "crop": "foreground on raw HU, then resample", "pad": "minimum",
                **asdict(self)}


HEAD_CT_PREPROCESSING = HeadCTPreprocessing()


@dataclass(frozen=True)
class HeadCTCheck:
    """What a cheap look at the scan found; ``looks_like_head`` is False when any of ``reasons`` applies.

    ``coverage_mm`` is the (S, P, L) extent of the foreground (HU > 0) box; ``cropped_away_mm`` how much of it the
    model's field of view leaves out along each axis; ``skull_extent_mm`` the S extent of axial slices whose bone
    ring encloses brain-like tissue; ``cranial_width_mm`` the widest left-right extent of what it encloses.
    """

    looks_like_head: bool
    coverage_mm: tuple[float, float, float]
    cropped_away_mm: tuple[float, float, float]
    skull_extent_mm: float
    cranial_width_mm: float
    modality: str | None
    reasons: tuple[str, ...]
    notes: tuple[str, ...]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class HeadCTInput:
    """A head CT in model space: the stacked windows (4*z, y, x) in [0, 1], the grid of one window block."""

    image: np.ndarray
    grid: Grid
    source_grid: Grid
    preprocessing: HeadCTPreprocessing
    checks: HeadCTCheck


def head_ct_hu(
    volume: CTVolume, preprocessing: HeadCTPreprocessing = HEAD_CT_PREPROCESSING
) -> tuple[np.ndarray, Grid, HeadCTCheck]:
    """HU on the model grid (z, y, x) = ``spatial_size_zyx`` before windowing, that grid, and the head check."""
    # Orientation first, at the scan's own spacing: voxel centres stay where they are, only the axes turn to SPL.
    probe = spl_grid(volume.grid, (1.0, 1.0, 1.0))
    source_axis = np.abs(volume.grid.direction.T @ probe.direction).argmax(axis=0)
    native_zyx = tuple(float(s) for s in np.asarray(volume.grid.spacing_xyz_mm)[source_axis][::-1])
    oriented = spl_grid(volume.grid, native_zyx)  # type: ignore[arg-type]
    darkest = float(volume.voxels.min())
    hu = resample(volume.voxels.astype(np.float32, copy=False), volume.grid, oriented, fill=darkest)
    box = foreground_box(hu, preprocessing.foreground_above_hu)
    if box is None:
        raise InputError(f"{volume.source}: no voxel is above {preprocessing.foreground_above_hu:g} HU, so there is "
                         f"no patient to crop to; give a CT of the head")
    hu, cropped = hu[box], crop_grid(oriented, box)
    coverage = tuple(float(n * s) for n, s in zip(hu.shape, native_zyx, strict=True))
    resampled = spl_grid(cropped, preprocessing.spacing_zyx_mm)
    hu = resample(hu, cropped, resampled, fill=float(hu.min()))
    checks = check_head(hu, preprocessing.spacing_zyx_mm, coverage, preprocessing, volume.dicom.modality)
    hu, start = pad_and_centre_crop(hu, preprocessing.spatial_size_zyx)
    box = tuple(slice(first, first + size) for first, size in zip(start, preprocessing.spatial_size_zyx, strict=True))
    return hu, crop_grid(resampled, box), checks  # type: ignore[arg-type]


def window_stack(hu: np.ndarray, windows: tuple[tuple[str, float, float], ...] = HEAD_CT_WINDOWS) -> np.ndarray:
    """Each HU window scaled to [0, 1] (clipped), the results concatenated along z: (len(windows) * z, y, x)."""
    return np.concatenate([scale_hu(hu, (low, high)) for _, low, high in windows], axis=0)


def head_ct_input(volume: CTVolume, preprocessing: HeadCTPreprocessing = HEAD_CT_PREPROCESSING) -> HeadCTInput:
    """The triage network's input for ``volume``, float32 (192, 128, 128) with the default preprocessing."""
    hu, grid, checks = head_ct_hu(volume, preprocessing)
    return HeadCTInput(window_stack(hu, preprocessing.windows), grid, volume.grid, preprocessing, checks)


def pad_and_centre_crop(hu: np.ndarray, size_zyx: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """MONAI SpatialPad(mode="minimum", symmetric) then CenterSpatialCrop; also the box start in ``hu`` indices.

    MONAI pads "minimum" with numpy's ``np.pad``: a padded voxel takes the minimum of its own line along the
    padded axis, not one global minimum.  The start may be negative where the volume was padded.
    """
    padding = [(max(0, size - n) // 2, max(0, size - n) - max(0, size - n) // 2)
               for size, n in zip(size_zyx, hu.shape, strict=True)]
    if any(before or after for before, after in padding):
        hu = np.pad(hu, padding, mode="minimum")
    starts = [n // 2 - size // 2 for size, n in zip(size_zyx, hu.shape, strict=True)]
    box = tuple(slice(first, first + size) for first, size in zip(starts, size_zyx, strict=True))
    start = tuple(first - before for first, (before, _) in zip(starts, padding, strict=True))
    return np.ascontiguousarray(hu[box], dtype=np.float32), start  # type: ignore[return-value]


def check_head(
    hu: np.ndarray,
    spacing_zyx_mm: tuple[float, float, float],
    coverage_mm: tuple[float, float, float],
    preprocessing: HeadCTPreprocessing = HEAD_CT_PREPROCESSING,
    modality: str | None = None,
) -> HeadCTCheck:
    """Look for a cranium: axial slices where a bone ring (HU > 300) encloses brain-like tissue filling most of
    the body's cross-section.  ``hu`` is (z, y, x) on an SPL grid with ``spacing_zyx_mm``."""
    pixel_mm2 = spacing_zyx_mm[1] * spacing_zyx_mm[2]
    gap = max(1, round(RING_GAP_MM / 2 / min(spacing_zyx_mm[1:])))
    skull_slices, widths = 0, [0.0]
    for plane in hu:
        body = plane > BODY_HU
        bone = ndimage.binary_closing(np.pad(plane > SKULL_HU, gap), iterations=gap)[gap:-gap, gap:-gap]
        enclosed = ndimage.binary_fill_holes(bone) & ~bone
        area = enclosed.sum() * pixel_mm2
        brain = enclosed & (plane > BRAIN_HU[0]) & (plane < BRAIN_HU[1])
        if (area >= MIN_CRANIAL_AREA_MM2 and brain.sum() >= MIN_BRAIN_SHARE_OF_ENCLOSED * enclosed.sum()
                and enclosed.sum() >= MIN_ENCLOSED_SHARE_OF_BODY * body.sum()):
            skull_slices += 1
            columns = np.flatnonzero(enclosed.any(axis=0))
            widths.append(float((columns[-1] - columns[0] + 1) * spacing_zyx_mm[2]))
    skull_extent = skull_slices * spacing_zyx_mm[0]
    cranial_width = max(widths)
    reasons = []
    if modality is not None and modality.upper() != "CT":
        reasons.append(f"the DICOM modality is {modality}, not CT")
    if skull_extent < MIN_SKULL_EXTENT_MM:
        reasons.append(f"no cranium found (bone enclosing brain-like tissue over {skull_extent:.0f} mm along S; "
                       f"a head CT shows it over at least {MIN_SKULL_EXTENT_MM:.0f} mm)")
    elif cranial_width > MAX_CRANIAL_WIDTH_MM:
        reasons.append(f"the space inside the skull-like ring is {cranial_width:.0f} mm wide; inside a skull it is "
                       f"narrower than {MAX_CRANIAL_WIDTH_MM:.0f} mm")
    cropped = tuple(max(0.0, extent - view) for extent, view in zip(coverage_mm, preprocessing.field_of_view_mm,
                                                                    strict=True))
    notes = []
    if coverage_mm[0] < MIN_HEAD_COVERAGE_MM:
        notes.append(f"covers {coverage_mm[0]:.0f} mm along S; a full head CT covers about 120-200 mm")
    if any(cropped):
        notes.append("the model's field of view ({:.0f} x {:.0f} x {:.0f} mm) leaves out {:.0f}, {:.0f}, {:.0f} mm "
                     "along S, P, L".format(*preprocessing.field_of_view_mm, *cropped))
    return HeadCTCheck(
        looks_like_head=not reasons,
        coverage_mm=tuple(round(c, 1) for c in coverage_mm),  # type: ignore[arg-type]
        cropped_away_mm=tuple(round(c, 1) for c in cropped),  # type: ignore[arg-type]
        skull_extent_mm=float(skull_extent),
        cranial_width_mm=round(cranial_width, 1),
        modality=modality,
        reasons=tuple(reasons),
        notes=tuple(notes),
    )
