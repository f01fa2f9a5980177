"""Reading CT into a :class:`~ctfm_engine.volume.CTVolume`: :func:`read_volume` takes what a user gives (a NIfTI,
NRRD or MetaImage file, or a folder holding a DICOM series) and dispatches by its kind, then checks Hounsfield units.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.errors import InputError
from ctfm_engine.volume import CTVolume, check_hounsfield, file_format


def read_volume(
    path: str | Path,
    *,
    series_uid: str | None = None,
    hu_offset: float | None = None,
    check_hu: bool = True,
) -> CTVolume:
    """Read a NIfTI/NRRD/MHA file or a folder holding one DICOM CT series into a validated CTVolume.

    ``hu_offset`` is added to every voxel (e.g. -1024 for CT stored as HU+1024 without a rescale);
    ``series_uid`` picks one series from a folder holding several.  Unacceptable data raises InputError.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: does not exist")
    if path.is_dir():
        volume = read_dicom_series(path, series_uid=series_uid, hu_offset=hu_offset)
    else:
        volume = _read_image_file(path, hu_offset)
    if check_hu:
        check_hounsfield(volume.voxels, volume.source)
    return volume


def _read_image_file(path: Path, hu_offset: float | None) -> CTVolume:
    fmt = file_format(path)
    if fmt is None:
        if path.suffix.lower() in {".dcm", ".dicom", ".ima"} or _has_dicom_preamble(path):
            raise InputError(f"{path}: is a single DICOM file; pass the folder that holds the whole series")
        raise InputError(
            f"{path}: unsupported file type; give a NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd) "
            f"file or a folder holding a DICOM series"
        )
    if fmt == "NIfTI":
        _check_nifti_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise InputError(f"{path}: cannot be read as {fmt} (corrupt or truncated file: {reason[:160]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} values per voxel; a CT has one (greyscale)"
        )
    if image.GetDimension() != 3:
        raise InputError(f"{path}: is a {image.GetDimension()}-D image; a CT volume is 3-D")
    if min(image.GetSize()) < 2:
        raise InputError(f"{path}: has size {image.GetSize()}; a CT volume needs at least 2 voxels along each axis")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(f"{path}: its direction matrix is not orthonormal (sheared geometry); resample it first")
    volume = CTVolume.from_sitk(image, source=str(path))
    if hu_offset:
        volume = volume.with_voxels(volume.voxels + np.float32(hu_offset))
    return volume


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(132)[128:] == b"DICM"


def _check_nifti_complete(path: Path) -> None:
    """Refuse truncated NIfTI files, which ITK silently pads with zeros instead of failing."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(540)
            size = len(header) + sum(len(block) for block in iter(lambda: stream.read(1 << 22), b""))
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"{path}: cannot be read as NIfTI (corrupt or truncated file: {error})") from None
    expected = _nifti_size(header)
    if expected is None:
        raise InputError(f"{path}: cannot be read as NIfTI (no NIfTI header: corrupt or not a NIfTI file)")
    if size < expected:
        raise InputError(
            f"{path}: is a corrupt or truncated NIfTI file: it holds {size} bytes where its header needs {expected}"
        )


def _nifti_size(header: bytes) -> int | None:
    """Bytes a NIfTI-1 or NIfTI-2 file needs (voxel offset + voxel data), from its header; None if no header."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bits = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            bits = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    voxels = 1
    for extent in dims[1 : dims[0] + 1]:
        voxels *= max(int(extent), 1)
    return offset + voxels * max(int(bits), 8) // 8
