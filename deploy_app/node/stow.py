"""The node's STOW-RS endpoint (DICOMweb, PS3.18 10.5): ``POST /studies`` (or ``/dicom-web/studies``, and either
with ``/{StudyInstanceUID}``) on ``stow_port``, for PACSes and gateways that push over HTTP rather than DIMSE.

A request is ``multipart/related; type="application/dicom"``, each part one DICOM file; its body may come with a
Content-Length or chunked.  Each part goes the way a C-STORE of it goes (``Receiver.store_file``: written durably,
recorded, deduplicated by SOP Instance UID, refused when the spool is full), and the answer is the PS3.18 store
response in ``application/dicom+json``: 200 when every instance is stored (or was already), 202 when some were
refused, 409 when none was stored, each refused one in the Failed SOP Sequence with its reason (0xA700 out of
resources, 0xC000 cannot understand).  A full spool answers 503 with Retry-After before reading the body.

Access: an address outside ``allow_hosts`` gets 403; with ``stow_token_file`` a request needs ``Authorization:
Bearer <the file's token>`` (401 otherwise); with ``tls_cert``/``tls_key`` the port speaks HTTPS only (and with
``tls_ca`` asks for client certificates signed by it).  A request is audited like an association (``stow-request``:
peer, stored, duplicates, refused, bytes) and, with ``queue_on_release``, completes its studies when it ends.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import ssl
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from ctfm_engine.dicom.pacs import read_bearer_token
from ctfm_engine.errors import UsageError
from deploy_app.node.health import HttpEndpoint, send_body
from deploy_app.node.receiver import SUCCESS, AssociationTally, Receiver

log = logging.getLogger("deploy_app.node")

PATH = re.compile(r"^(?:/dicom-web)?/studies(?:/[0-9.]+)?/?$")
RETRY_AFTER_S = 60
MAX_BODY_BYTES = 4 * 2**30
NO_TOKEN_MATCHES = "\0"  # a token file that cannot be read, or is empty, lets nobody in
STOW_AE = "STOW-RS"  # the "calling AE title" of STOW-RS requests in the queue, status and audit


class StowServer(HttpEndpoint):
    """STOW-RS on ``host:port`` into ``receiver``; ``token`` (read each request) is the bearer token required."""

    def __init__(self, host: str, port: int, receiver: Receiver, *, token: Callable[[], str | None],
                 ssl_context: ssl.SSLContext | None = None, on_instance: Callable[[str], None] | None = None) -> None:
        outer = self
        self.receiver = receiver

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                outer._post(self)

            def do_GET(self) -> None:  # noqa: N802
                self.close_connection = True
                _answer(self, 405, {"error": "this endpoint only stores: POST multipart/related DICOM to /studies"})

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server signature)
                return  # each request is audited instead

        self.token = token
        self.on_instance = on_instance
        self.serve(host, port, Handler, ssl_context)

    name = "STOW-RS"

    def describe(self) -> str:
        return super().describe() + (": bearer token required" if self.token() else ": no token asked")

    def _post(self, request: BaseHTTPRequestHandler) -> None:
        peer = request.client_address[0]
        request.close_connection = True  # one request per connection: simple, and a refused body is never read
        if not PATH.match(request.path.split("?")[0]):
            _answer(request, 404, {"error": "POST to /studies (or /dicom-web/studies)"})
            return
        if not self.receiver.host_allowed(peer):
            log.warning("STOW-RS from %s refused: address not in allow_hosts", peer)
            self.receiver.audit.record("association-refused", calling_ae=STOW_AE, peer=peer,
                                       reason=f"address {peer} not in allow_hosts")
            _answer(request, 403, {"error": "this address may not store here"})
            return
        expected = self.token()
        given = request.headers.get("Authorization", "")
        if expected and not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            log.warning("STOW-RS from %s refused: %s", peer, "wrong bearer token" if given else "no bearer token")
            self.receiver.audit.record("association-refused", calling_ae=STOW_AE, peer=peer,
                                       reason="STOW-RS without the right bearer token")
            _answer(request, 401, {"error": "a bearer token is required"}, {"WWW-Authenticate": "Bearer"})
            return
        full = self.receiver.full()
        if full:
            self.receiver.audit.record("association-refused", calling_ae=STOW_AE, peer=peer,
                                       reason=f"spool full: {full}")
            _answer(request, 503, {"error": f"spool full: {full}"}, {"Retry-After": str(RETRY_AFTER_S)})
            return
        boundary = _boundary(request.headers.get("Content-Type", ""))
        if boundary is None:
            _answer(request, 415, {"error": 'send multipart/related; type="application/dicom" with a boundary'})
            return
        try:
            body = _read_body(request)
        except ValueError as error:
            _answer(request, 400 if "length" not in str(error) else 411, {"error": str(error)})
            return
        tally = AssociationTally(STOW_AE, peer)
        stored, failed = [], []
        for part in _parts(body, boundary):
            before = (tally.stored, tally.duplicates)
            status, sop_class, sop_uid = self.receiver.store_file(part, tally)
            if self.on_instance is not None:
                self.on_instance("new" if tally.stored > before[0] else "duplicate"
                                 if tally.duplicates > before[1] else "refused")
            item = {"00081150": {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
                    "00081155": {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"}}
            if status == SUCCESS:
                stored.append(item)
            else:
                failed.append({**item, "00081197": {"vr": "US", "Value": [status]}})
        self.receiver.finish(tally, "ended", complete=True, event="stow-request")
        document: dict[str, Any] = {}
        if stored:
            document["00081199"] = {"vr": "SQ", "Value": stored}
        if failed:
            document["00081198"] = {"vr": "SQ", "Value": failed}
        code = 200 if not failed else 202 if stored else 409
        _answer(request, code, document, content_type="application/dicom+json")


def _answer(request: BaseHTTPRequestHandler, code: int, document: dict[str, Any],
            headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
    send_body(request, code, content_type, json.dumps(document).encode(), {"Connection": "close", **(headers or {})})


def _boundary(content_type: str) -> bytes | None:
    if not content_type.lower().startswith("multipart/related"):
        return None
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    return match.group(1).encode() if match else None


def _read_body(request: BaseHTTPRequestHandler) -> bytes:
    """The request's body, from a Content-Length or chunked (ValueError: neither, or too large)."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        chunks, total = [], 0
        while True:
            size = int(request.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while request.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise ValueError(f"a request body over {MAX_BODY_BYTES // 2**30} GB: send the study in parts")
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
    length = request.headers.get("Content-Length")
    if length is None:
        raise ValueError("no Content-Length and not chunked: give the body's length")
    if int(length) > MAX_BODY_BYTES:
        raise ValueError(f"a request body over {MAX_BODY_BYTES // 2**30} GB: send the study in parts")
    return request.rfile.read(int(length))


def _parts(body: bytes, boundary: bytes) -> list[bytes]:
    """The contents of the parts of a multipart body (their headers dropped)."""
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        headers_end = chunk.find(b"\r\n\r\n")
        if headers_end < 0:
            continue
        content = chunk[headers_end + 4:]
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


def read_token(path: Path | None) -> str | None:
    """The bearer token in ``path``, read each time so that a rotated file takes effect at once; a file that cannot
    be read or is empty lets nobody in (and says so in the log)."""
    if path is None:
        return None
    try:
        return read_bearer_token(path, "stow_token_file")
    except UsageError as error:
        log.error("%s: STOW-RS refuses every request", error)
        return NO_TOKEN_MATCHES
