"""The DICOM node dispatching its jobs to a real Ray cluster (`serve --ray-address`): a Ray head started here by
`ray start --head` with the deploy environment's Python, token authentication on, its own temporary folder, torn
down by killing its session only (never `ray stop`, which would end every Ray cluster of this machine).  The node
ships its code with each task; the workers' deploy app imports that copy.

The real head CT goes to the node over DICOM; its job runs as a Ray task; the node stopped (SIGTERM) or killed
(kill -9) while the task runs leaves no deploy app running on the cluster, and the restarted node runs the job again
and delivers its DICOM-SEG and SR to a real Orthanc once (cluster, node and modality in Orthanc's network
namespace).  Also: the job timeout cancels the task, a model folder the workers lack fails the job naming it, and
an unreachable cluster stops `serve` at start.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from conftest import SHIPPED_SEG, deploy_python, require
from orthanc import Orthanc, running_orthanc
from test_node import (
    HEAD_FILES,
    MODALITY_AET,
    NODE_AET,
    NODE_PORT,
    REPOSITORY,
    NodeProcess,
    dead_pacs_node,
    free_port,
    node_config,
    orthanc_file,
    orthanc_series,
    send,
)

from deploy_app.node.audit import read_audit
from deploy_app.node.dispatch import SCRATCH_PREFIX
from deploy_app.node.queue import JobQueue, JobState

DEPLOY_PYTHON = deploy_python()
RAY = DEPLOY_PYTHON.parent / "ray"
require(RAY.is_file(), f"the node's Ray dispatch needs ray in the deploy environment ({RAY} is missing)")


class RayHead:
    """`ray start --head --block` in a session of its own; every process of that session is its cluster's."""

    def __init__(self, folder: Path, namespace: str | None = None) -> None:
        self.port = free_port()
        self.folder = folder
        self.output = folder / "head.log"
        self.token = folder / "token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.scratch = folder / "tmp"  # the workers' temporary folder: the jobs' scratch folders go there
        self.scratch.mkdir()
        environment = {**os.environ, **self.client_environment, "CTFM_CACHE": str(folder / "cache"),
                       "HF_HUB_OFFLINE": "1", "TMPDIR": str(self.scratch)}
        prefix = ["nsenter", f"--net={namespace}"] if namespace else []
        command = [*prefix, str(RAY), "start", "--head", "--port", str(self.port), "--temp-dir", str(folder / "ray"),
                   "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--block"]
        with self.output.open("wb") as stream:
            self.process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=environment,
                                            start_new_session=True)
        try:
            wait_until(lambda: "Ray runtime started" in self.output.read_text(errors="replace")
                       or self.process.poll() is not None, "Ray head", 90)
            assert self.process.poll() is None, f"ray start exited with {self.process.returncode}:\n{self.log()}"
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_environment(self) -> dict[str, str]:
        """What a driver (the node) needs to be let in: the cluster's token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token)}

    def processes(self) -> dict[int, bytes]:
        """{pid: command line} of every process of the cluster (its session)."""
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[3]) == self.process.pid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
        return found

    def node_id(self) -> str:
        """The head's Ray node id, from its raylet's command line."""
        for command in self.processes().values():
            for argument in command.split(b"\0"):
                if argument.startswith(b"--node_id="):
                    return argument.split(b"=", 1)[1].decode()
        raise AssertionError(f"no raylet in the Ray head's session:\n{self.log()}")

    def deploy_apps(self) -> list[int]:
        """Process ids of deploy apps the cluster's workers run."""
        return [pid for pid, command in self.processes().items() if b"deploy_app\0-i\0" in command]

    def stop(self) -> None:
        """SIGKILL every process of the cluster's session (workers have process groups of their own)."""
        for _ in range(3):
            for pid in self.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        self.process.wait(timeout=30)

    def log(self) -> str:
        return "\n".join(self.output.read_text(errors="replace").splitlines()[-30:])


@pytest.fixture
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc-ray")) as server:
        yield server


@contextmanager
def ray_cluster(namespace: str | None = None) -> Iterator[RayHead]:
    """A one-machine Ray cluster (in a network namespace when given), torn down whatever happens."""
    # A short folder: Ray's socket paths under it must stay within the 107 characters of a Unix socket name.
    folder = Path(tempfile.mkdtemp(prefix="ctfm-ray-"))
    head = None
    try:
        head = RayHead(folder, namespace)
        yield head
    finally:
        if head is not None:
            head.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    with ray_cluster() as head:
        yield head


@pytest.fixture
def ray_client(ray_head: RayHead, monkeypatch: pytest.MonkeyPatch) -> RayHead:
    """The Ray head, with its token where the nodes this test starts (our children) find it."""
    for name, value in ray_head.client_environment.items():
        monkeypatch.setenv(name, value)
    return ray_head


def test_a_study_runs_as_a_ray_task_is_run_again_after_the_node_was_stopped_or_killed_and_its_results_come_once(
        pacs, tmp_path, nodes, monkeypatch):
    orthanc = pacs
    # The cluster, the node and the modality share Orthanc's network namespace: everyone reaches everyone there.
    with ray_cluster(orthanc.namespace) as head:
        for name, value in head.client_environment.items():
            monkeypatch.setenv(name, value)
        spool = tmp_path / "spool"
        config = node_config(tmp_path, queue_on_release=True, quiet_seconds=600, retry_seconds=1,
                             delivery_retry_seconds=1, ray_num_cpus=1)
        arguments = ["--config", str(config), "--ae-title", NODE_AET, "--port", str(NODE_PORT), "--pacs",
                     orthanc.dimse_url, "--allow-ae", MODALITY_AET, "--ray-address", head.address]
        node = NodeProcess(spool, arguments, orthanc.namespace).start(timeout_s=120)
        nodes.append(node)
        assert node.status()["node"]["ray_address"] == head.address
        assert [answer["status"] for answer in send(orthanc, MODALITY_AET, HEAD_FILES)] == [0] * 93

        # Stopped (SIGTERM) while the task runs: the task is cancelled, its deploy app ends, the job queued again.
        node.wait_for(head.deploy_apps, "a deploy app on the Ray cluster", 120)
        assert not list(spool.glob("jobs/*/attempt-*.log")), "a Ray run's log arrives with its result"
        assert node.stop() == 0
        wait_until(lambda: not head.deploy_apps(), "the cancelled task's deploy app to end", 30)
        [job] = node.jobs()
        assert job.state is JobState.QUEUED and job.interruptions == 1
        assert len(list(head.scratch.glob(SCRATCH_PREFIX + "*"))) == 1  # the killed worker could not remove it

        # Killed (kill -9) while the task runs: Ray ends the dead driver's task; the restarted node runs it again.
        node = NodeProcess(spool, arguments, orthanc.namespace).start(timeout_s=120)
        nodes.append(node)
        node.wait_for(head.deploy_apps, "the deploy app again", 120)
        node.kill()
        wait_until(lambda: not head.deploy_apps(), "the dead node's deploy app to end", 60)
        node = NodeProcess(spool, arguments, orthanc.namespace).start(timeout_s=120)
        nodes.append(node)
        [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.DELIVERED], "a delivery",
                              240)
        assert job.interruptions == 2 and job.attempts == 1, job
        assert sorted(item["file"] for item in job.outputs) == ["ctfm-measurements-sr.dcm", "ctfm-seg.dcm"]
        ray_node = head.node_id()
        scratch_left = list(head.scratch.glob(SCRATCH_PREFIX + "*"))
        assert node.stop() == 0

    # In the PACS, once: one SEG and one SR of the head CT's study, the SEG made from all 93 slices.
    held = orthanc_series(orthanc)
    assert sorted(series["modality"] for series in held) == ["SEG", "SR"], held
    assert orthanc.instance_count() == 2
    seg = pydicom.dcmread(orthanc_file(orthanc, next(s["id"] for s in held if s["modality"] == "SEG"), tmp_path))
    source = pydicom.dcmread(HEAD_FILES[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.pixel_array.any()
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 93

    events = read_audit(spool / "logs")
    [processed] = [event for event in events if event["event"] == "processed"]
    assert processed["ran_on"] == f"ray:{ray_node}" and processed["instances"] == 93
    assert [event["event"] for event in events].count("delivered") == 1
    started = [event for event in events if event["event"] == "node-started"]
    assert [event["ray_address"] for event in started] == [head.address] * 3
    assert [event["interrupted_requeued"] for event in started] == [0, 0, 1]
    # The scratch folders of cancelled tasks were removed by the tasks that ran after them.
    assert scratch_left == []


def test_a_ray_task_past_the_job_timeout_is_cancelled_and_the_job_fails_saying_so(ray_client, tmp_path, nodes):
    head = ray_client
    spool, port = tmp_path / "spool", free_port()
    config = node_config(tmp_path, host="127.0.0.1", queue_on_release=True, quiet_seconds=600, max_attempts=1,
                         job_timeout_minutes=0.1)
    node = dead_pacs_node(spool, config, port, "--ray-address", head.address).start(120)
    nodes.append(node)
    assert [answer["status"] for answer in send(None, MODALITY_AET, HEAD_FILES, port=port)] == [0] * 93
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.FAILED], "the timeout", 90)
    assert job.reason == "the deploy app took longer than 0.1 min and was stopped" and job.next_try is None
    wait_until(lambda: not head.deploy_apps(), "the cancelled task's deploy app to end", 30)
    [failed] = [event for event in read_audit(spool / "logs") if event["event"] == "failed"]
    assert failed["reason"] == job.reason and failed["ran_on"] == "ray"
    assert not (spool / "jobs" / str(job.id) / "results").exists()
    assert node.stop() == 0


def test_a_model_folder_the_ray_workers_lack_fails_the_job_naming_the_folder_and_the_worker(ray_client, tmp_path):
    head = ray_client
    spool, port = tmp_path / "spool", free_port()
    # The node alone sees the model: its folder is in a file system mounted in the node's own mount namespace.
    mount = tmp_path / "node-only"
    mount.mkdir()
    model = mount / SHIPPED_SEG.name
    config = node_config(tmp_path, host="127.0.0.1", queue_on_release=True, quiet_seconds=600, model=str(model))
    script = f'mount -t tmpfs tmpfs "{mount}" && cp -r "{SHIPPED_SEG}" "{model}" && exec "$@"'
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(DEPLOY_PYTHON), "-m",
               "deploy_app", "serve", "--config", str(config), "--ae-title", NODE_AET, "--port", str(port),
               "--spool", str(spool), "--pacs", f"dicom://PACS@127.0.0.1:{free_port()}", "--ray-address",
               head.address]
    output = tmp_path / "node.log"
    with output.open("wb") as stream:
        node = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, cwd=REPOSITORY)
    try:
        wait_until(lambda: (spool / "node.json").is_file() or node.poll() is not None, "the node", 120)
        assert node.poll() is None, output.read_text()
        assert not model.exists()  # not here, nor on the cluster's workers
        assert [answer["status"] for answer in send(None, MODALITY_AET, HEAD_FILES, port=port)] == [0] * 93
        [job] = wait_for_failure(spool)
        assert job.reason == (f"the model cannot be used: the model folder {model} is not on the Ray worker "
                              f"{socket.gethostname()}: put it on storage every worker mounts at the same path, or "
                              "in the workers' image"), job.reason
        assert job.next_try is None
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            code = node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
            code = node.wait(timeout=30)
    assert code == 0, output.read_text()


def wait_for_failure(spool: Path) -> list:
    """The failed jobs of the node on ``spool``, once there is one."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        queue = JobQueue(spool / "queue.sqlite", read_only=True)
        try:
            failed = queue.jobs(JobState.FAILED)
        finally:
            queue.close()
        if failed:
            return failed
        time.sleep(0.3)
    raise AssertionError("no failed job within 90 s")


def test_an_unreachable_ray_cluster_stops_serve_with_exit_2_naming_the_address(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    result = subprocess.run([DEPLOY_PYTHON, "-m", "deploy_app", "serve", "--ae-title", NODE_AET, "--port",
                             str(free_port()), "--spool", tmp_path / "spool", "--pacs", "dicom://PACS@127.0.0.1:104",
                             "--ray-address", address], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("deploy_app: error: ")]
    assert line.startswith(f"deploy_app: error: cannot reach the Ray cluster at {address}: "), result.stderr


def wait_until(condition, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.3)
