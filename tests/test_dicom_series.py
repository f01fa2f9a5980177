"""read_dicom_series on the real DICOM data in shared/data (README sections 5.1-5.3, 5.6)."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import require
from pydicom.data import get_testdata_file
from pydicom.uid import UID, generate_uid

from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.errors import InputError
from ctfm_engine.volume import CTVolume, Grid

SHARED = Path(os.environ.get("CTFM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TS_SERIES = "dicom/ts_abdomen_20slices_j2k"
HEAD_SERIES = "dicom/slicer_head_64x64"
TILT_SERIES = "dicom/ge_head_gantry_tilt"


@pytest.fixture
def shared_data() -> Path:
    require((SHARED / "dicom").is_dir(), f"shared test data not found at {SHARED} (set CTFM_SHARED_DATA)")
    return SHARED


def dicom_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if not path.name.startswith(("LICENSE", "README")))


def normal_of(header: pydicom.Dataset) -> np.ndarray:
    cosines = np.array(header.ImageOrientationPatient, dtype=float)
    return np.cross(cosines[:3], cosines[3:])


def by_position(files: list[Path]) -> list[Path]:
    """The files sorted along the slice normal, as the DICOM headers place them."""
    headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in files}
    return sorted(files, key=lambda p: np.array(headers[p].ImagePositionPatient, dtype=float) @ normal_of(headers[p]))


def copy_files(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy(path, folder / path.name)
    return folder


def refusal(folder: Path, **options: object) -> str:
    with pytest.raises(InputError) as info:
        read_dicom_series(folder, **options)  # type: ignore[arg-type]
    assert info.value.exit_code == 3
    return str(info.value)


def hu_slice(path: Path) -> np.ndarray:
    dataset = pydicom.dcmread(path)
    return dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)


def weighted_centroid(hu: np.ndarray) -> tuple[float, float]:
    """Row and column of the intensity-weighted centroid of a slice, weights HU + 1024 clipped at 0."""
    weights = np.clip(hu.astype(np.float64) + 1024.0, 0.0, None)
    rows, columns = np.indices(hu.shape)
    return float((weights * rows).sum() / weights.sum()), float((weights * columns).sum() / weights.sum())


def source_centroid_lps(path: Path) -> np.ndarray:
    """Centroid of one source slice in LPS, placed by the slice's own ImagePositionPatient/Orientation."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    row, column = weighted_centroid(hu_slice(path))
    cosines = np.array(header.ImageOrientationPatient, dtype=float)
    spacing = np.array(header.PixelSpacing, dtype=float)
    position = np.array(header.ImagePositionPatient, dtype=float)
    return position + column * spacing[1] * cosines[:3] + row * spacing[0] * cosines[3:]


# --- ts_abdomen_20slices_j2k: JPEG 2000, blank UIDs -------------------------------------------------------------


@pytest.fixture
def ts_volume(shared_data: Path) -> CTVolume:
    return read_dicom_series(shared_data / TS_SERIES)


def test_jpeg2000_series_reads_in_hu_with_header_geometry(ts_volume: CTVolume) -> None:
    assert ts_volume.shape_zyx == (20, 512, 512)
    assert ts_volume.spacing_xyz_mm == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert ts_volume.origin_lps_mm == pytest.approx((-249.51171875, -437.51171875, -804.5))
    np.testing.assert_allclose(ts_volume.direction, np.eye(3), atol=1e-9)
    assert ts_volume.voxels.dtype == np.float32
    assert float(ts_volume.voxels.min()) == pytest.approx(-1024, abs=1)
    assert float(ts_volume.voxels.max()) == pytest.approx(1839, abs=1)
    assert ts_volume.series_instance_uid is None  # blank in the files; not invented here
    info = ts_volume.dicom.as_dict()
    # Blank in the files: derived deterministically (Study, Series) or taken from the file meta (SOP instances).
    assert info["derived_uids"] == ["StudyInstanceUID", "SeriesInstanceUID"]
    assert all(UID(uid).is_valid for uid in info["sop_instance_uids"]) and len(set(info["sop_instance_uids"])) == 20
    assert info["frame_of_reference_uid"].startswith("1.3.12.2.1107.5.1.4.60064")
    assert info["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.90"
    assert info["modality"] == "CT"
    assert info["manufacturer"] == "SIEMENS"
    assert info["slice_thickness_mm"] == 3.0  # thicker than the 2 mm step: an overlapping reconstruction
    assert info["hu_offset_applied"] == 0.0
    assert info["gantry_tilt_deg"] == 0.0
    assert info["resampled_for_tilt"] is False
    assert len(info["files"]) == 20
    assert not {"patient_name", "patient_id", "study_date"} & set(info)


def test_untilted_geometry_agrees_with_simpleitk(ts_volume: CTVolume) -> None:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(ts_volume.dicom.files))
    image = reader.Execute()
    assert Grid.of_image(image).matches(ts_volume.grid, tolerance_mm=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), ts_volume.spacing_xyz_mm, atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ts_volume.voxels)


def test_same_physical_grid_as_the_y_flipped_totalsegmentator_label(shared_data: Path, ts_volume: CTVolume) -> None:
    label = sitk.ReadImage(str(shared_data / "totalsegmentator" / "example_seg_dicom.nii.gz"))
    label_grid = Grid.of_image(label)
    assert label_grid.shape_zyx == ts_volume.shape_zyx
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in ts_volume.shape_zyx], indexing="ij")).reshape(3, -1).T
    ours = ts_volume.zyx_index_to_lps(corners)
    theirs = label_grid.zyx_index_to_lps(corners)
    distances = np.linalg.norm(ours[:, None, :] - theirs[None, :, :], axis=-1)
    assert distances.min(axis=1).max() < 1e-3  # every corner centre of ours is one of theirs
    on_our_grid = sitk.Resample(label, ts_volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_our_grid), np.flip(sitk.GetArrayFromImage(label), 1))


# --- slicer_head_64x64: file names sort wrongly; stored as HU+1024 ---------------------------------------------


def test_slices_are_ordered_by_position_not_by_file_name(shared_data: Path) -> None:
    volume = read_dicom_series(shared_data / HEAD_SERIES)
    files = [Path(name) for name in volume.dicom.files]
    assert [f.name for f in files[:3]] == ["CTHead1.dcm", "CTHead2.dcm", "CTHead3.dcm"]
    assert sorted(files) != files  # CTHead10 sorts before CTHead2 by name
    heights = [
        float(np.array(pydicom.dcmread(f).ImagePositionPatient, dtype=float) @ volume.direction[:, 2]) for f in files
    ]
    assert heights[0] == 0.0
    assert bool(np.all(np.diff(heights) > 0))
    assert volume.origin_lps_mm == (0.0, 0.0, 0.0)
    assert volume.spacing_xyz_mm == (3.2, 3.2, 1.5)
    assert volume.zyx_index_to_lps(np.array([92, 0, 0]))[2] == pytest.approx(138.0)
    for k in (0, 46, 92):
        np.testing.assert_array_equal(volume.voxels[k], hu_slice(files[k]) - 1024)


def test_hu_plus_1024_storage_is_detected_and_shifted(shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ctfm_engine.dicom.series"):
        volume = read_dicom_series(shared_data / HEAD_SERIES)
    assert float(volume.voxels.min()) == -1024.0
    assert volume.dicom.hu_offset_applied == -1024.0
    brain = volume.voxels[40:61, 28:36, 28:36]  # centre of the head, mid-brain slices
    assert 0.0 < float(np.median(brain)) < 80.0
    assert "HU+1024" in caplog.text
    assert "--hu-offset 0" in caplog.text
    assert "Austrialian" not in caplog.text  # PatientName stays out of logs


def test_hu_offset_zero_keeps_stored_values(shared_data: Path) -> None:
    raw = read_dicom_series(shared_data / HEAD_SERIES, hu_offset=0)
    assert float(raw.voxels.min()) >= 0.0
    assert raw.dicom.hu_offset_applied == 0.0
    shifted = read_dicom_series(shared_data / HEAD_SERIES)
    np.testing.assert_array_equal(raw.voxels - 1024, shifted.voxels)


# --- ge_head_gantry_tilt: 18.5 degree tilt, 4 mm and 7 mm blocks --------------------------------------------------


def test_tilted_series_with_two_slice_steps_is_refused(shared_data: Path) -> None:
    folder = shared_data / TILT_SERIES
    message = refusal(folder)
    assert str(folder) in message
    assert "uneven slice spacing" in message
    assert "1.08 to 7.00 mm" in message
    assert "between 14.dcm and 15.dcm" in message


@pytest.fixture
def uniform_tilted_block(shared_data: Path, tmp_path: Path) -> list[Path]:
    """The files of the leading run of equal slice steps along the normal, copied to their own folder."""
    ordered = by_position(dicom_files(shared_data / TILT_SERIES))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ordered]
    heights = np.array([np.array(h.ImagePositionPatient, dtype=float) @ normal_of(h) for h in headers])
    steps = np.diff(heights)
    run = int(np.argmax(np.abs(steps - steps[0]) > 0.02))
    block = ordered[: run + 1]
    assert [p.name for p in block] == [f"{i:02d}.dcm" for i in range(1, 15)]
    assert steps[:run] == pytest.approx(4.0, abs=0.01)
    copy_files(block, tmp_path / "tilt4mm")
    return [tmp_path / "tilt4mm" / p.name for p in block]


def test_gantry_tilt_is_resampled_without_misplacing_anything(
    uniform_tilted_block: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ctfm_engine.dicom.series"):
        volume = read_dicom_series(uniform_tilted_block[0].parent)
    assert volume.dicom.resampled_for_tilt is True
    assert volume.dicom.gantry_tilt_deg == pytest.approx(18.5, abs=0.05)
    assert "gantry tilt of 18.5 degrees" in caplog.text
    assert volume.shape_zyx[0] == 14
    assert volume.shape_zyx[2] == 512
    assert volume.shape_zyx[1] > 512  # grown by the 17 mm total shear so that nothing is cropped
    assert volume.spacing_xyz_mm == pytest.approx((0.4882812, 0.4882812, 4.0), abs=0.01)
    np.testing.assert_allclose(volume.direction.T @ volume.direction, np.eye(3), atol=1e-9)
    for k, path in enumerate(uniform_tilted_block):
        row, column = weighted_centroid(volume.voxels[k])
        centroid = volume.zyx_index_to_lps(np.array([k, row, column]))
        assert np.linalg.norm(centroid - source_centroid_lps(path)) < 0.5, path.name
        source_mass = np.clip(hu_slice(path) + 1024, 0, None).sum()
        assert np.clip(volume.voxels[k] + 1024, 0, None).sum() == pytest.approx(source_mass, rel=1e-3)


def test_simpleitk_geometry_would_misplace_tilted_slices(uniform_tilted_block: list[Path]) -> None:
    """Why the reader computes geometry itself: SimpleITK takes the tilt for a rotation of the whole stack."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in uniform_tilted_block])
    image = reader.Execute()
    last = len(uniform_tilted_block) - 1
    row, column = weighted_centroid(sitk.GetArrayFromImage(image)[last])
    naive = np.array(image.TransformContinuousIndexToPhysicalPoint((column, row, float(last))))
    assert np.linalg.norm(naive - source_centroid_lps(uniform_tilted_block[last])) > 5.0


# --- series assembly errors -------------------------------------------------------------------------------------


def test_missing_slice_is_named(shared_data: Path, tmp_path: Path) -> None:
    ordered = by_position(dicom_files(shared_data / TS_SERIES))
    folder = copy_files(ordered[:10] + ordered[11:], tmp_path / "gap")
    message = refusal(folder)
    assert message.startswith(f"{folder}: missing slice(s) between {ordered[9].name} and {ordered[11].name}")
    assert "gap 4.00 mm where slices are 2.00 mm apart" in message


def test_duplicated_slice_is_named(shared_data: Path, tmp_path: Path) -> None:
    files = dicom_files(shared_data / TS_SERIES)
    folder = copy_files(files, tmp_path / "dup")
    shutil.copy(files[5], folder / "copy_of_slice.dcm")
    message = refusal(folder)
    assert message.startswith(f"{folder}: duplicated slice at")
    assert files[5].name in message
    assert "copy_of_slice.dcm" in message


def test_folder_with_two_series_lists_them_and_series_picks_one(shared_data: Path, tmp_path: Path) -> None:
    copy_files(dicom_files(shared_data / TS_SERIES), tmp_path / "mixed" / "abdomen")
    copy_files(dicom_files(shared_data / HEAD_SERIES), tmp_path / "mixed" / "head")
    folder = tmp_path / "mixed"
    message = refusal(folder)
    head_uid = pydicom.dcmread(dicom_files(shared_data / HEAD_SERIES)[0], stop_before_pixels=True).SeriesInstanceUID
    assert message.startswith(f"{folder}: holds 2 series:")
    assert "'CT Body 3.0' (CT, 20 files, --series derived-" in message
    assert f"(CT, 93 files, --series {head_uid})" in message
    assert message.endswith("pick one with --series UID")

    derived = re.search(r"--series (derived-[0-9a-f]{8})", message)
    assert derived is not None
    assert read_dicom_series(folder, series_uid=derived.group(1)).shape_zyx == (20, 512, 512)
    assert read_dicom_series(folder, series_uid=head_uid).shape_zyx == (93, 64, 64)
    unknown = refusal(folder, series_uid="1.2.3")
    assert "holds no series '1.2.3'" in unknown
    assert derived.group(1) in unknown
    assert head_uid in unknown


def test_non_image_objects_next_to_the_series_are_ignored(shared_data: Path, tmp_path: Path) -> None:
    segmentations = shared_data / "dicom" / "dcmqi" / "segmentations"
    folder = copy_files([*dicom_files(segmentations / "ct-3slice"), segmentations / "liver.dcm"], tmp_path / "ct_seg")
    assert read_dicom_series(folder).shape_zyx == (3, 512, 512)


def test_mr_series_is_refused(tmp_path: Path) -> None:
    source = get_testdata_file("MR_small.dcm")
    assert source is not None
    folder = tmp_path / "mr"
    folder.mkdir()
    for k in range(3):
        dataset = pydicom.dcmread(source)
        dataset.ImagePositionPatient[2] = float(dataset.ImagePositionPatient[2]) + 2.0 * k
        dataset.SOPInstanceUID = generate_uid()
        dataset.save_as(folder / f"mr{k}.dcm")
    message = refusal(folder)
    assert message.startswith(f"{folder}: series is MR, not CT")


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    assert refusal(tmp_path).startswith(f"{tmp_path}: is empty")


def test_folder_without_dicom_images_is_refused(shared_data: Path, tmp_path: Path) -> None:
    shutil.copy(shared_data / HEAD_SERIES / "LICENSE_Slicer.txt", tmp_path)
    assert refusal(tmp_path).startswith(f"{tmp_path}: holds no DICOM images (1 file looked at: 1 not DICOM")


def test_single_slice_is_refused(shared_data: Path, tmp_path: Path) -> None:
    folder = copy_files([shared_data / "dicom" / "pydicom" / "CT_small.dcm"], tmp_path / "one")
    assert refusal(folder).startswith(f"{folder / 'CT_small.dcm'}: is the only slice of its series")


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("series", [HEAD_SERIES, TS_SERIES], ids=["uncompressed", "jpeg2000"])
def test_truncated_file_is_named(shared_data: Path, tmp_path: Path, series: str) -> None:
    files = dicom_files(shared_data / series)
    folder = copy_files(files, tmp_path / "truncated")
    damaged = folder / files[7].name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    message = refusal(folder)
    assert message.startswith(f"{damaged}: ")
    assert "truncated" in message


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_unparseable_dicom_header_is_named(shared_data: Path, tmp_path: Path) -> None:
    folder = copy_files(dicom_files(shared_data / HEAD_SERIES)[:5], tmp_path / "broken")
    source = (folder / "CTHead1.dcm").read_bytes()
    broken = folder / "CTHead1.dcm"
    broken.write_bytes(source[:132] + b"\xff" * 64)  # intact preamble, garbage where the header should be
    message = refusal(folder)
    assert message.startswith(f"{broken}: is a corrupt DICOM file")


def test_localizer_is_refused(shared_data: Path, tmp_path: Path) -> None:
    folder = copy_files(dicom_files(shared_data / HEAD_SERIES)[:5], tmp_path / "scout")
    scout = folder / "CTHead1.dcm"
    dataset = pydicom.dcmread(scout)
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    dataset.save_as(scout)
    assert refusal(folder).startswith(f"{scout}: is a localizer (scout) image")


def test_enhanced_multiframe_ct_is_refused(shared_data: Path, tmp_path: Path) -> None:
    folder = copy_files([shared_data / "dicom" / "pydicom" / "eCT_Supplemental.dcm"], tmp_path / "enhanced")
    message = refusal(folder)
    assert message.startswith(f"{folder / 'eCT_Supplemental.dcm'}: is a multi-frame Enhanced CT image")
    assert "not supported yet" in message
