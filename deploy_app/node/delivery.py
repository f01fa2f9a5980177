"""Delivering a job's results to the PACS through the engine's outbox (``jobs/<id>/results/outbox.json``).

The outbox records each result per destination and saves its state after every file, and the PACS client asks the
PACS which instances it holds before sending; the results' UIDs are derived from the source series, the weights and
the result.  So a delivery interrupted anywhere (the node killed while sending, the PACS gone mid-way) is resumed
without sending anything twice.  A PACS that is down leaves the job ``sending`` with the outbox's back-off as its
next try; a PACS that refuses a result fails the job with its reason (not retried: something must change first).

A ``dicom-tls://`` or ``https://`` PACS is reached with the ``pacs_tls_*`` files (a certificate it does not trust,
or one we do not trust, is a refusal); ``pacs_token_file`` is read at every delivery, so a rotated token is used from
the next one on, and a missing or empty file keeps the job waiting with that reason.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from ctfm_engine.dicom.outbox import EntryState, Outbox
from ctfm_engine.dicom.pacs import PacsClient, RetryPolicy, TlsSettings, open_pacs, parse_address, read_bearer_token
from ctfm_engine.errors import CTFMError
from deploy_app.node.audit import AuditLog, without_uids
from deploy_app.node.config import NodeConfig
from deploy_app.node.queue import Job, JobQueue, JobState
from deploy_app.node.spool import Spool

log = logging.getLogger("deploy_app.node")

MAX_RETRY_AFTER_S = 3600.0


class Courier:
    """Sends the results of ``sending`` jobs to the configured PACS."""

    def __init__(self, config: NodeConfig, spool: Spool, queue: JobQueue, audit: AuditLog) -> None:
        self.config = config
        self.spool = spool
        self.queue = queue
        self.audit = audit
        self.address = parse_address(config.pacs, calling_aet=config.ae_title)
        self.tls = TlsSettings(config.pacs_tls_ca, config.pacs_tls_cert, config.pacs_tls_key)
        # Settings that do not fit the address (TLS files for a plain one, a token for DIMSE) stop the node at start.
        self._open("token" if config.pacs_token_file is not None else None)

    def _open(self, token: str | None) -> PacsClient:
        return open_pacs(self.address, retry=RetryPolicy(attempts=1), timeout_s=self.config.pacs_timeout_seconds,
                         tls=self.tls, bearer_token=token)

    def _token(self) -> str | None:
        """The bearer token as ``pacs_token_file`` holds it now; UsageError when it cannot be read or is empty."""
        path = self.config.pacs_token_file
        return None if path is None else read_bearer_token(path, "pacs_token_file")

    def deliver(self, job: Job) -> Job:
        """One delivery run of ``job``'s results: ``delivered``, still ``sending`` (with its next try), or
        ``failed`` when the PACS refused a result or a result can no longer be read."""
        results = self.spool.results_folder(job.id)
        outbox = Outbox(results, retry_after_s=self.config.delivery_retry_seconds,
                        max_retry_after_s=MAX_RETRY_AFTER_S)
        try:
            token = self._token()
        except CTFMError as error:  # a token being rotated may be missing for a moment: wait, do not fail
            reason = f"waiting for a bearer token: {error}"
            log.warning("job %d: %s", job.id, reason)
            return self.queue.finish(job.id, JobState.SENDING, reason=reason,
                                     next_try=time.time() + self.config.delivery_retry_seconds)
        try:
            outbox.add([results / item["file"] for item in job.outputs or []], self.address)
            outbox.send(self._open(token))
        except CTFMError as error:
            return self._failed(job, f"the results cannot be delivered: {error}")
        entries = [entry for entry in outbox.entries() if entry.destination == self.address.display]
        names = {entry.sop_instance_uid: entry.file.rsplit("/", 1)[-1] for entry in entries}
        lost = [entry for entry in entries if entry.state in (EntryState.REFUSED, EntryState.UNREADABLE)]
        if lost:
            reason = "; ".join(f"{names[entry.sop_instance_uid]}: {entry.state.value} ({entry.last_error})"
                               for entry in lost)
            return self._failed(job, f"{self.address.display} did not take every result: {reason}")
        pending = [entry for entry in entries if entry.state is EntryState.PENDING]
        if pending:
            next_try = min(datetime.fromisoformat(entry.next_try).timestamp() for entry in pending
                           if entry.next_try) if any(entry.next_try for entry in pending) else None
            problem = without_uids(pending[0].last_error or "not tried yet")
            reason = f"waiting for {self.address.display}: {problem}"
            log.warning("job %d: %d result(s) not delivered yet (%s)", job.id, len(pending), problem)
            self.audit.record("delivery-pending", job=job.id, destination=self.address.display,
                              pending=len(pending), reason=problem, next_try=next_try)
            return self.queue.finish(job.id, JobState.SENDING, reason=reason, next_try=next_try)
        log.info("job %d delivered to %s", job.id, self.address.display)
        self.audit.record("delivered", job=job.id, study=job.study_key, destination=self.address.display,
                          files=[{"file": names[entry.sop_instance_uid], "result": entry.result,
                                  "attempts": entry.attempts} for entry in entries])
        return self.queue.finish(job.id, JobState.DELIVERED)

    def _failed(self, job: Job, reason: str) -> Job:
        reason = without_uids(reason)
        log.error("job %d: %s", job.id, reason)
        self.audit.record("failed", job=job.id, study=job.study_key, stage="delivery", reason=reason)
        return self.queue.finish(job.id, JobState.FAILED, reason=reason)
