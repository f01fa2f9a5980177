"""PACS clients: send result files to a PACS and fetch series from it, over DICOMweb or DIMSE.

Two protocol families reach a PACS:

* DICOMweb (PS3.18): HTTP services below a base URL such as ``http://pacs:8042/dicom-web``.  STOW-RS stores
  instances (``POST /studies``), QIDO-RS searches (``GET /series?Modality=SEG``), WADO-RS retrieves
  (``GET /studies/{study}/series/{series}``).  dicomweb-client speaks it.
* DIMSE (PS3.7, services in PS3.4): the DICOM network protocol between application entities (AEs) named by AE
  titles.  An association negotiates one presentation context per kind of object (SOP class + transfer syntax),
  then C-ECHO verifies, C-STORE stores, C-FIND searches, C-GET retrieves over the same association, and C-MOVE asks
  the PACS to send the objects to an AE it knows by title, host and port (here a storage SCP started for the
  duration of the retrieval).  pynetdicom speaks it.

One string names a PACS: ``http(s)://HOST[:PORT]/PATH`` for DICOMweb (``user:password@`` before the host is used
for HTTP basic authentication and never shown), ``dicom://CALLED_AET@HOST:PORT`` for DIMSE and
``dicom-tls://CALLED_AET@HOST:PORT`` for DIMSE over TLS (PS3.15 B.1), our own (calling) AE title being given
separately (default ``CTFM``).

TLS (``https://``, ``dicom-tls://``, at least TLS 1.2): the PACS's certificate is verified against a CA file, or the
system's CAs, and must name the host as given; our own certificate and key go along when the PACS asks for one
(:class:`TlsSettings`).  A DICOMweb PACS may take a bearer token instead (``Authorization: Bearer``; never logged or
shown).  A TLS failure (certificate not trusted, ours refused, no TLS on that port) is permanent: the configuration
must change.  C-MOVE's own storage SCP listens without TLS: fetch from a TLS-only PACS by C-GET.

Failures are transient or permanent.  Transient ones (connection refused or reset, no answer in time, HTTP 5xx,
429 or 408, an association rejected as transient or aborted) are retried with exponential back-off
(:class:`RetryPolicy`).  Permanent ones (other HTTP 4xx, DIMSE failure statuses such as 0xA7xx or 0xCxxx, a
presentation context or an association refused for good) are reported per file and never retried.

Sending is idempotent: the SOPInstanceUID is an object's identity, and storing an instance the PACS already holds
does not duplicate it.  Orthanc 1.10 keeps its copy and answers success to a repeated STOW-RS and C-STORE alike,
so the answer cannot tell a re-send from a first store; :meth:`PacsClient.store` therefore first asks the PACS
which instances of each series it holds (one QIDO-RS or C-FIND per series) and reports those as
``already-present`` without sending them.  ``skip_present=False`` sends them anyway.  A PACS that answers a
C-STORE with 0x0111 (duplicate SOP instance) is reported as ``already-present`` too.

Nothing here logs patient data: logs and reports name files, UIDs, modalities, series numbers and counts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import ssl
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ctfm_engine.errors import CTFMError, InputError, PacsError, UsageError
from ctfm_engine.io import atomic_folder

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.events import Event

log = logging.getLogger(__name__)

DEFAULT_CALLING_AET = "CTFM"
AE_TITLE_LENGTH = 16
ADDRESS_EXAMPLES = ("give a DICOMweb base URL such as https://pacs.example.org/dicom-web or a DIMSE address such "
                    "as dicom://ORTHANC@pacs.example.org:4242 (dicom-tls://ORTHANC@pacs.example.org:2762 over TLS)")

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# SOP classes pydicom 3.0 does not name yet.
SOP_CLASS_NAMES = {LABELMAP_SEGMENTATION: "Label Map Segmentation Storage"}
# What C-GET asks for: the storage classes of CT work and of its results.  C-GET needs one requested presentation
# context per SOP class and transfer syntax (at most 128 in all); C-MOVE accepts every storage class instead.
IMAGE_SOP_CLASSES = (
    CT_IMAGE,
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
    SEGMENTATION,
    LABELMAP_SEGMENTATION,
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.4",  # MR
)
DOCUMENT_SOP_CLASSES = (
    COMPREHENSIVE_3D_SR,
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Lossless and lossy encodings a PACS may hold images in; each gets its own context so the PACS sends as stored.
COMPRESSED = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
)
# QIDO-RS attributes of a series we read: Study/Series Instance UID, Modality, Series Number and Description,
# Number of Series Related Instances.
SERIES_TAGS = ("0020000D", "0020000E", "00080060", "00200011", "0008103E", "00201209")
MAX_STORAGE_CONTEXTS = 126  # of the 128 an association may propose: one is kept for C-FIND
TRANSIENT_HTTP_CODES = {408, 429}
# DIMSE statuses (PS3.7 Annex C, PS3.4 B.2.3/C.4.3).
DUPLICATE_SOP_INSTANCE = 0x0111
PENDING = {0xFF00, 0xFF01}
MOVE_DESTINATION_UNKNOWN = 0xA801
SUB_OPERATIONS_FAILED = 0xB000

T = TypeVar("T")


class _Failure(Exception):
    """One failed exchange with a PACS; ``transient`` tells whether trying again may help."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class _ConnectionLost(_Failure):
    """The connection or association is gone: the files not yet sent wait for the next attempt."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, transient=True)


class _ContextsRefused(_Failure):
    """The PACS answered the association request but accepted none of the proposed presentation contexts."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, transient=False)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off for transient failures.

    Parameters
    ----------
    attempts:
        Tries in all, the first included (1: no retry).
    first_delay_s:
        Seconds to wait after the first failed try.
    factor:
        Each further wait is this many times longer than the previous one ...
    max_delay_s:
        ... up to this many seconds.
    """

    attempts: int = 4
    first_delay_s: float = 0.5
    factor: float = 2.0
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.first_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError(f"delays must not be negative, got {self.first_delay_s} and {self.max_delay_s}")
        if self.factor < 1:
            raise ValueError(f"factor must be at least 1, got {self.factor}")

    def delay_s(self, failed_attempt: int) -> float:
        """Seconds to wait after the try numbered ``failed_attempt`` (from 1) failed."""
        return min(self.first_delay_s * self.factor ** (failed_attempt - 1), self.max_delay_s)

    def call(self, operation: Callable[[], T], *, what: str) -> T:
        """Run ``operation``; while it raises an exception whose ``transient`` attribute is true, wait and retry.

        The last exception propagates when every attempt failed; other exceptions propagate at once.  Each retry is
        logged at INFO with ``what`` (which must not hold patient data).
        """
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except Exception as error:
                if not getattr(error, "transient", False) or attempt == self.attempts:
                    raise
                delay = self.delay_s(attempt)
                log.info("%s: %s; attempt %d of %d in %.2g s", what, error, attempt + 1, self.attempts, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


@dataclass(frozen=True)
class DicomWebAddress:
    """A DICOMweb service: its base URL (without credentials) and optional HTTP basic-authentication credentials."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: ClassVar[str] = "dicomweb"

    @property
    def display(self) -> str:
        """The address as shown in logs, reports and outboxes: never with credentials."""
        return self.url


@dataclass(frozen=True)
class DimseAddress:
    """A DIMSE peer: the PACS's (called) AE title, host and port, our own (calling) AE title, and whether the
    association runs over TLS."""

    called_aet: str
    host: str
    port: int
    calling_aet: str = DEFAULT_CALLING_AET
    tls: bool = False
    protocol: ClassVar[str] = "dimse"

    @property
    def display(self) -> str:
        """The address in the ``dicom://CALLED_AET@HOST:PORT`` (or ``dicom-tls://``) form it was given in."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'dicom-tls' if self.tls else 'dicom'}://{self.called_aet}@{host}:{self.port}"


@dataclass(frozen=True)
class TlsSettings:
    """How we make TLS connections to a PACS: ``ca_file`` verifies its certificate (None: the system's CAs), and
    ``cert_file`` with ``key_file`` (PEM) is our own certificate, for a PACS that asks for one."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise UsageError("a client certificate and its private key go together: give both PEM files or neither")

    def client_context(self) -> ssl.SSLContext:
        """A client context (TLS 1.2 or later, the peer's certificate and host name verified) with these files.

        Raises
        ------
        UsageError
            A file is missing or is not a PEM certificate, key or CA bundle.
        """
        context = _TlsClientContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca_file is None:
            context.load_default_certs()
        else:
            _load_pem(lambda: context.load_verify_locations(self.ca_file), self.ca_file, "CA certificates")
        if self.cert_file is not None and self.key_file is not None:
            _load_pem(lambda: context.load_cert_chain(self.cert_file, self.key_file), self.cert_file,
                      f"certificate matching the key {self.key_file}")
        return context


def _load_pem(load: Callable[[], None], path: Path, what: str) -> None:
    """Run ``load`` (an SSLContext method reading ``path``); a missing or unreadable file is one UsageError."""
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file; give the PEM file of the {what}")
    try:
        load()
    except (ssl.SSLError, ValueError) as error:
        raise UsageError(f"{path}: cannot be read as PEM {what} ({_ssl_reason(error)}); give a PEM file") from None


class _TlsSocket(ssl.SSLSocket):
    """A client TLS socket that keeps its TLS failure on its context: pynetdicom catches it and reports only that
    the connection failed or was closed."""

    context: _TlsClientContext

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as error:
            self.context.failure = error
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as error:  # TLS 1.3: a refused client certificate is told after the handshake
            self.context.failure = error
            raise


class _TlsClientContext(ssl.SSLContext):
    """An SSLContext whose sockets record the last TLS failure in ``failure``."""

    sslsocket_class = _TlsSocket
    failure: ssl.SSLError | None = None


def _ssl_cause(error: BaseException) -> ssl.SSLError | None:
    """The ssl.SSLError inside ``error`` (requests and urllib3 wrap it in their own exceptions), if any."""
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        item = pending.pop(0)
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLError):
            return item
        pending.extend([*item.args, getattr(item, "reason", None), item.__cause__, item.__context__])
    return None


def _ssl_reason(error: BaseException) -> str:
    """What went wrong in OpenSSL's words, e.g. ``certificate verify failed (unable to get local issuer
    certificate)``, without the source location."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed ({error.verify_message})"
    reason = getattr(error, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", _first_line(error))


def _tls_failure(peer: str, error: ssl.SSLError) -> _Failure:
    """One sentence for a failed TLS exchange with ``peer`` (HOST:PORT); permanent unless the peer only closed."""
    reason = _ssl_reason(error)
    code = str(getattr(error, "reason", "") or "")
    if code in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
        hint = "; the peer does not speak TLS on this port"
    elif "ALERT" in code:
        hint = "; the peer refused our TLS connection (its CA list, our client certificate or the TLS version)"
    elif isinstance(error, ssl.SSLCertVerificationError):
        hint = "; check the CA file and that the certificate names this host"
    else:
        hint = ""
    closed = isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError)
    return _Failure(f"TLS handshake with {peer} failed: {reason}{hint}", transient=closed)


PacsAddress = DicomWebAddress | DimseAddress


def parse_address(text: str, *, calling_aet: str = DEFAULT_CALLING_AET) -> PacsAddress:
    """The PACS named by ``text``: ``http(s)://HOST[:PORT]/PATH`` (DICOMweb), ``dicom://AET@HOST:PORT`` (DIMSE) or
    ``dicom-tls://AET@HOST:PORT`` (DIMSE over TLS).

    Raises
    ------
    UsageError
        ``text`` is neither, or ``calling_aet`` is not a valid AE title; the message gives an example.
    """
    shown = _without_password(text.strip())
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()

    def bad(problem: str) -> UsageError:
        return UsageError(f"{shown!r} is not a PACS address ({problem}); {ADDRESS_EXAMPLES}")

    try:
        port = parts.port
    except ValueError:
        raise bad("the port must be a number from 1 to 65535") from None
    if port == 0:
        raise bad("the port must be a number from 1 to 65535")
    if scheme not in ("http", "https", "dicom", "dicom-tls"):
        raise bad(f"unknown scheme {scheme + '://' if scheme else 'missing'}")
    if not parts.hostname:
        raise bad("no host")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if scheme in ("http", "https"):
        if parts.query or parts.fragment:
            raise bad("a DICOMweb base URL has no query or fragment")
        netloc = host if port is None else f"{host}:{port}"
        return DicomWebAddress(
            urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", "")),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )
    if not parts.username or parts.password is not None:
        raise bad(f"the PACS's AE title goes before the host: {scheme}://AET@HOST:PORT")
    if port is None:
        raise bad("a DIMSE address needs its port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad("a DIMSE address ends with the port")
    called_aet = unquote(parts.username)
    problem = ae_title_problem(called_aet)
    if problem:
        raise bad(f"AE title {called_aet!r} {problem}")
    problem = ae_title_problem(calling_aet)
    if problem:
        raise UsageError(f"--aet {calling_aet!r}: an AE title {problem}; e.g. --aet CTFM")
    return DimseAddress(called_aet, parts.hostname, port, calling_aet, tls=scheme == "dicom-tls")


def read_bearer_token(path: str | Path, setting: str) -> str:
    """The bearer token held in the file ``path`` (surrounding whitespace dropped), read afresh at each call so that a
    rotated file takes effect; ``setting`` names where the path was given (e.g. ``--token-file``).

    Raises
    ------
    UsageError
        The file cannot be read or is empty (the message names ``setting`` and the file, never the token).
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        problem = getattr(error, "strerror", None) or type(error).__name__
        raise UsageError(f"{setting} {path} cannot be read ({problem}); give the file that holds the bearer token"
                         ) from None
    if not token:
        raise UsageError(f"{setting} {path} is empty; write the bearer token into it")
    return token


def ae_title_problem(title: str) -> str | None:
    """Why ``title`` is not a valid AE title (empty, too long, characters DICOM forbids), or None when it is."""
    if not title.strip():
        return "is empty"
    if len(title) > AE_TITLE_LENGTH:
        return f"has more than {AE_TITLE_LENGTH} characters"
    if "\\" in title or any(not 32 <= ord(char) < 127 for char in title):
        return "may hold printable ASCII characters other than a backslash only"
    return None


def _without_password(text: str) -> str:
    return re.sub(r"://([^/@:]*):[^/@]*@", r"://\1:***@", text)


@dataclass(frozen=True)
class OutgoingFile:
    """A DICOM file to store, with the header values a PACS identifies it by."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str

    @property
    def context_key(self) -> tuple[str, str]:
        """(SOP class, transfer syntax) with both little-endian uncompressed syntaxes as one: a DIMSE context."""
        uncompressed = self.transfer_syntax_uid in UNCOMPRESSED
        return self.sop_class_uid, "uncompressed" if uncompressed else self.transfer_syntax_uid


def read_outgoing(path: str | Path) -> OutgoingFile:
    """Read the identifying header of one DICOM file to store.

    Raises
    ------
    InputError
        The file does not exist, is not a DICOM Part-10 file, or lacks a UID a PACS needs.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: does not exist or is not a file; give DICOM files or folders that hold them")
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise InputError(f"{path}: is not a DICOM file (no DICM preamble); only DICOM files can be sent to a PACS")\
            from None
    except Exception as error:  # pydicom signals damaged files with many exception types
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise InputError(f"{path}: is a damaged DICOM file ({reason}); replace it with an intact copy") from None
    file_meta = getattr(header, "file_meta", None) or Dataset()
    values = {
        "SOPClassUID": _text(header, "SOPClassUID") or _text(file_meta, "MediaStorageSOPClassUID"),
        "SOPInstanceUID": _text(header, "SOPInstanceUID") or _text(file_meta, "MediaStorageSOPInstanceUID"),
        "StudyInstanceUID": _text(header, "StudyInstanceUID"),
        "SeriesInstanceUID": _text(header, "SeriesInstanceUID"),
        "TransferSyntaxUID": _text(file_meta, "TransferSyntaxUID"),
    }
    if values["SOPClassUID"] == MEDIA_STORAGE_DIRECTORY:
        raise InputError(f"{path}: is a DICOMDIR (a media index), not an object a PACS stores; send the files it "
                         "lists, or their folder")
    missing = [keyword for keyword, value in values.items() if not value]
    if missing:
        raise InputError(f"{path}: has no {', '.join(missing)}; a PACS identifies every object by these UIDs, so "
                         "the file cannot be stored as it is")
    return OutgoingFile(path, values["SOPClassUID"], values["SOPInstanceUID"], values["StudyInstanceUID"],
                        values["SeriesInstanceUID"], values["TransferSyntaxUID"])


def collect_outgoing(paths: Iterable[str | Path]) -> list[OutgoingFile]:
    """The DICOM files named by ``paths``, each a file or a folder searched recursively, validated up front.

    A file named on its own must be DICOM; in a folder, files without the DICM preamble (notes, logs) and DICOMDIR
    indexes are skipped.  A SOP instance met twice is sent once.

    Raises
    ------
    InputError
        A named file is not sendable (see :func:`read_outgoing`), a path does not exist, or a folder holds no
        DICOM file.
    """
    files: dict[str, OutgoingFile] = {}
    for given in (Path(path) for path in paths):
        if given.is_dir():
            found = [read_outgoing(path) for path in sorted(given.rglob("*"))
                     if path.is_file() and path.name.upper() != "DICOMDIR" and _has_preamble(path)]
            if not found:
                raise InputError(f"{given}: holds no DICOM file to send; give the folder or files of the results")
            skipped = sum(1 for path in given.rglob("*") if path.is_file()) - len(found)
            if skipped:
                log.info("%s: %d file(s) that are not DICOM objects skipped", given, skipped)
        elif given.exists() or given.is_symlink():
            found = [read_outgoing(given)]
        else:
            raise InputError(f"{given}: does not exist; give DICOM files or folders that hold them")
        for outgoing in found:
            if outgoing.sop_instance_uid in files:
                log.info("%s: SOP instance %s is also in %s; sent once", outgoing.path, outgoing.sop_instance_uid,
                         files[outgoing.sop_instance_uid].path)
            else:
                files[outgoing.sop_instance_uid] = outgoing
    return list(files.values())


def _has_preamble(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(132)[128:132] == b"DICM"


class StoreStatus(str, Enum):
    """What became of one file sent to a PACS."""

    STORED = "stored"
    ALREADY_PRESENT = "already-present"  # the PACS held this SOP instance already; not duplicated
    REFUSED = "refused"  # permanently: retrying will not help until something changes
    FAILED = "failed"  # transiently, on every attempt: try again later


@dataclass(frozen=True)
class StoredFile:
    """The outcome of sending one file; ``attempts`` counts the tries it took (1 when the first settled it)."""

    path: Path
    sop_instance_uid: str
    status: StoreStatus
    message: str
    attempts: int

    @property
    def delivered(self) -> bool:
        """The PACS holds the instance now (stored, or there already)."""
        return self.status in (StoreStatus.STORED, StoreStatus.ALREADY_PRESENT)

    def as_dict(self) -> dict[str, Any]:
        return {"file": str(self.path), "sop_instance_uid": self.sop_instance_uid, "status": self.status.value,
                "message": self.message, "attempts": self.attempts}


@dataclass(frozen=True)
class StoreReport:
    """Per-file outcomes of one :meth:`PacsClient.store`, in the order the files were given."""

    destination: str
    files: list[StoredFile]
    seconds: float

    @property
    def complete(self) -> bool:
        """Every file is delivered."""
        return all(item.delivered for item in self.files)

    @property
    def not_delivered(self) -> list[StoredFile]:
        return [item for item in self.files if not item.delivered]

    def counts(self) -> dict[str, int]:
        """Files per status, every status listed."""
        return {status.value: sum(item.status is status for item in self.files) for status in StoreStatus}

    def as_dict(self) -> dict[str, Any]:
        return {"pacs": self.destination, "counts": self.counts(), "files": [item.as_dict() for item in self.files],
                "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class SeriesInfo:
    """A series a PACS holds, described without patient data."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    instances: int | None  # NumberOfSeriesRelatedInstances, when the PACS reports it

    def as_dict(self) -> dict[str, Any]:
        return {"study_instance_uid": self.study_instance_uid, "series_instance_uid": self.series_instance_uid,
                "modality": self.modality, "series_number": self.series_number,
                "series_description": self.series_description, "instances": self.instances}


class _StorageSession(ABC):
    """One connection (HTTP session or association) over which files are stored."""

    @abstractmethod
    def present(self, files: Sequence[OutgoingFile]) -> set[str]:
        """SOP instance UIDs among ``files`` that the PACS holds already (empty when it cannot tell)."""

    @abstractmethod
    def send(self, file: OutgoingFile) -> tuple[StoreStatus, str]:
        """Store one file: its status and a message; raises _Failure when it failed (transient or not)."""


class PacsClient(ABC):
    """A PACS reached over one protocol: echo, store, find series, fetch a series.

    Parameters
    ----------
    address:
        Where the PACS is (:func:`parse_address`).
    retry:
        Back-off for transient failures.
    timeout_s:
        Seconds to wait for a connection and for each answer.
    """

    def __init__(self, address: PacsAddress, *, retry: RetryPolicy | None = None, timeout_s: float = 30.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.address = address
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s

    @property
    def destination(self) -> str:
        """The PACS's address without credentials."""
        return self.address.display

    def echo(self) -> float:
        """Check that the PACS answers (C-ECHO; a QIDO-RS study search for DICOMweb): seconds the answer took.

        Raises
        ------
        PacsError
            It did not answer after the retries, or refused.
        """
        started = time.perf_counter()
        self._retrying("echo", self._echo)
        return time.perf_counter() - started

    def find_series(self, study_uid: str | None = None, modality: str | None = None,
                    series_uid: str | None = None) -> list[SeriesInfo]:
        """The series the PACS holds that match every given key (QIDO-RS, or C-FIND at SERIES level, Study Root).

        Raises
        ------
        PacsError
            The PACS did not answer after the retries, or refused the query.
        """
        return self._retrying("find", lambda: self._find_series(study_uid, modality, series_uid))

    def fetch_series(self, study_uid: str, series_uid: str, folder: str | Path) -> list[Path]:
        """Retrieve every instance of one series into ``folder`` as ``<SOPInstanceUID>.dcm``.

        The instances arrive in a staging folder first and move into ``folder`` only when the whole series is
        there: a failed fetch leaves nothing behind (a new ``folder`` is not created at all).

        Returns
        -------
        list[Path]
            The files written, sorted by name.

        Raises
        ------
        PacsError
            The PACS did not answer after the retries, refused, or holds no instance of that series.
        """
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder}: is a file; give a folder to fetch the series into")

        def fetch_once() -> list[Path]:
            with _staged(folder) as staging:
                self._retrieve(study_uid, series_uid, staging)
                names = sorted(path.name for path in staging.iterdir())
                if not names:
                    raise _Failure(f"it holds no instance of series {series_uid} in study {study_uid}",
                                   transient=False)
            return [folder / name for name in names]

        return self._retrying("fetch", fetch_once, after=f"; nothing was written to {folder}")

    def store(self, paths: Iterable[str | Path], *, skip_present: bool = True,
              on_result: Callable[[StoredFile], None] | None = None) -> StoreReport:
        """Send DICOM files (or folders of them); a per-file report, never an exception for a PACS failure.

        Parameters
        ----------
        paths:
            Files and folders (searched recursively); validated before any connection is made.
        skip_present:
            Ask the PACS first which instances it holds and do not send those (reported ``already-present``).
        on_result:
            Called with each file's outcome as soon as it is final, e.g. to record progress crash-safely.

        Raises
        ------
        InputError
            A file is not DICOM or lacks its UIDs (nothing is sent then).
        """
        files = collect_outgoing(paths)
        if not files:
            return StoreReport(self.destination, [], 0.0)
        started = time.perf_counter()
        results: dict[str, StoredFile] = {}
        waiting = files
        for attempt in range(1, self.retry.attempts + 1):
            retry_reasons: dict[str, str] = {}

            def settle(file: OutgoingFile, status: StoreStatus, message: str, attempt: int = attempt) -> None:
                results[file.sop_instance_uid] = StoredFile(file.path, file.sop_instance_uid, status, message,
                                                            attempt)
                if on_result is not None:
                    on_result(results[file.sop_instance_uid])

            try:
                with self._storage_session(waiting) as session:
                    present = session.present(waiting) if skip_present else set()
                    for file in waiting:
                        if file.sop_instance_uid in present:
                            settle(file, StoreStatus.ALREADY_PRESENT, "the PACS holds this SOP instance already; "
                                   "not sent again")
                            continue
                        try:
                            settle(file, *session.send(file))
                        except _ConnectionLost:
                            raise
                        except _Failure as failure:
                            if failure.transient:
                                retry_reasons[file.sop_instance_uid] = failure.reason
                            else:
                                settle(file, StoreStatus.REFUSED, failure.reason)
            except _Failure as failure:
                for file in waiting:
                    if file.sop_instance_uid in results or file.sop_instance_uid in retry_reasons:
                        continue
                    if failure.transient:
                        retry_reasons[file.sop_instance_uid] = failure.reason
                    else:
                        settle(file, StoreStatus.REFUSED, failure.reason)
            waiting = [file for file in waiting if file.sop_instance_uid in retry_reasons]
            if not waiting:
                break
            if attempt == self.retry.attempts:
                for file in waiting:
                    settle(file, StoreStatus.FAILED, retry_reasons[file.sop_instance_uid]
                           + (f" (on each of {attempt} attempts)" if attempt > 1 else ""))
                break
            delay = self.retry.delay_s(attempt)
            log.info("store on %s: %d file(s) not stored yet (%s); attempt %d of %d in %.2g s", self.destination,
                     len(waiting), retry_reasons[waiting[0].sop_instance_uid], attempt + 1, self.retry.attempts,
                     delay)
            time.sleep(delay)
        return StoreReport(self.destination, [results[file.sop_instance_uid] for file in files],
                           time.perf_counter() - started)

    def _retrying(self, operation: str, call: Callable[[], T], *, after: str = "") -> T:
        try:
            return self.retry.call(call, what=f"{operation} on {self.destination}")
        except _Failure as failure:
            tries = f" on each of {self.retry.attempts} attempts" if failure.transient and self.retry.attempts > 1 \
                else ""
            raise PacsError(f"{operation} on {self.destination} failed{tries}: {failure.reason}{after}",
                            transient=failure.transient) from None

    @abstractmethod
    def _echo(self) -> None: ...

    @abstractmethod
    def _find_series(self, study_uid: str | None, modality: str | None,
                     series_uid: str | None) -> list[SeriesInfo]: ...

    @abstractmethod
    def _retrieve(self, study_uid: str, series_uid: str, staging: Path) -> None:
        """Write the series' instances into ``staging`` as ``<SOPInstanceUID>.dcm``; raise _Failure if it fails."""

    @abstractmethod
    def _storage_session(self, files: Sequence[OutgoingFile]) -> Any:
        """A context manager yielding a _StorageSession fit for ``files``; raises _Failure if none can be had."""


def open_pacs(address: str | PacsAddress, *, calling_aet: str = DEFAULT_CALLING_AET,
              retry: RetryPolicy | None = None, timeout_s: float = 30.0,
              move_port: int | None = None, tls: TlsSettings | None = None,
              bearer_token: str | None = None) -> PacsClient:
    """A client for the PACS at ``address`` (a string is parsed by :func:`parse_address`).

    ``move_port`` makes a DIMSE client fetch by C-MOVE to a storage SCP it starts on that port (the PACS must know
    ``calling_aet`` at this host and port) instead of C-GET.  ``tls`` sets the CA file and our certificate for an
    ``https://`` or ``dicom-tls://`` PACS (default: the system's CAs, no certificate of ours); ``bearer_token`` is
    sent to a DICOMweb PACS as ``Authorization: Bearer``.

    Raises
    ------
    UsageError
        A setting that does not fit the address (TLS files for a plain address, a token for DIMSE or with basic
        credentials), or a TLS file that cannot be read.
    """
    if isinstance(address, str):
        address = parse_address(address, calling_aet=calling_aet)
    secure = address.tls if isinstance(address, DimseAddress) else address.url.startswith("https://")
    if tls is not None and tls != TlsSettings() and not secure:
        raise UsageError(f"{address.display}: TLS files apply to https:// and dicom-tls:// addresses only; give the "
                         "PACS's TLS address, or leave the TLS files out")
    if isinstance(address, DicomWebAddress):
        if move_port is not None:
            raise UsageError(f"{address.display}: C-MOVE is a DIMSE retrieval; a DICOMweb PACS is fetched by WADO-RS")
        return DicomWebPacs(address, retry=retry, timeout_s=timeout_s, tls=tls, bearer_token=bearer_token)
    if bearer_token is not None:
        raise UsageError(f"{address.display}: a bearer token is for a DICOMweb PACS; DIMSE authenticates by AE title "
                         "and TLS certificate")
    return DimsePacs(address, retry=retry, timeout_s=timeout_s, move_port=move_port, tls=tls)


class DicomWebPacs(PacsClient):
    """A PACS reached over DICOMweb (STOW-RS, QIDO-RS, WADO-RS) with dicomweb-client.

    Parameters
    ----------
    tls:
        For ``https://``: the CA file that verifies the PACS (default: the system's CAs) and our certificate.
    bearer_token:
        Sent as ``Authorization: Bearer``; kept out of every log, report and representation.
    """

    address: DicomWebAddress

    def __init__(self, address: DicomWebAddress, *, retry: RetryPolicy | None = None, timeout_s: float = 30.0,
                 tls: TlsSettings | None = None, bearer_token: str | None = None) -> None:
        super().__init__(address, retry=retry, timeout_s=timeout_s)
        if bearer_token is not None and not bearer_token.strip():
            raise UsageError(f"{address.display}: the bearer token is empty; give the token the PACS issued")
        if bearer_token is not None and address.username is not None:
            raise UsageError(f"{address.display}: give basic credentials in the URL or a bearer token, not both")
        self.tls = tls or TlsSettings()
        if address.url.startswith("https://"):
            self.tls.client_context()  # a missing or unreadable PEM file is refused now, not at the first request
        self._bearer_token = bearer_token

    def _client(self) -> Any:
        requests, dicomweb_client = _dicomweb_modules()
        session = requests.Session()
        if self.address.username is not None:
            session.auth = (self.address.username, self.address.password or "")
        if self._bearer_token is not None:
            session.headers["Authorization"] = f"Bearer {self._bearer_token.strip()}"
        if self.tls.ca_file is not None:
            # requests lets REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE override a session's CA file; proxies still come
            # from the environment.
            session.trust_env = False
            session.proxies = requests.utils.get_environ_proxies(self.address.url)
            session.verify = str(self.tls.ca_file)
        if self.tls.cert_file is not None and self.tls.key_file is not None:
            session.cert = (str(self.tls.cert_file), str(self.tls.key_file))
        client = dicomweb_client.DICOMwebClient(url=self.address.url, session=session, timeout=self.timeout_s)
        client.set_http_retry_params(retry=False)  # RetryPolicy decides, for every kind of transient failure
        return client

    @contextmanager
    def _calling(self) -> Iterator[None]:
        """Turn what requests raises into _Failure, transient or not."""
        requests, _ = _dicomweb_modules()
        try:
            yield
        except requests.HTTPError as error:
            raise _http_failure(error) from None
        except requests.exceptions.SSLError as error:
            cause = _ssl_cause(error)
            if cause is None:
                raise _Failure(f"TLS failure ({_first_line(error)})", transient=False) from None
            raise _tls_failure(_host_port(self.address.url), cause) from None
        except requests.Timeout:
            raise _ConnectionLost(f"no answer within {self.timeout_s:g} s") from None
        except requests.ConnectionError as error:
            raise _ConnectionLost(_connection_problem(error)) from None
        except ValueError as error:  # dicomweb-client: a response it cannot parse
            raise _Failure(f"unexpected answer ({_first_line(error)})", transient=False) from None

    def _echo(self) -> None:
        client = self._client()
        with self._calling():
            client.search_for_studies(limit=1, fields=["StudyInstanceUID"])

    def _find_series(self, study_uid: str | None, modality: str | None, series_uid: str | None) -> list[SeriesInfo]:
        client = self._client()
        filters = {key: value for key, value in (("Modality", modality), ("SeriesInstanceUID", series_uid)) if value}
        with self._calling():
            found = client.search_for_series(
                study_instance_uid=study_uid, search_filters=filters, get_remaining=True,
                fields=["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                        "NumberOfSeriesRelatedInstances"],
            )
        return [_series_info(Dataset.from_json(_only_tags(item, SERIES_TAGS))) for item in found]

    def _retrieve(self, study_uid: str, series_uid: str, staging: Path) -> None:
        client = self._client()
        with self._calling():
            # transfer-syntax=* asks for the instances as stored, not transcoded (PS3.18 8.7.3.5.2).
            for dataset in client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),)):
                dataset.save_as(staging / _instance_file_name(_text(dataset, "SOPInstanceUID")),
                                enforce_file_format=True)

    @contextmanager
    def _storage_session(self, files: Sequence[OutgoingFile]) -> Iterator[_StorageSession]:
        yield _DicomWebStorage(self, self._client())


class _DicomWebStorage(_StorageSession):
    def __init__(self, pacs: DicomWebPacs, client: Any) -> None:
        self.pacs = pacs
        self.client = client

    def present(self, files: Sequence[OutgoingFile]) -> set[str]:
        held: set[str] = set()
        for study_uid, series_uid in dict.fromkeys((file.study_instance_uid, file.series_instance_uid)
                                                   for file in files):
            try:
                with self.pacs._calling():
                    found = self.client.search_for_instances(study_uid, series_uid, fields=["SOPInstanceUID"],
                                                             get_remaining=True)
            except _ConnectionLost:
                raise
            except _Failure as failure:
                log.info("%s: cannot list the instances of series %s (%s); sending all", self.pacs.destination,
                         series_uid, failure.reason)
                continue
            held.update(str(value) for item in found for value in item.get("00080018", {}).get("Value", []))
        return held

    def send(self, file: OutgoingFile) -> tuple[StoreStatus, str]:
        requests, _ = _dicomweb_modules()
        dataset = pydicom.dcmread(file.path)
        with self.pacs._calling():
            try:
                answer = self.client.store_instances([dataset])
            except requests.HTTPError as error:  # 409 and 400 answers list the failed instances
                answer = _stow_answer(error.response)
                if answer is None or "FailedSOPSequence" not in answer:
                    raise
        for item in answer.get("FailedSOPSequence", []):
            if _text(item, "ReferencedSOPInstanceUID") == file.sop_instance_uid:
                reason = item.get("FailureReason")
                code = f"failure reason 0x{int(reason):04X}" if reason is not None else "no failure reason given"
                raise _Failure(f"STOW-RS refused it ({code}{_status_text(reason)})", transient=False)
        for item in answer.get("ReferencedSOPSequence", []):
            if _text(item, "ReferencedSOPInstanceUID") == file.sop_instance_uid:
                warning = item.get("WarningReason")
                note = "" if warning is None else f"stored with warning 0x{int(warning):04X}{_status_text(warning)}"
                return StoreStatus.STORED, note
        raise _Failure("STOW-RS answered without listing the instance as stored or failed", transient=False)


def _stow_answer(response: Any) -> Dataset | None:
    """The STOW-RS response dataset carried by an HTTP error answer (409 lists the failed instances), if any."""
    if response is None or not response.content:
        return None
    try:
        return Dataset.from_json(response.json())
    except ValueError:
        return None


def _http_failure(error: Any) -> _Failure:
    response = error.response
    code = None if response is None else response.status_code
    if code is None:
        return _Failure(f"HTTP error ({_first_line(error)})", transient=True)
    transient = code >= 500 or code in TRANSIENT_HTTP_CODES
    return _Failure(f"HTTP {code} {response.reason or ''}".rstrip(), transient=transient)


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _connection_problem(error: Exception) -> str:
    text = str(error)
    if "Connection refused" in text:
        return "connection refused"
    if "reset" in text.lower():
        return "connection reset"
    if "Name or service not known" in text or "NameResolution" in text or "nodename nor servname" in text:
        return "host name not found"
    if "No route to host" in text or "Network is unreachable" in text:
        return "host unreachable"
    return f"connection failed ({type(error).__name__})"


def _only_tags(item: dict[str, Any], tags: Sequence[str]) -> dict[str, Any]:
    """A QIDO-RS result reduced to ``tags``: the patient data some servers add never reaches a Dataset."""
    return {tag: item[tag] for tag in tags if tag in item}


def _series_info(dataset: Dataset) -> SeriesInfo:
    number = dataset.get("SeriesNumber")
    instances = dataset.get("NumberOfSeriesRelatedInstances")
    return SeriesInfo(
        study_instance_uid=_text(dataset, "StudyInstanceUID"),
        series_instance_uid=_text(dataset, "SeriesInstanceUID"),
        modality=_text(dataset, "Modality"),
        series_number=None if number in (None, "") else int(number),
        series_description=_text(dataset, "SeriesDescription"),
        instances=None if instances in (None, "") else int(instances),
    )


class DimsePacs(PacsClient):
    """A PACS reached over DIMSE (C-ECHO, C-STORE, C-FIND, C-GET or C-MOVE) with pynetdicom.

    Parameters
    ----------
    move_port:
        None: fetch by C-GET (the objects come back over our own association).  A port: fetch by C-MOVE to a
        storage SCP started on this port for the retrieval, under our calling AE title, which the PACS must know.
        That SCP listens without TLS, whatever the address says.
    tls:
        For a ``dicom-tls://`` address: the CA file that verifies the PACS (default: the system's CAs) and our
        certificate; every association we open (echo, find, get, move, store) runs over TLS then.
    """

    address: DimseAddress

    def __init__(self, address: DimseAddress, *, retry: RetryPolicy | None = None, timeout_s: float = 30.0,
                 move_port: int | None = None, tls: TlsSettings | None = None) -> None:
        super().__init__(address, retry=retry, timeout_s=timeout_s)
        if move_port is not None and not 1 <= move_port <= 65535:
            raise UsageError(f"--move-port {move_port}: give a port from 1 to 65535")
        self.move_port = move_port
        self._tls_context = (tls or TlsSettings()).client_context() if address.tls else None

    def _associate(self, ae: AE, **options: Any) -> Association:
        if self._tls_context is not None:
            self._tls_context.failure = None
            options["tls_args"] = (self._tls_context, self.address.host)
        return ae.associate(self.address.host, self.address.port, ae_title=self.address.called_aet, **options)

    def _ae(self) -> AE:
        from pynetdicom import AE

        ae = AE(ae_title=self.address.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        return ae

    @contextmanager
    def _association(self, ae: AE, **options: Any) -> Iterator[Association]:
        association = self._associate(ae, **options)
        if not association.is_established:
            raise self._association_failure(association)
        try:
            yield association
        finally:
            if association.is_established:
                association.release()

    def _association_failure(self, association: Association) -> _Failure:
        if self._tls_context is not None and self._tls_context.failure is not None:
            return _tls_failure(f"{self.address.host}:{self.address.port}", self._tls_context.failure)
        answer = association.acceptor.primitive
        if association.is_rejected and answer is not None:
            # PS3.8 9.3.4: result 1 is rejected-permanent, 2 rejected-transient.
            reason = f"association rejected ({answer.result_str}; {answer.source_str}: {answer.reason_str})"
            return _Failure(reason, transient=answer.result == 0x02)
        if answer is not None and getattr(answer, "result", None) == 0x00 and association.rejected_contexts:
            refused = "; ".join(sorted({f"{_sop_name(context.abstract_syntax)}: {context.status}"
                                        for context in association.rejected_contexts}))
            return _ContextsRefused(f"the PACS accepted none of the presentation contexts ({refused})")
        if answer is None:
            return _ConnectionLost(f"cannot connect (refused, unreachable, or no answer within {self.timeout_s:g} s)")
        return _ConnectionLost("the association was aborted")

    def _echo(self) -> None:
        from pynetdicom.sop_class import Verification

        ae = self._ae()
        ae.add_requested_context(Verification)
        with self._association(ae) as association:
            status = association.send_c_echo()
            _raise_for_status(status, "C-ECHO")

    def _find_series(self, study_uid: str | None, modality: str | None, series_uid: str | None) -> list[SeriesInfo]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FindModel

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid or ""
        query.SeriesInstanceUID = series_uid or ""
        query.Modality = modality or ""
        query.SeriesNumber = ""
        query.SeriesDescription = ""
        query.NumberOfSeriesRelatedInstances = ""
        ae = self._ae()
        ae.add_requested_context(FindModel)
        with self._association(ae) as association:
            return [_series_info(identifier) for identifier in _c_find(association, query)]

    def _retrieve(self, study_uid: str, series_uid: str, staging: Path) -> None:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        receiver = _Receiver(staging)
        if self.move_port is None:
            self._c_get(query, receiver)
        else:
            self._c_move(query, receiver)
        if receiver.errors:
            raise _Failure(f"{len(receiver.errors)} instance(s) could not be written ({receiver.errors[0]})",
                           transient=False)

    def _c_get(self, query: Dataset, receiver: _Receiver) -> None:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GetModel

        ae = self._ae()
        ae.add_requested_context(GetModel)
        for sop_class in IMAGE_SOP_CLASSES + DOCUMENT_SOP_CLASSES:
            ae.add_requested_context(sop_class, list(UNCOMPRESSED))
        for sop_class in IMAGE_SOP_CLASSES:
            for syntax in COMPRESSED:
                ae.add_requested_context(sop_class, [syntax])
        roles = [build_role(sop_class, scp_role=True) for sop_class in IMAGE_SOP_CLASSES + DOCUMENT_SOP_CLASSES]
        with self._association(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, receiver)]) as association:
            _check_retrieval(association.send_c_get(query, GetModel), "C-GET",
                             hint="it may hold SOP classes C-GET does not ask for: fetch by C-MOVE")

    def _c_move(self, query: Dataset, receiver: _Receiver) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MoveModel

        storage = self._ae()
        for context in StoragePresentationContexts:
            storage.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        for sop_class in (LABELMAP_SEGMENTATION,):
            storage.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        try:
            server = storage.start_server(("", self.move_port), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, receiver)])
        except OSError as error:
            raise _Failure(f"cannot listen on port {self.move_port} for C-MOVE ({error.strerror})",
                           transient=False) from None
        try:
            ae = self._ae()
            ae.add_requested_context(MoveModel)
            with self._association(ae) as association:
                responses = association.send_c_move(query, self.address.calling_aet, MoveModel)
                _check_retrieval(responses, "C-MOVE",
                                 hint=f"it must know AE {self.address.calling_aet} at this host, port "
                                 f"{self.move_port}")
        finally:
            server.shutdown()

    @contextmanager
    def _storage_session(self, files: Sequence[OutgoingFile]) -> Iterator[_StorageSession]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FindModel

        keys = sorted({file.context_key for file in files})
        if len(keys) > MAX_STORAGE_CONTEXTS:
            raise InputError(f"{len(keys)} kinds of objects (SOP class and transfer syntax) in one send, more than "
                             f"the {MAX_STORAGE_CONTEXTS} one DIMSE association can negotiate; send fewer at a time")
        ae = self._ae()
        for sop_class, syntax in keys:
            ae.add_requested_context(sop_class, list(UNCOMPRESSED) if syntax == "uncompressed" else [syntax])
        ae.add_requested_context(FindModel)
        association = self._associate(ae)
        if not association.is_established:
            failure = self._association_failure(association)
            if not isinstance(failure, _ContextsRefused):
                raise failure
            yield _RefusedStorage(association.rejected_contexts)
            return
        try:
            yield _DimseStorage(self, association)
        finally:
            if association.is_established:
                association.release()


class _RefusedStorage(_StorageSession):
    """What remains when a PACS accepted no presentation context: a per-file refusal saying which and why."""

    def __init__(self, rejected: Sequence[Any]) -> None:
        self.reasons = {context.abstract_syntax: context.status for context in rejected}

    def present(self, files: Sequence[OutgoingFile]) -> set[str]:
        return set()

    def send(self, file: OutgoingFile) -> tuple[StoreStatus, str]:
        raise _Failure(_context_refusal(file, self.reasons.get(file.sop_class_uid)), transient=False)


class _DimseStorage(_StorageSession):
    def __init__(self, pacs: DimsePacs, association: Association) -> None:
        self.pacs = pacs
        self.association = association

    def present(self, files: Sequence[OutgoingFile]) -> set[str]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FindModel

        if not any(context.abstract_syntax == FindModel for context in self.association.accepted_contexts):
            log.info("%s: refuses C-FIND; sending every file", self.pacs.destination)
            return set()
        held: set[str] = set()
        for study_uid, series_uid in dict.fromkeys((file.study_instance_uid, file.series_instance_uid)
                                                   for file in files):
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = series_uid
            query.SOPInstanceUID = ""
            try:
                held.update(_text(identifier, "SOPInstanceUID") for identifier in _c_find(self.association, query))
            except _ConnectionLost:
                raise
            except _Failure as failure:
                log.info("%s: cannot list the instances of series %s (%s); sending all", self.pacs.destination,
                         series_uid, failure.reason)
        return held

    def send(self, file: OutgoingFile) -> tuple[StoreStatus, str]:
        from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

        try:
            status = self.association.send_c_store(file.path)
        except ValueError as error:
            if "presentation context" in str(error).lower():
                refused = {context.abstract_syntax: context.status for context in self.association.rejected_contexts}
                raise _Failure(_context_refusal(file, refused.get(file.sop_class_uid)), transient=False) from None
            raise _Failure(f"cannot encode it for sending ({_first_line(error)})", transient=False) from None
        except RuntimeError:
            raise _ConnectionLost("the association was lost") from None
        if not status:
            raise _ConnectionLost("the association was aborted or the PACS did not answer in time")
        code = int(status.Status)
        comment = f": {status.ErrorComment}" if status.get("ErrorComment") else ""
        described = f"0x{code:04X}{_status_text(code, STORAGE_SERVICE_CLASS_STATUS)}{comment}"
        if code == 0x0000:
            return StoreStatus.STORED, ""
        if code == DUPLICATE_SOP_INSTANCE:
            return StoreStatus.ALREADY_PRESENT, f"the PACS holds this SOP instance already ({described})"
        if code_to_category(code) == "Warning":
            return StoreStatus.STORED, f"stored with warning {described}"
        raise _Failure(f"C-STORE refused it (status {described})", transient=False)


class _Receiver:
    """The C-STORE handler of a retrieval: writes each instance as received into the staging folder."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.errors: list[str] = []

    def __call__(self, event: Event) -> int:
        try:
            path = self.staging / _instance_file_name(str(event.request.AffectedSOPInstanceUID))
            path.write_bytes(event.encoded_dataset())
        except _Failure as failure:
            self.errors.append(failure.reason)
            return 0xC000  # Error: cannot understand
        except OSError as error:
            self.errors.append(error.strerror or type(error).__name__)
            return 0xA700  # Refused: out of resources
        return 0x0000


def _c_find(association: Association, query: Dataset) -> list[Dataset]:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FindModel
    from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS

    found = []
    try:
        responses = association.send_c_find(query, FindModel)
        for status, identifier in responses:
            if not status:
                raise _ConnectionLost("the association was aborted or the PACS did not answer in time")
            code = int(status.Status)
            if code in PENDING:
                if identifier is not None:
                    found.append(identifier)
            elif code == 0x0000:
                break
            else:
                raise _Failure(f"C-FIND status 0x{code:04X}{_status_text(code, QR_FIND_SERVICE_CLASS_STATUS)}",
                               transient=False)
    except ValueError as error:  # no accepted context for the query model
        raise _Failure(f"C-FIND cannot be sent ({_first_line(error)})", transient=False) from None
    return found


def _check_retrieval(responses: Iterable[tuple[Dataset, Dataset | None]], service: str, hint: str) -> None:
    """Read C-GET/C-MOVE responses to the end; raise _Failure unless every sub-operation succeeded."""
    from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

    table = QR_GET_SERVICE_CLASS_STATUS if service == "C-GET" else QR_MOVE_SERVICE_CLASS_STATUS
    final = None
    for status, _ in responses:
        if not status:
            raise _ConnectionLost(f"the association was aborted during {service}")
        final = status
        if int(status.Status) not in PENDING:
            break
    if final is None:
        raise _ConnectionLost(f"no answer to {service}")
    code = int(final.Status)
    failed = int(final.get("NumberOfFailedSuboperations") or 0)
    if code == 0x0000 and not failed:
        return
    completed = int(final.get("NumberOfCompletedSuboperations") or 0)
    if code in (0x0000, SUB_OPERATIONS_FAILED) or failed:
        raise _Failure(f"{service}: {failed} of {failed + completed} instance(s) were not sent ({hint})",
                       transient=False)
    detail = f"; {hint}" if code == MOVE_DESTINATION_UNKNOWN else ""
    raise _Failure(f"{service} status 0x{code:04X}{_status_text(code, table)}{detail}", transient=False)


def _raise_for_status(status: Dataset, service: str) -> None:
    if not status:
        raise _ConnectionLost(f"the association was aborted or the PACS did not answer {service} in time")
    code = int(status.Status)
    if code != 0x0000:
        raise _Failure(f"{service} status 0x{code:04X}{_status_text(code)}", transient=False)


def _context_refusal(file: OutgoingFile, reason: str | None) -> str:
    syntax = UID(file.transfer_syntax_uid)
    return (f"the PACS refused the presentation context for {_sop_name(file.sop_class_uid)} "
            f"({file.sop_class_uid}) in {syntax.name}: {reason or 'no accepted context'}")


def _status_text(code: Any, table: dict[int, tuple[str, str]] | None = None) -> str:
    """`` (description)`` of a DIMSE/STOW status code, empty when unknown."""
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

    if code is None:
        return ""
    code = int(code)
    for lookup in (table or {}, STORAGE_SERVICE_CLASS_STATUS, GENERAL_STATUS):
        if code in lookup and lookup[code][1]:
            return f" ({lookup[code][1]})"
    return ""


def _sop_name(uid: str) -> str:
    return SOP_CLASS_NAMES.get(uid) or UID(uid).name


@contextmanager
def _staged(folder: Path) -> Iterator[Path]:
    """A staging folder whose files end up in ``folder`` all at once on success, and nowhere on failure."""
    if not folder.exists():
        with atomic_folder(folder) as staging:
            yield staging
        return
    staging = Path(tempfile.mkdtemp(prefix=".ctfm-fetch-", dir=folder))
    try:
        yield staging
        for path in sorted(staging.iterdir()):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _instance_file_name(sop_instance_uid: str) -> str:
    """``<SOPInstanceUID>.dcm``; a UID is digits and dots, so anything else a peer sends cannot become a path."""
    if not re.fullmatch(r"[0-9][0-9.]{0,63}", sop_instance_uid):
        raise _Failure(f"it sent an instance with an invalid SOPInstanceUID {sop_instance_uid[:70]!r}",
                       transient=False)
    return f"{sop_instance_uid}.dcm"


def _dicomweb_modules() -> tuple[Any, Any]:
    try:
        import dicomweb_client
        import requests
    except ImportError:
        raise CTFMError("DICOMweb needs dicomweb-client: pip install 'ctfm-engine[dicom]'") from None
    return requests, dicomweb_client


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return "" if value is None else str(value).strip()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
