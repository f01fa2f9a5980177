"""The node's DICOM listener: a pynetdicom storage SCP (C-ECHO, C-STORE) that writes every instance durably into the
spool before it answers success.

* Association: a calling AE title not in the allow-list (or an address outside ``allow_hosts``) is rejected
  permanently ("calling AE title not recognised",
  PS3.8 A-ASSOCIATE-RJ result 1, source 1, reason 3), as is a wrong called AE title; while the spool is full every
  association is rejected as transient ("temporary congestion", result 2, source 3, reason 1) so the sender tries
  again later.
* C-STORE: an instance already in the spool (same SOP Instance UID) is answered success and not stored again; a new
  one is written to a temporary file, flushed to disk, renamed, recorded in the queue, and only then answered
  0x0000; a spool that filled up during the association answers 0xA700 (Refused: out of resources), a write that
  fails 0xA700 too, an instance that cannot be decoded 0xC000 (Error: cannot understand).
* A study that alone fills the quota (``spool_quota_mb``) can never be processed: it is refused for good when an
  instance of it finds the quota reached, its instances leave the spool, and further instances of it are answered
  0xA700 without being stored, until the quota is raised.
* A study some of whose instances were refused for want of room is incomplete: when its quiet period ends without
  its sender having sent them again, it is refused with that reason rather than processed in part.
* Completion: a study is complete ``quiet_seconds`` after its last instance (the scheduler's job) or, with
  ``queue_on_release``, as soon as the association that sent it is released normally (not aborted, and with no
  instance refused: a sender told 0xA700 sends the rest again later).
* TLS: with ``tls_cert`` and ``tls_key`` the listener speaks DICOM over TLS only (PS3.15 B.1, TLS 1.2 or later); with
  ``tls_ca`` a sender must present a certificate signed by that CA.  A failed handshake (a plain sender, a
  certificate not trusted) closes that connection, is logged with the peer's address, and the listener goes on.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import sqlite3
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from ctfm_engine.dicom.pacs import COMPRESSED, LABELMAP_SEGMENTATION, UNCOMPRESSED
from ctfm_engine.errors import UsageError
from deploy_app.node.audit import AuditLog
from deploy_app.node.config import NodeConfig
from deploy_app.node.metrics import NodeMetrics
from deploy_app.node.queue import JobQueue
from deploy_app.node.spool import Spool, uid_key

if TYPE_CHECKING:
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("deploy_app.node")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_UNKNOWN_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CONGESTION = (0x02, 0x03, 0x01)
# pynetdicom runs the TLS handshake in its accepting thread: a peer that never speaks must not hold it for long.
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass
class AssociationTally:
    """What one association did, for the audit trail."""

    calling_ae: str
    peer: str
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes: int = 0
    jobs: set[int] = field(default_factory=set)


class Receiver:
    """The storage SCP of ``config`` writing into ``spool`` and ``queue``.

    Parameters
    ----------
    on_complete:
        Called with the ids of the jobs an association's release completed (``queue_on_release``), and with an
        empty list whenever a new study starts arriving, so the node can wake its scheduler.
    metrics:
        Counts instances (new, duplicate, refused) and associations (accepted, rejected by reason) when given.
    """

    def __init__(self, config: NodeConfig, spool: Spool, queue: JobQueue, audit: AuditLog,
                 on_complete: Callable[[list[int]], None], metrics: NodeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.spool = spool
        self.queue = queue
        self.audit = audit
        self.on_complete = on_complete
        self._server: ThreadedAssociationServer | None = None
        self._tallies: dict[int, AssociationTally] = {}
        self._lock = threading.Lock()
        self._spool_bytes = queue.spool_bytes()
        quota = config.spool_quota_mb
        self._quota_bytes = None if quota is None else int(quota * 2**20)
        self._networks = [ipaddress.ip_network(network, strict=False) for network in config.allow_hosts]

    # Backpressure.

    @property
    def spool_bytes(self) -> int:
        """Bytes of received instances the spool holds (as the quota counts them)."""
        return self._spool_bytes

    def full(self) -> str | None:
        """Why the spool takes no more instances now (quota reached, disk almost full), or None."""
        quota = self.config.spool_quota_mb
        if quota is not None and self._spool_bytes >= quota * 2**20:
            return f"the spool holds {self._spool_bytes / 2**20:.1f} MB, its quota is {quota:g} MB"
        free = self.spool.free_mb()
        if free < self.config.min_free_mb:
            return f"{free:.0f} MB free on the spool's disk, less than the {self.config.min_free_mb:g} MB kept free"
        return None

    def released_bytes(self, size: int) -> None:
        """Retention removed ``size`` bytes of instances from the spool."""
        with self._lock:
            self._spool_bytes = max(0, self._spool_bytes - size)

    # Server.

    def start(self) -> None:
        from pynetdicom import AE, StoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for whole CT slices
        syntaxes = [*UNCOMPRESSED, *COMPRESSED]
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(LABELMAP_SEGMENTATION, syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, self._store),
                    (evt.EVT_RELEASED, self._released), (evt.EVT_ABORTED, self._aborted),
                    (evt.EVT_REJECTED, self._rejected), (evt.EVT_ACCEPTED, self._accepted)]
        context = None
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            context = tls_server_context(self.config.tls_cert, self.config.tls_key, self.config.tls_ca)
        self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers,
                                       ssl_context=context)
        log.info("listening as %s on port %d%s%s", self.config.ae_title, self.config.port,
                 f" ({self.config.host})" if self.config.host else "",
                 "" if context is None else ", DICOM over TLS only, "
                 + ("client certificates signed by tls_ca required" if self.config.tls_ca else "no client certificate"
                    " asked"))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # Handlers (each runs in its association's thread).

    def _requested(self, event: Event) -> None:
        calling = _calling_ae(event)
        allowed = self.config.allow_ae
        if allowed and calling not in allowed:
            self._reject(event, REJECT_UNKNOWN_CALLING_AE, calling, "calling AE title not in the allow-list",
                         "calling_ae")
            return
        if not self.host_allowed(_peer(event)):
            self._reject(event, REJECT_UNKNOWN_CALLING_AE, calling, f"address {_peer(event)} not in allow_hosts",
                         "calling_host")
            return
        full = self.full()
        if full:
            self._reject(event, REJECT_CONGESTION, calling, f"spool full: {full}", "spool_full")
            return
        with self._lock:
            self._tallies[id(event.assoc)] = AssociationTally(calling, _peer(event))

    def host_allowed(self, address: str) -> bool:
        """Whether ``address`` may send studies (``allow_hosts``; empty: any)."""
        if not self._networks:
            return True
        try:
            peer = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if peer.version == 6 and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        return any(peer in network for network in self._networks)

    def _reject(self, event: Event, answer: tuple[int, int, int], calling: str, reason: str, kind: str) -> None:
        self._count_rejection(kind)
        log.warning("association from %s (%s) rejected: %s", calling, _peer(event), reason)
        self.audit.record("association-refused", calling_ae=calling, peer=_peer(event), reason=reason)
        event.assoc.acse.send_reject(*answer)
        event.assoc.kill()  # returns once the A-ASSOCIATE-RJ is out; the socket is closed right after

    def _rejected(self, event: Event) -> None:
        # pynetdicom's own rejections (wrong called AE title); ours are recorded where they are made.
        with self._lock:
            if id(event.assoc) in self._tallies:
                tally = self._tallies.pop(id(event.assoc))
                reason = "called AE title is not ours"
                self._count_rejection("called_ae")
                log.warning("association from %s (%s) rejected: %s", tally.calling_ae, tally.peer, reason)
                self.audit.record("association-refused", calling_ae=tally.calling_ae, peer=tally.peer,
                                  reason=reason)

    def _accepted(self, event: Event) -> None:
        if self.metrics is not None:
            self.metrics.accepted.inc()

    def _count_rejection(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(kind).inc()

    def _store(self, event: Event) -> int:
        tally = self._tally(event)  # one C-STORE at a time per association: its tally tells what this one did
        stored, duplicates = tally.stored, tally.duplicates
        status = self._store_instance(event, tally)
        if self.metrics is not None:
            outcome = "new" if tally.stored > stored else "duplicate" if tally.duplicates > duplicates else "refused"
            self.metrics.instances.labels(outcome).inc()
        return status

    def _store_instance(self, event: Event, tally: AssociationTally) -> int:
        full = self.full()
        if full:
            tally.refused += 1
            if tally.refused == 1:  # once per association; its record at the end counts them all
                log.warning("C-STORE from %s refused (0xA700): %s", tally.calling_ae, full)
            try:
                study_key = self._study_key(event.dataset, tally.calling_ae)
                size = event.request.DataSet.getbuffer().nbytes
                sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
            except Exception:  # undecodable: refused (0xA700) like any instance now, nothing more to say
                return OUT_OF_RESOURCES
            self._refused_for_room(study_key, sop_uid, size)
            return OUT_OF_RESOURCES
        sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        if not sop_uid:
            tally.refused += 1
            return CANNOT_UNDERSTAND
        if self.queue.known_instance(uid_key("sop", sop_uid)):
            tally.duplicates += 1
            return SUCCESS
        try:
            study_key = self._study_key(event.dataset, tally.calling_ae)
            data = event.encoded_dataset()
        except Exception as error:  # pydicom signals undecodable data with many exception types
            tally.refused += 1
            log.warning("C-STORE from %s: cannot decode the instance (%s)", tally.calling_ae, type(error).__name__)
            return CANNOT_UNDERSTAND
        return self._keep(sop_uid, study_key, data, tally)

    def store_file(self, data: bytes, tally: AssociationTally) -> tuple[int, str, str]:
        """Store one DICOM file (Part 10 bytes, e.g. a STOW-RS part) as a C-STORE of it would be: the status
        (0x0000, 0xA700 or 0xC000), its SOP Class UID and SOP Instance UID (empty when unreadable)."""
        try:
            header = pydicom.dcmread(io.BytesIO(data), defer_size=4096, stop_before_pixels=False)
            sop_class = str(header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID") or "")
            sop_uid = str(header.get("SOPInstanceUID") or header.file_meta.get("MediaStorageSOPInstanceUID") or "")
            study_key = self._study_key(header, tally.calling_ae)
        except Exception as error:  # pydicom signals undecodable data with many exception types
            tally.refused += 1
            log.warning("STOW-RS from %s: cannot decode a part (%s)", tally.peer, type(error).__name__)
            return CANNOT_UNDERSTAND, "", ""
        sop_uid = sop_uid.strip()
        full = self.full()
        if full:
            tally.refused += 1
            if tally.refused == 1:
                log.warning("STOW-RS from %s: instance refused (0xA700): %s", tally.peer, full)
            self._refused_for_room(study_key, sop_uid, len(data))
            return OUT_OF_RESOURCES, sop_class, sop_uid
        if not sop_uid or not sop_class:
            tally.refused += 1
            return CANNOT_UNDERSTAND, sop_class, sop_uid
        if self.queue.known_instance(uid_key("sop", sop_uid)):
            tally.duplicates += 1
            return SUCCESS, sop_class, sop_uid
        return self._keep(sop_uid, study_key, data, tally), sop_class, sop_uid

    def _keep(self, sop_uid: str, study_key: str, data: bytes, tally: AssociationTally) -> int:
        """Write one new instance durably into the spool and record it: the status to answer."""
        sop_key = uid_key("sop", sop_uid)
        if self._refused_as_oversized(study_key):
            tally.refused += 1  # a study refused as larger than the quota (still the same): not stored again
            return OUT_OF_RESOURCES
        path = self.spool.instance_path(study_key, sop_key)
        try:
            self.spool.write_durably(path, data)
        except OSError as error:
            tally.refused += 1
            log.error("%s: cannot write to the spool (%s)", tally.calling_ae, error.strerror)
            self._note_missing(study_key, sop_key)
            return OUT_OF_RESOURCES
        try:
            stored = self.queue.record_instance(study_key=study_key, sop_key=sop_key,
                                                file=str(path.relative_to(self.spool.root)), size=len(data),
                                                calling_ae=tally.calling_ae)
        except sqlite3.Error as error:  # e.g. "database or disk is full": the file is not kept unrecorded
            path.unlink(missing_ok=True)
            tally.refused += 1
            log.error("%s: cannot record the instance in the queue (%s)", tally.calling_ae, error)
            self._note_missing(study_key, sop_key)
            return OUT_OF_RESOURCES
        if stored.duplicate:  # the same instance arrived over two associations at once: one copy, one record
            tally.duplicates += 1
            return SUCCESS
        with self._lock:
            self._spool_bytes += len(data)
        tally.stored += 1
        tally.bytes += len(data)
        tally.jobs.add(stored.job_id)
        if stored.new_job:
            log.info("job %d: study %s arriving from %s", stored.job_id, study_key[:12], tally.calling_ae)
        return SUCCESS

    def _refused_for_room(self, study_key: str, sop_uid: str, size: int) -> None:
        """An instance was refused because the spool is full: its study is incomplete until it comes again (or is
        refused for good when it fills the quota alone)."""
        if sop_uid:
            self._note_missing(study_key, uid_key("sop", sop_uid))
        self._refuse_if_oversized(study_key, size)

    def _note_missing(self, study_key: str, sop_key: str) -> None:
        try:
            self.queue.note_missing(study_key, sop_key)
        except sqlite3.Error as error:  # the disk is full for the queue too: the quiet period will not know
            log.error("cannot record a refused instance as missing (%s)", error)

    def _refused_as_oversized(self, study_key: str) -> bool:
        """Whether ``study_key`` was refused as larger than the quota, and the quota has not been raised since."""
        refused_at = self.queue.oversized_quota(study_key)
        return self._quota_bytes is not None and refused_at is not None and refused_at >= self._quota_bytes

    def _refuse_if_oversized(self, study_key: str, size: int) -> None:
        """The quota is reached: when the study of this instance (``size`` bytes) fills it alone, it can never be
        processed here, so it is refused for good (with its reason in status and the audit trail) and its instances
        leave the spool."""
        if self._quota_bytes is None:
            return
        held = self.queue.study_bytes(study_key)
        if held + size <= self._quota_bytes or self._refused_as_oversized(study_key):
            return
        reason = (f"the study is larger than the spool's quota: {held / 2**20:.1f} MB of it were received when the "
                  f"{self.config.spool_quota_mb:g} MB quota was reached; raise spool_quota_mb, or send fewer "
                  "series, then send it again")
        job, files = self.queue.refuse_oversized(study_key, self._quota_bytes, reason)
        freed = 0
        for name in files:
            path = self.spool.root / name
            try:
                freed += path.stat().st_size
                path.unlink()
            except OSError:
                pass
        self.released_bytes(freed)
        if job is not None:
            log.warning("job %d refused: %s", job.id, reason)
            self.audit.record("refused", job=job.id, study=job.study_key, calling_ae=job.calling_ae,
                              stage="receiving", reason=reason, instances_removed=len(files), bytes_removed=freed)
            self.on_complete([])

    def _study_key(self, header: Any, calling_ae: str) -> str:
        study_uid = str(header.get("StudyInstanceUID") or "").strip()
        if study_uid:
            return uid_key("study", study_uid)
        # A sender that blanked the Study Instance UID: its instances are grouped by series (or frame of reference).
        series_uid = str(header.get("SeriesInstanceUID") or header.get("FrameOfReferenceUID") or "").strip()
        return uid_key("blank-study", f"{calling_ae}:{series_uid}")

    def _released(self, event: Event) -> None:
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is not None:
            self.finish(tally, "released", complete=True)

    def _aborted(self, event: Event) -> None:
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is not None:
            self.finish(tally, "aborted", complete=False)

    def finish(self, tally: AssociationTally, outcome: str, *, complete: bool, event: str = "association") -> None:
        """Record what an association (or a STOW-RS request: ``event``) did; with ``complete`` and
        ``queue_on_release`` its studies are complete now, unless instances of it were refused (spool full: the
        study is cut short, the quiet period decides)."""
        log.info("%s from %s %s: %d stored, %d duplicate(s), %d refused", event.replace("-", " "), tally.calling_ae,
                 outcome, tally.stored, tally.duplicates, tally.refused)
        self.audit.record(event, calling_ae=tally.calling_ae, peer=tally.peer, outcome=outcome,
                          stored=tally.stored, duplicates=tally.duplicates, refused=tally.refused, bytes=tally.bytes,
                          jobs=sorted(tally.jobs))
        if complete and self.config.queue_on_release and tally.jobs and not tally.refused:
            self.on_complete(sorted(tally.jobs))
        elif tally.stored:
            self.on_complete([])

    def _tally(self, event: Event) -> AssociationTally:
        with self._lock:
            tally = self._tallies.get(id(event.assoc))
            if tally is None:  # an association that started before a handler was bound: count it anyway
                tally = self._tallies[id(event.assoc)] = AssociationTally(_calling_ae(event), _peer(event))
            return tally


def tls_server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A server context (TLS 1.2 or later) presenting ``cert``; with ``ca``, peers must present a certificate it
    signed.

    Raises
    ------
    UsageError
        A file cannot be read as PEM, or the key does not match the certificate.
    """
    context = _LoggedServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as error:
        raise UsageError(f"tls_cert {cert} and tls_key {key}: cannot be read as a PEM certificate and its key "
                         f"({getattr(error, 'reason', None) or error.strerror or error}); give matching PEM files")\
            from None
    if ca is not None:
        try:
            context.load_verify_locations(ca)
        except (ssl.SSLError, OSError) as error:
            raise UsageError(f"tls_ca {ca}: cannot be read as PEM CA certificates "
                             f"({getattr(error, 'reason', None) or error.strerror or error}); give a PEM file")\
                from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _LoggedServerContext(ssl.SSLContext):
    """A server context whose handshakes are bounded in time and logged when they fail."""

    def wrap_socket(self, sock: socket.socket, *args: Any, **options: Any) -> ssl.SSLSocket:  # type: ignore[override]
        peer, timeout = _address(sock), sock.gettimeout()
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            wrapped = super().wrap_socket(sock, *args, **options)
        except (ssl.SSLError, OSError) as error:
            reason = error.verify_message if isinstance(error, ssl.SSLCertVerificationError) else \
                getattr(error, "reason", None) or type(error).__name__
            log.warning("TLS handshake from %s failed (%s): connection closed", peer, reason)
            raise
        wrapped.settimeout(timeout)
        return wrapped


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "a peer that left"
    return f"{host}:{port}"


def _calling_ae(event: Any) -> str:
    # The A-ASSOCIATE request's own value: the requestor's ae_title is only set after EVT_REQUESTED.
    title = event.assoc.requestor.primitive.calling_ae_title
    return (title.decode(errors="replace") if isinstance(title, bytes) else str(title)).strip()


def _peer(event: Any) -> str:
    return str(event.assoc.requestor.address)
