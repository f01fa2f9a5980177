"""How fast the DICOM node (``python -m deploy_app serve``) takes studies in, next to a storage SCP that keeps nothing.

Both are pynetdicom SCPs listening on loopback in processes of their own; the same studies (the real head CT,
slicer_head_64x64, 93 instances, re-identified with fresh Study/Series/SOP Instance UIDs per copy) are sent at once,
one dcmtk ``storescu`` (C++, so that the sender is not what is measured) per study.  The node writes each instance to
a temporary file, fsyncs it, renames it, fsyncs the folder and records it in SQLite (synchronous FULL) before it
answers; the null SCP answers at once.  A second send of the same studies measures the duplicate path (answered from
the queue, nothing written).  No study is processed (the quiet period is an hour).

    .venv/bin/python benchmarks/node_receive.py [--studies 8]   # about half a minute on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED = REPOSITORY.parent / "shared" / "data"
HEAD = SHARED / "dicom" / "slicer_head_64x64"
DEPLOY_PYTHON = REPOSITORY / ".venv-deploy" / "bin" / "python"
NULL_SCP = """
import sys
from pynetdicom import AE, StoragePresentationContexts, evt
ae = AE(ae_title="NULL")
ae.maximum_pdu_size = 0
for context in StoragePresentationContexts:
    ae.add_supported_context(context.abstract_syntax)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_studies(count: int, folder: Path) -> list[Path]:
    """``count`` copies of the head CT in folders of their own, each copy with UIDs of its own."""
    source = [pydicom.dcmread(path) for path in sorted(HEAD.glob("*.dcm"))]
    folders = []
    for number in range(count):
        study, series = generate_uid(), generate_uid()
        target = folder / f"study-{number}"
        target.mkdir(parents=True)
        for index, original in enumerate(source):
            dataset = copy.deepcopy(original)
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            dataset.save_as(target / f"{index:03d}.dcm", enforce_file_format=True)
        folders.append(target)
    return folders


def timed_send(port: int, called: str, folders: list[Path]) -> float:
    """Seconds for one dcmtk storescu per study folder, all at once, to send every study."""
    started = time.perf_counter()
    senders = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", called, "+sd", "127.0.0.1", str(port),
                                 str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for folder in folders]
    for sender in senders:
        _, error = sender.communicate(timeout=600)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {error.strip()[-500:]}")
    return time.perf_counter() - started


def wait_listening(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("the server did not listen in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8, help="studies sent at once, one association each (8)")
    options = parser.parse_args()
    if shutil.which("storescu") is None:
        sys.exit("dcmtk's storescu is needed (Debian dcmtk, installed with orthanc)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="ctfm-node-bench-") as temporary:
        folders = write_studies(options.studies, Path(temporary) / "studies")
        files = [path for folder in folders for path in folder.iterdir()]
        instances, megabytes = len(files), sum(path.stat().st_size for path in files) / 2**20

        port = free_port()
        null = subprocess.Popen([sys.executable, "-c", NULL_SCP, str(port)])
        try:
            wait_listening(port, null)
            results["null SCP"] = timed_send(port, "NULL", folders)
        finally:
            null.kill()
            null.wait()

        spool, port = Path(temporary) / "spool", free_port()
        node = subprocess.Popen([str(DEPLOY_PYTHON), "-m", "deploy_app", "serve", "--ae-title", "CTFM", "--port",
                                 str(port), "--spool", str(spool), "--pacs", f"dicom://PACS@127.0.0.1:{free_port()}",
                                 "--quiet-seconds", "3600"], stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, node)
            results["node, new instances"] = timed_send(port, "CTFM", folders)
            results["node, duplicates"] = timed_send(port, "CTFM", folders)
            status = json.loads(subprocess.run([str(DEPLOY_PYTHON), "-m", "deploy_app", "status", "--spool",
                                                str(spool), "--json"], capture_output=True, text=True,
                                               check=True).stdout)
        finally:
            node.terminate()
            node.wait(timeout=60)
    assert status["received"]["instances"] == instances, status["received"]
    assert status["counts"]["received"] == options.studies, status["counts"]

    print(f"{options.studies} studies x {instances // options.studies} instances ({megabytes:.1f} MB), sent at once "
          "by dcmtk storescu over loopback")
    baseline = results["null SCP"]
    for name, seconds in results.items():
        print(f"  {name:20s} {seconds:6.2f} s  {instances / seconds:6.0f} instances/s  {megabytes / seconds:5.1f} MB/s"
              f"  x{seconds / baseline:.2f} the null SCP's time")


if __name__ == "__main__":
    main()
