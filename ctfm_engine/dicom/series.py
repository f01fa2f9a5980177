"""Read one CT series from a folder of DICOM files into a CTVolume.

Headers are read with pydicom and the geometry is computed from them (ImagePositionPatient along the slice normal,
ImageOrientationPatient); SimpleITK/GDCM only decodes the pixels and applies the rescale.  GDCM decodes the
compressed transfer syntaxes archives use (JPEG 2000, JPEG-LS, RLE; lossless and lossy) as well as deflated and
uncompressed ones.  SimpleITK's own geometry is not trusted: it treats a gantry tilt as a rotation and averages
uneven slice steps, silently misplacing slices.

Series ids: files are grouped by SeriesInstanceUID, or by a ``derived-xxxxxxxx`` key when it is blank (see
:mod:`ctfm_engine.dicom.uids`).  A series whose slices carry two or more SliceThickness values (e.g. a 4 mm and a
7 mm block acquired in one series) is split into one block per thickness, with the id
``f"{series_id}#{thickness:g}mm"``; each block reads as its own volume, the series as a whole does not.
Blank identifying UIDs are resolved (derived or refused) by the policy of :mod:`ctfm_engine.dicom.uids`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from ctfm_engine.dicom.uids import MissingUIDPolicy, SeriesUIDs, check_policy, resolve_uids, series_key
from ctfm_engine.dicom.uids import header_text as _text
from ctfm_engine.dicom.uids import header_values as _values
from ctfm_engine.errors import InputError
from ctfm_engine.volume import CTVolume, DicomReferences

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
ENHANCED_CT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT",
}
# Objects that carry Rows or pixel data without being images of the patient (SEG, dose grids, reports).
NON_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "KO", "PR", "REG", "DOC"}
# Part-10 files without their 128-byte preamble ("raw" datasets) start with a tag of one of these groups.
RAW_DATASET_GROUPS = {0x0002, 0x0008}
# Header values longer than this (pixel data, private blobs) are skipped while scanning, not loaded.
DEFERRED_VALUE_BYTES = 4096
ESSENTIAL_ATTRIBUTES = {
    "Rows": 1,
    "Columns": 1,
    "PixelSpacing": 2,
    "ImagePositionPatient": 3,
    "ImageOrientationPatient": 6,
}
SAME_ATTRIBUTE_TOLERANCE = 1e-4
DUPLICATE_SLICE_MM = 0.01
UNEVEN_STEP_MM = 0.02
UNEVEN_STEP_FRACTION = 0.01
MISSING_SLICE_FRACTION = 0.1
# A drift this small across the whole stack is below any voxel size; resampling for it would only blur.
SHEAR_DRIFT_MM = 0.05
SHEAR_JITTER_MM = 0.02
HU_PLUS_1024_OFFSET = -1024.0
# SliceThickness values are compared after rounding to this many decimals (0.001 mm).
THICKNESS_DECIMALS = 3
THICKNESS_BLOCK_SEPARATOR = "#"


@dataclass(frozen=True)
class DicomFile:
    """One DICOM image file and its header, read without pixel data."""

    path: Path
    header: Dataset


class _SpacingError(InputError):
    """A slice stack whose spacing is not regular, kept in parts so that a caller can add the cause."""

    def __init__(self, where: Path, problem: str, remedy: str) -> None:
        super().__init__(f"{where}: {problem}; {remedy}")
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class _Stack:
    """A series' slices sorted along the slice normal, with the geometry the headers give them."""

    files: list[DicomFile]
    row: np.ndarray
    column: np.ndarray
    normal: np.ndarray
    spacing_xyz_mm: tuple[float, float, float]
    shear_rc_mm: np.ndarray  # in-plane displacement per slice step along (row, column); zero when untilted

    @property
    def first_position(self) -> np.ndarray:
        return _floats(self.files[0].header, "ImagePositionPatient")

    @property
    def sheared(self) -> bool:
        return bool(np.any(self.shear_rc_mm))

    @property
    def tilt_deg(self) -> float:
        return math.degrees(math.atan2(float(np.linalg.norm(self.shear_rc_mm)), self.spacing_xyz_mm[2]))


def read_dicom_series(
    folder: str | Path,
    *,
    series_uid: str | None = None,
    hu_offset: float | None = None,
    missing_uids: MissingUIDPolicy = "derive",
) -> CTVolume:
    """Read the CT series in ``folder`` (searched recursively) into a CTVolume with HU voxels.

    Parameters
    ----------
    folder:
        Folder holding the DICOM files (any depth; non-DICOM files and non-image objects are ignored).
    series_uid:
        Picks one series when the folder holds several: a SeriesInstanceUID, the ``derived-…`` id listed for a
        series without one, or ``{id}#{thickness}mm`` for one thickness block of a mixed-thickness series.
    hu_offset:
        Added to every voxel instead of the automatic detection of CT stored as HU+1024 (0 keeps the stored
        values).
    missing_uids:
        ``"derive"`` (default) or ``"refuse"``: what to do when Study/Series/SOP Instance or Frame of Reference
        UIDs are blank (:mod:`ctfm_engine.dicom.uids`).

    Returns
    -------
    CTVolume
        Voxels (z, y, x) in HU; a gantry-tilted (sheared) stack is resampled onto a rectangular grid.
        ``series_instance_uid`` is the file's own SeriesInstanceUID (None when blank; the resolved one is in
        ``dicom``).  ``dicom`` holds non-identifying references: the resolved (never blank)
        ``study_instance_uid``, ``series_instance_uid``, ``frame_of_reference_uid``, ``sop_instance_uids`` and
        ``files`` in slice order, ``derived_uids`` (keywords of the UIDs that were derived), ``series_id`` and
        acquisition descriptors.

    Raises
    ------
    InputError
        Anything that cannot be read as one regular CT volume; UsageError for an unknown ``missing_uids``.
    """
    folder = Path(folder)
    policy = check_policy(missing_uids)
    groups = group_series(scan_folder(folder))
    series_id, files = _choose_series(folder, groups, series_uid)
    _check_kind(folder, files)
    _check_one_thickness(folder, series_id, files)
    stack = _measure_stack(folder, files)
    whole_series = groups[whole_series_id(series_id)]
    uids = resolve_uids(whole_series_id(series_id), [(file.path, file.header) for file in whole_series], policy)
    _log_resolved_uids(folder, series_id, uids)
    voxels = _read_pixels(folder, stack.files)
    offset = _hu_offset(folder, stack.files, voxels, hu_offset)
    voxels += np.float32(offset)
    origin = stack.first_position
    if stack.sheared:
        voxels, origin = _deshear(voxels, stack)
        log.warning(
            "%s: the series had a gantry tilt of %.1f degrees (slices shifted %.2f mm sideways each); "
            "resampled onto a rectangular grid",
            folder,
            stack.tilt_deg,
            float(np.linalg.norm(stack.shear_rc_mm)),
        )
    first = stack.files[0].header
    return CTVolume(
        voxels=voxels,
        spacing_xyz_mm=stack.spacing_xyz_mm,
        origin_lps_mm=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=np.column_stack([stack.row, stack.column, stack.normal]),
        source=str(folder),
        series_instance_uid=_text(first, "SeriesInstanceUID") or None,
        dicom=_references(series_id, stack, whole_series, uids, offset),
    )


def scan_folder(folder: Path) -> list[DicomFile]:
    """Headers of the DICOM images under ``folder`` (recursive; no pixel data is read).

    Files that are not DICOM and DICOM objects that are not images (SEG, SR, RTSTRUCT, ...) are skipped; an
    empty folder, a folder without images and a damaged DICOM file raise InputError.
    """
    paths = sorted(path for path in folder.rglob("*") if path.is_file())
    if not paths:
        raise InputError(f"{folder}: is empty; give the folder that holds the DICOM files of one CT series")
    images: list[DicomFile] = []
    not_dicom = not_image = 0
    for path in paths:
        header = _read_header(path)
        if header is None:
            not_dicom += 1
            log.debug("%s: not a DICOM file, ignored", path)
        elif not _is_image(header):
            not_image += 1
            log.debug("%s: a DICOM object without an image (e.g. SEG, SR, RTSTRUCT), ignored", path)
        else:
            images.append(DicomFile(path, header))
    if not images:
        raise InputError(
            f"{folder}: holds no DICOM images ({_count(len(paths), 'file')} looked at: {not_dicom} not DICOM, "
            f"{not_image} DICOM objects without images); give the folder that holds a CT series"
        )
    return images


def _read_header(path: Path) -> Dataset | None:
    """The file's DICOM header, None for a file that is not DICOM; InputError for a damaged DICOM file."""
    with path.open("rb") as stream:
        head = stream.read(132)
    has_preamble = head[128:132] == b"DICM"
    raw_dataset = not has_preamble and len(head) >= 8 and int.from_bytes(head[:2], "little") in RAW_DATASET_GROUPS
    claims_dicom = has_preamble or path.suffix.lower() in DICOM_SUFFIXES
    if not (has_preamble or raw_dataset):
        if claims_dicom:
            raise _corrupt(path, "it has neither a DICM preamble nor a DICOM header")
        return None
    try:
        # Deferring large values instead of stopping before the pixel data still records whether the pixel data
        # element exists: pydicom silently returns what it could read of a truncated file, so that is the check.
        header = pydicom.dcmread(path, defer_size=DEFERRED_VALUE_BYTES, force=raw_dataset)
    except Exception as error:  # pydicom signals damaged files with many exception types
        if not claims_dicom:
            return None
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise _corrupt(path, f"its header cannot be parsed: {reason}") from None
    if not sop_class_uid(header) and "Rows" not in header:
        if not claims_dicom:
            return None
        raise _corrupt(path, "its header names no SOP class: truncated or damaged")
    if _is_image(header) and "PixelData" not in header:
        raise _corrupt(path, "an image without pixel data: truncated or damaged")
    short = _short_pixel_data(header)
    if short:
        raise _corrupt(path, short)
    return header


def _short_pixel_data(header: Dataset) -> str | None:
    """Why the uncompressed pixel data of ``header`` cannot fill its image (fewer bytes than Rows, Columns,
    Samples per Pixel, Bits Allocated and Number of Frames promise), or None: GDCM would fill the rest with
    whatever it finds, so a slice cut short on its way would be read as anatomy."""
    transfer_syntax = UID(str(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "") or ""))
    if "PixelData" not in header or (transfer_syntax and transfer_syntax.is_compressed):
        return None
    try:
        length = header.get_item("PixelData").length
        promised_bits = (int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel") or 1)
                         * int(header.BitsAllocated) * int(header.get("NumberOfFrames") or 1))
    except (AttributeError, TypeError, ValueError):
        return None
    promised = (promised_bits + 7) // 8
    if length is None or length == 0xFFFFFFFF or length >= promised:
        return None
    return f"its pixel data holds {length} bytes where its {int(header.Rows)}x{int(header.Columns)} image needs " \
        f"{promised}: cut short"


def _corrupt(path: Path, problem: str) -> InputError:
    return InputError(f"{path}: is a corrupt DICOM file ({problem}); replace it with an intact copy or remove it")


def sop_class_uid(header: Dataset) -> str:
    """The SOP Class UID of the file (from its file meta when the dataset's is blank); empty when it has none."""
    # Some exports blank SOPClassUID in the dataset but keep it in the file meta information.
    file_meta = getattr(header, "file_meta", None) or Dataset()
    return _text(header, "SOPClassUID") or _text(file_meta, "MediaStorageSOPClassUID")


def _is_image(header: Dataset) -> bool:
    if _text(header, "Modality") in NON_IMAGE_MODALITIES:
        return False
    sop_class = sop_class_uid(header)
    if sop_class and UID(sop_class).name != sop_class:
        return "Image Storage" in UID(sop_class).name
    # A SOP class pydicom does not know (newer or private): judge by the presence of an image matrix.
    return "Rows" in header


def group_series(images: list[DicomFile]) -> dict[str, list[DicomFile]]:
    """The images grouped by series id (:func:`ctfm_engine.dicom.uids.series_key`), in scan order."""
    groups: dict[str, list[DicomFile]] = {}
    for image in images:
        groups.setdefault(series_key(image.header), []).append(image)
    return groups


def slice_thickness_mm(header: Dataset) -> float | None:
    """The file's SliceThickness in mm rounded to 0.001 mm; None when absent or not a number."""
    value = header.get("SliceThickness")
    try:
        return None if value in (None, "") else round(float(value), THICKNESS_DECIMALS)
    except (TypeError, ValueError):
        return None


def thickness_blocks(series_id: str, files: list[DicomFile]) -> dict[str, list[DicomFile]]:
    """The readable parts of a series: ``{series_id: files}``, or one block per SliceThickness when it mixes them.

    Block ids are ``f"{series_id}#{thickness:g}mm"`` (``#unknown-thickness`` for slices without a thickness),
    thinnest first; within a block the files keep their order.
    """
    by_thickness: dict[float | None, list[DicomFile]] = {}
    for file in files:
        by_thickness.setdefault(slice_thickness_mm(file.header), []).append(file)
    if len(by_thickness) < 2:
        return {series_id: files}
    ordered = sorted(by_thickness.items(), key=lambda item: math.inf if item[0] is None else item[0])
    return {_block_id(series_id, thickness): block for thickness, block in ordered}


def whole_series_id(series_id: str) -> str:
    """The id of the series a thickness block belongs to (the id itself for a whole series)."""
    return series_id.partition(THICKNESS_BLOCK_SEPARATOR)[0]


def _block_id(series_id: str, thickness: float | None) -> str:
    label = "unknown-thickness" if thickness is None else f"{thickness:g}mm"
    return f"{series_id}{THICKNESS_BLOCK_SEPARATOR}{label}"


def _choose_series(
    folder: Path, groups: dict[str, list[DicomFile]], series_uid: str | None
) -> tuple[str, list[DicomFile]]:
    """(id, files) of the series or thickness block to read."""
    if series_uid is not None:
        key = whole_series_id(series_uid)
        if key in groups:
            blocks = {key: groups[key], **thickness_blocks(key, groups[key])}
            if series_uid in blocks:
                return series_uid, blocks[series_uid]
        raise InputError(
            f"{folder}: holds no series {series_uid!r}, only {_listing(groups)}; pick one with --series UID"
        )
    if len(groups) > 1:
        raise InputError(f"{folder}: holds {len(groups)} series: {_listing(groups)}; pick one with --series UID")
    return next(iter(groups.items()))


def _listing(groups: dict[str, list[DicomFile]]) -> str:
    entries = []
    for key, files in groups.items():
        for series_id, block in thickness_blocks(key, files).items():
            header = block[0].header
            description = _text(header, "SeriesDescription") or "no description"
            modality = _text(header, "Modality") or "unknown modality"
            thickness = "" if series_id == key else f", {_thickness_text(header)}"
            entries.append(
                f"'{description}' ({modality}, {_count(len(block), 'file')}{thickness}, --series {series_id})"
            )
    return "; ".join(entries)


def _thickness_text(header: Dataset) -> str:
    thickness = slice_thickness_mm(header)
    return "unknown thickness" if thickness is None else f"{thickness:g} mm"


def _check_kind(folder: Path, files: list[DicomFile]) -> None:
    modality = _text(files[0].header, "Modality")
    if modality != "CT":
        raise InputError(f"{folder}: series is {modality or 'of unknown modality'}, not CT; give a CT series")
    for file in files:
        sop_class = sop_class_uid(file.header)
        if sop_class in ENHANCED_CT_CLASSES:
            raise InputError(
                f"{file.path}: is a multi-frame {ENHANCED_CT_CLASSES[sop_class]} image, and multi-frame enhanced CT "
                f"is not supported yet; export the series as single-frame CT images (one file per slice)"
            )
        if "LOCALIZER" in _values(file.header, "ImageType"):
            raise InputError(
                f"{file.path}: is a localizer (scout) image, not a CT slice; remove it or give the folder of the "
                f"axial series"
            )


def _check_one_thickness(folder: Path, series_id: str, files: list[DicomFile]) -> None:
    """Refuse a whole series that mixes slice thicknesses, naming the block ids to read instead."""
    blocks = thickness_blocks(series_id, files)
    if len(blocks) == 1:
        return
    mixture = " and ".join(
        f"{_thickness_text(block[0].header)} ({_count(len(block), 'slice')})" for block in blocks.values()
    )
    cause = f"series {series_id} mixes slice thicknesses {mixture}"
    try:
        _measure_stack(folder, files)
        problem = f"{folder}: {cause}"
    except _SpacingError as error:
        problem = f"{error.where}: {error.problem}, because {cause}"
    choices = " or ".join(f"--series {block_id}" for block_id in blocks)
    raise InputError(f"{problem}; read one thickness at a time with {choices}")


def _measure_stack(folder: Path, files: list[DicomFile]) -> _Stack:
    _check_complete(files)
    _check_same_plane_geometry(files)
    row, column, normal = _orientation(files[0])
    heights = np.array([_floats(file.header, "ImagePositionPatient") @ normal for file in files])
    order = np.argsort(heights, kind="stable")
    files = [files[i] for i in order]
    heights = heights[order]
    if len(files) < 2:
        raise InputError(
            f"{files[0].path}: is the only slice of its series; a CT volume needs at least 2 slices, "
            f"so give the folder with the whole series"
        )
    steps = np.diff(heights)
    _check_duplicates(folder, files, heights, steps)
    step = float(np.median(steps))
    _check_even_steps(folder, files, steps, step)
    spacing = _floats(files[0].header, "PixelSpacing")
    return _Stack(
        files=files,
        row=row,
        column=column,
        normal=normal,
        spacing_xyz_mm=(float(spacing[1]), float(spacing[0]), step),
        shear_rc_mm=_shear(folder, files, steps, np.column_stack([row, column, normal])),
    )


def _check_complete(files: list[DicomFile]) -> None:
    for file in files:
        for keyword, length in ESSENTIAL_ATTRIBUTES.items():
            value = file.header.get(keyword)
            count = len(value) if isinstance(value, MultiValue) else int(value is not None and value != "")
            if count != length:
                raise InputError(
                    f"{file.path}: is a corrupt or incomplete CT image ({keyword} is missing or malformed); "
                    f"replace it with an intact copy or remove it"
                )


def _check_same_plane_geometry(files: list[DicomFile]) -> None:
    first = files[0]
    for file in files[1:]:
        for keyword in ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient"):
            if not np.allclose(
                _floats(file.header, keyword), _floats(first.header, keyword), atol=SAME_ATTRIBUTE_TOLERANCE, rtol=0
            ):
                raise InputError(
                    f"{file.path}: its {keyword} {_floats(file.header, keyword).tolist()} differs from "
                    f"{_floats(first.header, keyword).tolist()} in {first.path.name}, so the files are not one "
                    f"regular stack; remove the odd file or pick another series"
                )


def _orientation(file: DicomFile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cosines = _floats(file.header, "ImageOrientationPatient")
    row, column = cosines[:3], cosines[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(row @ column) > 1e-3:
        raise InputError(
            f"{file.path}: its ImageOrientationPatient {cosines.tolist()} is not two orthogonal unit vectors; "
            f"the file is corrupt, replace it with an intact copy"
        )
    # Headers store the cosines with a few decimals; make them exactly orthonormal for the direction matrix.
    row = row / np.linalg.norm(row)
    column = column - (column @ row) * row
    column = column / np.linalg.norm(column)
    return row, column, np.cross(row, column)


def _check_duplicates(folder: Path, files: list[DicomFile], heights: np.ndarray, steps: np.ndarray) -> None:
    duplicated = np.flatnonzero(steps < DUPLICATE_SLICE_MM)
    if duplicated.size:
        k = int(duplicated[0])
        raise _SpacingError(
            folder,
            f"duplicated slice at {heights[k]:.2f} mm along the slice normal: "
            f"{_name(folder, files[k])} and {_name(folder, files[k + 1])}",
            "remove one of the two files",
        )


def _check_even_steps(folder: Path, files: list[DicomFile], steps: np.ndarray, step: float) -> None:
    irregular = np.abs(steps - step) > max(UNEVEN_STEP_MM, UNEVEN_STEP_FRACTION * step)
    if not irregular.any():
        return
    multiples = np.rint(steps / step)
    gaps = irregular & (multiples >= 2) & (np.abs(steps - multiples * step) <= MISSING_SLICE_FRACTION * step)
    k = int(np.argmax(irregular))
    between = f"{_name(folder, files[k])} and {_name(folder, files[k + 1])}"
    if np.array_equal(gaps, irregular):
        raise _SpacingError(
            folder,
            f"missing slice(s) between {between} (gap {steps[k]:.2f} mm where slices are {step:.2f} mm apart)",
            "add the missing files or give the complete series",
        )
    raise _SpacingError(
        folder,
        f"uneven slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm (first irregular step between "
        f"{between})",
        "copy the evenly spaced slices to their own folder and read that",
    )


def _shear(folder: Path, files: list[DicomFile], steps: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """The constant in-plane (row, column) displacement per slice step, in mm; zero for an unsheared stack."""
    positions = np.array([_floats(file.header, "ImagePositionPatient") for file in files])
    in_plane = (np.diff(positions, axis=0) @ axes)[:, :2]
    shear = in_plane.mean(axis=0)
    jitter = np.linalg.norm(in_plane - shear, axis=1)
    if jitter.max() > SHEAR_JITTER_MM:
        k = int(np.argmax(jitter))
        raise _SpacingError(
            folder,
            f"slice positions move sideways by varying amounts (by {jitter.max():.2f} mm off the average between "
            f"{_name(folder, files[k])} and {_name(folder, files[k + 1])}), which is not a gantry tilt this reader "
            f"can undo",
            "resample the series in a DICOM tool first",
        )
    if np.linalg.norm(shear) * len(steps) <= SHEAR_DRIFT_MM:
        return np.zeros(2)
    return shear


def _read_pixels(folder: Path, files: list[DicomFile]) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(file.path) for file in files])
    try:
        image = reader.Execute()
    except RuntimeError:
        raise _unreadable_pixels(folder, files) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{folder}: its images have {image.GetNumberOfComponentsPerPixel()} values per pixel (colour), "
            f"while a CT has one; give a greyscale CT series"
        )
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    rows, columns = int(files[0].header.Rows), int(files[0].header.Columns)
    if voxels.shape != (len(files), rows, columns):
        raise InputError(
            f"{folder}: decoding gave pixel data of shape {voxels.shape} where the headers promise "
            f"{(len(files), rows, columns)}; the files are inconsistent, replace them with an intact export"
        )
    return voxels


def _unreadable_pixels(folder: Path, files: list[DicomFile]) -> InputError:
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(file.path))
        try:
            reader.Execute()
        except RuntimeError:
            return InputError(
                f"{file.path}: its pixel data cannot be decoded (corrupt or truncated file); "
                f"replace it with an intact copy"
            )
    return InputError(
        f"{folder}: the pixel data of its series cannot be decoded together although each file decodes alone; "
        f"re-export the series"
    )


def _hu_offset(folder: Path, files: list[DicomFile], voxels: np.ndarray, requested: float | None) -> float:
    if requested is not None:
        return float(requested)
    intercepts = {float(file.header.get("RescaleIntercept") or 0.0) for file in files}
    if intercepts != {0.0} or float(voxels.min()) < 0:
        return 0.0
    log.warning(
        "%s: CT stored as HU+1024 (rescale intercept 0 and no negative values); shifted by -1024; "
        "pass --hu-offset 0 to keep the stored values",
        folder,
    )
    return HU_PLUS_1024_OFFSET


def _deshear(voxels: np.ndarray, stack: _Stack) -> tuple[np.ndarray, np.ndarray]:
    """Resample a sheared stack so that each slice sits straight above the first; nothing is cropped.

    Slice k of the source lies k * shear mm sideways of where a rectangular grid would put it.  The output grid
    keeps the slice axes (row, column, normal) and grows in-plane by the total drift, its origin moved so that
    every source pixel keeps a place; output pixel i of slice k samples source pixel i + low - k * shift.
    """
    count = voxels.shape[0]
    shift = stack.shear_rc_mm / np.asarray(stack.spacing_xyz_mm[:2])  # (x, y) pixels per slice step
    low = np.minimum(0.0, (count - 1) * shift)
    growth = np.ceil(np.abs((count - 1) * shift) - 1e-6).astype(int)
    out_x, out_y = voxels.shape[2] + growth[0], voxels.shape[1] + growth[1]
    fill = float(voxels.min())
    resampled = np.empty((count, out_y, out_x), dtype=np.float32)
    for k in range(count):
        slice_x = _sample_linear(voxels[k], np.arange(out_x) + low[0] - k * shift[0], axis=1, fill=fill)
        resampled[k] = _sample_linear(slice_x, np.arange(out_y) + low[1] - k * shift[1], axis=0, fill=fill)
    origin = stack.first_position + low[0] * stack.spacing_xyz_mm[0] * stack.row
    origin = origin + low[1] * stack.spacing_xyz_mm[1] * stack.column
    return resampled, origin


def _sample_linear(values: np.ndarray, positions: np.ndarray, axis: int, fill: float) -> np.ndarray:
    """``values`` linearly interpolated at fractional ``positions`` along ``axis``; ``fill`` outside."""
    size = values.shape[axis]
    pad = [(0, 0)] * values.ndim
    pad[axis] = (1, 1)
    padded = np.pad(values, pad, constant_values=fill)
    # Padded index p + 1 is source index p; positions beyond the padding read the fill value.
    position = np.clip(positions + 1.0, 0.0, size + 1.0)
    lower = np.minimum(np.floor(position).astype(int), size)
    weight = (position - lower).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    weight = weight.reshape(shape)
    below = np.take(padded, lower, axis=axis)
    # This form returns a uniform region (e.g. the fill value) exactly, without float32 rounding.
    return below + (np.take(padded, lower + 1, axis=axis) - below) * weight


def _log_resolved_uids(folder: Path, series_id: str, uids: SeriesUIDs) -> None:
    recovered = f"{_count(uids.recovered_from_file_meta, 'SOPInstanceUID')} taken from the file meta"
    if uids.derived:
        log.warning(
            "%s: series %s lacks %s in its files: derived deterministically%s; objects made from it reference UIDs "
            "that its archive does not know",
            folder,
            series_id,
            ", ".join(uids.derived),
            f" ({recovered})" if uids.recovered_from_file_meta else "",
        )
    elif uids.recovered_from_file_meta:
        log.info("%s: series %s has blank SOPInstanceUIDs: %s", folder, series_id, recovered)


def _references(
    series_id: str, stack: _Stack, whole_series: list[DicomFile], uids: SeriesUIDs, offset: float
) -> DicomReferences:
    """Non-identifying provenance of the series: resolved UIDs, acquisition descriptors and what this reader did."""
    first = stack.files[0].header
    file_meta = getattr(first, "file_meta", None) or Dataset()
    thickness = first.get("SliceThickness")
    sop_uid_of = {file.path: uid for file, uid in zip(whole_series, uids.sop_instance_uids, strict=True)}
    return DicomReferences(
        series_id=series_id,
        study_instance_uid=uids.study_instance_uid,
        series_instance_uid=uids.series_instance_uid,
        frame_of_reference_uid=uids.frame_of_reference_uid,
        sop_instance_uids=tuple(sop_uid_of[file.path] for file in stack.files),
        derived_uids=tuple(uids.derived),
        sop_class_uid=sop_class_uid(first),
        modality=_text(first, "Modality"),
        manufacturer=_text(first, "Manufacturer"),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        convolution_kernel="\\".join(_values(first, "ConvolutionKernel")),
        image_type=tuple(_values(first, "ImageType")),
        transfer_syntax_uid=_text(file_meta, "TransferSyntaxUID"),
        files=tuple(str(file.path) for file in stack.files),
        gantry_tilt_deg=stack.tilt_deg,
        resampled_for_tilt=bool(stack.sheared),
        hu_offset_applied=offset,
    )


def _floats(header: Dataset, keyword: str) -> np.ndarray:
    value = header.get(keyword)
    return np.array([float(v) for v in (value if isinstance(value, MultiValue) else [value])], dtype=np.float64)


def _name(folder: Path, file: DicomFile) -> str:
    return str(file.path.relative_to(folder))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
