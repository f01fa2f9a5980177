"""The node's spool folder: where received instances, each job's input and results, the queue and the logs live.

    SPOOL/queue.sqlite            the job queue (SQLite, WAL)
    SPOOL/incoming/<study>/<instance>.dcm
                                  every received instance, named by the sha256 of its Study and SOP Instance UIDs
                                  (no UID, name or date of a patient in a path, so none in a log line naming one)
    SPOOL/jobs/<id>/input/        the study as the job saw it when it started (hard links into incoming/)
    SPOOL/jobs/<id>/attempt-<n>/  one run of the deploy app, and its log attempt-<n>.log
    SPOOL/jobs/<id>/results/      the results of the run that succeeded, renamed into place whole; outbox.json
    SPOOL/logs/node.log           the node's log (rotated); SPOOL/logs/audit.jsonl the audit trail

Every file the node writes is written to a temporary name, flushed to disk (fsync) and renamed, and the rename is
flushed too (fsync of the folder), so a file under its final name is always complete, even after a power cut.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

QUEUE_FILE = "queue.sqlite"
INCOMING = "incoming"
JOBS = "jobs"
LOGS = "logs"
TEMPORARY_PREFIX = ".partial-"


def uid_key(kind: str, uid: str) -> str:
    """A stable name for a UID that does not reveal it: the sha256 of ``kind:uid`` (hex, 32 characters)."""
    return hashlib.sha256(f"{kind}:{uid}".encode()).hexdigest()[:32]


class Spool:
    """The spool folder's layout and its durable writes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def queue_file(self) -> Path:
        return self.root / QUEUE_FILE

    @property
    def logs(self) -> Path:
        return self.root / LOGS

    def create(self) -> None:
        for folder in (self.root, self.root / INCOMING, self.root / JOBS, self.logs):
            folder.mkdir(parents=True, exist_ok=True)

    def study_folder(self, study_key: str) -> Path:
        return self.root / INCOMING / study_key

    def instance_path(self, study_key: str, sop_key: str) -> Path:
        return self.study_folder(study_key) / f"{sop_key}.dcm"

    def job_folder(self, job_id: int) -> Path:
        return self.root / JOBS / str(job_id)

    def input_folder(self, job_id: int) -> Path:
        return self.job_folder(job_id) / "input"

    def attempt_folder(self, job_id: int, attempt: int) -> Path:
        return self.job_folder(job_id) / f"attempt-{attempt}"

    def results_folder(self, job_id: int) -> Path:
        return self.job_folder(job_id) / "results"

    def write_durably(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` so that it is on disk, complete, under its name when this returns."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temporary, 0o640)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        sync_folder(path.parent)

    def snapshot(self, job_id: int, instance_files: list[Path]) -> Path:
        """The job's input folder holding exactly ``instance_files`` (hard links: no copy), made whole or not at all."""
        target = self.input_folder(job_id)
        staging = target.with_name(TEMPORARY_PREFIX + "input")
        for stale in (staging, target):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
        for source in instance_files:
            os.link(source, staging / source.name)
        os.replace(staging, target)
        sync_folder(target.parent)
        return target

    def publish_results(self, job_id: int, attempt_folder: Path) -> Path:
        """Flush every file of a finished run to disk and rename its folder to the job's results folder."""
        for path in attempt_folder.rglob("*"):
            if path.is_file():
                with path.open("rb") as stream:
                    os.fsync(stream.fileno())
        sync_folder(attempt_folder)
        target = self.results_folder(job_id)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(attempt_folder, target)
        sync_folder(target.parent)
        return target

    def remove_temporaries(self) -> int:
        """Remove what an interrupted write left (``.partial-*`` files and folders): how many."""
        removed = 0
        for top in (self.root / INCOMING, self.root / JOBS):
            for path in list(top.rglob(TEMPORARY_PREFIX + "*")) if top.is_dir() else []:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
        return removed

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

