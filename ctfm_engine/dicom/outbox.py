"""An on-disk outbox of result files waiting for a PACS: nothing is lost while the PACS is down.

An outbox is a folder holding ``outbox.json``: one entry per (destination, SOP instance) with the result file's
path (files stay where they are, referenced in place), its state and its delivery history:

* ``pending``: not delivered yet; ``attempts`` counts the delivery runs that tried it, ``last_error`` says why the
  last one failed (a transient failure: the PACS was down or busy) and ``next_try`` when a scheduler should try
  again (exponential back-off from ``retry_after_s``, capped at ``max_retry_after_s``);
* ``sent``: the PACS holds it (``result`` is ``stored`` or ``already-present``); not sent again unless requeued;
* ``refused``: the PACS refused it for good (``last_error`` says why); sent again only when requeued;
* ``unreadable``: the file is gone or no longer a sendable DICOM file at delivery time.

Destinations are recorded as addresses without credentials (see :mod:`ctfm_engine.dicom.pacs`), so an outbox never
stores a password.  The state file is rewritten atomically after every file whose outcome is final, under an
exclusive lock, so a crash or a second process loses nothing and sends nothing twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from ctfm_engine.dicom.pacs import (
    PacsAddress,
    PacsClient,
    StoredFile,
    StoreReport,
    StoreStatus,
    collect_outgoing,
    read_outgoing,
)
from ctfm_engine.errors import InputError
from ctfm_engine.io import atomic_output

try:
    import fcntl
except ImportError:  # Windows: one process at a time is the user's job there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

STATE_FILE = "outbox.json"
LOCK_FILE = ".outbox.lock"
FORMAT = "ctfm-outbox"
VERSION = 1


class EntryState(str, Enum):
    """Where one outbox entry stands."""

    PENDING = "pending"
    SENT = "sent"
    REFUSED = "refused"
    UNREADABLE = "unreadable"


@dataclass
class OutboxEntry:
    """One result file bound for one PACS; times are ISO 8601 UTC."""

    file: str
    destination: str
    sop_instance_uid: str
    state: EntryState = EntryState.PENDING
    added: str = ""
    attempts: int = 0
    last_error: str | None = None
    next_try: str | None = None
    sent: str | None = None
    result: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OutboxEntry:
        return cls(**{**values, "state": EntryState(values["state"])})


@dataclass(frozen=True)
class Delivery:
    """What one :meth:`Outbox.send` did for one destination."""

    destination: str
    report: StoreReport
    unreadable: list[OutboxEntry] = field(default_factory=list)
    still_pending: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**self.report.as_dict(), "unreadable": [entry.as_dict() for entry in self.unreadable],
                "still_pending": self.still_pending}


class Outbox:
    """Result files waiting for PACS delivery, recorded in ``folder/outbox.json``.

    Parameters
    ----------
    folder:
        The outbox folder (created by the first :meth:`add`).
    retry_after_s:
        ``next_try`` of an entry that failed once lies this far ahead; each further failed run doubles it ...
    max_retry_after_s:
        ... up to this.
    """

    def __init__(self, folder: str | Path, *, retry_after_s: float = 60.0, max_retry_after_s: float = 3600.0) -> None:
        self.folder = Path(folder)
        self.retry_after_s = retry_after_s
        self.max_retry_after_s = max_retry_after_s

    @property
    def state_file(self) -> Path:
        return self.folder / STATE_FILE

    def exists(self) -> bool:
        return self.state_file.is_file()

    def entries(self) -> list[OutboxEntry]:
        """Every entry, in the order added.  A folder without ``outbox.json`` is an empty outbox."""
        return self._load()

    def pending(self, destination: str | None = None) -> list[OutboxEntry]:
        """Entries not delivered yet, for one destination (an address's ``display``) or all."""
        return [entry for entry in self._load() if entry.state is EntryState.PENDING
                and (destination is None or entry.destination == destination)]

    def add(self, paths: Iterable[str | Path], destination: PacsAddress, *, force: bool = False) -> list[OutboxEntry]:
        """Record DICOM files (or folders of them) to send to ``destination``; they are validated, not copied.

        A SOP instance already recorded for this destination keeps its entry; a pending or unreadable one takes the
        new path (and is pending again), and ``force`` puts sent and refused ones back to pending too.

        Returns
        -------
        list[OutboxEntry]
            The entries of these files, new or existing.

        Raises
        ------
        InputError
            A file is not DICOM or lacks the UIDs a PACS needs (nothing is recorded then).
        """
        files = collect_outgoing(paths)
        now = _now()
        with self._locked():
            entries = self._load()
            by_key = {(entry.destination, entry.sop_instance_uid): entry for entry in entries}
            chosen = []
            for outgoing in files:
                key = (destination.display, outgoing.sop_instance_uid)
                entry = by_key.get(key)
                if entry is None:
                    entry = OutboxEntry(str(outgoing.path.resolve()), destination.display,
                                        outgoing.sop_instance_uid, added=now)
                    entries.append(entry)
                    by_key[key] = entry
                elif entry.state in (EntryState.PENDING, EntryState.UNREADABLE) or force:
                    entry.file = str(outgoing.path.resolve())
                    if entry.state is not EntryState.PENDING:
                        entry.state, entry.next_try = EntryState.PENDING, None
                chosen.append(entry)
            self._save(entries)
        return chosen

    def requeue(self, destination: str | None = None) -> int:
        """Put sent, refused and unreadable entries (of one destination, or all) back to pending: how many."""
        with self._locked():
            entries = self._load()
            count = 0
            for entry in entries:
                if entry.state is not EntryState.PENDING and destination in (None, entry.destination):
                    entry.state, entry.next_try = EntryState.PENDING, None
                    count += 1
            self._save(entries)
        return count

    def send(self, pacs: PacsClient, *, skip_present: bool = True, only_due: bool = False) -> Delivery:
        """Deliver this destination's pending entries to ``pacs``; the state is saved after each file.

        Parameters
        ----------
        pacs:
            The client of the destination; entries recorded for other destinations are left alone.
        skip_present:
            Ask the PACS first which instances it holds and mark those sent without sending them again.
        only_due:
            Only entries whose ``next_try`` has come (for schedulers); by default every pending entry is tried.

        Returns
        -------
        Delivery
            The store report of the files tried, the entries found unreadable, and how many stay pending.
        """
        with self._locked():
            entries = self._load()
            now = datetime.now(timezone.utc)
            chosen = [entry for entry in entries if entry.destination == pacs.destination
                      and entry.state is EntryState.PENDING
                      and not (only_due and entry.next_try and datetime.fromisoformat(entry.next_try) > now)]
            sendable, unreadable = [], []
            for entry in chosen:
                try:
                    outgoing = read_outgoing(entry.file)
                except InputError as error:
                    entry.state, entry.last_error = EntryState.UNREADABLE, str(error)
                    unreadable.append(entry)
                    continue
                if outgoing.sop_instance_uid != entry.sop_instance_uid:
                    entry.state = EntryState.UNREADABLE
                    entry.last_error = (f"{entry.file}: now holds SOP instance {outgoing.sop_instance_uid}, not the "
                                        f"recorded {entry.sop_instance_uid}; add the file again")
                    unreadable.append(entry)
                    continue
                sendable.append(entry)
            if unreadable:
                self._save(entries)
            by_uid = {entry.sop_instance_uid: entry for entry in sendable}

            def record(outcome: StoredFile) -> None:
                self._record(by_uid[outcome.sop_instance_uid], outcome)
                self._save(entries)

            report = pacs.store([entry.file for entry in sendable], skip_present=skip_present, on_result=record)
            still_pending = sum(entry.state is EntryState.PENDING and entry.destination == pacs.destination
                                for entry in entries)
        return Delivery(pacs.destination, report, unreadable, still_pending)

    def _record(self, entry: OutboxEntry, outcome: StoredFile) -> None:
        now = datetime.now(timezone.utc)
        entry.attempts += 1
        if outcome.delivered:
            entry.state, entry.sent, entry.result = EntryState.SENT, now.isoformat(), outcome.status.value
            entry.last_error = entry.next_try = None
        elif outcome.status is StoreStatus.REFUSED:
            entry.state, entry.last_error, entry.next_try = EntryState.REFUSED, outcome.message, None
        else:
            wait_s = min(self.retry_after_s * 2 ** (entry.attempts - 1), self.max_retry_after_s)
            entry.state, entry.last_error = EntryState.PENDING, outcome.message
            entry.next_try = (now + timedelta(seconds=wait_s)).isoformat()

    def _load(self) -> list[OutboxEntry]:
        if not self.state_file.is_file():
            return []
        try:
            document = json.loads(self.state_file.read_text())
            if document.get("format") != FORMAT or document.get("version") != VERSION:
                raise ValueError(f"not a {FORMAT} version {VERSION} file")
            return [OutboxEntry.from_dict(item) for item in document["entries"]]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise InputError(f"{self.state_file}: is not a readable outbox ({error}); restore it or start a new "
                             "outbox folder") from None

    def _save(self, entries: list[OutboxEntry]) -> None:
        document = {"format": FORMAT, "version": VERSION, "entries": [entry.as_dict() for entry in entries]}
        with atomic_output(self.state_file) as temporary:
            temporary.write_text(json.dumps(document, indent=1))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        descriptor = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
