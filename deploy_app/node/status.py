"""``python -m deploy_app status --spool DIR``: the node's queue by state, its last errors and its throughput, read
from the spool (the queue database, read-only, ``node.json`` and the spool's lock) whether the node runs or not, in
a container or not; and ``requeue``, an operator's "try these again"."""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ctfm_engine.errors import UsageError
from deploy_app.node.audit import AuditLog
from deploy_app.node.queue import JobQueue, JobState
from deploy_app.node.service import LOCK_FILE, PID_FILE
from deploy_app.node.spool import Spool

RECENT_ERRORS = 10
HOUR_S = 3600.0


def node_status(spool_root: Path, *, now: float | None = None) -> dict[str, Any]:
    """The status document of the node whose spool is ``spool_root``.

    Raises
    ------
    UsageError
        ``spool_root`` holds no node queue.
    """
    now = time.time() if now is None else now
    spool = _node_spool(spool_root)
    queue = JobQueue(spool.queue_file, read_only=True)
    try:
        jobs = queue.jobs()
        counts = queue.counts()
        instances, received_bytes = queue.instance_totals()
        spool_bytes = queue.spool_bytes()
    finally:
        queue.close()
    delivered = [job for job in jobs if job.state is JobState.DELIVERED and job.delivered]
    turnaround = [job.delivered - job.queued for job in delivered if job.queued]
    processing = [job.finished - job.started for job in jobs if job.started and job.finished
                  and job.state in (JobState.SENDING, JobState.DELIVERED)]
    errors = sorted((job for job in jobs if job.state in (JobState.REFUSED, JobState.FAILED)
                     or (job.state is JobState.SENDING and job.reason)),
                    key=lambda job: job.finished or job.created, reverse=True)[:RECENT_ERRORS]
    return {
        "spool": str(spool.root),
        "node": _node(spool.root),
        "counts": counts,
        "received": {"instances": instances, "bytes": received_bytes, "in_spool_bytes": spool_bytes},
        "throughput": {
            "delivered_last_hour": sum(now - job.delivered < HOUR_S for job in delivered),
            "delivered_last_24h": sum(now - job.delivered < 24 * HOUR_S for job in delivered),
            "delivered_total": len(delivered),
            "median_seconds_complete_to_delivered": _median(turnaround),
            "median_seconds_processing": _median(processing),
        },
        "active": [_brief(job) for job in jobs if job.state not in (JobState.DELIVERED, JobState.REFUSED,
                                                                    JobState.FAILED)],
        "errors": [_brief(job) for job in errors],
    }


def human_lines(document: dict[str, Any]) -> list[str]:
    """The status document as a few lines for a terminal."""
    node = document["node"]
    if node["running"]:
        where = f"; jobs on the Ray cluster at {node['ray_address']}" if node.get("ray_address") else ""
        lines = [f"node: running (pid {node.get('pid')}, AE {node.get('ae_title')} on port {node.get('port')}, since "
                 f"{_time(node.get('started'))}{where})"]
    else:
        lines = ["node: not running"]
    lines.append("jobs: " + ", ".join(f"{count} {state}" for state, count in document["counts"].items()))
    received = document["received"]
    lines.append(f"received: {received['instances']} instance(s), {received['bytes'] / 2**20:.1f} MB in all; "
                 f"{received['in_spool_bytes'] / 2**20:.1f} MB in the spool")
    speed = document["throughput"]
    median = speed["median_seconds_complete_to_delivered"]
    lines.append(f"throughput: {speed['delivered_last_hour']} study(ies) delivered in the last hour, "
                 f"{speed['delivered_last_24h']} in 24 h, {speed['delivered_total']} in all"
                 + (f"; median {median:.0f} s from complete to delivered" if median is not None else ""))
    for job in document["active"]:
        lines.append(f"  job {job['id']} {job['state']}: {job['instances']} instance(s) from {job['calling_ae']}"
                     + (f"; {job['reason']}" if job["reason"] else ""))
    if document["errors"]:
        lines.append("last errors:")
        for job in document["errors"]:
            retry = f" (next try {_time(job['next_try'])})" if job["next_try"] else ""
            lines.append(f"  job {job['id']} {job['state']} {_time(job['finished'])}{retry}: {job['reason']}")
    return lines


def requeue_jobs(spool_root: Path, job_ids: list[int], *, every_failed: bool = False) -> list[str]:
    """Requeue ``job_ids`` (and every failed job with ``every_failed``) of the node whose spool is ``spool_root``
    (see :meth:`JobQueue.requeue`); one line per job saying what will happen.  A running node takes them up within
    a second; a stopped one at its next start.  Each is recorded in the audit log (``requeued``).

    Raises
    ------
    UsageError
        No queue in ``spool_root``, no job named, a job that does not exist or cannot be requeued.
    """
    spool = _node_spool(spool_root)
    queue = JobQueue(spool.queue_file)
    audit = AuditLog(spool.logs)
    try:
        chosen = list(dict.fromkeys([*job_ids, *(job.id for job in queue.jobs(JobState.FAILED) if every_failed)]))
        if not chosen:
            raise UsageError("no job to requeue: give job numbers (as `status` lists them) or --failed")
        lines = []
        for job_id in chosen:
            try:
                before = queue.job(job_id)
                has_results = (spool.results_folder(job_id) / "outbox.json").is_file()
                job = queue.requeue(job_id, has_results=has_results, reason="requeued by the operator")
            except (KeyError, ValueError) as error:
                raise UsageError(f"{spool_root}: {str(error).strip(chr(39))}") from None
            audit.record("requeued", job=job_id, study=job.study_key, was=before.state.value, now=job.state.value,
                         previous_reason=before.reason)
            what = "delivered again" if job.state is JobState.SENDING else "run again"
            lines.append(f"job {job_id}: {before.state.value} -> {job.state.value} (will be {what})")
        return lines
    finally:
        queue.close()


def _node_spool(spool_root: Path) -> Spool:
    """The spool at ``spool_root``; UsageError when it holds no node queue."""
    spool = Spool(spool_root)
    if not spool.queue_file.is_file():
        raise UsageError(f"{spool_root}: holds no node queue ({spool.queue_file.name}); give the --spool folder of "
                         "a node that has run")
    return spool


def _node(root: Path) -> dict[str, Any]:
    try:
        document = json.loads((root / PID_FILE).read_text())
    except (OSError, ValueError):
        document = {}
    return {**document, "running": _serving(root)}


def _serving(root: Path) -> bool:
    """A node holds this spool's lock: true for a node in a container too (its process ids are not ours)."""
    try:
        descriptor = os.open(root / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # closing releases a shared lock taken here
    return False


def _brief(job: Any) -> dict[str, Any]:
    return {"id": job.id, "state": job.state.value, "study": job.study_key, "calling_ae": job.calling_ae,
            "instances": job.instances, "attempts": job.attempts, "interruptions": job.interruptions,
            "reason": job.reason, "next_try": job.next_try, "finished": job.finished,
            "model": job.model, "outputs": [item["file"] for item in job.outputs or []]}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def _time(stamp: float | None) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"
