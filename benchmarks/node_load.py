"""The DICOM node (``python -m deploy_app serve``) under load, end to end: studies from several modalities at once,
processed by the deploy app and delivered to a real Orthanc PACS.

``--studies`` copies of the real head CT (slicer_head_64x64, 93 instances, re-identified with fresh Study/Series/SOP
Instance UIDs per copy) are sent by ``--senders`` pynetdicom modalities at once (each sends its share one study per
association, one after the other).  The node (``--workers`` deploy apps at a time, a study complete when its sender
releases the association) and the Orthanc run as the tests run them (tests/orthanc.py: Orthanc in a network namespace
of its own; tests/test_node.py's NodeProcess and send), the deploy app with PyTorch (CTFM_BACKEND=torch) and the
shipped demonstration model.  Checked: every study delivered exactly once (one job, one run, one SEG and one SR per
study in the PACS).  Printed: throughput (studies/hour, from the first instance received to the last result stored
in the PACS), latency from a study's last instance received to its results stored in the PACS (p50/p95), and where
that time goes: waiting for a worker, the deploy app's own run (its child process, start-up included), and the
node's own overhead (everything else: scheduling, the input snapshot, publishing the results, delivery).

    .venv/bin/python benchmarks/node_load.py [--studies 20] [--senders 4] [--workers 1]   # root (the namespace)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
# The repository first: the script's own folder holds a benchmarks/deploy_app.py that would hide the package.
sys.path[:0] = [str(REPOSITORY), str(REPOSITORY / "tests")]

from node_receive import write_studies  # noqa: E402
from orthanc import running_orthanc  # noqa: E402
from test_node import NODE_AET, NODE_PORT, NodeProcess, node_config, send  # noqa: E402

from deploy_app.node.audit import read_audit  # noqa: E402
from deploy_app.node.queue import JobQueue, JobState  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="studies in all (20)")
    parser.add_argument("--senders", type=int, default=4, help="modalities sending at once (4)")
    parser.add_argument("--workers", type=int, default=1, help="the node's workers (1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for every delivery (1800)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ctfm-node-load-") as temporary:
        work = Path(temporary)
        os.environ.update(CTFM_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", CTFM_BACKEND="torch")
        folders = write_studies(options.studies, work / "studies")
        senders = [f"MODALITY{number}" for number in range(1, options.senders + 1)]
        with running_orthanc(work / "orthanc") as orthanc:
            spool = work / "spool"
            config = node_config(work, queue_on_release=True, quiet_seconds=600, workers=options.workers,
                                 delivery_retry_seconds=1, allow_ae=senders)
            node = NodeProcess(spool, ["--config", str(config), "--ae-title", NODE_AET, "--port", str(NODE_PORT),
                                       "--pacs", orthanc.dimse_url], orthanc.namespace).start()
            try:
                problems: list[str] = []

                def modality(calling: str, studies: list[Path]) -> None:
                    for folder in studies:
                        answers = send(orthanc, calling, sorted(folder.iterdir()))
                        if [answer.get("status") for answer in answers] != [0] * len(answers) or not answers:
                            problems.append(f"{calling}: {folder.name} not stored whole: {answers[-1:]}")

                started = time.time()
                threads = [threading.Thread(target=modality, args=(calling, folders[index::options.senders]))
                           for index, calling in enumerate(senders)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                sent = time.time()
                if problems:
                    raise SystemExit("\n".join(problems))
                node.wait_for(lambda: len([job for job in node.jobs() if job.state is JobState.DELIVERED])
                              == options.studies, f"{options.studies} deliveries", options.timeout)
                queue = JobQueue(spool / "queue.sqlite", read_only=True)
                jobs = queue.jobs()
                queue.close()
                events = read_audit(spool / "logs")
                held = orthanc.rest("/series?expand")
            finally:
                node.stop()

    # Exactly once: one job per study, run once, one SEG and one SR per study in the PACS.
    assert len(jobs) == options.studies and all(job.attempts == 1 and job.instances == 93 for job in jobs), jobs
    runs = {event["job"]: event["seconds"] for event in events if event["event"] == "processed"}
    assert sorted(runs) == sorted(job.id for job in jobs), runs
    per_study: dict[str, list[str]] = {}
    for series in held:
        per_study.setdefault(series["ParentStudy"], []).append(series["MainDicomTags"].get("Modality"))
    assert len(per_study) == options.studies and all(sorted(kinds) == ["SEG", "SR"] for kinds in
                                                     per_study.values()), per_study
    assert all(len(series["Instances"]) == 1 for series in held)

    first = min(job.created for job in jobs)
    last = max(job.delivered for job in jobs)
    latency = [job.delivered - job.last_received for job in jobs]
    waiting = [job.started - job.queued for job in jobs]
    run = [runs[job.id] for job in jobs]
    overhead = [total - wait - seconds for total, wait, seconds in zip(latency, waiting, run, strict=True)]
    print(f"{options.studies} studies x 93 instances (head CT 64x64), {options.senders} senders at once, "
          f"{options.workers} worker(s), PACS: Orthanc {orthanc.dimse_url.split('@')[0]} (DIMSE), "
          f"{os.cpu_count()} CPU(s)")
    print(f"  sending took {sent - started:.1f} s; all delivered {last - first:.1f} s after the first instance")
    print(f"  throughput: {options.studies / (last - first) * 3600:.0f} studies/hour")
    print(f"  latency, last instance received -> results stored in the PACS: p50 {percentile(latency, 0.5):.1f} s, "
          f"p95 {percentile(latency, 0.95):.1f} s, max {max(latency):.1f} s")
    print(f"  of which waiting for a worker: median {statistics.median(waiting):.1f} s; the deploy app's run: median "
          f"{statistics.median(run):.1f} s (sum {sum(run):.0f} s)")
    print(f"  the node's own overhead per study (latency - waiting - run): median {statistics.median(overhead):.2f} s, "
          f"p95 {percentile(overhead, 0.95):.2f} s = {statistics.median(overhead) / statistics.median(run):.1%} of "
          "the median run")
    busy = sum(run) / (last - first) / options.workers
    print(f"  workers busy with the deploy app {busy:.0%} of the time")


if __name__ == "__main__":
    main()
