"""Inference jobs that run in a worker process, so Slicer's UI thread never waits on CT-FM and a crash cannot take
Slicer down: the client side.  Slicer-free and Qt-free: the widget polls a :class:`Job` from a QTimer; tests poll
it from a loop.  The worker is :mod:`CTFMLib.worker`; what the two exchange is :mod:`CTFMLib.protocol`.

Why a subprocess speaking JSON lines, not ``multiprocessing``: inside Slicer ``sys.executable`` is the Slicer
application, so a "spawn" child would start another Slicer unless the executable is patched per platform; a plain
subprocess running ``worker.py`` with ``PythonSlicer`` (or any Python that has ``ctfm_engine``) is what Slicer's
own ``launchConsoleProcess`` does, lives in its own process group so a cancel kills the whole tree, and its protocol
can be read in a log.

:class:`Job` runs one task (``start_segmentation``, ``start_triage``, ``start_search_features``); the persistent
:class:`SearchWorker` keeps the encoder and the feature maps in memory, so a click costs one similarity pass.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from CTFMLib import protocol
from CTFMLib.protocol import grid_from_event, write_volume

if TYPE_CHECKING:
    from ctfm_engine.volume import CTVolume

__all__ = ["CANCEL_GRACE_S", "FINISHED", "STATES", "Job", "JobError", "JobProgress", "SearchWorker",
           "default_python", "grid_from_event", "kill_tree", "start_search_features", "start_segmentation",
           "start_triage"]

STATES = ("queued", "running", "cancelling", "cancelled", "failed", "done")
FINISHED = frozenset({"cancelled", "failed", "done"})
CANCEL_GRACE_S = 0.5  # the worker may stop at its next cancel check; after this the whole tree is killed
WORKER_SCRIPT = Path(__file__).resolve().with_name("worker.py")
_END = object()  # end of a worker stream


@dataclass(frozen=True)
class JobProgress:
    """The latest progress report: ``done`` of ``total`` units of ``stage`` (windows, steps)."""

    done: int
    total: int
    stage: str

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total > 0 else 0.0


@dataclass(frozen=True)
class JobError:
    """Why a job failed: the engine's exit code and its one-sentence message."""

    exit_code: int
    message: str
    kind: str = "CTFMError"


def default_python() -> str:
    """The interpreter that runs workers: ``PythonSlicer`` beside a running Slicer, else this one."""
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def _job_folder(prefix: str, work_dir: str | Path | None) -> Path:
    """A new private folder for one worker, inside ``work_dir`` (created when missing) or the system temp."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))


def _absolute(path: str | Path | None) -> str | None:
    """A path the worker can open: it runs in its job folder, so relative paths are made absolute here."""
    return None if path is None else str(Path(path).expanduser().resolve())


def _popen(python: str, task: str, folder: Path, stdin: bool) -> subprocess.Popen:
    command = [python, str(WORKER_SCRIPT), task, str(folder)]
    environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    options: dict[str, Any] = {}
    if os.name == "nt":
        options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        options["start_new_session"] = True  # its own process group: a cancel kills the worker and its children
    return subprocess.Popen(command, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environment, cwd=folder, text=True, encoding="utf-8",
                            errors="replace", **options)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (psutil when present; else the pid alone, its group is killed anyway)."""
    try:
        import psutil
    except ImportError:
        return [pid]
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def kill_tree(process: subprocess.Popen) -> None:
    """Kill a worker and every process it started, now (SIGKILL on POSIX, TerminateProcess on Windows)."""
    pids = _process_tree(process.pid)
    if os.name != "nt":
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL if os.name != "nt" else signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError):
            pass


class _WorkerProcess:
    """A worker subprocess, its job folder, and the threads that turn its output into events on a queue."""

    def __init__(self, task: str, folder: Path, python: str | None, stdin: bool) -> None:
        self.folder = folder
        self.events: queue.Queue = queue.Queue()
        self.process = _popen(python or default_python(), task, folder, stdin)
        self._streams_open = 2
        self._stdin_lock = threading.Lock()
        threading.Thread(target=self._read_protocol, args=(self.process.stdout,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(self.process.stderr,), daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: dict[str, Any]) -> bool:
        """Write one request line to the worker's stdin; False when it has gone."""
        if self.process.stdin is None:
            return False
        with self._stdin_lock:
            try:
                self.process.stdin.write(json.dumps(message) + "\n")
                self.process.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

    def _read_protocol(self, stream: IO[str]) -> None:
        for line in stream:
            event = protocol.read_event(line)
            if event is None:
                continue
            if event["event"] == protocol.RESULT:  # arrays load here, in this reader thread, not the UI thread
                event = protocol.load_arrays(event, self.folder)
            self.events.put(event)
        self.events.put(_END)

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            if line.strip():
                self.events.put({"event": protocol.LOG, "level": "STDERR", "message": line.rstrip()})
        self.events.put(_END)

    def drain(self) -> tuple[list[dict[str, Any]], bool]:
        """(events so far, whether both streams have ended); never blocks."""
        events = []
        while True:
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                self._streams_open -= 1
            else:
                events.append(item)
        return events, self._streams_open == 0

    def exited(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        if self.process.poll() is None:
            kill_tree(self.process)

    def remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Job:
    """One inference run in a worker process; the caller polls it (never blocks) and may cancel it.

    ``state`` goes queued -> running -> done | failed, or -> cancelling -> cancelled.  ``poll()`` returns the new
    events and updates ``progress``, ``result``, ``error`` and ``log``.  The job folder (input copy, result files)
    is removed when the job ends.
    """

    def __init__(self, task: str, volume: CTVolume, request: dict[str, Any], *, python: str | None = None,
                 work_dir: str | Path | None = None) -> None:
        if task not in protocol.TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(protocol.TASKS)}")
        self.task = task
        self.state = "queued"
        self.progress: JobProgress | None = None
        self.result: dict[str, Any] | None = None
        self.error: JobError | None = None
        self.log: list[str] = []
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        folder = _job_folder(f"ctfm-{task}-", work_dir)
        try:
            write_volume(volume, folder)
            (folder / protocol.REQUEST_FILE).write_text(json.dumps(request))
            self._worker = _WorkerProcess(task, folder, python, stdin=True)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._kill_timer: threading.Timer | None = None

    @property
    def folder(self) -> Path:
        return self._worker.folder

    @property
    def pid(self) -> int:
        return self._worker.pid

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def process_ids(self) -> list[int]:
        """The worker and its descendants now (for diagnostics and tests)."""
        return _process_tree(self.pid) if self._worker.exited() is None else []

    def poll(self) -> list[dict[str, Any]]:
        """New events since the last call (:mod:`CTFMLib.protocol` lists them); non-blocking."""
        if self.finished:
            return []
        events, ended = self._worker.drain()
        for event in events:
            self._apply(event)
        if ended:
            code = self._worker.exited()
            if code is not None:
                events.extend(self._finish(code))
        return events

    def cancel(self) -> None:
        """Ask the worker to stop and kill its whole process tree after ``CANCEL_GRACE_S``; returns at once.

        The state becomes ``cancelling``, then ``cancelled`` at the next :meth:`poll` after the worker is gone.
        """
        if self.finished or self.state == "cancelling":
            return
        self.state = "cancelling"
        if not self._worker.send({"op": protocol.CANCEL}):
            self._worker.kill()
            return
        self._kill_timer = threading.Timer(CANCEL_GRACE_S, self._worker.kill)
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        """Poll until the job ends or ``timeout`` seconds pass; the state.  For scripts and tests, not the UI."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished and (deadline is None or time.monotonic() < deadline):
            self.poll()
            time.sleep(interval)
        return self.state

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == protocol.STARTED and self.state == "queued":
            self.state = "running"
        elif kind == protocol.PROGRESS:
            self.progress = JobProgress(int(event["done"]), int(event["total"]), str(event.get("stage", "")))
        elif kind == protocol.LOG:
            self.log.append(f"{event.get('level', 'INFO')}: {event.get('message', '')}")
        elif kind == protocol.RESULT:
            self.result = {key: value for key, value in event.items() if key != "event"}
        elif kind == protocol.ERROR:
            self.error = JobError(int(event.get("exit_code", 1)), str(event.get("message", "")),
                                  str(event.get("kind", "CTFMError")))

    def _finish(self, code: int) -> list[dict[str, Any]]:
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self._worker.remove_folder()
        self.finished_at = time.monotonic()
        if self.state == "cancelling":
            self.state, self.result = "cancelled", None
            return [{"event": protocol.CANCELLED}]
        if code == 0 and self.result is not None and self.error is None:
            self.state = "done"
            return []
        self.state, self.result = "failed", None
        if self.error is None:
            self.error = JobError(code or 1, f"the CT-FM worker stopped unexpectedly (exit code {code}) without "
                                             f"a result; see the log above for the reason", "WorkerCrash")
            return [{"event": protocol.ERROR, "exit_code": self.error.exit_code, "message": self.error.message,
                     "kind": self.error.kind}]
        return []


def start_segmentation(
    volume: CTVolume,
    weights: str | Path | None = None,
    device: str = "cpu",
    *,
    roi_size_zyx: Sequence[int] | None = None,
    overlap: float | None = None,
    largest_component: bool | None = None,
    skip_ct_check: bool = False,
    python: str | None = None,
    work_dir: str | Path | None = None,
) -> Job:
    """Whole-body segmentation of ``volume`` in a worker (the engine's ``run_segmentation``).

    ``weights`` is a SegResNetDS checkpoint folder or hub repo id (None: the engine's weights policy chooses, down to
    its demonstration model); ``roi_size_zyx`` and ``overlap`` override the checkpoint's window;
    ``largest_component`` keeps (True) or not (False) only the largest piece of each structure, None: the model's own
    post-processing (the published model: on, as its card); ``skip_ct_check``
    reads a volume that does not look like CT in Hounsfield units instead of refusing it.  Result: ``labels``
    (uint8 (z, y, x) on ``volume``'s grid), ``names`` ({value: TotalSegmentator name}), ``structures`` (label, name,
    voxels, volume_ml), ``measurements`` (per structure: volume_ml and HU mean, sd, median, min, max, p5/25/75/95 on
    the input's grid), ``weights`` ({name, sha256, demonstration}), ``model``, ``device``, ``seconds``.
    """
    request = {"weights": _absolute(weights), "device": device,
               "roi_size_zyx": None if roi_size_zyx is None else [int(v) for v in roi_size_zyx],
               "overlap": overlap,
               "largest_component": None if largest_component is None else bool(largest_component),
               "skip_ct_check": bool(skip_ct_check)}
    return Job("segment", volume, request, python=python, work_dir=work_dir)


def start_triage(
    volume: CTVolume,
    model: str | Path | None = None,
    device: str = "cpu",
    *,
    threshold: float | None = None,
    accept_partial: bool = False,
    skip_ct_check: bool = False,
    python: str | None = None,
    work_dir: str | Path | None = None,
) -> Job:
    """Head-CT triage of ``volume`` in a worker (the engine's ``run_triage``): the scan is screened as a head CT
    before the model loads.  ``model`` None: the engine's weights policy (``$CTFM_TRIAGE_WEIGHTS``, the cache);
    ``skip_ct_check`` as for :func:`start_segmentation`.
    Result: ``probability``, ``decision``, ``threshold``, ``threshold_source``, ``checks`` (what the input screen
    found), ``notes``, ``weights``."""
    request = {"weights": _absolute(model), "device": device, "threshold": threshold,
               "accept_partial": bool(accept_partial), "skip_ct_check": bool(skip_ct_check)}
    return Job("triage", volume, request, python=python, work_dir=work_dir)


def start_search_features(
    volume: CTVolume,
    weights: str | Path | None = None,
    device: str = "cpu",
    *,
    cache_dir: str | Path | None = None,
    skip_ct_check: bool = False,
    python: str | None = None,
    work_dir: str | Path | None = None,
) -> Job:
    """Compute a scan's dense CT-FM feature map into the on-disk feature cache (``cache_dir``, default the
    engine's ``<cache>/features``), so a later search on it skips the encoder; ``skip_ct_check`` as for
    :func:`start_segmentation`.  Result: ``key``, ``cached`` (it was there already), ``feature_shape``, ``weights``."""
    request = {"weights": _absolute(weights), "device": device, "cache_dir": _absolute(cache_dir),
               "skip_ct_check": bool(skip_ct_check)}
    return Job("features", volume, request, python=python, work_dir=work_dir)


class SearchWorker:
    """A persistent semantic-search worker: one process that keeps the encoder and the scans' feature maps.

    ``add_volume`` sends a scan once (its features are computed then); ``query`` asks for the patch at an LPS point
    of one loaded scan in others and returns a request id; ``poll`` returns events, and a ``result`` event (also
    stored in ``results[request]``) carries per target its ``matches`` (``point_lps``, ``similarity``, best first)
    and, with heatmaps, the ``heatmap_<i>`` array ((z, y, x) float32 in [0, 1] on that target's grid), and the
    ``weights`` of the encoder.  ``weights`` None: the engine's weights policy chooses the encoder;
    ``skip_ct_check`` reads volumes that do not look like CT in Hounsfield units instead of refusing them.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str = "cpu",
        *,
        cache_dir: str | Path | None = None,
        top_k: int = 5,
        skip_ct_check: bool = False,
        python: str | None = None,
        work_dir: str | Path | None = None,
    ) -> None:
        self.state = "queued"
        self.error: JobError | None = None
        self.weights: dict[str, Any] | None = None
        self.loaded: dict[str, dict[str, Any]] = {}  # volume key -> its "loaded" event
        self.results: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, JobError] = {}
        self.log: list[str] = []
        self._requests = itertools.count(1)
        self._sent: dict[str, int] = {}
        folder = _job_folder("ctfm-search-", work_dir)
        try:
            request = {"weights": _absolute(weights), "device": device, "top_k": int(top_k),
                       "cache_dir": _absolute(cache_dir), "skip_ct_check": bool(skip_ct_check)}
            (folder / protocol.REQUEST_FILE).write_text(json.dumps(request))
            self._worker = _WorkerProcess(protocol.SEARCH_WORKER, folder, python, stdin=True)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @property
    def pid(self) -> int:
        return self._worker.pid

    @property
    def alive(self) -> bool:
        return self.state in ("queued", "running")

    def add_volume(self, volume: CTVolume, key: str | None = None) -> str:
        """Send ``volume`` to the worker under ``key`` (default: a new id) unless already sent; the key."""
        key = key or uuid.uuid4().hex[:16]
        if key in self._sent:
            return key
        if not self.alive:
            raise RuntimeError("the search worker has stopped; start a new one")
        request = next(self._requests)
        stem = f"volume-{request}"
        write_volume(volume, self._worker.folder, stem)
        self._sent[key] = request
        self._worker.send({"op": protocol.LOAD, "request": request, "key": key, "stem": stem})
        return key

    def query(self, source: str, point_lps: Sequence[float], targets: Sequence[str], *,
              heatmaps: bool = True, heatmap_grid: str = "source") -> int:
        """Search the patch at ``point_lps`` (LPS mm) of loaded scan ``source`` in the loaded ``targets``; the
        request id its ``result`` or ``error`` event will carry.  ``heatmap_grid`` ``model`` sends each heatmap on
        the (coarser) model grid, described in the target's ``heatmap_grid`` entry (see :func:`grid_from_event`)."""
        unknown = [key for key in (source, *targets) if key not in self._sent]
        if unknown:
            raise KeyError(f"volumes not added to the search worker: {', '.join(unknown)}")
        if not self.alive:
            raise RuntimeError("the search worker has stopped; start a new one")
        request = next(self._requests)
        self._worker.send({"op": protocol.SEARCH, "request": request, "source": source,
                           "point_lps": [float(v) for v in point_lps], "targets": list(targets),
                           "heatmaps": bool(heatmaps), "heatmap_grid": heatmap_grid})
        return request

    def poll(self) -> list[dict[str, Any]]:
        """New events since the last call; non-blocking."""
        events, ended = self._worker.drain()
        for event in events:
            kind, request = event["event"], event.get("request")
            if kind == protocol.READY:
                self.state, self.weights = "running", event.get("weights")
            elif kind == protocol.LOADED:
                self.loaded[event["key"]] = event
            elif kind == protocol.RESULT:
                self.results[int(request)] = event
            elif kind == protocol.LOG:
                self.log.append(f"{event.get('level', 'INFO')}: {event.get('message', '')}")
            elif kind == protocol.ERROR:
                error = JobError(int(event.get("exit_code", 1)), str(event.get("message", "")),
                                 str(event.get("kind", "CTFMError")))
                if request is None:
                    self.error = error
                else:
                    self.errors[int(request)] = error
        if ended and self._worker.exited() is not None and self.alive:
            self._worker.remove_folder()
            self.state = "done" if self.error is None else "failed"
        return events

    def close(self) -> None:
        """Stop the worker (its process tree) and remove its folder; returns at once."""
        if self.alive:
            self._worker.send({"op": protocol.CLOSE})
            self._worker.kill()
            self.state = "cancelled" if self.error is None else "failed"
        self._worker.remove_folder()
