"""The DICOM node in a container: the MAP image `make map` builds, started by deploy_app/scripts/run_node.sh (podman,
runc, cgroupfs, the host's network), its spool a mounted folder, its model the image's bundled demonstration model.

A modality on the host C-ECHOes it and sends the real slicer_head_64x64 series (re-identified) with
queue_on_release; the node in the container runs the deploy app on it; the PACS it is told of is a port where
nothing listens, so the job ends `sending` with the DICOM-SEG and the measurement SR waiting in jobs/N/results.
`podman stop` (SIGTERM) ends the node cleanly and leaves no container behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from conftest import SHIPPED_SEG, deploy_python
from test_map import IMAGE, PODMAN
from test_node import MODALITY_AET, NODE_AET, free_port, reidentified_copy, send

REPOSITORY = Path(__file__).resolve().parents[1]
RUN_NODE = REPOSITORY / "deploy_app" / "scripts" / "run_node.sh"
IMAGE_USER = (1000, 1000)  # holoscan, the image's own user

ECHO = """
import sys
from pynetdicom import AE
ae = AE(ae_title=sys.argv[1])
ae.add_requested_context("1.2.840.10008.1.1")
association = ae.associate("127.0.0.1", int(sys.argv[2]), ae_title=sys.argv[3])
if not association.is_established:
    sys.exit(1)
status = association.send_c_echo()
association.release()
sys.exit(0 if status and status.Status == 0 else 1)
"""


def echoes(port: int) -> bool:
    return subprocess.run([sys.executable, "-c", ECHO, MODALITY_AET, str(port), NODE_AET], capture_output=True,
                          timeout=30).returncode == 0


def containers(name: str) -> list[str]:
    return subprocess.run([*PODMAN, "ps", "-a", "--filter", f"name=^{name}$", "--format", "{{.Names}}"],
                          capture_output=True, text=True, timeout=60, check=True).stdout.split()


def status_in_container(name: str) -> dict:
    """`status --spool --json` run by the image's entrypoint inside the running node's container."""
    result = subprocess.run([*PODMAN, "exec", name, "/var/holoscan/tools", "status", "--spool", "/var/holoscan/spool",
                             "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_the_node_in_the_map_image_answers_echo_processes_a_real_study_and_stops_cleanly(tmp_path):
    spool, dead_pacs, port = tmp_path / "spool", free_port(), free_port()
    spool.mkdir()
    os.chown(spool, *IMAGE_USER)
    config = tmp_path / "node.toml"
    config.write_text("queue_on_release = true\nquiet_seconds = 600\ndelivery_retry_seconds = 60\n")
    name = f"ctfm-node-test-{os.getpid()}"
    log = tmp_path / "container.log"
    environment = {**os.environ, "NODE_NAME": name, "NODE_CONFIG": str(config), "CTFM_BACKEND": "torch"}
    started = time.monotonic()
    with log.open("wb") as stream:
        node = subprocess.Popen([RUN_NODE, IMAGE, spool, "--", "--ae-title", NODE_AET, "--port", str(port),
                                 "--pacs", f"dicom://PACS@127.0.0.1:{dead_pacs}"], stdout=stream,
                                stderr=subprocess.STDOUT, env=environment)
    try:
        while not echoes(port):
            assert node.poll() is None, f"the container exited with {node.returncode}:\n{log.read_text()}"
            assert time.monotonic() - started < 60, f"no C-ECHO answer within 60 s:\n{log.read_text()}"
            time.sleep(0.3)
        print(f"container start to C-ECHO answered: {time.monotonic() - started:.1f} s")

        answers = send(None, MODALITY_AET, reidentified_copy(tmp_path / "study"), port=port)
        assert len(answers) == 93 and {answer.get("status") for answer in answers} == {0}
        received = time.monotonic()
        deadline = received + 120
        while True:
            document = status_in_container(name)
            # "sending" is entered before the first delivery attempt; the reason comes with that attempt.
            tried = [job for job in document["active"] if job["state"] == "sending" and job["reason"]]
            if tried or document["counts"]["failed"] or time.monotonic() > deadline:
                break
            assert node.poll() is None, f"the container exited with {node.returncode}:\n{log.read_text()}"
            time.sleep(1)
        print(f"study received to processed: {time.monotonic() - received:.1f} s")
        assert document["node"]["running"] is True
        [job] = document["active"]
        assert job["state"] == "sending", (job, log.read_text())
        assert f"127.0.0.1:{dead_pacs}" in job["reason"]
        assert (job["model"]["name"], job["model"]["demonstration"]) == (SHIPPED_SEG.name, True)
        results = spool / "jobs" / str(job["id"]) / "results"
        assert job["outputs"] == ["ctfm-measurements-sr.dcm", "ctfm-seg.dcm"]
        assert {"ctfm-measurements-sr.dcm", "ctfm-seg.dcm", "ctfm-results.json"} <= {p.name for p in results.iterdir()}
        assert {(path.stat().st_uid, path.stat().st_gid) for path in results.iterdir()} == {IMAGE_USER}  # who ran it
        seg, sr = (pydicom.dcmread(results / name) for name in ("ctfm-seg.dcm", "ctfm-measurements-sr.dcm"))
        assert seg.Modality == "SEG" and sr.Modality == "SR" and seg.pixel_array.any()
        assert seg.StudyInstanceUID == sr.StudyInstanceUID
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == SHIPPED_SEG.name and "demonstration=true" in algorithm.AlgorithmParameters

        # The same status from the host, read from the mounted spool with the deploy environment's Python.
        host = subprocess.run([deploy_python(), "-m", "deploy_app", "status", "--spool", spool, "--json"],
                              capture_output=True, text=True, timeout=60, cwd=REPOSITORY)
        assert host.returncode == 0, host.stderr
        # Running, seen from the host although the node's process ids are the container's: it holds the spool's lock.
        assert json.loads(host.stdout)["counts"]["sending"] == 1 and json.loads(host.stdout)["node"]["running"]

        stopped = subprocess.run([*PODMAN, "stop", "-t", "40", name], capture_output=True, text=True, timeout=90)
        assert stopped.returncode == 0, stopped.stderr
        assert node.wait(timeout=60) == 0, log.read_text()
        assert "stopped (0 running job(s) queued again)" in log.read_text()
        assert containers(name) == []
    finally:
        if node.poll() is None:
            subprocess.run([*PODMAN, "rm", "-f", "-t", "5", name], capture_output=True, timeout=60)
            node.wait(timeout=60)
