"""PACS clients against a real Orthanc (DICOMweb + DIMSE) in its own network namespace: send, find, fetch, idempotent
re-sends, refusals, the outbox while the PACS is down, and the exit codes of `ctfm pacs`."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from conftest import SHARED, run_cli
from orthanc import Orthanc, running_orthanc

from ctfm_engine.cli.pacs import human_lines
from ctfm_engine.dicom.outbox import Outbox
from ctfm_engine.dicom.pacs import DicomWebAddress, DimseAddress, RetryPolicy, parse_address
from ctfm_engine.errors import UsageError

HEAD = SHARED / "dicom" / "slicer_head_64x64"
SEGMENTATIONS = SHARED / "dicom" / "dcmqi" / "segmentations"
CT_3SLICE = SEGMENTATIONS / "ct-3slice"
LIVER_SEG = SEGMENTATIONS / "liver.dcm"
OVERLAP_SEG = SEGMENTATIONS / "partial_overlaps.dcm"
LABELMAP_SEG = SEGMENTATIONS / "sparse-labelmap-noppv.dcm"
NOT_DICOM = SEGMENTATIONS / "liver_seg.nrrd"  # the label map a user may send instead of its DICOM-SEG
HEAD_PATIENT_NAME = "Austrialian"  # PatientName in the head CT headers: must never reach an output or a log
FAST_RETRIES = ("--retries", "2", "--retry-delay", "0.01")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def document(self) -> dict:
        return json.loads(self.stdout)


def ctfm(orthanc: Orthanc, *args: str | Path) -> Run:
    """`ctfm ARGS` inside Orthanc's network namespace."""
    result = orthanc.run([sys.executable, "-m", "ctfm_engine.cli", *map(str, args)])
    return Run(result.returncode, result.stdout, result.stderr)


def headers(folder: Path) -> dict[str, pydicom.Dataset]:
    """The DICOM files of ``folder`` by SOPInstanceUID, with pixel data."""
    files = (pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm")))
    return {dataset.SOPInstanceUID: dataset for dataset in files}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="session")
def head_on_pacs(orthanc: Orthanc) -> dict:
    """The 93-slice head CT stored by STOW-RS: the `ctfm pacs send --json` document."""
    run = ctfm(orthanc, "pacs", "send", orthanc.dicomweb_url, HEAD, "--json")
    assert run.code == 0, run.stderr
    return run.document


def test_retry_policy_backs_off_exponentially_up_to_its_cap() -> None:
    policy = RetryPolicy()
    assert [policy.delay_s(attempt) for attempt in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_addresses_are_parsed_and_bad_ones_are_usage_errors() -> None:
    web = parse_address("https://reader:s3cret@pacs.example.org:8443/dicom-web/")
    assert web == DicomWebAddress("https://pacs.example.org:8443/dicom-web", "reader", "s3cret")
    assert "s3cret" not in web.display and "s3cret" not in repr(web)
    dimse = parse_address("dicom://ORTHANC@10.0.0.5:4242", calling_aet="SLICER")
    assert dimse == DimseAddress("ORTHANC", "10.0.0.5", 4242, "SLICER")
    assert dimse.display == "dicom://ORTHANC@10.0.0.5:4242"
    for bad in ("ftp://pacs/dicom-web", "dicom://10.0.0.5:4242", "dicom://ORTHANC@10.0.0.5", "pacs:4242",
                "http://pacs:99999/dicom-web", "dicom://A_TITLE_LONGER_THAN_16@pacs:104"):
        with pytest.raises(UsageError, match="dicom://ORTHANC@pacs.example.org:4242"):
            parse_address(bad)
    with pytest.raises(UsageError) as caught:
        parse_address("ftp://reader:s3cret@pacs/x")
    assert "s3cret" not in str(caught.value) and "reader:***@" in str(caught.value)
    run = run_cli("pacs", "echo", "dicom://10.0.0.5:4242")
    assert run.code == 2 and "dicom://ORTHANC@pacs.example.org:4242" in run.stderr
    run = run_cli("pacs", "echo", "dicom://ORTHANC@10.0.0.5:4242", "--aet", "NOT\\VALID")
    assert run.code == 2 and "--aet" in run.stderr


def test_a_file_that_is_not_dicom_is_named_before_anything_is_sent_or_recorded(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    # Port 9 has no PACS: validation must fail before any connection is tried.
    run = run_cli("pacs", "send", "http://127.0.0.1:9/dicom-web", LIVER_SEG, NOT_DICOM, "--outbox", outbox, "--json")
    assert run.code == 3
    assert str(NOT_DICOM) in run.document["error"]["message"]
    assert "not a DICOM file" in run.document["error"]["message"]
    assert not (outbox / "outbox.json").exists()


def test_an_outbox_entry_whose_file_vanished_is_reported_without_contacting_the_pacs(tmp_path: Path) -> None:
    result = tmp_path / "results" / LIVER_SEG.name
    result.parent.mkdir()
    shutil.copy(LIVER_SEG, result)
    outbox = tmp_path / "outbox"
    Outbox(outbox).add([result.parent], parse_address("http://127.0.0.1:9/dicom-web"))
    result.unlink()
    run = run_cli("pacs", "outbox", outbox, "--send", "--json")
    assert run.code == 3 and str(result) in run.document["error"]["message"]
    assert [entry.state.value for entry in Outbox(outbox).entries()] == ["unreadable"]
    assert run_cli("pacs", "outbox", tmp_path / "results").code == 3  # not an outbox


def test_echo_over_dicomweb_and_dimse(orthanc: Orthanc) -> None:
    for url, protocol in ((orthanc.dicomweb_url, "dicomweb"), (orthanc.dimse_url, "dimse")):
        run = ctfm(orthanc, "pacs", "echo", url, "--json")
        assert run.code == 0, run.stderr
        assert run.document["pacs"] == url and run.document["protocol"] == protocol
        assert human_lines(run.document) == [f"{url} answers ({protocol}, {1000 * run.document['seconds']:.0f} ms)"]


def test_stow_rs_send_then_qido_rs_find_and_wado_rs_fetch_give_the_series_back(
        orthanc: Orthanc, head_on_pacs: dict, tmp_path: Path) -> None:
    originals = headers(HEAD)
    assert len(originals) == 93
    assert head_on_pacs["counts"]["stored"] == 93 and len(head_on_pacs["files"]) == 93
    first = next(iter(originals.values()))
    study_uid, series_uid = first.StudyInstanceUID, first.SeriesInstanceUID

    found = ctfm(orthanc, "pacs", "find", orthanc.dicomweb_url, "--study", study_uid, "--modality", "CT", "--json")
    assert found.code == 0, found.stderr
    assert [(item["series_instance_uid"], item["instances"]) for item in found.document["series"]] == [
        (series_uid, 93)]
    assert found.document["series"][0]["series_number"] == int(first.SeriesNumber)
    for text in (found.stdout, found.stderr, json.dumps(head_on_pacs)):
        assert HEAD_PATIENT_NAME not in text

    out = tmp_path / "fetched"
    fetched = ctfm(orthanc, "pacs", "fetch", orthanc.dicomweb_url, "--study", study_uid, "--series", series_uid,
                   "--out", out, "--json")
    assert fetched.code == 0, fetched.stderr
    assert fetched.document["method"] == "WADO-RS" and fetched.document["instances"] == 93
    copies = headers(out)
    assert copies.keys() == originals.keys()
    for uid, original in originals.items():
        assert copies[uid].PixelData == original.PixelData
        assert copies[uid].file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def test_c_store_send_then_c_find_and_c_get_or_c_move_fetch_give_the_series_back(
        orthanc: Orthanc, tmp_path: Path) -> None:
    originals = headers(CT_3SLICE)
    first = next(iter(originals.values()))
    sent = ctfm(orthanc, "pacs", "send", orthanc.dimse_url, CT_3SLICE, "--json")
    assert sent.code == 0, sent.stderr
    assert {item["sop_instance_uid"] for item in sent.document["files"]} == originals.keys()
    assert all(item["status"] in ("stored", "already-present") for item in sent.document["files"])

    found = ctfm(orthanc, "pacs", "find", orthanc.dimse_url, "--series", first.SeriesInstanceUID, "--json")
    assert found.code == 0, found.stderr
    assert [(item["study_instance_uid"], item["modality"], item["instances"]) for item in found.document["series"]
            ] == [(first.StudyInstanceUID, "CT", 3)]

    for method, extra in (("C-GET", ()), ("C-MOVE", ("--move-port", "11113"))):
        out = tmp_path / method
        if method == "C-MOVE":  # into a folder that exists already: its other files stay
            out.mkdir()
            (out / "notes.txt").write_text("kept")
        fetched = ctfm(orthanc, "pacs", "fetch", orthanc.dimse_url, "--study", first.StudyInstanceUID,
                       "--series", first.SeriesInstanceUID, "--out", out, *extra, "--json")
        assert fetched.code == 0, fetched.stderr
        assert fetched.document["method"] == method
        copies = headers(out)
        assert copies.keys() == originals.keys()
        assert all(copies[uid].PixelData == original.PixelData for uid, original in originals.items())
    assert sorted(path.name for path in out.iterdir()) == sorted([f"{uid}.dcm" for uid in originals] + ["notes.txt"])


def test_sending_again_does_not_duplicate_instances(orthanc: Orthanc, head_on_pacs: dict) -> None:
    before = orthanc.instance_count()
    again = ctfm(orthanc, "pacs", "send", orthanc.dimse_url, HEAD, "--json")
    assert again.code == 0, again.stderr
    assert again.document["counts"]["already-present"] == 93 and again.document["counts"]["stored"] == 0
    forced = ctfm(orthanc, "pacs", "send", orthanc.dicomweb_url, HEAD, "--force", "--json")
    assert forced.code == 0, forced.stderr
    assert forced.document["counts"]["stored"] == 93
    assert orthanc.instance_count() == before
    series_uid = pydicom.dcmread(head_on_pacs["files"][0]["file"], stop_before_pixels=True).SeriesInstanceUID
    found = ctfm(orthanc, "pacs", "find", orthanc.dicomweb_url, "--series", series_uid, "--json")
    assert [item["instances"] for item in found.document["series"]] == [93]


REFUSAL_SNIPPET = """
import json, sys
from ctfm_engine.dicom.pacs import RetryPolicy, open_pacs
pacs = open_pacs(sys.argv[1], retry=RetryPolicy(attempts=4, first_delay_s=0.01))
print(json.dumps(pacs.store(sys.argv[2:]).as_dict()))
"""


def test_a_refused_labelmap_seg_is_reported_per_file_and_not_retried(orthanc: Orthanc) -> None:
    # Orthanc 1.10 does not know the LABELMAP SEG SOP class: it refuses its presentation context over DIMSE.
    run = ctfm(orthanc, "pacs", "send", orthanc.dimse_url, CT_3SLICE, LABELMAP_SEG, "--retries", "3",
               "--retry-delay", "0.01", "--json")
    assert run.code == 1
    message = run.document["error"]["message"]
    assert orthanc.dimse_url in message and LABELMAP_SEG.name in message and "refused" in message
    assert "Abstract Syntax Not Supported" in message
    assert "attempt 2 of" not in run.stderr

    result = orthanc.run([sys.executable, "-c", REFUSAL_SNIPPET, orthanc.dimse_url, CT_3SLICE, LABELMAP_SEG])
    assert result.returncode == 0, result.stderr
    report = {Path(item["file"]).name: item for item in json.loads(result.stdout)["files"]}
    assert report[LABELMAP_SEG.name]["status"] == "refused" and report[LABELMAP_SEG.name]["attempts"] == 1
    assert "Label Map Segmentation Storage" in report[LABELMAP_SEG.name]["message"]
    assert all(report[path.name]["status"] in ("stored", "already-present") for path in CT_3SLICE.glob("*.dcm"))

    # The same object is accepted over DICOMweb.
    stow = ctfm(orthanc, "pacs", "send", orthanc.dicomweb_url, LABELMAP_SEG, "--json")
    assert stow.code == 0, stow.stderr
    assert stow.document["files"][0]["status"] == "stored"


def test_results_wait_in_the_outbox_while_the_pacs_is_down_and_are_delivered_later(
        orthanc: Orthanc, tmp_path: Path) -> None:
    results = [LIVER_SEG, OVERLAP_SEG]
    digests = [digest(path) for path in results]
    outbox = tmp_path / "outbox"
    with orthanc.stopped():
        direct = ctfm(orthanc, "pacs", "send", orthanc.dicomweb_url, *results, *FAST_RETRIES, "--json")
        assert direct.code == 1
        message = direct.document["error"]["message"]
        assert orthanc.dicomweb_url in message and "connection refused" in message
        assert "2 of 2 file(s) not stored" in message and "unchanged" in message
        assert direct.stderr.count("attempt 2 of 3") == 1 and direct.stderr.count("attempt 3 of 3") == 1

        queued = ctfm(orthanc, "pacs", "send", orthanc.dimse_url, *results, "--outbox", outbox, *FAST_RETRIES,
                      "--json")
        assert queued.code == 1
        message = queued.document["error"]["message"]
        assert orthanc.dimse_url in message and str(outbox) in message and "ctfm pacs outbox" in message
        state = json.loads((outbox / "outbox.json").read_text())["entries"]
        # The outbox records real paths (../shared may be a symbolic link).
        assert [(Path(entry["file"]), entry["state"], entry["attempts"]) for entry in state] == [
            (path.resolve(), "pending", 1) for path in results]
        assert all("cannot connect" in entry["last_error"] and entry["next_try"] for entry in state)

        again = ctfm(orthanc, "pacs", "outbox", outbox, "--send", "--retries", "0", "--json")
        assert again.code == 1
        state = json.loads((outbox / "outbox.json").read_text())["entries"]
        assert [(entry["state"], entry["attempts"]) for entry in state] == [("pending", 2)] * 2
    assert [digest(path) for path in results] == digests

    delivered = ctfm(orthanc, "pacs", "outbox", outbox, "--send", "--json")
    assert delivered.code == 0, delivered.stderr
    assert [(entry["state"], entry["result"]) for entry in delivered.document["entries"]] == [("sent", "stored")] * 2
    assert delivered.document["counts"]["sent"] == 2 and delivered.document["counts"]["pending"] == 0

    seg_series = {pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID for path in results}
    found = ctfm(orthanc, "pacs", "find", orthanc.dicomweb_url, "--modality", "SEG", "--json")
    assert seg_series <= {item["series_instance_uid"] for item in found.document["series"]}

    nothing_left = ctfm(orthanc, "pacs", "outbox", outbox, "--send", "--json")
    assert nothing_left.code == 0, nothing_left.stderr
    assert all(delivery["files"] == [] for delivery in nothing_left.document["deliveries"])


def test_a_failed_fetch_leaves_no_folder_behind(orthanc: Orthanc, tmp_path: Path) -> None:
    study_uid = next(iter(headers(CT_3SLICE).values())).StudyInstanceUID
    for url in (orthanc.dicomweb_url, orthanc.dimse_url):
        out = tmp_path / "never"
        run = ctfm(orthanc, "pacs", "fetch", url, "--study", study_uid, "--series", "1.2.3.4.5", "--out", out,
                   "--json")
        assert run.code == 1
        assert url in run.document["error"]["message"] and "nothing was written" in run.document["error"]["message"]
        assert not out.exists()
