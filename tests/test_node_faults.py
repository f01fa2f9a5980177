"""The DICOM node under faults of the disk and the network: the spool's file system really full (a small tmpfs
mounted for the test), a sender that aborts its association half-way, and the node killed (kill -9) in the middle
of a C-STORE of its result to a real Orthanc behind a slow link; and the bad studies a network brings (localiser
only, a slice cut short, a duplicated slice, an object without images, a study cut short by a full spool), each
refused with its reason.  Each node is a real child process (`python -m deploy_app serve` in the deploy
environment), fed by a pynetdicom modality; the studies are made from the real head CT (tests/test_node.py has the
PACS round trips)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import SHARED, missing_real_part
from orthanc import Orthanc, running_orthanc
from test_node import (
    DEPLOY_PYTHON,
    HEAD_FILES,
    MODALITY_AET,
    NODE_AET,
    NODE_PORT,
    REPOSITORY,
    NodeProcess,
    dead_pacs_node,
    deploy_apps_running,
    free_port,
    node_config,
    orthanc_series,
    send,
)

from deploy_app.node.audit import read_audit
from deploy_app.node.queue import JobQueue, JobState
from deploy_app.node.spool import uid_key

SHARED_RTSTRUCT = SHARED / "dicom" / "pydicom" / "rtstruct.dcm"  # an RT Structure Set: no image at all

# A modality that sends the files given over one association and then aborts it (A-ABORT), as a sender that crashes
# or loses its network does; one JSON line per instance the node answered.
SEND_AND_ABORT = """
import json, sys
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
calling, port, called, files = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
ae = AE(ae_title=calling)
ae.add_requested_context(CTImageStorage)
association = ae.associate("127.0.0.1", port, ae_title=called)
assert association.is_established
for path in files:
    print(json.dumps({"file": path, "status": int(association.send_c_store(pydicom.dcmread(path)).Status)}), flush=True)
association.abort()
"""

# C-ECHO: prints the status, or "rejected"/"no association".
ECHO = """
import sys
from pynetdicom import AE
from pynetdicom.sop_class import Verification
ae = AE(ae_title=sys.argv[1])
ae.add_requested_context(Verification)
association = ae.associate("127.0.0.1", int(sys.argv[2]), ae_title=sys.argv[3])
if not association.is_established:
    print("rejected" if association.is_rejected else "no association")
    sys.exit(0)
print(int(association.send_c_echo().Status))
association.release()
"""


def echo_in(orthanc: Orthanc, port: int = NODE_PORT) -> str:
    """C-ECHO to a node in the PACS's network namespace."""
    result = orthanc.run([sys.executable, "-c", ECHO, MODALITY_AET, str(port), NODE_AET], timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def echo(port: int) -> str:
    result = subprocess.run([sys.executable, "-c", ECHO, MODALITY_AET, str(port), NODE_AET], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MB tmpfs mounted at a folder of the test (root only), unmounted at its end."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        missing_real_part("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True,
                             text=True, timeout=30, check=False)
    if mounted.returncode != 0:
        missing_real_part(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30, check=False)


def queue_of(spool: Path) -> tuple[list, set[str]]:
    queue = JobQueue(spool / "queue.sqlite", read_only=True)
    try:
        return queue.jobs(), queue.recorded_files()
    finally:
        queue.close()


def test_a_full_disk_refuses_what_does_not_fit_queues_nothing_half_written_and_takes_the_study_once_freed(
        small_disk, tmp_path, nodes):
    spool, port = small_disk / "spool", free_port()
    # No margin kept free (min_free_mb 0): the file system itself runs out of space.  A study is complete when its
    # sender releases the association.
    config = node_config(tmp_path, host="127.0.0.1", min_free_mb=0, queue_on_release=True, quiet_seconds=600)
    node = dead_pacs_node(spool, config, port).start()
    nodes.append(node)
    study_bytes = sum(path.stat().st_size for path in HEAD_FILES)
    # Another program fills the disk: about half the study still fits.
    ballast = small_disk / "ballast"
    with ballast.open("wb") as stream:
        stream.write(b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - study_bytes // 2))

    answers = send(None, MODALITY_AET, HEAD_FILES, port=port)
    statuses = [answer["status"] for answer in answers]
    stored = statuses.count(0)
    assert 0 < stored < 93, statuses
    assert set(statuses) <= {0, 0xA700}, statuses
    assert echo(port) in ("0", "rejected"), "the node stopped answering"
    assert node.alive()

    # Nothing half-written: every file in the spool is recorded and whole; no temporary left; not queued.
    jobs, recorded = queue_of(spool)
    files = {str(path.relative_to(spool)) for path in spool.glob("incoming/*/*")}
    assert files == recorded and len(files) == stored
    acknowledged = {uid_key("sop", pydicom.dcmread(answer["file"]).SOPInstanceUID) for answer in answers
                    if answer["status"] == 0}
    assert {Path(name).stem for name in files} == acknowledged
    for name in files:
        assert pydicom.dcmread(spool / name).pixel_array.shape == (64, 64)
    assert not list(spool.rglob(".partial-*"))
    [job] = jobs
    assert job.state is JobState.RECEIVED and job.instances == stored  # the release did not queue a cut study
    assert deploy_apps_running(spool) == []
    # Refused by the disk itself: a file that could not be written, or the queue's database that could not grow
    # (SQLite's "database or disk is full": the instance's file is removed, not left unrecorded).
    log = (spool / "logs" / "node.log").read_text(errors="replace")
    assert "no space left" in log.lower() or "disk is full" in log, log[-3000:]

    # Space freed: the re-sent study is taken (the stored half as duplicates) and processed once, whole.
    ballast.unlink()
    assert echo(port) == "0"
    assert [answer["status"] for answer in send(None, MODALITY_AET, HEAD_FILES, port=port)] == [0] * 93
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.SENDING], "the results", 120)
    assert job.instances == 93 and job.attempts == 1
    assert sorted(path.name for path in (spool / "jobs" / str(job.id) / "results").glob("*.dcm")) == [
        "ctfm-measurements-sr.dcm", "ctfm-seg.dcm"]
    events = read_audit(spool / "logs")
    assert [event["event"] for event in events].count("processed") == 1
    associations = [event for event in events if event["event"] == "association"]
    assert associations[-1]["duplicates"] == stored and associations[-1]["stored"] == 93 - stored


def test_an_aborted_association_leaves_its_study_waiting_and_the_rest_completes_it_once(tmp_path, nodes):
    spool, port = tmp_path / "spool", free_port()
    config = node_config(tmp_path, host="127.0.0.1", queue_on_release=True, quiet_seconds=600)
    node = dead_pacs_node(spool, config, port).start()
    nodes.append(node)
    half = len(HEAD_FILES) // 2
    result = subprocess.run([sys.executable, "-c", SEND_AND_ABORT, MODALITY_AET, str(port), NODE_AET,
                             *map(str, HEAD_FILES[:half])], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line)["status"] for line in result.stdout.splitlines()] == [0] * half
    node.wait_for(lambda: [event for event in read_audit(spool / "logs") if event["event"] == "association"
                           and event["outcome"] == "aborted"], "the aborted association's record", 30)
    assert echo(port) == "0" and node.alive()
    time.sleep(3.0)  # the scheduler ticks every 0.5 s: an abort taken for a release would have queued it by now
    [job] = node.jobs()
    assert job.state is JobState.RECEIVED and job.instances == half
    assert deploy_apps_running(spool) == []

    # The sender comes back with the rest: the study is complete at its release and processed once, whole.
    assert [answer["status"] for answer in send(None, MODALITY_AET, HEAD_FILES[half:], port=port)] == [0] * (93 - half)
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.SENDING], "the results", 120)
    assert job.instances == 93 and job.attempts == 1 and len(node.jobs()) == 1
    input_files = list((spool / "jobs" / str(job.id) / "input").iterdir())
    assert len(input_files) == 93
    assert [event["event"] for event in read_audit(spool / "logs")].count("processed") == 1


# A slow network link: a TCP relay (loopback, in the PACS's namespace) from LISTEN to TARGET that passes at most
# RATE bytes per second towards the PACS and prints, per connection, how many bytes it has passed so far.
SLOW_LINK = """
import json, socket, sys, threading, time
listen, target, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
server = socket.create_server(("127.0.0.1", listen))
print(json.dumps({"listening": listen}), flush=True)

def pump(source, sink, number, slow):
    passed = 0
    try:
        while True:
            chunk = source.recv(2048 if slow else 65536)
            if not chunk:
                break
            sink.sendall(chunk)
            passed += len(chunk)
            if slow:
                print(json.dumps({"connection": number, "passed": passed}), flush=True)
                time.sleep(len(chunk) / rate)
    except OSError:
        pass
    for end in (source, sink):
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

number = 0
while True:
    client, _ = server.accept()
    number += 1
    pacs = socket.create_connection(("127.0.0.1", target))
    threading.Thread(target=pump, args=(client, pacs, number, True), daemon=True).start()
    threading.Thread(target=pump, args=(pacs, client, number, False), daemon=True).start()
"""


@pytest.fixture
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc-faults")) as server:
        yield server


def test_a_node_killed_while_it_sends_a_result_sends_it_once_after_the_restart(tmp_path, nodes, orthanc):
    """kill -9 in the middle of a C-STORE of the DICOM-SEG to a real Orthanc, behind a slow link."""
    link_port = free_port()
    link = subprocess.Popen(["nsenter", f"--net={orthanc.namespace}", sys.executable, "-c", SLOW_LINK, str(link_port),
                             str(orthanc.dicom_port), "40000"], stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(link.stdout.readline()) == {"listening": link_port}
        passed: dict[int, int] = {}

        def follow() -> None:
            for line in link.stdout:
                event = json.loads(line)
                passed[event["connection"]] = event["passed"]

        threading.Thread(target=follow, daemon=True).start()

        spool = tmp_path / "spool"
        config = node_config(tmp_path, queue_on_release=True, quiet_seconds=600, delivery_retry_seconds=1,
                             pacs_timeout_seconds=60)
        arguments = ["--config", str(config), "--ae-title", NODE_AET, "--port", str(NODE_PORT), "--pacs",
                     f"dicom://{orthanc.aet}@127.0.0.1:{link_port}"]
        node = NodeProcess(spool, arguments, orthanc.namespace).start()
        nodes.append(node)
        answers = send(orthanc, MODALITY_AET, HEAD_FILES, port=NODE_PORT)
        assert [answer["status"] for answer in answers] == [0] * 93

        # The small SR goes first, then the SEG, far larger than an association's set-up, a C-FIND or the SR: 20 kB
        # through one connection is the SEG's C-STORE under way (the link passes 40 kB/s).
        node.wait_for(lambda: any(count > 20000 for count in passed.values()), "a result half sent", 180)
        node.kill()
        held = orthanc_series(orthanc)
        assert [series["modality"] for series in held] in ([], ["SR"]), f"the cut SEG reached the PACS: {held}"
        [job] = node.jobs()
        assert job.state is JobState.SENDING
        results = spool / "jobs" / str(job.id) / "results"
        outbox = json.loads((results / "outbox.json").read_text())
        recorded = {entry["file"].rsplit("/", 1)[-1]: entry["state"] for entry in outbox["entries"]}
        assert recorded["ctfm-seg.dcm"] == "pending", recorded

        node = NodeProcess(spool, arguments, orthanc.namespace).start()
        nodes.append(node)
        [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.DELIVERED], "a delivery",
                              180)
        assert job.attempts == 1 and len(node.jobs()) == 1  # delivered again, not processed again
        held = orthanc_series(orthanc)
        assert sorted((series["modality"], series["instances"]) for series in held) == [("SEG", 1), ("SR", 1)], held
        outbox = json.loads((results / "outbox.json").read_text())
        assert {entry["state"] for entry in outbox["entries"]} == {"sent"}, outbox
        seg = next(entry for entry in outbox["entries"] if entry["file"].endswith("ctfm-seg.dcm"))
        assert seg["result"] == "stored" and seg["attempts"] >= 1, seg  # sent whole by the restarted node
        events = [event["event"] for event in read_audit(spool / "logs")]
        assert events.count("processed") == 1 and events.count("delivered") == 1, events
    finally:
        link.kill()
        link.wait(timeout=30)


# A modality's C-STORE SCU for any object: CT images, an RT structure set; one JSON line per instance answered.
SEND_OBJECTS = """
import json, sys
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage
calling, port, called, files = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
ae = AE(ae_title=calling)
for context in (CTImageStorage, RTStructureSetStorage):
    ae.add_requested_context(context)
association = ae.associate("127.0.0.1", port, ae_title=called)
assert association.is_established
for path in files:
    print(json.dumps({"file": path, "status": int(association.send_c_store(pydicom.dcmread(path, force=True)).Status)}),
          flush=True)
association.release()
"""


def study_copy(folder: Path, files: list[Path], change=None) -> list[Path]:
    """``files`` as a study of their own (new Study, Series and SOP Instance UIDs), each passed through ``change``."""
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    written = []
    for number, source in enumerate(files):
        dataset = pydicom.dcmread(source, force=True)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if change is not None:
            change(number, dataset)
        path = folder / f"{number:03d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def test_localiser_only_truncated_duplicated_and_non_image_studies_from_the_network_are_refused_with_reasons(
        tmp_path, nodes, orthanc):
    def localiser(number: int, dataset: pydicom.Dataset) -> None:
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    def truncated(number: int, dataset: pydicom.Dataset) -> None:
        if number == 40:  # one slice whose pixel data was cut short on its way
            dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]

    studies = {
        "localiser": (study_copy(tmp_path / "localiser", HEAD_FILES[40:43], localiser), "localizer"),
        "truncated": (study_copy(tmp_path / "truncated", HEAD_FILES, truncated), "cut short"),
        "duplicated": (study_copy(tmp_path / "duplicated", [*HEAD_FILES, HEAD_FILES[50]]), "duplicate"),
        "non-image": (study_copy(tmp_path / "non-image", [SHARED_RTSTRUCT]), "objects without images"),
    }
    spool = tmp_path / "spool"
    config = node_config(tmp_path, queue_on_release=True, quiet_seconds=600)
    arguments = ["--config", str(config), "--ae-title", NODE_AET, "--port", str(NODE_PORT), "--pacs",
                 orthanc.dimse_url, "--allow-ae", MODALITY_AET]
    node = NodeProcess(spool, arguments, orthanc.namespace).start()
    nodes.append(node)
    for name, (files, _) in studies.items():
        result = orthanc.run([sys.executable, "-c", SEND_OBJECTS, MODALITY_AET, str(NODE_PORT), NODE_AET, *map(
            str, files)], timeout=120)
        assert result.returncode == 0, (name, result.stderr[-2000:])
        assert [json.loads(line)["status"] for line in result.stdout.splitlines()] == [0] * len(files), name
    jobs = node.wait_for(lambda: (jobs := node.jobs()) and len(jobs) == 4 and all(
        job.state in (JobState.REFUSED, JobState.FAILED, JobState.SENDING, JobState.DELIVERED) for job in jobs)
        and jobs, "four studies handled", 240)
    status = node.status()
    audit = {event["job"]: event for event in read_audit(spool / "logs") if event["event"] == "refused"}
    for job, (name, (files, expected)) in zip(jobs, studies.items(), strict=True):
        assert job.state is JobState.REFUSED and job.instances == len(files), (name, job)
        assert expected.lower() in job.reason.lower(), (name, job.reason)
        assert audit[job.id]["reason"] == job.reason
        assert job.reason in [error["reason"] for error in status["errors"]]
    assert orthanc.instance_count() == 0 and not list(spool.glob("jobs/*/results"))
    assert echo_in(orthanc) == "0" and node.alive()  # still serving


def test_a_study_cut_short_by_a_full_spool_is_refused_as_incomplete_not_processed_in_part(tmp_path, nodes):
    from test_node import reidentified_copy

    spool, port = tmp_path / "spool", free_port()
    # A quota of about 32 head-CT slices; a study is complete 3 s after its last instance.
    config = node_config(tmp_path, host="127.0.0.1", spool_quota_mb=0.3, min_free_mb=0, quiet_seconds=3)
    node = dead_pacs_node(spool, config, port).start()
    nodes.append(node)
    first = reidentified_copy(tmp_path / "first")[:25]
    assert [answer["status"] for answer in send(None, MODALITY_AET, first, port=port)] == [0] * 25
    statuses = [answer["status"] for answer in send(None, MODALITY_AET, HEAD_FILES, port=port)]
    taken = statuses.count(0)
    assert 0 < taken < 20 and statuses == [0] * taken + [0xA700] * (93 - taken)
    # The sender does not come back with the rest: at the end of the quiet period the study is refused, not run.
    second = node.wait_for(lambda: [job for job in node.jobs() if job.instances == taken and job.state not in (
        JobState.RECEIVED, JobState.QUEUED)], "the cut study's outcome", 60)[0]
    assert second.state is JobState.REFUSED and second.attempts == 0, second
    assert second.reason == (f"the study is incomplete: {93 - taken} of its instances were refused while the spool "
                             "was full and not sent again; send the study again")
    [event] = [event for event in read_audit(spool / "logs") if event["event"] == "refused"
               and event["job"] == second.id]
    assert event["reason"] == second.reason and event["stage"] == "receiving"
    assert second.reason in [error["reason"] for error in node.status()["errors"]]


def test_a_sender_outside_allow_hosts_is_rejected_at_association_and_one_inside_is_served(tmp_path, nodes):
    port = free_port()
    for allowed, expected in ((["10.9.9.0/24"], "rejected"), (["10.9.9.0/24", "127.0.0.1"], "0")):
        spool = tmp_path / f"spool-{expected}"
        config = node_config(tmp_path, host="127.0.0.1", allow_ae=[MODALITY_AET], allow_hosts=allowed)
        node = dead_pacs_node(spool, config, port).start()
        nodes.append(node)
        assert echo(port) == expected
        refusals = [event for event in read_audit(spool / "logs") if event["event"] == "association-refused"]
        assert [event["reason"] for event in refusals] == (
            ["address 127.0.0.1 not in allow_hosts"] if expected == "rejected" else [])
        assert node.stop() == 0
    config = node_config(tmp_path, allow_hosts=["10.9.9.300"])
    bad = subprocess.run([DEPLOY_PYTHON, "-m", "deploy_app", "serve", "--config", config, "--ae-title", NODE_AET,
                          "--port", str(port), "--pacs", "dicom://PACS@127.0.0.1:104", "--spool", tmp_path / "bad"],
                         capture_output=True, text=True, timeout=60, cwd=REPOSITORY)
    assert bad.returncode == 2 and "allow_hosts '10.9.9.300': not an address or network" in bad.stderr, bad.stderr
