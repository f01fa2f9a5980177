"""The DICOM node (`python -m deploy_app serve`) as a hospital runs it: a real Orthanc PACS (Debian orthanc in its own
network namespace) routes every stable study to the node by a Lua rule, the node receives it (pynetdicom SCP), queues
it in SQLite, runs the deploy app on it and sends the DICOM-SEG and the measurement SR back.

Faults: the node killed (kill -9) while it infers and while it receives, then restarted; the PACS down, then back;
bad input from the network (an unknown AE title, an MR series); a full spool.  Every node is a child process started
with the deploy environment's Python, inside the PACS's namespace or on loopback; the deploy app runs the shipped
demonstration model with PyTorch (CTFM_BACKEND=torch, set by conftest and inherited).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SHARED, TS_DICOM, deploy_python, require, require_module
from orthanc import Orthanc, running_orthanc

DEPLOY_PYTHON = deploy_python()

from ctfm_engine.dicom.measurements_sr import read_measurements_sr  # noqa: E402
from ctfm_engine.dicom.validate import dciodvfy  # noqa: E402
from deploy_app.node.audit import read_audit  # noqa: E402
from deploy_app.node.queue import JobQueue, JobState  # noqa: E402
from deploy_app.node.spool import uid_key  # noqa: E402
from deploy_app.node.status import node_status  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
HEAD = SHARED / "dicom" / "slicer_head_64x64"
HEAD_FILES = sorted(HEAD.glob("*.dcm"))
MR_IMAGE = SHARED / "negative-controls" / "brain1_image.nrrd"
ROUTE_LUA = REPOSITORY / "deploy_app" / "node" / "orthanc-route.lua"
NODE_AET = "CTFMNODE"
NODE_PORT = 11112
MODALITY_AET = "MODALITY"

# A modality's C-STORE SCU: sends the files given on the command line over one association and prints one JSON line
# per instance the node answered, as soon as it answered (so a test knows what was acknowledged before a kill).
SEND = """
import json, sys, time
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, CTImageStorage, Verification
calling, port, called, delay, files = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5:]
ae = AE(ae_title=calling)
for context in (CTImageStorage, MRImageStorage, Verification):
    ae.add_requested_context(context)
ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.90"])  # JPEG 2000 lossless, sent as it is stored
association = ae.associate("127.0.0.1", port, ae_title=called)
if not association.is_established:
    answer = association.acceptor.primitive
    print(json.dumps({"rejected": association.is_rejected, "result": getattr(answer, "result", None),
                      "source": getattr(answer, "result_source", None), "reason": getattr(answer, "diagnostic", None)}))
    sys.exit(0)
for path in files:
    dataset = pydicom.dcmread(path)
    # A sender fills the SOP class and instance of an object that blanked them from its file meta information.
    dataset.SOPClassUID = dataset.SOPClassUID or dataset.file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = dataset.SOPInstanceUID or dataset.file_meta.MediaStorageSOPInstanceUID
    status = association.send_c_store(dataset)
    if not status:
        print(json.dumps({"lost": path}), flush=True)
        sys.exit(0)
    print(json.dumps({"file": path, "status": int(status.Status)}), flush=True)
    time.sleep(delay)
association.release()
"""


class NodeProcess:
    """`python -m deploy_app serve` as a child process, in ``namespace`` (a /proc/PID/ns/net path) or ours."""

    def __init__(self, spool: Path, arguments: list[str], namespace: str | None = None) -> None:
        self.spool = spool
        self.arguments = arguments
        self.namespace = namespace
        self.process: subprocess.Popen | None = None
        self.output = spool.parent / f"{spool.name}-stderr.log"

    def start(self, timeout_s: float = 60) -> NodeProcess:
        prefix = ["nsenter", f"--net={self.namespace}"] if self.namespace else []
        command = [*prefix, str(DEPLOY_PYTHON), "-m", "deploy_app", "serve", "--spool", str(self.spool),
                   *self.arguments]
        with self.output.open("ab") as stream:
            self.process = subprocess.Popen(command, cwd=REPOSITORY, stdout=stream, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        pid_file = self.spool / "node.json"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the node exited with {self.process.returncode}:\n{self.log_tail()}")
            if pid_file.is_file() and json.loads(pid_file.read_text())["pid"] == self.process.pid:
                return self
            time.sleep(0.1)
        raise AssertionError(f"the node did not start listening within {timeout_s} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return -9

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> dict:
        return node_status(self.spool)

    def jobs(self) -> list:
        queue = JobQueue(self.spool / "queue.sqlite", read_only=True)
        try:
            return queue.jobs()
        finally:
            queue.close()

    def wait_for(self, condition, what: str, timeout_s: float = 150):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = condition()
            if found:
                return found
            if not self.alive():
                raise AssertionError(f"the node died while waiting for {what}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {timeout_s} s; jobs: {[job.as_dict() for job in self.jobs()]}\n"
                             f"{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        logs = [self.output, self.spool / "logs" / "node.log", *sorted(self.spool.glob("jobs/*/attempt-*.log"))]
        return "\n".join(f"== {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                         for path in logs if path.is_file())


def dead_pacs_node(spool: Path, config: Path, port: int, *options: str) -> NodeProcess:
    """A node (not started) listening on loopback ``port`` with the settings file ``config``, whose PACS does not
    listen: its results wait in ``sending``."""
    return NodeProcess(spool, ["--config", str(config), "--ae-title", NODE_AET, "--port", str(port), "--pacs",
                               f"dicom://PACS@127.0.0.1:{free_port()}", *options])


def deploy_apps_running(spool: Path) -> list[int]:
    """Process ids of deploy apps working on this spool's jobs."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(spool).encode() in command and b"-i\x00" in command:
                found.append(int(entry.name))
    return found


def send(orthanc: Orthanc | None, calling: str, files: list[Path], *, port: int = NODE_PORT, delay_s: float = 0.0,
         called: str = NODE_AET) -> list[dict]:
    """Send ``files`` to the node as a modality would (in the PACS's namespace when given); one answer per line."""
    command = [sys.executable, "-c", SEND, calling, str(port), called, str(delay_s), *map(str, files)]
    if orthanc is not None:
        result = orthanc.run(command, timeout=300)
    else:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def orthanc_series(orthanc: Orthanc) -> list[dict]:
    """Every series Orthanc holds, with its modality and instance count, by Orthanc's own REST API."""
    return [{"modality": series["MainDicomTags"].get("Modality"), "uid": series["MainDicomTags"]["SeriesInstanceUID"],
             "instances": len(series["Instances"]), "id": series["ID"], "study": series["ParentStudy"]}
            for series in orthanc.rest("/series?expand")]


def orthanc_file(orthanc: Orthanc, series_id: str, folder: Path) -> Path:
    """The single instance of an Orthanc series, fetched by Orthanc's REST API into ``folder``."""
    instance = orthanc.rest(f"/series/{series_id}/instances")[0]["ID"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{series_id}.dcm"
    fetch = f"import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen('{orthanc.http_url}" \
            f"/instances/{instance}/file', timeout=30).read())"
    result = orthanc.run([sys.executable, "-c", fetch], text=False)
    assert result.returncode == 0, result.stderr
    path.write_bytes(result.stdout)
    return path


def assert_valid(path: Path) -> None:
    validation = dciodvfy(path)
    require(validation is not None, "dciodvfy (Debian dicom3tools) is not installed")
    assert validation.errors == [], f"{path.name}: {validation.errors}"


def assert_no_patient_data(spool: Path, source: Path) -> None:
    """Neither the node's log nor its audit trail names the patient or shows the study's UIDs in clear."""
    header = pydicom.dcmread(source, stop_before_pixels=True)
    secrets = [str(header.get(keyword) or "") for keyword in ("PatientName", "PatientID", "PatientBirthDate",
                                                                "StudyInstanceUID", "SeriesInstanceUID")]
    for path in (spool / "logs" / "node.log", spool / "logs" / "audit.jsonl"):
        text = path.read_text()
        for secret in filter(None, secrets):
            assert secret not in text, f"{path.name} holds {secret!r}"


def node_config(tmp_path: Path, **settings: object) -> Path:
    """A TOML --config file holding ``settings``."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path = tmp_path / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def routing_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """An Orthanc that knows the node as modality ``ctfmnode`` and forwards every stable study to it (the shipped
    Lua rule)."""
    overrides = {"LuaScripts": [str(ROUTE_LUA)],
                 "DicomModalities": {"ctfmnode": [NODE_AET, "127.0.0.1", NODE_PORT]}}
    with running_orthanc(tmp_path_factory.mktemp("orthanc-node"), config_overrides=overrides) as server:
        yield server


@pytest.fixture
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc-plain")) as server:
        yield server


def test_a_study_routed_by_the_pacs_comes_back_as_seg_and_sr_once_although_the_node_was_killed_while_inferring(
        routing_orthanc, tmp_path, nodes):
    orthanc = routing_orthanc
    spool = tmp_path / "spool"
    # The config file sets what the flags do not; the flags override it (quiet_seconds 600 would never end).
    config = node_config(tmp_path, quiet_seconds=600, delivery_retry_seconds=1, retry_seconds=1, workers=1)
    arguments = ["--config", str(config), "--ae-title", NODE_AET, "--port", str(NODE_PORT), "--pacs",
                 orthanc.dimse_url, "--allow-ae", "ORTHANC", "--quiet-seconds", "2"]
    node = NodeProcess(spool, arguments, orthanc.namespace).start()
    nodes.append(node)

    result = orthanc.run([sys.executable, "-m", "ctfm_engine.cli", "pacs", "send", orthanc.dimse_url, HEAD, "--json"])
    assert result.returncode == 0, result.stderr
    ct = [series for series in orthanc_series(orthanc) if series["modality"] == "CT"]
    assert len(ct) == 1 and ct[0]["instances"] == len(HEAD_FILES) == 93

    # Orthanc's rule sends the stable study; the node queues it after 2 quiet seconds and starts the deploy app.
    node.wait_for(lambda: any("segmenting" in path.read_text(errors="replace")
                              for path in spool.glob("jobs/*/attempt-*.log")), "a deploy app segmenting", 90)
    assert [job.state for job in node.jobs()] == [JobState.RUNNING]
    assert deploy_apps_running(spool)
    node.kill()
    time.sleep(1.0)
    assert deploy_apps_running(spool) == [], "the deploy app outlived the node killed with -9"
    assert not (spool / "jobs" / "1" / "results").exists()

    node = NodeProcess(spool, arguments, orthanc.namespace).start()
    nodes.append(node)
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.DELIVERED], "a delivery")
    assert job.instances == 93 and job.interruptions == 1 and job.attempts == 1, job
    assert job.model["name"] == "ctfm-mini-wholebody-seg" and job.model["demonstration"] is True
    assert sorted(item["file"] for item in job.outputs) == ["ctfm-measurements-sr.dcm", "ctfm-seg.dcm"]

    # In the PACS: the CT and, in its study, one SEG and one SR that reference it.
    held = orthanc_series(orthanc)
    assert sorted(series["modality"] for series in held) == ["CT", "SEG", "SR"], held
    assert {series["study"] for series in held} == {ct[0]["study"]}
    seg_path = orthanc_file(orthanc, next(s["id"] for s in held if s["modality"] == "SEG"), tmp_path / "back")
    sr_path = orthanc_file(orthanc, next(s["id"] for s in held if s["modality"] == "SR"), tmp_path / "back")
    seg = pydicom.dcmread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct[0]["uid"]
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 93
    measurements = read_measurements_sr(sr_path)
    assert measurements and {(row["seg_sop_instance_uid"], row["source_series_uid"]) for row in measurements} == {
        (seg.SOPInstanceUID, ct[0]["uid"])}
    for path in (seg_path, sr_path):
        assert_valid(path)

    # The results made the study stable again, so the rule sent the CT once more: 93 duplicates, no new job.
    node.wait_for(lambda: [event for event in read_audit(spool / "logs")
                           if event["event"] == "association" and event["duplicates"] == 93], "the re-sent CT", 60)
    time.sleep(3.0)  # a quiet period and more: a new job would have been queued by now
    assert len(node.jobs()) == 1
    assert orthanc.instance_count() == 95

    events = [event["event"] for event in read_audit(spool / "logs")]
    for expected in ("node-started", "association", "queued", "processed", "delivered"):
        assert expected in events, events
    processed = next(event for event in read_audit(spool / "logs") if event["event"] == "processed")
    assert len(processed["model"]["sha256"]) == 64 and processed["instances"] == 93
    assert_no_patient_data(spool, HEAD_FILES[0])
    status = node.status()
    assert status["counts"]["delivered"] == 1 and status["throughput"]["delivered_total"] == 1


def test_a_study_cut_by_a_kill_while_receiving_is_completed_by_the_resend_and_its_results_wait_for_the_pacs(
        orthanc, tmp_path, nodes):
    spool = tmp_path / "spool"
    config = node_config(tmp_path, quiet_seconds=6, delivery_retry_seconds=1, allow_ae=[MODALITY_AET])
    arguments = ["--config", str(config), "--ae-title", NODE_AET, "--port", str(NODE_PORT), "--pacs",
                 orthanc.dicomweb_url]
    node = NodeProcess(spool, arguments, orthanc.namespace).start()
    nodes.append(node)

    # A modality sends slowly; the node is killed after 30 instances are in.
    command = ["nsenter", f"--net={orthanc.namespace}", sys.executable, "-c", SEND, MODALITY_AET, str(NODE_PORT),
               NODE_AET, "0.05", *map(str, HEAD_FILES)]
    sender = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node.wait_for(lambda: len(list(spool.glob("incoming/*/*.dcm"))) >= 30, "30 instances received", 60)
    node.kill()
    out, _ = sender.communicate(timeout=60)
    acknowledged = [json.loads(line)["file"] for line in out.splitlines()
                    if json.loads(line).get("status") == 0]
    assert 30 <= len(acknowledged) < 93

    # Everything acknowledged is in the spool, whole, and recorded; nothing was queued yet.
    queue = JobQueue(spool / "queue.sqlite", read_only=True)
    jobs = queue.jobs()
    recorded = queue.recorded_files()
    queue.close()
    assert [job.state for job in jobs] == [JobState.RECEIVED]
    for name in acknowledged:
        source = pydicom.dcmread(name)
        key = uid_key("sop", source.SOPInstanceUID)
        [stored_name] = [path for path in recorded if path.endswith(f"/{key}.dcm")]
        stored = pydicom.dcmread(spool / stored_name)
        assert stored.SOPInstanceUID == source.SOPInstanceUID
        assert np.array_equal(stored.pixel_array, source.pixel_array)

    with orthanc.stopped():
        node = NodeProcess(spool, arguments, orthanc.namespace).start()
        nodes.append(node)
        answers = send(orthanc, MODALITY_AET, HEAD_FILES)  # the modality sends the study again
        assert [answer["status"] for answer in answers] == [0] * 93
        [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.SENDING and job.reason],
                              "results waiting for the PACS")
        assert job.instances == 93 and "waiting for" in job.reason
        status = node.status()
        assert status["counts"]["sending"] == 1 and status["errors"][0]["reason"] == job.reason
        # Killed again while its results wait: the restarted node goes on waiting, it does not run the study again.
        node.kill()
        node = NodeProcess(spool, arguments, orthanc.namespace).start()
        nodes.append(node)
        assert [job.state for job in node.jobs()] == [JobState.SENDING]
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.DELIVERED], "a delivery", 60)

    # One SEG and one SR in the PACS, made from the whole series (93 instances), not from the 30 of the cut send.
    held = orthanc_series(orthanc)
    assert sorted(series["modality"] for series in held) == ["SEG", "SR"], held
    seg = pydicom.dcmread(orthanc_file(orthanc, next(s["id"] for s in held if s["modality"] == "SEG"), tmp_path))
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 93
    events = read_audit(spool / "logs")
    assert [event["event"] for event in events].count("processed") == 1
    assert any(event["event"] == "delivery-pending" for event in events)
    associations = [event for event in events if event["event"] == "association"]
    assert associations[-1]["stored"] + associations[-1]["duplicates"] == 93
    assert associations[-1]["duplicates"] >= 30
    assert not list(spool.rglob(".partial-*"))


def test_a_jpeg2000_series_without_study_uids_is_stored_as_sent_and_kept_together(tmp_path, nodes):
    spool, port = tmp_path / "spool", free_port()
    config = node_config(tmp_path, host="127.0.0.1", quiet_seconds=600)
    node = dead_pacs_node(spool, config, port).start()
    nodes.append(node)
    sources = sorted(path for path in TS_DICOM.iterdir() if path.name.startswith("CT."))
    assert [answer["status"] for answer in send(None, MODALITY_AET, sources, port=port)] == [0] * 20
    [job] = node.jobs()
    assert job.instances == 20 and job.state is JobState.RECEIVED  # one study although its UIDs are blank
    for source in sources:
        original = pydicom.dcmread(source)
        key = uid_key("sop", original.file_meta.MediaStorageSOPInstanceUID)
        [stored_path] = spool.glob(f"incoming/*/{key}.dcm")
        stored = pydicom.dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
        assert stored.PixelData == original.PixelData  # the JPEG 2000 codestream, byte for byte


def test_a_stopped_node_queues_its_running_study_again_and_a_second_node_cannot_take_its_spool(tmp_path, nodes):
    spool, port = tmp_path / "spool", free_port()
    config = node_config(tmp_path, host="127.0.0.1", queue_on_release=True, quiet_seconds=600)
    node = dead_pacs_node(spool, config, port).start()
    nodes.append(node)
    assert [answer["status"] for answer in send(None, MODALITY_AET, HEAD_FILES, port=port)] == [0] * 93
    node.wait_for(lambda: deploy_apps_running(spool), "a deploy app", 30)
    second = subprocess.run([DEPLOY_PYTHON, "-m", "deploy_app", "serve", "--config", config, "--ae-title", NODE_AET,
                             "--port", str(free_port()), "--spool", spool, "--pacs", "dicom://PACS@127.0.0.1:104"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 2 and "another node serves this spool" in second.stderr, second.stderr
    assert node.stop() == 0  # SIGTERM, as systemd stops it
    assert deploy_apps_running(spool) == []
    [job] = node.jobs()
    assert job.state is JobState.QUEUED and job.interruptions == 1 and job.attempts == 0
    assert read_audit(spool / "logs")[-1] == {**read_audit(spool / "logs")[-1], "event": "node-stopped",
                                              "requeued": 1}
    assert not node.status()["node"]["running"]


def test_a_job_failed_by_a_wrong_setting_runs_again_when_requeued_after_the_fix(tmp_path, nodes):
    spool, port = tmp_path / "spool", free_port()
    config = node_config(tmp_path, host="127.0.0.1", queue_on_release=True, quiet_seconds=600)
    dead_pacs = f"dicom://PACS@127.0.0.1:{free_port()}"
    arguments = ["--config", str(config), "--ae-title", NODE_AET, "--port", str(port), "--pacs", dead_pacs]
    node = NodeProcess(spool, [*arguments, "--model", str(tmp_path / "no-such-model")]).start()
    nodes.append(node)
    assert node.status()["node"]["running"] is True
    assert [answer["status"] for answer in send(None, MODALITY_AET, HEAD_FILES, port=port)] == [0] * 93
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.FAILED], "the failed job", 120)
    assert "no-such-model" in job.reason and job.next_try is None, job  # a setting: not tried again by itself

    requeue = [DEPLOY_PYTHON, "-m", "deploy_app", "requeue", "--spool", spool]
    refused = subprocess.run([*requeue, "7"], capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "no job 7" in refused.stderr, refused.stderr
    assert node.stop() == 0
    node = NodeProcess(spool, arguments).start()  # the fix: the node started with the right model
    nodes.append(node)
    time.sleep(1.5)
    assert [job.state for job in node.jobs()] == [JobState.FAILED]  # a restart alone does not run it again
    done = subprocess.run([*requeue, "--failed"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "job 1: failed -> queued (will be run again)", done
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.SENDING], "the results", 120)
    assert job.attempts == 1 and job.model["name"] == "ctfm-mini-wholebody-seg", job
    again = subprocess.run([*requeue, "1"], capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0 and "sending -> sending (will be delivered again)" in again.stdout, again
    events = [event for event in read_audit(spool / "logs") if event["event"] == "requeued"]
    assert [(event["was"], event["now"]) for event in events] == [("failed", "queued"), ("sending", "sending")]


def reidentified_copy(folder: Path) -> list[Path]:
    """The head CT with Study, Series and SOP Instance UIDs of its own: another patient's study, for the node."""
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for source in HEAD_FILES:
        dataset = pydicom.dcmread(source)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(folder / source.name, enforce_file_format=True)
    return sorted(folder.iterdir())


def test_the_worker_pool_runs_at_most_workers_studies_at_once(tmp_path, nodes):
    spool, port = tmp_path / "spool", free_port()
    config = node_config(tmp_path, host="127.0.0.1", queue_on_release=True, quiet_seconds=600, workers=2)
    node = dead_pacs_node(spool, config, port).start()
    nodes.append(node)
    # Three studies over one association: all three are complete when it is released.
    studies = [*HEAD_FILES, *reidentified_copy(tmp_path / "b"), *reidentified_copy(tmp_path / "c")]
    assert [answer["status"] for answer in send(None, MODALITY_AET, studies, port=port)] == [0] * 3 * 93
    running = node.wait_for(lambda: len(deploy_apps_running(spool)) >= 2 and deploy_apps_running(spool),
                            "two deploy apps", 30)
    time.sleep(2.0)  # time enough for a third to start, were the pool not bounded
    assert len(running) == 2 and len(deploy_apps_running(spool)) == 2
    assert sorted(job.state.value for job in node.jobs()) == ["queued", "running", "running"]
    assert node.stop() == 0


def mr_series(folder: Path) -> list[Path]:
    """The real MR of the negative controls (brain1_image.nrrd) written as an MR Image Storage DICOM series."""
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    image = sitk.ReadImage(str(MR_IMAGE))
    voxels = sitk.GetArrayFromImage(image).astype(np.int16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    paths = []
    for index, plane in enumerate(voxels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        header = Dataset()
        header.file_meta = meta
        header.SOPClassUID, header.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        header.StudyInstanceUID, header.SeriesInstanceUID, header.FrameOfReferenceUID = study, series, frame
        header.Modality, header.ImageType, header.InstanceNumber, header.SeriesNumber = "MR", ["ORIGINAL", "PRIMARY"], \
            index + 1, 1
        header.PatientName, header.PatientID = "", ""
        header.ImageOrientationPatient = [*direction[:, 0], *direction[:, 1]]
        header.ImagePositionPatient = list(np.array(image.GetOrigin()) + index * image.GetSpacing()[2]
                                           * direction[:, 2])
        header.PixelSpacing = [image.GetSpacing()[1], image.GetSpacing()[0]]
        header.SliceThickness = image.GetSpacing()[2]
        header.Rows, header.Columns = plane.shape
        header.SamplesPerPixel, header.PhotometricInterpretation = 1, "MONOCHROME2"
        header.BitsAllocated, header.BitsStored, header.HighBit, header.PixelRepresentation = 16, 16, 15, 1
        header.PixelData = plane.tobytes()
        path = folder / f"mr{index:03d}.dcm"
        header.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_bad_input_from_the_network_is_refused_with_its_reason_and_the_node_keeps_serving(orthanc, tmp_path, nodes):
    spool = tmp_path / "spool"
    # A study is complete when its sender releases the association (no quiet period to wait); refused studies leave
    # the spool at the next retention pass (retention_hours 0: at once; a pass runs at start and every minute).
    config = node_config(tmp_path, queue_on_release=True, quiet_seconds=600, retention_hours=0)
    arguments = ["--config", str(config), "--ae-title", NODE_AET, "--port", str(NODE_PORT), "--pacs",
                 orthanc.dimse_url, "--allow-ae", MODALITY_AET]
    node = NodeProcess(spool, arguments, orthanc.namespace).start()
    nodes.append(node)

    [answer] = send(orthanc, "STRANGER", HEAD_FILES[:1])
    assert answer == {"rejected": True, "result": 1, "source": 1, "reason": 3}  # permanent: calling AE not recognised
    [answer] = send(orthanc, MODALITY_AET, HEAD_FILES[:1], called="SOMEONE")
    assert answer == {"rejected": True, "result": 1, "source": 1, "reason": 7}  # called AE title not recognised

    mr = mr_series(tmp_path / "mr")
    assert [answer["status"] for answer in send(orthanc, MODALITY_AET, mr)] == [0] * len(mr)
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.REFUSED], "a refusal", 90)
    assert "modality MR" in job.reason and job.instances == len(mr), job.reason
    status = json.loads(subprocess.run([DEPLOY_PYTHON, "-m", "deploy_app", "status", "--spool", spool, "--json"],
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
    assert status["counts"]["refused"] == 1 and status["errors"][0]["reason"] == job.reason
    human = subprocess.run([DEPLOY_PYTHON, "-m", "deploy_app", "status", "--spool", spool], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    assert "1 refused" in human and "modality MR" in human and "node: running" in human
    events = read_audit(spool / "logs")
    refusals = [event for event in events if event["event"] == "association-refused"]
    assert [event["calling_ae"] for event in refusals] == ["STRANGER", MODALITY_AET]
    [queued] = [event for event in events if event["event"] == "queued"]
    assert queued["why"] == "the sender released the association" and queued["instances"] == len(mr)
    [refused] = [event for event in events if event["event"] == "refused"]
    assert refused["reason"] == job.reason and refused["job"] == job.id
    assert not list(spool.glob("jobs/*/results"))

    # Still serving: two CT slices are stored, and refused in turn (too few slices for the rules).
    assert [answer["status"] for answer in send(orthanc, MODALITY_AET, HEAD_FILES[:2])] == [0, 0]
    [_, short] = node.wait_for(lambda: (jobs := node.jobs()) and all(job.state is JobState.REFUSED for job in jobs)
                               and len(jobs) == 2 and jobs, "the second refusal", 90)
    assert "2 slices < 10" in short.reason, short.reason
    assert orthanc.instance_count() == 0  # nothing reached the PACS
    assert node.alive()
    assert_no_patient_data(spool, mr[0])

    # Retention: after a restart both refused studies are gone from the spool; their instances stay known, so the
    # MR sent again is answered success and makes no new job.
    assert node.stop() == 0
    node = NodeProcess(spool, arguments, orthanc.namespace).start()
    nodes.append(node)
    node.wait_for(lambda: not list(spool.glob("incoming/*/*.dcm")) and not list(spool.glob("jobs/*")), "clean-up", 30)
    cleaned = [event for event in read_audit(spool / "logs") if event["event"] == "cleaned"]
    assert sorted(event["instances_removed"] for event in cleaned) == [2, len(mr)]
    assert [answer["status"] for answer in send(orthanc, MODALITY_AET, mr)] == [0] * len(mr)
    node.wait_for(lambda: [event for event in read_audit(spool / "logs") if event["event"] == "association"
                           and event["duplicates"] == len(mr) and event["stored"] == 0], "the duplicates' record", 30)
    assert len(node.jobs()) == 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(port: int) -> tuple[int, dict]:
    """GET /health of a node: HTTP status and document."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


METRICS_GET = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read()" \
    ".decode())"


def scrape(port: int, orthanc: Orthanc | None = None) -> dict[tuple[str, tuple], float]:
    """GET /metrics of a node (in the PACS's namespace when given), parsed by prometheus_client's own parser:
    {(sample name, sorted labels): value}."""
    parser = require_module("prometheus_client.parser", "the node's metrics are read with prometheus-client")
    command = [sys.executable, "-c", METRICS_GET, f"http://127.0.0.1:{port}/metrics"]
    result = orthanc.run(command, timeout=30) if orthanc is not None else subprocess.run(
        command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in parser.text_string_to_metric_families(result.stdout) for sample in family.samples}


def test_a_study_larger_than_the_quota_is_refused_and_a_full_spool_answers_out_of_resources_and_reports_unhealthy(
        tmp_path, nodes):
    spool, port = tmp_path / "spool", free_port()
    quota_mb = 0.3  # about 32 slices of the head CT
    quota = int(quota_mb * 2**20)
    health_port = free_port()
    # No study is complete here (quiet_seconds 600): what fills the spool stays in it.
    config = node_config(tmp_path, host="127.0.0.1", spool_quota_mb=quota_mb, quiet_seconds=600, min_free_mb=0,
                         health_port=health_port)
    node = dead_pacs_node(spool, config, port).start()
    nodes.append(node)
    code, document = health(health_port)
    assert code == 200 and document["ok"] is True and document["reason"] is None

    # A study that fills the quota alone can never be processed: refused for good, its instances out of the spool.
    statuses = [answer["status"] for answer in send(None, MODALITY_AET, HEAD_FILES, port=port)]
    stored = statuses.count(0)
    assert 20 < stored < 93 and statuses == [0] * stored + [0xA700] * (93 - stored)
    [job] = node.jobs()
    assert job.state is JobState.REFUSED and "larger than the spool's quota" in job.reason, job
    assert list(spool.glob("incoming/*/*.dcm")) == []
    code, document = health(health_port)
    assert code == 200, document  # room again
    status = node.status()
    assert status["counts"]["refused"] == 1 and status["errors"][0]["reason"] == job.reason
    assert status["received"]["in_spool_bytes"] == 0
    [refused] = [event for event in read_audit(spool / "logs") if event["event"] == "refused"]
    assert refused["stage"] == "receiving" and refused["instances_removed"] == stored and refused["job"] == job.id
    # Sent again: refused at once, nothing stored, no new job.
    assert [answer["status"] for answer in send(None, MODALITY_AET, HEAD_FILES[:3], port=port)] == [0xA700] * 3
    assert len(node.jobs()) == 1

    # Backpressure: two studies that fit one by one fill the spool together; the second waits for room.
    first = reidentified_copy(tmp_path / "first")[:25]
    assert [answer["status"] for answer in send(None, MODALITY_AET, first, port=port)] == [0] * 25
    second = reidentified_copy(tmp_path / "second")
    statuses = [answer["status"] for answer in send(None, MODALITY_AET, second, port=port)]
    taken = statuses.count(0)
    assert 0 < taken < 93 - 25 and statuses == [0] * taken + [0xA700] * (93 - taken)
    # Instances are taken until the spool holds the quota: the one that reached it was the last stored.
    sizes = [path.stat().st_size for path in spool.glob("incoming/*/*.dcm")]
    assert len(sizes) == 25 + taken and sum(sizes) - max(sizes) < quota <= sum(sizes)
    [answer] = send(None, MODALITY_AET, second[-1:], port=port)
    assert answer == {"rejected": True, "result": 2, "source": 3, "reason": 1}  # transient: temporary congestion
    assert [(job.state, job.instances) for job in node.jobs()[1:]] == [(JobState.RECEIVED, 25),
                                                                       (JobState.RECEIVED, taken)]
    code, document = health(health_port)
    assert code == 503 and document["reason"].startswith("spool full") and document["jobs"]["received"] == 2
    events = node.wait_for(lambda: (events := read_audit(spool / "logs")) and "association-refused" in
                           [event["event"] for event in events] and events, "the rejection's record", 30)
    assert [event["refused"] for event in events if event["event"] == "association"] == [93 - stored, 3, 0,
                                                                                          93 - taken]
    assert [event["reason"][:10] for event in events if event["event"] == "association-refused"] == ["spool full"]
    metrics = scrape(health_port)
    assert metrics[("ctfm_node_instances_received_total", (("outcome", "new"),))] == stored + 25 + taken
    assert metrics[("ctfm_node_instances_received_total", (("outcome", "refused"),))] == 93 - stored + 3 + 93 - taken
    assert metrics[("ctfm_node_associations_accepted_total", ())] == 4
    assert metrics[("ctfm_node_associations_rejected_total", (("reason", "spool_full"),))] == 1
    assert metrics[("ctfm_node_spool_bytes", ())] == sum(sizes)
    assert metrics[("ctfm_node_spool_quota_bytes", ())] == quota
    assert metrics[("ctfm_node_jobs", (("state", "received"),))] == 2
    assert metrics[("ctfm_node_jobs", (("state", "refused"),))] == 1
    assert node.stop() == 0
    assert node.status()["node"]["running"] is False


def test_the_metrics_count_what_the_node_did_with_a_real_study(orthanc, tmp_path, nodes):
    spool, health_port = tmp_path / "spool", 9464
    config = node_config(tmp_path, queue_on_release=True, quiet_seconds=600, health_port=health_port,
                         delivery_retry_seconds=1)
    node = NodeProcess(spool, ["--config", str(config), "--ae-title", NODE_AET, "--port", str(NODE_PORT), "--pacs",
                               orthanc.dimse_url, "--allow-ae", MODALITY_AET], orthanc.namespace).start()
    nodes.append(node)
    before = scrape(health_port, orthanc)
    assert before[("ctfm_node_instances_received_total", (("outcome", "new"),))] == 0
    assert ("ctfm_node_spool_quota_bytes", ()) not in before  # no quota set

    [answer] = send(orthanc, "STRANGER", HEAD_FILES[:1])
    assert answer["rejected"] is True
    [answer] = send(orthanc, MODALITY_AET, HEAD_FILES[:1], called="SOMEONE")
    assert answer["rejected"] is True
    assert [answer["status"] for answer in send(orthanc, MODALITY_AET, HEAD_FILES)] == [0] * 93
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.DELIVERED], "a delivery", 120)
    assert [answer["status"] for answer in send(orthanc, MODALITY_AET, HEAD_FILES[:5])] == [0] * 5  # duplicates
    node.wait_for(lambda: [event for event in read_audit(spool / "logs") if event["event"] == "association"
                           and event["duplicates"] == 5], "the duplicates' record", 30)

    metrics = scrape(health_port, orthanc)
    received = {outcome: metrics[("ctfm_node_instances_received_total", (("outcome", outcome),))]
                for outcome in ("new", "duplicate", "refused")}
    assert received == {"new": 93, "duplicate": 5, "refused": 0}
    assert metrics[("ctfm_node_associations_accepted_total", ())] == 2
    rejected = {reason: metrics[("ctfm_node_associations_rejected_total", (("reason", reason),))]
                for reason in ("calling_ae", "called_ae", "spool_full")}
    assert rejected == {"calling_ae": 1, "called_ae": 1, "spool_full": 0}
    jobs = {labels[0][1]: value for (name, labels), value in metrics.items() if name == "ctfm_node_jobs"}
    assert jobs == {state.value: int(state is JobState.DELIVERED) for state in JobState}
    # One run, ended with results to send (sending), as long as the run the audit trail timed; one delivery.
    [processed] = [event for event in read_audit(spool / "logs") if event["event"] == "processed"]
    assert metrics[("ctfm_node_job_run_seconds_count", (("outcome", "sending"),))] == 1
    assert processed["seconds"] - 0.1 <= metrics[("ctfm_node_job_run_seconds_sum", (("outcome", "sending"),))] \
        <= processed["seconds"] + 5
    assert metrics[("ctfm_node_delivery_seconds_count", (("outcome", "delivered"),))] == 1
    assert 0 < metrics[("ctfm_node_delivery_seconds_sum", (("outcome", "delivered"),))] <= job.delivered - \
        job.finished + 1
    assert metrics[("ctfm_node_spool_bytes", ())] == sum(path.stat().st_size for path in spool.glob("incoming/*/*"))
    assert metrics[("ctfm_node_spool_free_bytes", ())] > 0
    assert node.stop() == 0


def test_the_queue_takes_an_instance_once_reopens_a_queued_study_and_requeues_what_a_dead_node_ran(tmp_path):
    queue = JobQueue(tmp_path / "queue.sqlite")
    first = queue.record_instance(study_key="s1", sop_key="a", file="incoming/s1/a.dcm", size=10, calling_ae="M",
                                  now=100.0)
    again = queue.record_instance(study_key="s1", sop_key="a", file="incoming/s1/a.dcm", size=10, calling_ae="M",
                                  now=101.0)
    assert first.new_job and not first.duplicate and again.duplicate and again.job_id == first.job_id
    assert queue.queue_quiet(5.0, now=104.0) == ([], [])
    [queued], [] = queue.queue_quiet(5.0, now=105.0)
    assert queued.state is JobState.QUEUED and queued.instances == 1
    # One more slice before a worker took it: the same job, receiving again, with its quiet period restarted.
    late = queue.record_instance(study_key="s1", sop_key="b", file="incoming/s1/b.dcm", size=10, calling_ae="M",
                                 now=106.0)
    assert late.job_id == first.job_id and queue.job(first.job_id).state is JobState.RECEIVED
    assert queue.queue_quiet(5.0, now=110.0) == ([], [])
    queue.queue_quiet(5.0, now=111.0)
    job, files = queue.claim(now=112.0)
    assert job.state is JobState.RUNNING and files == ["incoming/s1/a.dcm", "incoming/s1/b.dcm"]
    # Instances arriving while it runs open a new job; it will see the whole study.
    newer = queue.record_instance(study_key="s1", sop_key="c", file="incoming/s1/c.dcm", size=10, calling_ae="M",
                                  now=113.0)
    assert newer.new_job and newer.job_id != job.id
    # The node died: the running job is queued again, its attempt not counted against it.
    [requeued] = JobQueue(tmp_path / "queue.sqlite").requeue_interrupted("stopped")
    assert requeued.id == job.id and requeued.state is JobState.QUEUED
    assert requeued.interruptions == 1 and requeued.attempts == 0
    assert requeued.queued == 111.0  # still complete since then: the turnaround in status counts the lost run
    assert queue.counts() == {"received": 1, "queued": 1, "running": 0, "sending": 0, "delivered": 0,
                              "refused": 0, "failed": 0}
    # Instances refused for want of room: their study is refused at its quiet period unless they came again.
    queue.record_instance(study_key="s2", sop_key="x", file="incoming/s2/x.dcm", size=10, calling_ae="M", now=200.0)
    queue.note_missing("s2", "y", now=200.5)
    queue.note_missing("s2", "x", now=200.5)  # stored already: not missing
    queue.record_instance(study_key="s3", sop_key="p", file="incoming/s3/p.dcm", size=10, calling_ae="M", now=200.0)
    queue.note_missing("s3", "q", now=200.5)
    queue.record_instance(study_key="s3", sop_key="q", file="incoming/s3/q.dcm", size=10, calling_ae="M", now=201.0)
    queued, [incomplete] = queue.queue_quiet(5.0, now=210.0)
    assert incomplete.study_key == "s2" and incomplete.state is JobState.REFUSED
    assert incomplete.reason.startswith("the study is incomplete: 1 of its instances were refused")
    assert {job.study_key for job in queued} == {"s1", "s3"}  # s3's refused instance came again
    # The operator's requeue: results the PACS refused are delivered again, not made again; nothing on its way
    # or delivered is requeued.
    queue.claim(now=120.0)
    queue.finish(job.id, JobState.FAILED, reason="the PACS refused ctfm-seg.dcm", now=121.0)
    assert queue.requeue(job.id, has_results=True, reason="by hand", now=130.0).state is JobState.SENDING
    assert [item.id for item in queue.delivery_due(now=130.0)] == [job.id]
    queue.finish(job.id, JobState.DELIVERED, now=131.0)
    with pytest.raises(ValueError, match="is delivered"):
        queue.requeue(job.id, has_results=True, reason="by hand")
    with pytest.raises(KeyError):
        queue.requeue(99, has_results=False, reason="by hand")


def test_the_example_settings_load_and_a_bad_setting_is_refused_naming_it(tmp_path):
    from deploy_app.node.config import load_config

    example = load_config(REPOSITORY / "deploy_app" / "node" / "node.example.toml", {"port": 4242})
    assert example.port == 4242 and example.allow_ae == ("PACS",) and example.retention_hours == 168
    bad = node_config(tmp_path, ae_title=NODE_AET, port=NODE_PORT, spool="spool", pacs="dicom://PACS@127.0.0.1:104",
                      quiet_second=5)
    result = subprocess.run([DEPLOY_PYTHON, "-m", "deploy_app", "serve", "--config", bad], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2 and "unknown setting(s) quiet_second" in result.stderr, result.stderr
    assert not (tmp_path / "spool").exists()


LOG_FLOOD = """
import logging, sys
from pathlib import Path
from deploy_app.node.config import NodeConfig
from deploy_app.node.service import configure_logging
folder = Path(sys.argv[1])
config = NodeConfig(ae_title="CTFM", port=11112, spool=folder, pacs="dicom://PACS@127.0.0.1:104", log_max_mb=0.01,
                    log_backups=2)
configure_logging(folder, config)
for number in range(2000):
    logging.getLogger("deploy_app.node").info("job %d queued: 93 instance(s), no new instance for 30 s", number)
"""


def test_the_node_log_rotates_at_log_max_mb_keeping_log_backups_files(tmp_path):
    result = subprocess.run([sys.executable, "-c", LOG_FLOOD, tmp_path], capture_output=True, text=True, timeout=60,
                            cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr[-2000:]
    logs = sorted(path.name for path in tmp_path.glob("node.log*"))
    assert logs == ["node.log", "node.log.1", "node.log.2"], logs
    assert all(path.stat().st_size <= 0.01 * 2**20 for path in tmp_path.glob("node.log*"))
    assert "job 1999 queued" in (tmp_path / "node.log").read_text()
