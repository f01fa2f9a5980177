"""The running node: the receiver, a scheduler, ``workers`` worker threads and a delivery thread around one spool.

Start-up recovers from whatever stopped the previous node (a kill -9 included): temporary files are removed,
instance files that were never recorded (their sender got no success and sends them again) are removed, jobs left
``running`` are queued again, and studies still arriving get a full quiet period from now.  SIGTERM or SIGINT stops
the node: no new association, running deploy apps stopped, their jobs queued again for the next start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ctfm_engine.errors import UsageError
from deploy_app.node.audit import AuditLog
from deploy_app.node.config import NodeConfig
from deploy_app.node.delivery import Courier
from deploy_app.node.dispatch import connect
from deploy_app.node.health import HealthServer
from deploy_app.node.metrics import CONTENT_TYPE, NodeMetrics
from deploy_app.node.queue import JobQueue, JobState
from deploy_app.node.receiver import Receiver, tls_server_context
from deploy_app.node.spool import INCOMING, TEMPORARY_PREFIX, Spool
from deploy_app.node.stow import StowServer, read_token
from deploy_app.node.worker import Runner

log = logging.getLogger("deploy_app.node")

PID_FILE = "node.json"
LOCK_FILE = "node.lock"
LOCK_WAIT_S = 2.0
TICK_S = 0.5
RETENTION_EVERY_S = 60.0


class Node:
    """One DICOM node serving ``config``; :meth:`serve` runs it until SIGTERM/SIGINT (or :meth:`stop`)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self._stop = threading.Event()
        self._work = threading.Event()
        self._deliveries = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock_descriptor: int | None = None

    def serve(self) -> None:
        self.spool.create()
        self._take_spool()
        configure_logging(self.spool.logs, self.config)
        self.queue = JobQueue(self.spool.queue_file)
        self.audit = AuditLog(self.spool.logs)
        recovered = self._recover()
        quota = self.config.spool_quota_mb
        self.metrics = NodeMetrics(jobs=self.queue.counts, spool_bytes=lambda: self.receiver.spool_bytes,
                                   free_bytes=lambda: shutil.disk_usage(self.spool.root).free,
                                   quota_bytes=None if quota is None else int(quota * 2**20))
        self.receiver = Receiver(self.config, self.spool, self.queue, self.audit, self._completed, self.metrics)
        self.dispatcher = connect(self.config) if self.config.ray_address else None  # before listening: exit 2 early
        self.runner = Runner(self.config, self.spool, self.queue, self.audit, self.dispatcher)
        self.courier = Courier(self.config, self.spool, self.queue, self.audit)
        if not self.config.allow_ae:
            log.warning("no allow-list (allow_ae): every calling AE title may store studies here")
        try:
            self.receiver.start()
        except OSError as error:
            raise UsageError(f"cannot listen on port {self.config.port} ({error.strerror}): another program uses "
                             "it, or the port needs privileges; choose another --port") from None
        self.health = None
        if self.config.health_port is not None:
            try:
                context = None
                if self.config.health_tls and self.config.tls_cert is not None and self.config.tls_key is not None:
                    context = tls_server_context(self.config.tls_cert, self.config.tls_key)
                self.health = HealthServer(self.config.host, self.config.health_port, self._health,
                                           self.metrics.exposition, CONTENT_TYPE, ssl_context=context)
            except OSError as error:
                self.receiver.stop()
                raise UsageError(f"cannot serve /health on port {self.config.health_port} ({error.strerror}); "
                                 "choose another health_port") from None
            self.health.start()
        self.stow = None
        if self.config.stow_port is not None:
            self.stow = self._start_stow()
        self._write_pid_file()
        self.audit.record("node-started", pid=os.getpid(), ae_title=self.config.ae_title, port=self.config.port,
                          pacs=self.courier.address.display, workers=self.config.workers,
                          allow_ae=list(self.config.allow_ae), ray_address=self.config.ray_address, **recovered)
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda *_: self._stop.set())
        self._start_threads()
        try:
            while not self._stop.wait(TICK_S):
                pass
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    def _start_stow(self) -> StowServer:
        config = self.config
        context = None
        if config.tls_cert is not None and config.tls_key is not None:
            context = tls_server_context(config.tls_cert, config.tls_key, config.tls_ca)
        try:
            stow = StowServer(config.host, config.stow_port, self.receiver, ssl_context=context,
                              token=lambda: read_token(config.stow_token_file),
                              on_instance=lambda outcome: self.metrics.instances.labels(outcome).inc())
        except OSError as error:
            self.receiver.stop()
            if self.health is not None:
                self.health.stop()
            raise UsageError(f"cannot serve STOW-RS on port {config.stow_port} ({error.strerror}); choose another "
                             "stow_port") from None
        stow.start()
        return stow

    # Start and stop.

    def _take_spool(self) -> None:
        descriptor = os.open(self.spool.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
        deadline = time.monotonic() + LOCK_WAIT_S  # `status` holds a shared lock for an instant when it looks
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(descriptor)
                    raise UsageError(f"{self.spool.root}: another node serves this spool; stop it first, or give "
                                     "another --spool") from None
                time.sleep(0.1)
        self._lock_descriptor = descriptor  # held until this process ends, however it ends

    def _recover(self) -> dict[str, int]:
        temporaries = self.spool.remove_temporaries()
        unrecorded = self._remove_unrecorded()
        interrupted = self.queue.requeue_interrupted("the node stopped while this job ran; it runs again")
        arriving = self.queue.restart_quiet_clock()
        for job in interrupted:
            log.warning("job %d was running when the node stopped: queued again", job.id)
        if temporaries or unrecorded or interrupted or arriving:
            log.info("recovered: %d temporary file(s) and %d unrecorded instance(s) removed, %d interrupted job(s) "
                     "queued again, %d study(ies) still arriving", temporaries, unrecorded, len(interrupted),
                     arriving)
        return {"temporaries_removed": temporaries, "unrecorded_removed": unrecorded,
                "interrupted_requeued": len(interrupted), "still_arriving": arriving}

    def _remove_unrecorded(self) -> int:
        """Remove instance files a crash left unrecorded (their sender was never told they were stored)."""
        recorded = self.queue.recorded_files()
        removed = 0
        for path in (self.spool.root / INCOMING).rglob("*.dcm"):
            if str(path.relative_to(self.spool.root)) not in recorded and not path.name.startswith(TEMPORARY_PREFIX):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _write_pid_file(self) -> None:
        from ctfm_engine.io import atomic_output

        document = {"pid": os.getpid(), "ae_title": self.config.ae_title, "port": self.config.port,
                    "started": time.time(), "workers": self.config.workers, "ray_address": self.config.ray_address}
        with atomic_output(self.spool.root / PID_FILE) as temporary:
            temporary.write_text(json.dumps(document))

    def _start_threads(self) -> None:
        targets = [("scheduler", self._schedule), ("delivery", self._deliver)]
        targets += [(f"worker-{number}", self._work_loop) for number in range(1, self.config.workers + 1)]
        for name, target in targets:
            thread = threading.Thread(target=self._guarded(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _guarded(self, loop: Any) -> Any:
        """A thread's loop that logs an unexpected error and starts over, rather than dying silently."""

        def run() -> None:
            while not self._stop.is_set():
                try:
                    loop()
                except Exception:
                    log.exception("%s: unexpected error; continuing", threading.current_thread().name)
                    self._stop.wait(5.0)

        return run

    def _shutdown(self) -> None:
        log.info("stopping")
        self.receiver.stop()
        if self.health is not None:
            self.health.stop()
        if self.stow is not None:
            self.stow.stop()
        self.runner.stop()
        self._work.set()
        self._deliveries.set()
        for thread in self._threads:
            thread.join(timeout=30)
        if self.dispatcher is not None:
            self.dispatcher.close()
        requeued = self.queue.requeue_interrupted("the node was stopped while this job ran; it runs again")
        (self.spool.root / PID_FILE).unlink(missing_ok=True)
        self.audit.record("node-stopped", pid=os.getpid(), requeued=len(requeued))
        log.info("stopped (%d running job(s) queued again)", len(requeued))

    def _health(self) -> dict[str, Any]:
        """Healthy while the node takes studies in: listening, spool not full, every thread alive."""
        full = self.receiver.full()
        dead = [thread.name for thread in self._threads if not thread.is_alive()]
        reason = f"spool full: {full}" if full else f"thread(s) stopped: {', '.join(dead)}" if dead else None
        return {"ok": reason is None and not self._stop.is_set(), "reason": reason,
                "ae_title": self.config.ae_title, "jobs": self.queue.counts()}

    # The loops.

    def _completed(self, job_ids: list[int]) -> None:
        if job_ids:
            for job in self.queue.queue_jobs(job_ids):
                self._queued(job, "the sender released the association")
        self._work.set()

    def _queued(self, job: Any, why: str) -> None:
        log.info("job %d queued: %d instance(s), %s", job.id, job.instances, why)
        self.audit.record("queued", job=job.id, study=job.study_key, calling_ae=job.calling_ae,
                          instances=job.instances, bytes=job.bytes, why=why)
        self._work.set()

    def _schedule(self) -> None:
        last_retention = 0.0
        while not self._stop.is_set():
            queued, incomplete = self.queue.queue_quiet(self.config.quiet_seconds)
            for job in queued:
                self._queued(job, f"no new instance for {self.config.quiet_seconds:g} s")
            for job in incomplete:
                log.warning("job %d refused: %s", job.id, job.reason)
                self.audit.record("refused", job=job.id, study=job.study_key, calling_ae=job.calling_ae,
                                  stage="receiving", reason=job.reason, instances=job.instances)
            for job in self.queue.retry_due():
                self._queued(job, f"retry {job.attempts + 1} of {self.config.max_attempts}")
            if self.queue.delivery_due():
                self._deliveries.set()
            if self.config.retention_hours is not None and time.monotonic() - last_retention > RETENTION_EVERY_S:
                last_retention = time.monotonic()
                self._clean(time.time() - self.config.retention_hours * 3600)
            self._stop.wait(TICK_S)

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            claimed = self.queue.claim()
            if claimed is None:
                self._work.wait(TICK_S)
                self._work.clear()
                continue
            job, files = claimed
            started = time.monotonic()
            try:
                job = self.runner.run(job, files)
            except Exception as error:  # the node's own trouble (e.g. a full disk): the study is tried again later
                log.exception("job %d: the node could not run it", job.id)
                retry_at = time.time() + self.config.retry_seconds * 2 ** (job.attempts - 1) \
                    if job.attempts < self.config.max_attempts else None
                job = self.queue.finish(job.id, JobState.FAILED, reason=f"the node could not run it: {error}",
                                        next_try=retry_at)
            if job.state is not JobState.RUNNING:  # RUNNING: stopped by the node, not a run that ended
                self.metrics.job_run.labels(job.state.value).observe(time.monotonic() - started)
            if job.state is JobState.SENDING:
                self._deliveries.set()

    def _deliver(self) -> None:
        while not self._stop.is_set():
            for job in self.queue.delivery_due():
                if self._stop.is_set():
                    return
                started = time.monotonic()
                try:
                    job = self.courier.deliver(job)
                except Exception as error:  # e.g. the results folder unreadable: try again later, not in a loop
                    log.exception("job %d: delivery failed", job.id)
                    job = self.queue.finish(job.id, JobState.SENDING, reason=f"delivery failed: {error}",
                                            next_try=time.time() + self.config.delivery_retry_seconds)
                self.metrics.delivery.labels(job.state.value).observe(time.monotonic() - started)
            self._deliveries.wait(TICK_S * 2)
            self._deliveries.clear()

    def _clean(self, older_than: float) -> None:
        for job in self.queue.expired(older_than):
            files = [self.spool.root / name for name in self.queue.clean(job)]
            size = sum(path.stat().st_size for path in files if path.is_file())
            for path in files:
                path.unlink(missing_ok=True)
            shutil.rmtree(self.spool.job_folder(job.id), ignore_errors=True)
            if files:
                shutil.rmtree(self.spool.study_folder(job.study_key), ignore_errors=True)
            self.receiver.released_bytes(size)
            self.audit.record("cleaned", job=job.id, study=job.study_key, instances_removed=len(files),
                              bytes_removed=size)


def configure_logging(folder: Path, config: NodeConfig) -> None:
    """The node's log: ``folder/node.log`` (rotated at ``log_max_mb``, ``log_backups`` kept) and stderr."""
    folder.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    file_handler = logging.handlers.RotatingFileHandler(folder / "node.log", maxBytes=int(config.log_max_mb * 2**20),
                                                        backupCount=config.log_backups, encoding="utf-8")
    console = logging.StreamHandler()
    root = logging.getLogger()
    for handler in (file_handler, console):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one INFO line per PDU otherwise
