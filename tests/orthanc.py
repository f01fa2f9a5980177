"""A real Orthanc PACS (Debian ``orthanc`` + ``orthanc-dicomweb``) for tests, in a network namespace of its own.

Orthanc binds every interface and has no bind-address setting, so each instance runs in a fresh network namespace
(``unshare -n``) holding nothing but a loopback interface: nothing outside can reach it, and it cannot clash with a
system Orthanc or with another test's.  The namespace belongs to a small holder process (``sleep``), so Orthanc can
be stopped and started again inside it with its storage kept (:meth:`Orthanc.stopped`: "the PACS is down");
:meth:`Orthanc.stop` ends both and the namespace disappears.

Clients must run inside the namespace too: :meth:`Orthanc.run` runs a command there (``nsenter --net``), e.g.
``orthanc.run([sys.executable, "-m", "ctfm_engine.cli", "pacs", "echo", orthanc.dicomweb_url])``.

Needs root (or CAP_SYS_ADMIN), util-linux ``unshare``/``nsenter``, iproute2 ``ip``, the ``Orthanc`` binary and
the DICOMweb plugin (``make test`` installs them as root); :func:`running_orthanc` skips the test with the reason when
one is missing, or fails it under CI (``conftest.missing_real_part``).

Use::

    with running_orthanc(tmp_path) as orthanc:
        orthanc.run([sys.executable, "-m", "ctfm_engine.cli", "pacs", "send", orthanc.dimse_url, folder])
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import missing_real_part

REPOSITORY = Path(__file__).resolve().parents[1]
ORTHANC_BINARIES = ("Orthanc", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"
# The AE Orthanc knows as a C-MOVE destination: the calling AE title `ctfm pacs` uses by default.
CLIENT_AET = "CTFM"
CLIENT_PORT = 11113
START_TIMEOUT_S = 30.0
PROBE = """
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=1).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.05)
"""
REST_GET = """
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
"""


def orthanc_unavailable() -> str | None:
    """Why a namespaced Orthanc cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a namespaced Orthanc needs root (unshare -n)"
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux / iproute2)"
    if _orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"the Orthanc DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


def _orthanc_binary() -> str | None:
    for name in ORTHANC_BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


class NamespaceUnavailable(RuntimeError):
    """The network namespace could not be created (no privilege for it here)."""


class Orthanc:
    """One Orthanc in its own network namespace, configured for tests.

    Parameters
    ----------
    workdir:
        Holds the configuration, the storage and index (kept across :meth:`stopped`) and ``orthanc.log``.
    http_port, dicom_port:
        Orthanc's HTTP (REST and DICOMweb) and DICOM ports inside the namespace.
    config_overrides:
        Configuration keys replacing the defaults, e.g. ``{"DicomAlwaysAllowStore": False}``.
    """

    def __init__(self, workdir: str | Path, *, http_port: int = 18042, dicom_port: int = 14242,
                 config_overrides: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.aet = ORTHANC_AET
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.storage = self.workdir / "storage"
        self.config = {
            "Name": "CTFM-TEST",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "UnknownSopClassAccepted": False,
            "DicomModalities": {"ctfm": [CLIENT_AET, "127.0.0.1", CLIENT_PORT]},
            "StableAge": 1,
            "SaveJobs": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": "127.0.0.1"},
            **(config_overrides or {}),
        }
        self._holder: subprocess.Popen | None = None
        self._server: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def dimse_url(self) -> str:
        return f"dicom://{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def namespace(self) -> str:
        if self._holder is None:
            raise RuntimeError("the Orthanc namespace is not running: call start()")
        return f"/proc/{self._holder.pid}/ns/net"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Create the namespace (first time) and start Orthanc in it; return once ``GET /system`` answers."""
        if self._server is not None:
            return
        if self._holder is None:
            self._start_namespace()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=1))
        with self.log_path.open("ab") as log:
            self._server = subprocess.Popen(
                ["nsenter", f"--net={self.namespace}", _orthanc_binary() or "Orthanc", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        probe = self.run([sys.executable, "-c", PROBE, f"{self.http_url}/system", str(timeout_s)],
                         timeout=timeout_s + 10)
        if probe.returncode != 0 or self._server.poll() is not None:
            self._kill_server(graceful=False)
            raise RuntimeError(f"Orthanc did not answer on {self.http_url}/system within {timeout_s:g} s; its log "
                               f"ends with:\n{self.log_tail()}")

    def stop(self) -> None:
        """Kill Orthanc (a graceful shutdown takes seconds; its SQLite index survives a kill) and end the namespace."""
        self._kill_server(graceful=False)
        if self._holder is not None:
            self._holder.kill()
            self._holder.wait(timeout=10)
            self._holder = None

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """Orthanc is down inside this block (nothing listens on its ports); it is up again, same storage, after."""
        self._kill_server(graceful=True)
        try:
            yield
        finally:
            self.start()

    def run(self, argv: Sequence[str | Path], *, timeout: float = 120, **options: Any) -> subprocess.CompletedProcess:
        """Run a command inside the namespace (text output captured unless told otherwise), from the repository."""
        options = {"capture_output": True, "text": True, "cwd": REPOSITORY, **options}
        return subprocess.run(["nsenter", f"--net={self.namespace}", *map(str, argv)], timeout=timeout,
                              check=False, **options)

    def rest(self, path: str) -> Any:
        """GET Orthanc's own REST API (e.g. ``/statistics``), decoded from JSON: a check independent of ctfm."""
        result = self.run([sys.executable, "-c", REST_GET, f"{self.http_url}{path}"], timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"GET {path} failed: {result.stderr.strip()[-500:]}")
        return json.loads(result.stdout)

    def instance_count(self) -> int:
        """Instances Orthanc stores, by its own count."""
        return int(self.rest("/statistics")["CountInstances"])

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start_namespace(self) -> None:
        holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && echo ready && exec sleep infinity"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        ready = holder.stdout.readline().strip() if holder.stdout else ""
        if ready != "ready":
            holder.kill()
            _, error = holder.communicate(timeout=10)
            raise NamespaceUnavailable(f"cannot create a network namespace: {error.strip() or 'unshare failed'}")
        # Never start Orthanc in our own namespace by mistake: the holder's must be a different one.
        if os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            holder.kill()
            holder.wait(timeout=10)
            raise NamespaceUnavailable("unshare -n did not give the holder a network namespace of its own")
        self._holder = holder

    def _kill_server(self, *, graceful: bool) -> None:
        if self._server is None:
            return
        if self._server.poll() is None:
            self._server.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                self._server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait(timeout=10)
        self._server = None


@contextmanager
def running_orthanc(tmp_path: str | Path, http_port: int = 18042, dicom_port: int = 14242,
                    **options: Any) -> Iterator[Orthanc]:
    """A started :class:`Orthanc` working in ``tmp_path``, stopped afterwards; if none can run here, the test is
    skipped (failed under CI) with the reason."""
    reason = orthanc_unavailable()
    if reason:
        missing_real_part(reason)
    orthanc = Orthanc(tmp_path, http_port=http_port, dicom_port=dicom_port, **options)
    try:
        orthanc.start()
    except NamespaceUnavailable as error:
        orthanc.stop()
        missing_real_part(str(error))
    except BaseException:
        orthanc.stop()
        raise
    try:
        yield orthanc
    finally:
        orthanc.stop()
