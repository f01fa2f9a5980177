"""The node's audit trail: one JSON document per line in ``SPOOL/logs/audit.jsonl``, appended and flushed to disk.

Each line has ``time`` (ISO 8601 UTC) and ``event``, then what the event concerns: the calling AE title and peer
address of an association, a job's id, its study as the sha256 of the Study Instance UID (``study``), counts and
bytes, the objects written (file name, SOP class, the sha256 of their SOP Instance UID) and where they went, the
model's name, sha256 and whether it is a demonstration model, and reasons.  Never a patient's name, ID or date,
nor a UID in clear.

Events: ``node-started``, ``node-stopped``, ``association-refused``, ``association`` (one per association, when it
ends: instances stored, duplicates, instances refused), ``queued``, ``processed``, ``refused``, ``failed``,
``delivered``, ``delivery-pending``, ``cleaned``, ``requeued`` (by the operator, `python -m deploy_app requeue`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"
# A DICOM UID (PS3.5 9.1): a root arc 0, 1 or 2, then numeric components ("2.25.<UUID as integer>" has only two
# more); at least 10 characters, so that version numbers stay as they are.
UID_PATTERN = re.compile(r"(?<![\w.])[0-2](?:\.(?:0|[1-9][0-9]*)){2,}(?![\w.])")
UID_MIN_LENGTH = 10


def hashed(uid: str) -> str:
    """The sha256 (hex) of a UID: enough to find the entry of a known object, not to learn the UID."""
    return hashlib.sha256(uid.encode()).hexdigest()


def without_uids(text: str) -> str:
    """``text`` (e.g. the deploy app's reason for a refusal) with each UID replaced by ``uid:`` and the first 12
    characters of its sha256, so that it can go into the node's log, queue and audit trail."""
    def replace(match: re.Match) -> str:
        uid = match.group()
        return "uid:" + hashed(uid)[:12] if len(uid) >= UID_MIN_LENGTH else uid

    return UID_PATTERN.sub(replace, text)


class AuditLog:
    """Appends events to ``folder/audit.jsonl`` from any thread."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / AUDIT_FILE
        self._lock = threading.Lock()

    def record(self, event: str, **details: Any) -> None:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event, **details}
        line = (json.dumps(entry, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(descriptor, line)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)


def read_audit(folder: Path) -> list[dict[str, Any]]:
    """Every event of ``folder/audit.jsonl``, oldest first; a last line cut short by a crash is left out."""
    path = Path(folder) / AUDIT_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
