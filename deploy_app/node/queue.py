"""The node's durable job queue: one SQLite database (WAL mode, synchronous FULL) in the spool.

A job is one study as received, processed and delivered.  Its states:

    received --(quiet period or release)--> queued --(a worker)--> running --> sending --> delivered
                                              ^                        |   |         |
                                              |                        |   |         +--> failed (PACS refused)
                                              +--- failed (retry due) <+   +--> refused (input; with reason)

* ``received``: instances are arriving; a new instance of the study keeps (or puts) its job here;
* ``queued``: the study is complete and waits for a worker (a new instance puts it back to ``received``);
* ``running``: a worker's deploy app runs on it; a node that stops (or is killed) while a job runs finds it
  ``running`` at the next start and queues it again (``interruptions`` counts these);
* ``sending``: results are written and wait in the job's outbox for the PACS (``next_try``: when it is tried again);
* ``delivered``: the PACS holds every result (or there was none to send: ``reason`` says why);
* ``refused``: the input is not acceptable (not CT, localiser only, ...): ``reason`` says why; never retried;
* ``failed``: the run failed or the PACS refused a result: ``reason``; with ``next_try`` set it runs again then.

An instance belongs to the study's open job (``received``/``queued``), or opens a new one when the study's job is
further on; a job's input is every instance of its study received before it started, so a study re-sent with one
more slice is processed again whole.  Instances are known by the sha256 of their SOP Instance UID: one received
again is not stored twice.  No UID, name or date of a patient is stored here: studies are the sha256 of their UID.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_key TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    state TEXT NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    last_received REAL NOT NULL,
    queued REAL,
    started REAL,
    finished REAL,
    delivered REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0,
    next_try REAL,
    reason TEXT,
    exit_code INTEGER,
    model TEXT,
    outputs TEXT,
    cleaned INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_key);
CREATE TABLE IF NOT EXISTS instances (
    sop_key TEXT PRIMARY KEY,
    study_key TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    file TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    received REAL NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_key);
CREATE TABLE IF NOT EXISTS missing (
    sop_key TEXT PRIMARY KEY,
    study_key TEXT NOT NULL,
    refused REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS missing_study ON missing (study_key);
CREATE TABLE IF NOT EXISTS oversized (
    study_key TEXT PRIMARY KEY,
    quota_bytes INTEGER NOT NULL,
    refused REAL NOT NULL
);
"""


class JobState(str, Enum):
    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DELIVERED = "delivered"
    REFUSED = "refused"
    FAILED = "failed"


OPEN_STATES = (JobState.RECEIVED, JobState.QUEUED)
FINAL_STATES = (JobState.DELIVERED, JobState.REFUSED, JobState.FAILED)


@dataclass(frozen=True)
class Job:
    """One row of the queue; times are seconds since the epoch."""

    id: int
    study_key: str
    calling_ae: str
    state: JobState
    instances: int
    bytes: int
    created: float
    last_received: float
    queued: float | None
    started: float | None
    finished: float | None
    delivered: float | None
    attempts: int
    interruptions: int
    next_try: float | None
    reason: str | None
    exit_code: int | None
    model: dict[str, Any] | None
    outputs: list[dict[str, Any]] | None
    cleaned: bool

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["state"] = JobState(values["state"])
        values["model"] = json.loads(values["model"]) if values["model"] else None
        values["outputs"] = json.loads(values["outputs"]) if values["outputs"] else None
        values["cleaned"] = bool(values["cleaned"])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "state": self.state.value}


@dataclass(frozen=True)
class Stored:
    """What recording one received instance did."""

    job_id: int
    duplicate: bool  # the instance was known already: nothing new stored
    new_job: bool  # the instance opened a new job for its study


class JobQueue:
    """The queue in ``path``; safe to use from many threads (one connection each) and processes (SQLite locks)."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._local = threading.local()
        if not read_only:
            self._connection().executescript(SCHEMA)  # its own transaction

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            if self.read_only:
                connection = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=30,
                                             isolation_level=None)
            else:
                connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
            connection.row_factory = sqlite3.Row
            self._local.connection = connection
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so two writers never deadlock."""
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    # Receiving.

    def known_instance(self, sop_key: str) -> bool:
        row = self._connection().execute("SELECT 1 FROM instances WHERE sop_key = ?", (sop_key,)).fetchone()
        return row is not None

    def record_instance(self, *, study_key: str, sop_key: str, file: str, size: int, calling_ae: str,
                        now: float | None = None) -> Stored:
        """Record an instance whose file is on disk: into its study's open job, or a new one."""
        now = time.time() if now is None else now
        with self._transaction() as connection:
            if connection.execute("SELECT 1 FROM instances WHERE sop_key = ?", (sop_key,)).fetchone():
                row = connection.execute("SELECT job_id FROM instances WHERE sop_key = ?", (sop_key,)).fetchone()
                return Stored(row["job_id"], duplicate=True, new_job=False)
            row = connection.execute(
                "SELECT id FROM jobs WHERE study_key = ? AND state IN (?, ?) ORDER BY id DESC LIMIT 1",
                (study_key, *[state.value for state in OPEN_STATES])).fetchone()
            if row is None:
                job_id = connection.execute(
                    "INSERT INTO jobs (study_key, calling_ae, state, created, last_received) VALUES (?, ?, ?, ?, ?)",
                    (study_key, calling_ae, JobState.RECEIVED.value, now, now)).lastrowid
                new_job = True
            else:
                job_id, new_job = row["id"], False
            connection.execute(
                "UPDATE jobs SET state = ?, instances = instances + 1, bytes = bytes + ?, last_received = ?, "
                "queued = NULL WHERE id = ?", (JobState.RECEIVED.value, size, now, job_id))
            connection.execute(
                "INSERT INTO instances (sop_key, study_key, job_id, file, bytes, received) VALUES (?, ?, ?, ?, ?, ?)",
                (sop_key, study_key, job_id, file, size, now))
            connection.execute("DELETE FROM missing WHERE sop_key = ?", (sop_key,))
        return Stored(job_id, duplicate=False, new_job=new_job)

    # Studies larger than the spool's quota.

    def study_bytes(self, study_key: str) -> int:
        """Bytes of the instances of ``study_key``'s open job (received or queued)."""
        row = self._connection().execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM jobs WHERE study_key = ? AND state IN (?, ?)",
            (study_key, *[state.value for state in OPEN_STATES])).fetchone()
        return int(row[0])

    def refuse_oversized(self, study_key: str, quota_bytes: int, reason: str,
                         now: float | None = None) -> tuple[Job | None, list[str]]:
        """Refuse ``study_key`` for good at this quota: its open job becomes ``refused`` with ``reason``, its
        instances are forgotten (so the study can be sent again once the quota is raised) and their spool-relative
        files returned for the caller to delete; further instances are refused (:meth:`oversized_quota`)."""
        now = time.time() if now is None else now
        with self._transaction() as connection:
            connection.execute("INSERT OR REPLACE INTO oversized (study_key, quota_bytes, refused) VALUES (?, ?, ?)",
                               (study_key, quota_bytes, now))
            row = connection.execute(
                "SELECT id FROM jobs WHERE study_key = ? AND state IN (?, ?) ORDER BY id DESC LIMIT 1",
                (study_key, *[state.value for state in OPEN_STATES])).fetchone()
            if row is None:
                return None, []
            files = [item["file"] for item in connection.execute(
                "SELECT file FROM instances WHERE job_id = ?", (row["id"],))]
            connection.execute("DELETE FROM instances WHERE job_id = ?", (row["id"],))
            connection.execute("UPDATE jobs SET state = ?, reason = ?, finished = ?, cleaned = 1 WHERE id = ?",
                               (JobState.REFUSED.value, reason, now, row["id"]))
        return self.job(row["id"]), files

    def oversized_quota(self, study_key: str) -> int | None:
        """The quota (bytes) at which ``study_key`` was refused as larger than it, or None."""
        row = self._connection().execute("SELECT quota_bytes FROM oversized WHERE study_key = ?",
                                         (study_key,)).fetchone()
        return None if row is None else int(row[0])

    # Instances refused for want of room: the study is incomplete until its sender sends them again.

    def note_missing(self, study_key: str, sop_key: str, now: float | None = None) -> None:
        """An instance of ``study_key`` was refused (spool full): its study must not be processed without it.  The
        study's quiet period starts again: its sender is still sending."""
        now = time.time() if now is None else now
        with self._transaction() as connection:
            if not connection.execute("SELECT 1 FROM instances WHERE sop_key = ?", (sop_key,)).fetchone():
                connection.execute("INSERT OR IGNORE INTO missing (sop_key, study_key, refused) VALUES (?, ?, ?)",
                                   (sop_key, study_key, now))
            connection.execute("UPDATE jobs SET last_received = MAX(last_received, ?) WHERE study_key = ? AND "
                               "state = ?", (now, study_key, JobState.RECEIVED.value))

    def queue_quiet(self, quiet_seconds: float, now: float | None = None) -> tuple[list[Job], list[Job]]:
        """Every received job whose last instance arrived ``quiet_seconds`` ago or earlier: queued when its study is
        whole, refused when instances of it were refused for want of room and never sent again (processing what
        arrived would give results for part of a study).  Returns (queued, refused)."""
        now = time.time() if now is None else now
        with self._transaction() as connection:
            rows = connection.execute(
                "SELECT jobs.id, COUNT(missing.sop_key) AS missing FROM jobs JOIN missing ON missing.study_key = "
                "jobs.study_key WHERE jobs.state = ? AND jobs.last_received <= ? GROUP BY jobs.id",
                (JobState.RECEIVED.value, now - quiet_seconds)).fetchall()
            for row in rows:
                reason = (f"the study is incomplete: {row['missing']} of its instances were refused while the spool "
                          "was full and not sent again; send the study again")
                connection.execute("UPDATE jobs SET state = ?, reason = ?, finished = ? WHERE id = ?",
                                   (JobState.REFUSED.value, reason, now, row["id"]))
                connection.execute("DELETE FROM missing WHERE study_key = (SELECT study_key FROM jobs WHERE id = ?)",
                                   (row["id"],))
        refused = [self.job(row["id"]) for row in rows]
        queued = self._queue("state = ? AND last_received <= ?", (JobState.RECEIVED.value, now - quiet_seconds), now)
        return queued, refused

    def queue_jobs(self, job_ids: list[int], now: float | None = None) -> list[Job]:
        """Queue these jobs now if they are still receiving (an explicit trigger: the sender released)."""
        if not job_ids:
            return []
        now = time.time() if now is None else now
        marks = ",".join("?" * len(job_ids))
        return self._queue(f"state = ? AND id IN ({marks})", (JobState.RECEIVED.value, *job_ids), now)

    def _queue(self, condition: str, parameters: tuple[Any, ...], now: float) -> list[Job]:
        with self._transaction() as connection:
            rows = connection.execute(f"SELECT * FROM jobs WHERE {condition}", parameters).fetchall()
            for row in rows:
                # queued: when the study was complete; a retry keeps it, so turnaround counts the retries.
                connection.execute("UPDATE jobs SET state = ?, queued = COALESCE(queued, ?) WHERE id = ?",
                                   (JobState.QUEUED.value, now, row["id"]))
        return [self.job(row["id"]) for row in rows]

    # Processing.

    def claim(self, now: float | None = None) -> tuple[Job, list[str]] | None:
        """Take the oldest queued job for a worker (it is ``running`` then): the job and the spool-relative files of
        every instance of its study, or None when nothing is queued."""
        now = time.time() if now is None else now
        with self._transaction() as connection:
            row = connection.execute("SELECT id, study_key FROM jobs WHERE state = ? ORDER BY queued, id LIMIT 1",
                                     (JobState.QUEUED.value,)).fetchone()
            if row is None:
                return None
            connection.execute("UPDATE jobs SET state = ?, started = ?, attempts = attempts + 1, next_try = NULL, "
                               "finished = NULL WHERE id = ?", (JobState.RUNNING.value, now, row["id"]))
            files = [item["file"] for item in connection.execute(
                "SELECT file FROM instances WHERE study_key = ? AND removed = 0 AND job_id <= ? ORDER BY file",
                (row["study_key"], row["id"]))]
        return self.job(row["id"]), files

    def finish(self, job_id: int, state: JobState, *, reason: str | None = None, exit_code: int | None = None,
               next_try: float | None = None, model: dict[str, Any] | None = None,
               outputs: list[dict[str, Any]] | None = None, now: float | None = None) -> Job:
        """Move a job to ``state`` with what its run or delivery found (None keeps a column's value)."""
        now = time.time() if now is None else now
        updates: dict[str, Any] = {"state": state.value, "reason": reason, "next_try": next_try}
        if exit_code is not None:
            updates["exit_code"] = exit_code
        if model is not None:
            updates["model"] = json.dumps(model)
        if outputs is not None:
            updates["outputs"] = json.dumps(outputs)
        # finished: when the run ended (a delivery keeps it); delivered: when the PACS had every result.
        if state is JobState.DELIVERED:
            updates["delivered"] = now
        assignments = ", ".join(f"{name} = ?" for name in updates)
        with self._transaction() as connection:
            connection.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*updates.values(), job_id))
            connection.execute("UPDATE jobs SET finished = COALESCE(finished, ?) WHERE id = ?", (now, job_id))
        return self.job(job_id)

    def retry_due(self, now: float | None = None) -> list[Job]:
        """Queue again the failed jobs whose retry time has come."""
        now = time.time() if now is None else now
        return self._queue("state = ? AND next_try IS NOT NULL AND next_try <= ?", (JobState.FAILED.value, now), now)

    def delivery_due(self, now: float | None = None) -> list[Job]:
        """Jobs whose results wait for the PACS and whose next try has come."""
        now = time.time() if now is None else now
        rows = self._connection().execute(
            "SELECT * FROM jobs WHERE state = ? AND (next_try IS NULL OR next_try <= ?) ORDER BY id",
            (JobState.SENDING.value, now)).fetchall()
        return [Job.from_row(row) for row in rows]

    def requeue_interrupted(self, reason: str) -> list[Job]:
        """Queue again the jobs left ``running`` by a node that stopped: they run again from their input."""
        with self._transaction() as connection:
            rows = connection.execute("SELECT id FROM jobs WHERE state = ?", (JobState.RUNNING.value,)).fetchall()
            for row in rows:
                connection.execute("UPDATE jobs SET state = ?, reason = ?, interruptions = interruptions + 1, "
                                   "attempts = MAX(attempts - 1, 0) WHERE id = ?",
                                   (JobState.QUEUED.value, reason, row["id"]))
        return [self.job(row["id"]) for row in rows]

    def requeue(self, job_id: int, *, has_results: bool, reason: str, now: float | None = None) -> Job:
        """An operator's "try again" (``python -m deploy_app requeue``), for a job that cannot go on by itself.

        A ``failed`` or ``refused`` job runs again (``queued``, its attempts counted afresh) or, when its results
        were written (``has_results``: the PACS refused them), is delivered again (``sending``); a ``sending`` job
        is tried at once instead of at its next try.

        Raises
        ------
        KeyError
            No job ``job_id``.
        ValueError
            The job is on its way or delivered (nothing to requeue), or retention removed its instances already.
        """
        now = time.time() if now is None else now
        with self._transaction() as connection:
            row = connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            state = JobState(row["state"])
            if state is JobState.SENDING:
                connection.execute("UPDATE jobs SET next_try = ? WHERE id = ?", (now, job_id))
            elif state in (JobState.FAILED, JobState.REFUSED) and has_results:
                connection.execute("UPDATE jobs SET state = ?, reason = ?, next_try = ? WHERE id = ?",
                                   (JobState.SENDING.value, reason, now, job_id))
            elif state in (JobState.FAILED, JobState.REFUSED):
                if row["cleaned"]:
                    raise ValueError(f"job {job_id}'s instances were removed by retention: send the study again")
                connection.execute("UPDATE jobs SET state = ?, reason = ?, next_try = NULL, attempts = 0, "
                                   "queued = COALESCE(queued, ?) WHERE id = ?",
                                   (JobState.QUEUED.value, reason, now, job_id))
            else:
                raise ValueError(f"job {job_id} is {state.value}: only failed, refused or sending jobs are requeued")
        return self.job(job_id)

    def restart_quiet_clock(self, now: float | None = None) -> int:
        """Give every study still arriving a full quiet period from now (a node that was down could not receive
        the rest): how many."""
        now = time.time() if now is None else now
        with self._transaction() as connection:
            return connection.execute("UPDATE jobs SET last_received = ? WHERE state = ?",
                                      (now, JobState.RECEIVED.value)).rowcount

    def recorded_files(self) -> set[str]:
        """The spool-relative files of every instance still in the spool."""
        return {row[0] for row in self._connection().execute("SELECT file FROM instances WHERE removed = 0")}

    # Retention.

    def expired(self, older_than: float) -> list[Job]:
        """Final jobs (delivered or refused) finished before ``older_than`` whose files are still in the spool."""
        rows = self._connection().execute(
            "SELECT * FROM jobs WHERE state IN (?, ?) AND cleaned = 0 AND COALESCE(delivered, finished) < ?",
            (JobState.DELIVERED.value, JobState.REFUSED.value, older_than)).fetchall()
        return [Job.from_row(row) for row in rows]

    def clean(self, job: Job) -> list[str]:
        """Mark a final job's files removed: the spool-relative instance files no open job of its study still needs
        (to be deleted by the caller).  The instances stay known, so a re-sent copy is still not stored again."""
        with self._transaction() as connection:
            connection.execute("UPDATE jobs SET cleaned = 1 WHERE id = ?", (job.id,))
            active = connection.execute(
                "SELECT 1 FROM jobs WHERE study_key = ? AND state NOT IN (?, ?) AND id != ?",
                (job.study_key, JobState.DELIVERED.value, JobState.REFUSED.value, job.id)).fetchone()
            if active:
                return []
            files = [row["file"] for row in connection.execute(
                "SELECT file FROM instances WHERE study_key = ? AND removed = 0", (job.study_key,))]
            connection.execute("UPDATE instances SET removed = 1 WHERE study_key = ?", (job.study_key,))
        return files

    # Reading.

    def job(self, job_id: int) -> Job:
        row = self._connection().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id}")
        return Job.from_row(row)

    def jobs(self, *states: JobState) -> list[Job]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self._connection().execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id",
                                              [state.value for state in states]).fetchall()
        else:
            rows = self._connection().execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [Job.from_row(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per state, every state listed."""
        found = dict(self._connection().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state.value: int(found.get(state.value, 0)) for state in JobState}

    def spool_bytes(self) -> int:
        """Bytes of received instances still in the spool."""
        row = self._connection().execute("SELECT COALESCE(SUM(bytes), 0) FROM instances WHERE removed = 0").fetchone()
        return int(row[0])

    def instance_totals(self) -> tuple[int, int]:
        """(instances, bytes) received since the spool was made."""
        row = self._connection().execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM instances").fetchone()
        return int(row[0]), int(row[1])
