"""Every kind of bad input is refused by `ctfm` with exit code 3 and one sentence naming the file and problem."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_CT, SHARED, TS_DICOM, run_cli

from ctfm_engine.readers import read_volume

GE_TILT = SHARED / "dicom" / "ge_head_gantry_tilt"
SLICER_HEAD = SHARED / "dicom" / "slicer_head_64x64"


def copy_series(source: Path, target: Path, skip: int | None = None) -> Path:
    target.mkdir(parents=True)
    files = sorted(p for p in source.iterdir() if not p.name.startswith("LICENSE"))
    for index, path in enumerate(files):
        if index != skip:
            shutil.copy(path, target / path.name)
    return target


def mr_nifti(tmp_path: Path) -> tuple[Path, str]:
    path = SHARED / "negative-controls" / "example_mr_sm.nii.gz"
    return path, "Hounsfield"


def mr_nrrd(tmp_path: Path) -> tuple[Path, str]:
    return SHARED / "negative-controls" / "brain1_image.nrrd", "Hounsfield"


def template_without_air(tmp_path: Path) -> tuple[Path, str]:
    return SHARED / "totalsegmentator" / "ct_brain_atlas_1mm.nii.gz", "Hounsfield"


def missing_path(tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / "nowhere.nii.gz", "does not exist"


def not_an_image(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "notes.txt"
    path.write_text("not a scan")
    return path, "unsupported file type"


def single_dicom_file(tmp_path: Path) -> tuple[Path, str]:
    return next(TS_DICOM.iterdir()), "single DICOM file"


def truncated_nifti(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(SAMPLE_CT.read_bytes()[:100_000])
    return path, "corrupt or truncated"


def nifti_with_garbage(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 4096))
    return path, "cannot be read"


def empty_folder(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "empty"
    path.mkdir()
    return path, "empty"


def folder_without_dicom(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "texts"
    path.mkdir()
    (path / "README.txt").write_text("hello")
    return path, "no DICOM"


def two_series(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "mixed"
    copy_series(TS_DICOM, path / "abdomen")
    copy_series(SLICER_HEAD, path / "head")
    return path, "--series"


def missing_slice(tmp_path: Path) -> tuple[Path, str]:
    return copy_series(TS_DICOM, tmp_path / "gap", skip=10), "missing"


def duplicated_slice(tmp_path: Path) -> tuple[Path, str]:
    path = copy_series(TS_DICOM, tmp_path / "twice")
    first = sorted(path.iterdir())[5]
    shutil.copy(first, path / "copy-of-a-slice")
    return path, "duplicated"


def uneven_spacing(tmp_path: Path) -> tuple[Path, str]:
    return GE_TILT, "uneven"


def corrupt_dicom_file(tmp_path: Path) -> tuple[Path, str]:
    path = copy_series(TS_DICOM, tmp_path / "corrupt")
    victim = sorted(path.iterdir())[7]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return path, victim.name


def pixel_data_cut_short(tmp_path: Path) -> tuple[Path, str]:
    import pydicom

    path = copy_series(SLICER_HEAD, tmp_path / "short")
    victim = sorted(path.glob("*.dcm"))[40]
    dataset = pydicom.dcmread(victim)
    dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]  # a well-formed file, half its pixels
    dataset.save_as(victim)
    return path, f"{victim.name}: is a corrupt DICOM file (its pixel data holds 4096 bytes"


def nan_voxels(tmp_path: Path) -> tuple[Path, str]:
    image = sitk.Cast(sitk.ReadImage(str(SAMPLE_CT)), sitk.sitkFloat32)
    voxels = sitk.GetArrayFromImage(image)
    voxels[10, 40:45, 50:55] = np.nan  # 25 voxels of a real CT, e.g. a failed reconstruction's holes
    holed = sitk.GetImageFromArray(voxels)
    holed.CopyInformation(image)
    path = tmp_path / "holes.nrrd"  # (ITK reads NaN in a NIfTI back as 0; NRRD keeps it)
    sitk.WriteImage(holed, str(path))
    return path, "25 voxel(s) are not numbers"


def spacing_larger_than_any_patient(tmp_path: Path) -> tuple[Path, str]:
    image = sitk.ReadImage(str(SAMPLE_CT))
    image.SetSpacing((50.0, 50.0, 50.0))  # a header in cm read as mm, or worse: a 6 m field of view
    path = tmp_path / "giant.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, "larger than any patient"


BAD_INPUTS = [
    nan_voxels, spacing_larger_than_any_patient, mr_nifti, mr_nrrd, template_without_air, missing_path, not_an_image,
    single_dicom_file, truncated_nifti,
    nifti_with_garbage, empty_folder, folder_without_dicom, two_series, missing_slice, duplicated_slice,
    uneven_spacing, corrupt_dicom_file, pixel_data_cut_short,
]


@pytest.mark.parametrize("make_input", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_exits_3_naming_the_file_and_the_problem(tmp_path, make_input):
    path, problem = make_input(tmp_path)
    out = tmp_path / "out.npz"
    # no weights exist: the input must be judged before any model is looked for
    result = run_cli("embed", path, "--out", out, "--json")
    assert result.code == 3, (result.code, result.stderr)
    message = result.document["error"]["message"]
    assert str(path) in message or path.name in message, message
    assert problem in message, message
    assert message.count("\n") == 0
    assert not out.exists()


def test_nrrd_and_mha_copies_of_a_nifti_read_identically(tmp_path):
    original = read_volume(SAMPLE_CT)
    for suffix in (".nrrd", ".mha"):
        copy = tmp_path / f"copy{suffix}"
        sitk.WriteImage(sitk.ReadImage(str(SAMPLE_CT)), str(copy))
        volume = read_volume(copy)
        assert volume.grid.matches(original.grid, tolerance_mm=1e-6)
        np.testing.assert_array_equal(volume.voxels, original.voxels)


def test_a_volume_handed_over_in_memory_is_checked_before_any_model_loads(tmp_path):
    """The Slicer worker and the deploy app hand the task layer a CTVolume: the same refusals apply to it."""
    from ctfm_engine.errors import InputError
    from ctfm_engine.pipelines import SegmentationRequest, run_segmentation

    volume = read_volume(SAMPLE_CT)
    holed = volume.with_voxels(np.where(np.arange(volume.voxels.size).reshape(volume.shape_zyx) == 7, np.inf,
                                        volume.voxels).astype(np.float32))
    with pytest.raises(InputError, match="1 voxel\\(s\\) are not numbers"):
        run_segmentation(SegmentationRequest(holed, weights=tmp_path / "no-such-model"))
    real = run_cli("embed", SHARED / "ct-nifti" / "TotalSegmentator_0002_0000.nii.gz", "--json", "-q")
    assert real.code == 0, real.stderr  # a real whole-body-length CT stays well inside the limits
