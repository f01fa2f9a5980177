"""CTVolume: CT voxels in Hounsfield units with their patient (LPS) geometry, and the checks every CT passes.

Geometry follows ITK/DICOM: world coordinates are patient LPS millimetres; ``origin_lps_mm`` is the centre of
the first voxel; column ``k`` of ``direction`` is the LPS unit vector along array index axis ``k`` in (x, y, z)
order; ``spacing_xyz_mm`` is in the same (x, y, z) order.  The voxel array itself is (z, y, x), as SimpleITK's
``GetArrayFromImage`` returns it.  Reading files into a CTVolume is :mod:`ctfm_engine.readers`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ctfm_engine.errors import InputError

log = logging.getLogger(__name__)

FILE_SUFFIXES = {
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}

# What tells CT in Hounsfield units from other images: voxels darker than -50 HU, fat (-150 to -50 HU) or air and
# lung (about -1000 HU), which every region of a body larger than one organ holds.  Their share, measured on the
# sample check_hounsfield takes (benchmarks/ct_check.py prints the table):
#   real CT, whole scans (4 NIfTI, the sample, 2 DICOM series)                      47 - 73 %
#   96 mm crops centred on each of the 41 structures of the sample CT               10 - 74 %
#     (the liver's has least; in 3 the darkest voxels are fat, -115 to -121 HU: a -200 HU rule refused them)
#   MR (2), CT stored as HU+1024 (a NIfTI, a DICOM series), the skull-stripped
#   brain template, a probability map                                                0 %
# Soft tissue, fluid and bone alone (a crop inside one organ or the skull) cannot be told from MR this way: such a
# true CT is refused too, with the remedy key "ct_check" that each face words as its way to read it anyway.
FAT_OR_AIR_BELOW_HU = -50.0
FAT_OR_AIR_LEAST_FRACTION = 0.01
# The refusal's diagnosis, measured likewise: a probability map lies within [0, 1]; exact zeros are 82 % of the
# brain template (MR 5 - 7 %, CT stored as HU+1024 up to 15 %, real CT at most 1.1 %); CT stored as HU+1024 keeps
# soft tissue (-100 to +100 HU) at 924 - 1124, 26 - 41 % of its voxels (MR at most 4 %, real CT at most 1 %).
MASKED_ZERO_FRACTION = 0.25
HU_PLUS_1024_SOFT_TISSUE = (924.0, 1124.0)
HU_PLUS_1024_SOFT_TISSUE_FRACTION = 0.15

# No patient is longer than this along any axis, and a CT's transverse field of view is at most about 80 cm: only
# one axis (the body's) may exceed the second limit.  Beyond them the header's spacing is wrong.
LONGEST_PATIENT_MM = 2500.0
WIDEST_FIELD_OF_VIEW_MM = 1000.0


@dataclass(frozen=True, eq=False)
class Grid:
    """Where a (z, y, x) voxel array sits in patient space: shape, spacing, first-voxel centre, direction."""

    shape_zyx: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]
    direction: np.ndarray

    def __post_init__(self) -> None:
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError("grid direction must be orthonormal")
        if min(self.spacing_xyz_mm) <= 0:
            raise ValueError(f"grid spacing must be positive, got {self.spacing_xyz_mm}")
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "shape_zyx", tuple(int(n) for n in self.shape_zyx))
        object.__setattr__(self, "spacing_xyz_mm", tuple(float(s) for s in self.spacing_xyz_mm))
        object.__setattr__(self, "origin_lps_mm", tuple(float(o) for o in self.origin_lps_mm))

    @property
    def index_to_lps_matrix(self) -> np.ndarray:
        """4x4 matrix taking a homogeneous (x, y, z) voxel index to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * np.asarray(self.spacing_xyz_mm)[None, :]
        matrix[:3, 3] = self.origin_lps_mm
        return matrix

    def zyx_index_to_lps(self, index_zyx: np.ndarray) -> np.ndarray:
        """Voxel indices (..., 3) in (z, y, x) order (may be fractional) to LPS points (..., 3) in mm."""
        index_xyz = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]
        matrix = self.index_to_lps_matrix
        return index_xyz @ matrix[:3, :3].T + matrix[:3, 3]

    def lps_to_zyx_index(self, points_lps: np.ndarray) -> np.ndarray:
        """LPS points (..., 3) in mm to continuous voxel indices (..., 3) in (z, y, x) order."""
        matrix = np.linalg.inv(self.index_to_lps_matrix)
        index_xyz = np.asarray(points_lps, dtype=np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
        return index_xyz[..., ::-1]

    def matches(self, other: Grid, tolerance_mm: float = 1e-3) -> bool:
        """True when both grids put every voxel centre at the same LPS point (within ``tolerance_mm``)."""
        if self.shape_zyx != other.shape_zyx:
            return False
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in self.shape_zyx], indexing="ij")).reshape(3, -1).T
        distance = np.linalg.norm(self.zyx_index_to_lps(corners) - other.zyx_index_to_lps(corners), axis=-1)
        return bool(distance.max() <= tolerance_mm)

    def image(self, voxels: np.ndarray) -> sitk.Image:
        """A SimpleITK image of ``voxels`` (shape ``shape_zyx``) placed on this grid."""
        if tuple(voxels.shape) != self.shape_zyx:
            raise ValueError(f"array shape {voxels.shape} differs from the grid's {self.shape_zyx}")
        image = sitk.GetImageFromArray(voxels)
        image.SetSpacing(self.spacing_xyz_mm)
        image.SetOrigin(self.origin_lps_mm)
        image.SetDirection(tuple(float(d) for d in self.direction.ravel()))
        return image

    @classmethod
    def of_image(cls, image: sitk.Image) -> Grid:
        return cls(
            shape_zyx=tuple(reversed(image.GetSize())),  # type: ignore[arg-type]
            spacing_xyz_mm=image.GetSpacing(),
            origin_lps_mm=image.GetOrigin(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
        )


@dataclass(frozen=True)
class DicomReferences:
    """What a CT read from a DICOM series keeps of it: the resolved (never blank) UIDs objects made from it must
    reference, its acquisition descriptors, and what the reader did -- nothing that identifies the patient.

    Empty for a CT read from an image file.  :meth:`from_dict` refuses unknown keys, so a misspelt or stale key
    crossing a process boundary (the Slicer worker's job folder) fails loudly instead of being dropped.
    """

    series_id: str | None = None  # the reader's series key: SeriesInstanceUID, with '#block' for a sub-series
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    sop_instance_uids: tuple[str, ...] = ()  # in volume slice order
    derived_uids: tuple[str, ...] = ()  # the UID attributes the files left blank and the reader derived
    sop_class_uid: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    slice_thickness_mm: float | None = None
    convolution_kernel: str | None = None
    image_type: tuple[str, ...] = ()
    transfer_syntax_uid: str | None = None
    files: tuple[str, ...] = ()  # the slices' files, in volume slice order
    gantry_tilt_deg: float | None = None
    resampled_for_tilt: bool = False
    hu_offset_applied: float | None = None

    def __post_init__(self) -> None:
        for name in ("sop_instance_uids", "derived_uids", "image_type", "files"):
            object.__setattr__(self, name, tuple(str(value) for value in getattr(self, name)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DicomReferences:
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DICOM reference field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT scan: voxels in HU, shape (z, y, x), and the geometry that places them in patient LPS space."""

    voxels: np.ndarray
    spacing_xyz_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]
    direction: np.ndarray
    source: str
    series_instance_uid: str | None = None
    dicom: DicomReferences = field(default_factory=DicomReferences)

    def __post_init__(self) -> None:
        if not isinstance(self.dicom, DicomReferences):
            raise TypeError(f"CTVolume.dicom must be DicomReferences, got {type(self.dicom).__name__}")
        if self.voxels.ndim != 3:
            raise ValueError(f"CTVolume voxels must be 3-D (z, y, x), got shape {self.voxels.shape}")
        grid = Grid(self.voxels.shape, self.spacing_xyz_mm, self.origin_lps_mm, self.direction)  # validates
        object.__setattr__(self, "direction", grid.direction)
        object.__setattr__(self, "spacing_xyz_mm", grid.spacing_xyz_mm)
        object.__setattr__(self, "origin_lps_mm", grid.origin_lps_mm)

    @property
    def grid(self) -> Grid:
        return Grid(self.voxels.shape, self.spacing_xyz_mm, self.origin_lps_mm, self.direction)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.grid.shape_zyx

    def zyx_index_to_lps(self, index_zyx: np.ndarray) -> np.ndarray:
        return self.grid.zyx_index_to_lps(index_zyx)

    def lps_to_zyx_index(self, points_lps: np.ndarray) -> np.ndarray:
        return self.grid.lps_to_zyx_index(points_lps)

    def with_voxels(self, voxels: np.ndarray) -> CTVolume:
        """The same geometry and provenance carrying other voxels of the same shape."""
        if voxels.shape != self.voxels.shape:
            raise ValueError(f"shape {voxels.shape} differs from the volume's {self.voxels.shape}")
        return replace(self, voxels=voxels)

    def to_sitk(self) -> sitk.Image:
        return self.grid.image(self.voxels)

    @classmethod
    def from_sitk(cls, image: sitk.Image, source: str, **provenance: Any) -> CTVolume:
        grid = Grid.of_image(image)
        return cls(
            voxels=sitk.GetArrayFromImage(image).astype(np.float32, copy=False),
            spacing_xyz_mm=grid.spacing_xyz_mm,
            origin_lps_mm=grid.origin_lps_mm,
            direction=grid.direction,
            source=source,
            **provenance,
        )


def file_format(path: Path) -> str | None:
    """The image format a file name announces, or None."""
    name = path.name.lower()
    for suffix, fmt in FILE_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def check_scan(volume: CTVolume) -> None:
    """Refuse, before any model allocates memory for it, a scan no model should see: voxels that are not numbers
    (NaN or infinite) and a geometry larger than any patient (a header with a wrong spacing)."""
    if volume.voxels.dtype.kind == "f":
        bad = int(volume.voxels.size - np.count_nonzero(np.isfinite(volume.voxels)))
        if bad:
            raise InputError(f"{volume.source}: {bad} voxel(s) are not numbers (NaN or infinite); a CT holds a "
                             f"Hounsfield value in every voxel")
    extent = [n * s for n, s in zip(volume.shape_zyx[::-1], volume.spacing_xyz_mm, strict=True)]
    described = " x ".join(f"{mm:.0f}" for mm in extent)
    if max(extent) > LONGEST_PATIENT_MM or sorted(extent)[1] > WIDEST_FIELD_OF_VIEW_MM:
        spacing = " x ".join(f"{mm:g}" for mm in volume.spacing_xyz_mm)
        raise InputError(f"{volume.source}: spans {described} mm (x, y, z; {spacing} mm voxels), larger than any "
                         f"patient; the spacing in its header is probably wrong")


def hounsfield_sample(voxels: np.ndarray) -> np.ndarray:
    """The voxels :func:`check_hounsfield` judges (a view): every second one in-plane, on about 64 slices."""
    return voxels[:: max(1, voxels.shape[0] // 64), ::2, ::2]


def check_hounsfield(voxels: np.ndarray, source: str) -> None:
    """Refuse data that cannot be CT in Hounsfield units: MR, PET, templates, probability maps and CT stored without
    its rescale, which hold no fat or air (see ``FAT_OR_AIR_BELOW_HU``).  The refusal says what looks wrong and
    carries the remedy key ``ct_check`` (``hu_offset`` for CT stored as HU+1024).

    A subsample decides (:func:`hounsfield_sample`), so a 512 x 512 x 1500 scan costs milliseconds.
    """
    sample = hounsfield_sample(voxels)
    fat_or_air = np.count_nonzero(sample < FAT_OR_AIR_BELOW_HU) / sample.size
    if fat_or_air >= FAT_OR_AIR_LEAST_FRACTION:
        return
    reason, remedy = _not_ct_reason(sample.astype(np.float32), fat_or_air)
    raise InputError(f"{source}: does not look like a CT in Hounsfield units: {reason}", remedy=remedy)


def _not_ct_reason(sample: np.ndarray, fat_or_air: float) -> tuple[str, str]:
    """What an image without fat or air looks like instead, and the remedy key of that diagnosis."""
    lowest, highest = float(np.nanmin(sample)), float(np.nanmax(sample))
    if lowest >= -1e-3 and highest <= 1 + 1e-3:
        return (f"its values lie between {lowest:.3g} and {highest:.3g}, as in a probability map or a mask, where a "
                f"CT ranges from air at -1000 HU to bone above +400 HU"), "ct_check"
    share = "none" if fat_or_air == 0 else f"only {fat_or_air:.1%}"
    scarce = f"{share} of its voxels are below {FAT_OR_AIR_BELOW_HU:g} (fat or air)"
    zeros = np.count_nonzero(sample == 0) / sample.size
    if zeros >= MASKED_ZERO_FRACTION:
        return f"{scarce} and {zeros:.0%} are exactly 0, as in a masked or skull-stripped image or a template", \
            "ct_check"
    low, high = HU_PLUS_1024_SOFT_TISSUE
    shifted_tissue = np.count_nonzero((sample >= low) & (sample <= high)) / sample.size
    if shifted_tissue >= HU_PLUS_1024_SOFT_TISSUE_FRACTION:
        return (f"{scarce} and {shifted_tissue:.0%} lie between {low:g} and {high:g}, as in CT stored as HU+1024 "
                f"without its -1024 HU rescale"), "hu_offset"
    darkest = float(np.nanpercentile(sample, 0.5))
    return (f"{scarce}, its darkest about {darkest:.0f}, while a CT shows fat (-150 to -50 HU) or air (-1000 HU) "
            f"in any region larger than one organ (MR, PET, a derived map or a crop inside one organ shows neither)"), \
        "ct_check"
