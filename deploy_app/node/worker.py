"""Running one job: the study's instances through the deploy app, the MAP's own entry (``python -m deploy_app -i
INPUT -o OUTPUT ...``), in a child process of its own, or, with ``ray_address``, in one on a Ray cluster's worker
(``deploy_app.node.dispatch``).

The deploy app selects the series by the rules, segments it, optionally triages it, and writes the DICOM-SEG and
the measurement SR in the configured encoding, exactly as it does as a MAP; it is given no PACS, the node delivers.
Its exit code decides the job's next state: 0 results (``sending``; ``delivered`` at once when there is nothing to
send), 3 the input is not acceptable (``refused``, with the app's one-sentence reason), 2 and 4 a setting or model
problem (``failed``, not retried: the node's configuration must change), anything else (``failed``, tried again
after a back-off until ``max_attempts``).

Each run writes into ``jobs/<id>/attempt-<n>/``; only a run that exited 0 has its folder flushed to disk and renamed
to ``jobs/<id>/results/``, so a half-written result never reaches the outbox.  The audit trail's event for the run
says where it ran (``ran_on``: ``local`` or ``ray:<node id>``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from deploy_app.node.audit import AuditLog, hashed, without_uids
from deploy_app.node.config import NodeConfig
from deploy_app.node.queue import Job, JobQueue, JobState
from deploy_app.node.spool import Spool

if TYPE_CHECKING:
    from deploy_app.node.dispatch import RayDispatcher

log = logging.getLogger("deploy_app.node")

ERROR_PREFIX = "deploy_app: error: "
INPUT_NOT_ACCEPTABLE = 3
NOT_RETRIED = {2: "a setting of the node is not usable", 4: "the model cannot be used"}
MAX_REASON = 600
STOP_GRACE_S = 10.0


class Runner:
    """Runs jobs with the deploy app; one instance is shared by the node's worker threads."""

    def __init__(self, config: NodeConfig, spool: Spool, queue: JobQueue, audit: AuditLog,
                 dispatcher: RayDispatcher | None = None) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.spool = spool
        self.queue = queue
        self.audit = audit
        self.stopping = threading.Event()
        self._children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def command(self, input_folder: Path, output_folder: Path) -> list[str]:
        """The deploy app's command line for one study under this node's settings."""
        return child_command(os.getpid(), input_folder, output_folder, app_settings(self.config))

    def run(self, job: Job, files: list[str]) -> Job:
        """Run ``job`` (claimed: ``running``) on ``files`` (spool-relative) and record what came of it."""
        present = [self.spool.root / name for name in files if (self.spool.root / name).is_file()]
        input_folder = self.spool.snapshot(job.id, present)
        output = self.spool.attempt_folder(job.id, job.attempts)
        shutil.rmtree(output, ignore_errors=True)
        log_path = output.with_name(output.name + ".log")
        where = "on the Ray cluster" if self.dispatcher is not None else "locally"
        log.info("job %d: running the deploy app %s on %d instance(s) (attempt %d)", job.id, where, len(present),
                 job.attempts)
        started = time.monotonic()
        if self.dispatcher is None:
            code, timed_out = self._run_locally(input_folder, output, log_path)
            ran_on = "local"
        else:
            code, timed_out, ran_on = self.dispatcher.run(input_folder, output, log_path, self.stopping)
        seconds = round(time.monotonic() - started, 1)
        if self.stopping.is_set():
            return self.queue.job(job.id)  # stopped by the node: queued again at shutdown, run again later
        if code == 0:
            return self._succeeded(job, output, seconds, ran_on)
        shutil.rmtree(output, ignore_errors=True)
        if timed_out:
            reason = f"the deploy app took longer than {self.config.job_timeout_minutes:g} min and was stopped"
        else:
            reason = _error_line(log_path) or (f"the deploy app was killed by signal {-code}" if code < 0
                                               else f"the deploy app exited with status {code}")
        if code == INPUT_NOT_ACCEPTABLE:
            log.warning("job %d refused: %s", job.id, reason)
            self.audit.record("refused", job=job.id, study=job.study_key, calling_ae=job.calling_ae, reason=reason,
                              seconds=seconds, ran_on=ran_on)
            return self.queue.finish(job.id, JobState.REFUSED, reason=reason, exit_code=code)
        retry_at = None
        if code not in NOT_RETRIED and job.attempts < self.config.max_attempts:
            retry_at = time.time() + self.config.retry_seconds * 2 ** (job.attempts - 1)
        elif code in NOT_RETRIED:
            reason = f"{NOT_RETRIED[code]}: {reason}"
        log.error("job %d failed (attempt %d of %d): %s", job.id, job.attempts, self.config.max_attempts, reason)
        self.audit.record("failed", job=job.id, study=job.study_key, attempt=job.attempts, reason=reason,
                          retry_at=retry_at, seconds=seconds, ran_on=ran_on)
        return self.queue.finish(job.id, JobState.FAILED, reason=reason, exit_code=code, next_try=retry_at)

    def _run_locally(self, input_folder: Path, output: Path, log_path: Path) -> tuple[int, bool]:
        """The deploy app in a child process of this node: (exit code, whether the job timeout stopped it)."""
        with log_path.open("wb") as stream:
            child = subprocess.Popen(self.command(input_folder, output), stdout=stream, stderr=subprocess.STDOUT,
                                     env=app_environment(os.environ), start_new_session=True)
            with self._lock:
                self._children[child.pid] = child
            try:
                return child.wait(timeout=self.config.job_timeout_minutes * 60), False
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                return child.wait(), True
            finally:
                with self._lock:
                    self._children.pop(child.pid, None)

    def _succeeded(self, job: Job, output: Path, seconds: float, ran_on: str) -> Job:
        results = self.spool.publish_results(job.id, output)
        summary = _summary(results)
        model = (summary.get("segmentation") or {}).get("weights")
        outputs = [_describe(path) for path in sorted(results.glob("*.dcm"))]
        self.audit.record("processed", job=job.id, study=job.study_key, calling_ae=job.calling_ae,
                          instances=job.instances, outputs=outputs, model=model,
                          triage_model=(summary.get("triage") or {}).get("weights"), seconds=seconds,
                          folder=str(results), ran_on=ran_on)
        if not outputs:
            reason = "nothing to send: " + str((summary.get("seg") or {}).get("skipped") or "the app wrote no object")
            log.info("job %d done in %.1f s; %s", job.id, seconds, reason)
            return self.queue.finish(job.id, JobState.DELIVERED, reason=reason, exit_code=0, model=model,
                                     outputs=[])
        log.info("job %d done in %.1f s: %s", job.id, seconds, ", ".join(item["file"] for item in outputs))
        return self.queue.finish(job.id, JobState.SENDING, exit_code=0, model=model, outputs=outputs)

    def stop(self) -> None:
        """Stop every running deploy app (SIGTERM, then SIGKILL after a grace period; Ray tasks are cancelled)."""
        self.stopping.set()
        if self.dispatcher is not None:
            self.dispatcher.cancel_all()
        with self._lock:
            children = list(self._children.values())
        for child in children:
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.wait()


def app_settings(config: NodeConfig) -> list[str]:
    """The deploy app's arguments but ``-i`` and ``-o`` under ``config``."""
    arguments = ["--encoding", config.encoding, "--device", config.device]
    if config.model:
        arguments += ["-m", config.model]
    if config.triage_model:
        arguments += ["--triage-model", config.triage_model]
    if config.rules is not None:
        arguments += ["--rules", str(config.rules)]
    if not config.measurements_sr:
        arguments.append("--no-measurements-sr")
    return arguments


def child_command(parent_pid: int, input_folder: Path, output_folder: Path, settings: list[str]) -> list[str]:
    """``python -m deploy_app -i INPUT -o OUTPUT SETTINGS`` in a child bound to ``parent_pid`` (it dies with it)."""
    return [sys.executable, "-m", "deploy_app.node.child", str(parent_pid), "-i", str(input_folder), "-o",
            str(output_folder), *settings]


def app_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The deploy app's environment: ``environment`` without a PACS (the node delivers), Holoscan's log quiet."""
    result = {key: value for key, value in environment.items() if key != "CTFM_PACS_URL"}
    result.setdefault("HOLOSCAN_LOG_LEVEL", "ERROR")
    return result


def _signal_group(child: subprocess.Popen, number: int) -> None:
    try:
        os.killpg(child.pid, number)
    except ProcessLookupError:
        pass


def _error_line(log_path: Path) -> str | None:
    """The deploy app's one-sentence error (its last ``deploy_app: error:`` line), UIDs hashed, shortened."""
    if not log_path.is_file():
        return None
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith(ERROR_PREFIX)]
    if not lines:
        return None
    reason = without_uids(lines[-1][len(ERROR_PREFIX):].strip())
    return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 3] + "..."


def _summary(results: Path) -> dict[str, Any]:
    path = results / "ctfm-results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(path: Path) -> dict[str, Any]:
    """A result object as the audit trail and the queue record it: file, SOP class, hashed UIDs, size."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    return {"file": path.name, "sop_class": getattr(header.SOPClassUID, "name", str(header.SOPClassUID)),
            "modality": str(header.get("Modality", "")), "sop_instance_sha256": hashed(str(header.SOPInstanceUID)),
            "series_sha256": hashed(str(header.SeriesInstanceUID)), "bytes": path.stat().st_size}
