"""Inference jobs that run in a worker process, so Slicer's UI thread never waits on CT-FM and a crash cannot take
Slicer down.  Slicer-free and Qt-free: the widget polls a :class:`Job` from a QTimer; tests poll it from a loop.

Why a subprocess speaking JSON lines, not ``multiprocessing``: inside Slicer ``sys.executable`` is the Slicer
application, so a "spawn" child would start another Slicer unless the executable is patched per platform; a plain
subprocess running this very file with ``PythonSlicer`` (or any Python that has ``ctfm_engine``) is what Slicer's
own ``launchConsoleProcess`` does, lives in its own process group so a cancel kills the whole tree, and its protocol
can be read in a log.

Protocol.  The client writes the input volume (``volume.npy`` + ``volume.json``: voxels (z, y, x) in HU and their
LPS geometry) and ``request.json`` into a private job folder, then runs ``python jobs.py TASK FOLDER``.  The worker
prints one JSON object per line on stdout (anything else it or a library prints goes to stderr):

``{"event": "started", "pid": int}``
    the engine is imported; the job is running (until then it is queued).
``{"event": "progress", "done": int, "total": int, "stage": str}``
    stages are ``reading input``, ``loading model``, then the task's own (``segmenting`` counts sliding windows).
``{"event": "log", "level": str, "message": str}``
    an engine log record (the engine logs no patient-identifying data).
``{"event": "result", ..., "arrays": {name: file}, "scales": {name: float}}``
    the task's result; arrays are ``.npy`` files written atomically in the job folder, loaded by the reader thread.
    An array named in ``scales`` travels as uint8 codes and means ``code * scale`` (float32): search heatmaps, in
    [0, 1], go at steps of 1/255 (finer than a 256-entry colour map shows), a quarter of the bytes of float32 (a
    512 x 512 x 300 scan's heatmap on the model grid: 17 MB, not 66 MB, per click).
``{"event": "error", "exit_code": int, "message": str, "kind": str}``
    the engine's error (exit codes as the ``ctfm`` command: 2 usage, 3 input, 4 model, 1 other, 130 cancelled).

The client appends ``{"event": "cancelled"}`` and, for a worker that dies without an error event, an ``error``
event of its own.  A job folder is removed when the job ends whatever the outcome, so no partial output remains.

The persistent :class:`SearchWorker` runs ``python jobs.py search-worker FOLDER`` and also reads requests, one JSON
object per line, on its stdin (``load`` a volume and compute its features, ``search`` a point, ``close``); it keeps
the encoder and the feature maps in memory, so a click costs one similarity pass.  Its events carry the request id.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
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

import numpy as np

if TYPE_CHECKING:
    from ctfm_engine.volume import CTVolume

log = logging.getLogger(__name__)

STATES = ("queued", "running", "cancelling", "cancelled", "failed", "done")
FINISHED = frozenset({"cancelled", "failed", "done"})
TASKS = ("segment", "triage", "features")
SEARCH_WORKER = "search-worker"
ENGINE_MODULES = {"segment": "ctfm_engine.tasks.segment", "triage": "ctfm_engine.tasks.triage",
                  "features": "ctfm_engine.tasks.search", SEARCH_WORKER: "ctfm_engine.tasks.search"}
CANCEL_GRACE_S = 0.5  # the worker may stop at its next cancel check; after this the whole tree is killed
CANCELLED_EXIT_CODE = 130
HEATMAP_CODES = 255  # search heatmaps travel as uint8 codes: value = code / 255 (see the protocol above)
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


def grid_to_event(grid: Any) -> dict[str, Any]:
    """A ``Grid`` as a target entry's ``heatmap_grid`` (JSON); :func:`grid_from_event` reads it back."""
    return {"shape_zyx": list(grid.shape_zyx), "spacing_xyz_mm": list(grid.spacing_xyz_mm),
            "origin_lps_mm": list(grid.origin_lps_mm), "direction": np.asarray(grid.direction, dtype=float).tolist()}


def grid_from_event(entry: dict[str, Any]) -> Any:
    """The ``Grid`` (patient LPS) a search result's heatmap sits on, from a target entry's ``heatmap_grid``."""
    from ctfm_engine.volume import Grid

    geometry = entry["heatmap_grid"]
    return Grid(tuple(geometry["shape_zyx"]), tuple(geometry["spacing_xyz_mm"]), tuple(geometry["origin_lps_mm"]),
                np.array(geometry["direction"], dtype=float))


def write_volume(volume: CTVolume, folder: Path, stem: str = "volume") -> None:
    """Store a CTVolume losslessly in ``folder``: ``<stem>.npy`` (voxels (z, y, x)) and ``<stem>.json`` (LPS
    geometry, source, series UID and the non-identifying DICOM references)."""
    np.save(folder / f"{stem}.npy", np.ascontiguousarray(volume.voxels), allow_pickle=False)
    geometry = {
        "spacing_xyz_mm": list(volume.spacing_xyz_mm),
        "origin_lps_mm": list(volume.origin_lps_mm),
        "direction": np.asarray(volume.direction, dtype=float).tolist(),
        "source": volume.source,
        "series_instance_uid": volume.series_instance_uid,
        "dicom": volume.dicom,
    }
    (folder / f"{stem}.json").write_text(json.dumps(geometry, default=str))


def _job_folder(prefix: str, work_dir: str | Path | None) -> Path:
    """A new private folder for one worker, inside ``work_dir`` (created when missing) or the system temp."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))


def _absolute(path: str | Path | None) -> str | None:
    """A path the worker can open: it runs in its job folder, so relative paths are made absolute here."""
    return None if path is None else str(Path(path).expanduser().resolve())


def _popen(python: str, task: str, folder: Path, stdin: bool) -> subprocess.Popen:
    command = [python, str(Path(__file__).resolve()), task, str(folder)]
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
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "log", "level": "STDOUT", "message": line}
            if not isinstance(event, dict) or "event" not in event:
                event = {"event": "log", "level": "STDOUT", "message": line}
            if event["event"] == "result":
                event = self._load_arrays(event)
            self.events.put(event)
        self.events.put(_END)

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            if line.strip():
                self.events.put({"event": "log", "level": "STDERR", "message": line.rstrip()})
        self.events.put(_END)

    def _load_arrays(self, event: dict[str, Any]) -> dict[str, Any]:
        """Replace the result's array files by the arrays (in this reader thread, not the UI thread)."""
        scales = dict(event.pop("scales", {}))
        for name, file in dict(event.pop("arrays", {})).items():
            path = self.folder / Path(file).name
            try:
                event[name] = np.load(path, allow_pickle=False)
                if name in scales:
                    event[name] = np.multiply(event[name], np.float32(scales[name]), dtype=np.float32)
            except (OSError, ValueError) as error:
                return {"event": "error", "exit_code": 1, "kind": "CTFMError", "request": event.get("request"),
                        "message": f"the worker's result {path.name} is unreadable ({error})"}
            path.unlink(missing_ok=True)
        return event

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
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
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
            (folder / "request.json").write_text(json.dumps(request))
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
        """New events since the last call (see the module docstring); non-blocking."""
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
        if not self._worker.send({"op": "cancel"}):
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
        if kind == "started" and self.state == "queued":
            self.state = "running"
        elif kind == "progress":
            self.progress = JobProgress(int(event["done"]), int(event["total"]), str(event.get("stage", "")))
        elif kind == "log":
            self.log.append(f"{event.get('level', 'INFO')}: {event.get('message', '')}")
        elif kind == "result":
            self.result = {key: value for key, value in event.items() if key != "event"}
        elif kind == "error":
            self.error = JobError(int(event.get("exit_code", 1)), str(event.get("message", "")),
                                  str(event.get("kind", "CTFMError")))

    def _finish(self, code: int) -> list[dict[str, Any]]:
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self._worker.remove_folder()
        self.finished_at = time.monotonic()
        if self.state == "cancelling":
            self.state, self.result = "cancelled", None
            return [{"event": "cancelled"}]
        if code == 0 and self.result is not None and self.error is None:
            self.state = "done"
            return []
        self.state, self.result = "failed", None
        if self.error is None:
            self.error = JobError(code or 1, f"the CT-FM worker stopped unexpectedly (exit code {code}) without "
                                             f"a result; see the log above for the reason", "WorkerCrash")
            return [{"event": "error", "exit_code": self.error.exit_code, "message": self.error.message,
                     "kind": self.error.kind}]
        return []


def start_segmentation(
    volume: CTVolume,
    weights: str | Path | None = None,
    device: str = "cpu",
    *,
    roi_size_zyx: Sequence[int] | None = None,
    overlap: float | None = None,
    largest_component: bool = False,
    python: str | None = None,
    work_dir: str | Path | None = None,
) -> Job:
    """Whole-body segmentation of ``volume`` in a worker (``ctfm_engine.tasks.segment``).

    ``weights`` is a SegResNetDS checkpoint folder (None: the bundled ``ctfm-mini-wholebody-seg``); ``roi_size_zyx``
    and ``overlap`` override the checkpoint's window.  Result: ``labels`` (uint8 (z, y, x) on ``volume``'s grid),
    ``names`` ({value: TotalSegmentator name}), ``structures`` (label, name, voxels, volume_ml), ``weights``
    ({name, sha256}), ``model``, ``seconds``.
    """
    request = {"weights": _absolute(weights), "device": device,
               "roi_size_zyx": None if roi_size_zyx is None else [int(v) for v in roi_size_zyx],
               "overlap": overlap, "largest_component": bool(largest_component)}
    return Job("segment", volume, request, python=python, work_dir=work_dir)


def start_triage(
    volume: CTVolume,
    model: str | Path | None = None,
    device: str = "cpu",
    *,
    threshold: float | None = None,
    accept_partial: bool = False,
    python: str | None = None,
    work_dir: str | Path | None = None,
) -> Job:
    """Head-CT triage of ``volume`` in a worker (``ctfm_engine.tasks.triage``): the scan is screened as a head CT
    before the model loads.  ``model`` None: ``$CTFM_TRIAGE_WEIGHTS`` or the cache.  Result: ``probability``,
    ``decision``, ``threshold``, ``threshold_source``, ``checks`` (what the input screen found), ``weights``."""
    request = {"model": _absolute(model), "device": device, "threshold": threshold,
               "accept_partial": bool(accept_partial)}
    return Job("triage", volume, request, python=python, work_dir=work_dir)


def start_search_features(
    volume: CTVolume,
    weights: str | Path | None = None,
    device: str = "cpu",
    *,
    cache_dir: str | Path | None = None,
    python: str | None = None,
    work_dir: str | Path | None = None,
) -> Job:
    """Compute a scan's dense CT-FM feature map into the on-disk feature cache (``cache_dir``, default the
    engine's ``<cache>/features``), so a later search on it skips the encoder.  Result: ``key``, ``cached`` (it was
    there already), ``feature_shape``, ``weights``."""
    request = {"weights": _absolute(weights), "device": device, "cache_dir": _absolute(cache_dir)}
    return Job("features", volume, request, python=python, work_dir=work_dir)


class SearchWorker:
    """A persistent semantic-search worker: one process that keeps the encoder and the scans' feature maps.

    ``add_volume`` sends a scan once (its features are computed then); ``query`` asks for the patch at an LPS point
    of one loaded scan in others and returns a request id; ``poll`` returns events, and a ``result`` event (also
    stored in ``results[request]``) carries per target its ``matches`` (``point_lps``, ``similarity``, best first)
    and, with heatmaps, the ``heatmap_<i>`` array ((z, y, x) float32 in [0, 1] on that target's grid).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str = "cpu",
        *,
        cache_dir: str | Path | None = None,
        top_k: int = 5,
        python: str | None = None,
        work_dir: str | Path | None = None,
    ) -> None:
        self.state = "queued"
        self.error: JobError | None = None
        self.weights: dict[str, str] | None = None
        self.loaded: dict[str, dict[str, Any]] = {}  # volume key -> its "loaded" event
        self.results: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, JobError] = {}
        self.log: list[str] = []
        self._requests = itertools.count(1)
        self._sent: dict[str, int] = {}
        folder = _job_folder("ctfm-search-", work_dir)
        try:
            request = {"weights": _absolute(weights), "device": device, "top_k": int(top_k),
                       "cache_dir": _absolute(cache_dir)}
            (folder / "request.json").write_text(json.dumps(request))
            self._worker = _WorkerProcess(SEARCH_WORKER, folder, python, stdin=True)
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
        self._worker.send({"op": "load", "request": request, "key": key, "stem": stem})
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
        self._worker.send({"op": "search", "request": request, "source": source,
                           "point_lps": [float(v) for v in point_lps], "targets": list(targets),
                           "heatmaps": bool(heatmaps), "heatmap_grid": heatmap_grid})
        return request

    def poll(self) -> list[dict[str, Any]]:
        """New events since the last call; non-blocking."""
        events, ended = self._worker.drain()
        for event in events:
            kind, request = event["event"], event.get("request")
            if kind == "ready":
                self.state, self.weights = "running", event.get("weights")
            elif kind == "loaded":
                self.loaded[event["key"]] = event
            elif kind == "result":
                self.results[int(request)] = event
            elif kind == "log":
                self.log.append(f"{event.get('level', 'INFO')}: {event.get('message', '')}")
            elif kind == "error":
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
            self._worker.send({"op": "close"})
            self._worker.kill()
            self.state = "cancelled" if self.error is None else "failed"
        self._worker.remove_folder()


# --- the worker side: runs in the subprocess, imports the engine -----------------------------------------------


class _Protocol:
    """Writes events to the protocol stream (the worker's original stdout), one JSON object per line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        with self.lock:
            self.stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
            self.stream.flush()

    def progress(self, stage: str, done: int, total: int) -> None:
        self.emit("progress", done=int(done), total=int(total), stage=stage)


class _LogToProtocol(logging.Handler):
    def __init__(self, protocol: _Protocol) -> None:
        super().__init__(logging.INFO)
        self.protocol = protocol

    def emit(self, record: logging.LogRecord) -> None:
        self.protocol.emit("log", level=record.levelname, message=record.getMessage())


def _read_volume(folder: Path, stem: str = "volume") -> CTVolume:
    from ctfm_engine.volume import CTVolume, check_hounsfield

    geometry = json.loads((folder / f"{stem}.json").read_text())
    voxels = np.load(folder / f"{stem}.npy", allow_pickle=False).astype(np.float32, copy=False)  # int16 from Slicer
    volume = CTVolume(voxels=voxels, spacing_xyz_mm=tuple(geometry["spacing_xyz_mm"]),
                      origin_lps_mm=tuple(geometry["origin_lps_mm"]), direction=np.array(geometry["direction"]),
                      source=geometry["source"], series_instance_uid=geometry.get("series_instance_uid"),
                      dicom=geometry.get("dicom") or {})
    check_hounsfield(volume.voxels, volume.source)
    return volume


def _save_array(folder: Path, name: str, array: np.ndarray) -> str:
    from ctfm_engine.io import atomic_output

    path = folder / f"{name}.npy"
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        np.save(stream, array, allow_pickle=False)
    return path.name


def _run_segment(folder: Path, request: dict[str, Any], protocol: _Protocol, cancel: threading.Event) -> None:
    from ctfm_engine.errors import ModelError
    from ctfm_engine.models.registry import bundled_weights
    from ctfm_engine.models.segmentation import inference_network
    from ctfm_engine.runtime.backends import TorchBackend
    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.segment import check_window, open_segmentation_model, segment

    protocol.progress("reading input", 0, 1)
    volume = _read_volume(folder)
    if request.get("roi_size_zyx") is not None or request.get("overlap") is not None:
        check_window(request.get("roi_size_zyx") or (16, 16, 16), request.get("overlap") or 0.0)
    device = resolve_device(request.get("device") or "cpu")
    protocol.progress("loading model", 0, 1)
    weights = request.get("weights") or bundled_weights("ctfm-mini-wholebody-seg")
    if weights is None:
        raise ModelError("no segmentation model: choose a checkpoint folder (e.g. a local copy of "
                         "project-lighter/whole_body_segmentation) in the Model section")
    model = open_segmentation_model(weights)
    roi = tuple(request["roi_size_zyx"]) if request.get("roi_size_zyx") else model.roi_size_zyx
    overlap = model.overlap if request.get("overlap") is None else float(request["overlap"])
    module, head = inference_network(model.network)
    started = time.perf_counter()
    result = segment(volume, preprocessing=model.preprocessing, roi_size_zyx=roi, overlap=overlap,
                     backend=TorchBackend(module, device), head=head,
                     largest_component=bool(request.get("largest_component")),
                     progress=lambda done, total: protocol.progress("segmenting", done, total), cancel=cancel)
    seconds = time.perf_counter() - started
    protocol.progress("writing result", 0, 1)
    labels = _save_array(folder, "labels", result.labels)
    protocol.emit("result", arrays={"labels": labels}, names={str(k): v for k, v in model.names.items()},
                  structures=result.structures(model.names), weights=model.checkpoint.identity,
                  model={**model.describe(), "roi_size_zyx": list(roi), "overlap": overlap}, device=str(device),
                  seconds=round(seconds, 3))


def _run_triage(folder: Path, request: dict[str, Any], protocol: _Protocol, cancel: threading.Event) -> None:
    from ctfm_engine.runtime.backends import TorchBackend
    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.triage import (
        decision_threshold,
        load_triage_model,
        require_head_ct,
        resolve_triage_weights,
        triage,
        triage_input,
    )

    protocol.progress("reading input", 0, 1)
    volume = _read_volume(folder)
    accept_partial = bool(request.get("accept_partial"))
    screened = require_head_ct(volume, accept_partial=accept_partial)  # the input is judged before a model loads
    device = resolve_device(request.get("device") or "cpu")
    protocol.progress("loading model", 0, 1)
    network, checkpoint = load_triage_model(resolve_triage_weights(request.get("model")))
    threshold, threshold_source = decision_threshold(network, request.get("threshold"))
    model_input = triage_input(volume, network.preprocessing, screened=screened)
    result = triage(volume, TorchBackend(network, device), network.preprocessing, threshold, model_input=model_input,
                    accept_partial=accept_partial, progress=lambda d, t: protocol.progress("triage", d, t),
                    cancel=cancel)
    document = result.as_dict()
    document.pop("input", None)
    protocol.emit("result", **document, threshold_source=threshold_source, weights=checkpoint.identity,
                  notes=list(model_input.checks.notes), device=str(device))


def _searcher(request: dict[str, Any], protocol: _Protocol) -> tuple[Any, Any]:
    from ctfm_engine.models.registry import bundled_weights, cache_dir, load_encoder
    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.search import FeatureCache, SearchSettings, SemanticSearch

    device = resolve_device(request.get("device") or "cpu")
    protocol.progress("loading model", 0, 1)
    encoder, checkpoint = load_encoder(request.get("weights") or bundled_weights("ctfm-mini"))
    cache = FeatureCache(Path(request.get("cache_dir") or cache_dir() / "features"))
    settings = SearchSettings(top_k=int(request.get("top_k") or 5))
    return SemanticSearch(encoder, checkpoint.sha256, device=device, settings=settings, cache=cache), checkpoint


def _run_features(folder: Path, request: dict[str, Any], protocol: _Protocol, cancel: threading.Event) -> None:
    from ctfm_engine.progress import check_cancelled
    from ctfm_engine.tasks.search import volume_key

    protocol.progress("reading input", 0, 1)
    volume = _read_volume(folder)
    searcher, checkpoint = _searcher(request, protocol)
    check_cancelled(cancel)
    key = volume_key(volume, searcher.settings.preprocessing, searcher.weights_sha256)
    cached = searcher.cache.get(key) is not None
    protocol.progress("features", 0, 1)
    features = searcher.features(volume)
    protocol.progress("features", 1, 1)
    protocol.emit("result", key=key, cached=cached, feature_shape=list(features.features.shape),
                  weights=checkpoint.identity)


def _serve_search(folder: Path, request: dict[str, Any], protocol: _Protocol, requests: queue.Queue) -> None:
    """The persistent search worker's loop: answer requests from stdin until ``close`` or end of input."""
    from ctfm_engine.errors import CTFMError

    searcher, checkpoint = _searcher(request, protocol)
    protocol.emit("ready", weights=checkpoint.identity)
    volumes: dict[str, CTVolume] = {}
    while True:
        message = requests.get()
        if message is None or message.get("op") == "close":
            return
        number = message.get("request")
        started = time.perf_counter()
        try:
            if message["op"] == "load":
                volume = _read_volume(folder, message["stem"])
                volume.voxels.flags.writeable = False  # kept for later clicks: the searcher hashes it only once
                for suffix in (".npy", ".json"):
                    (folder / f"{message['stem']}{suffix}").unlink(missing_ok=True)
                searcher.features(volume)
                volumes[message["key"]] = volume
                protocol.emit("loaded", request=number, key=message["key"],
                              seconds=round(time.perf_counter() - started, 3))
            elif message["op"] == "search":
                _answer_search(folder, message, volumes, searcher, protocol, started)
        except CTFMError as error:
            protocol.emit("error", request=number, exit_code=error.exit_code, message=str(error),
                          kind=type(error).__name__)


def _answer_search(folder: Path, message: dict[str, Any], volumes: dict[str, CTVolume], searcher: Any,
                   protocol: _Protocol, started: float) -> None:
    from ctfm_engine.errors import UsageError

    missing = [key for key in (message["source"], *message["targets"]) if key not in volumes]
    if missing:
        raise UsageError(f"the search worker could not load {', '.join(missing)}; add the volumes again")
    result = searcher.search(volumes[message["source"]], message["point_lps"],
                             [volumes[key] for key in message["targets"]], method="fast",
                             heatmaps=bool(message.get("heatmaps", True)),
                             heatmap_grid=message.get("heatmap_grid", "source"))
    arrays, scales, targets = {}, {}, []
    for index, (key, target) in enumerate(zip(message["targets"], result.targets, strict=True)):
        if target.heatmap is not None:
            name = f"heatmap_{index}"
            codes = np.rint(np.clip(target.heatmap, 0.0, 1.0) * HEATMAP_CODES).astype(np.uint8)
            arrays[name], scales[name] = _save_array(folder, f"{name}-{message['request']}", codes), 1 / HEATMAP_CODES
        entry = {"key": key, "matches": [{"point_lps": list(m.point_lps), "similarity": m.similarity}
                                         for m in target.matches],
                 "flat": target.flat, "cached": target.cached, "windows": target.windows}
        if target.heatmap_grid is not None:
            entry["heatmap_grid"] = grid_to_event(target.heatmap_grid)
        targets.append(entry)
    protocol.emit("result", request=message["request"], point_lps=list(result.point_lps), targets=targets,
                  notes=result.notes, arrays=arrays, scales=scales, seconds=round(time.perf_counter() - started, 3))


def _read_requests(requests: queue.Queue, cancel: threading.Event) -> None:
    """The worker's stdin: ``cancel`` sets the event the engine checks; other requests are queued."""
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("op") == "cancel":
            cancel.set()
        else:
            requests.put(message)
    requests.put(None)


def worker_main(argv: Sequence[str]) -> int:
    """Entry point of the worker process: ``jobs.py TASK FOLDER``; returns the exit code."""
    if len(argv) != 2 or argv[0] not in (*TASKS, SEARCH_WORKER):
        print(f"usage: jobs.py {{{','.join((*TASKS, SEARCH_WORKER))}}} JOB_FOLDER", file=sys.stderr)
        return 2
    task, folder = argv[0], Path(argv[1])
    protocol = _Protocol(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)  # whatever the engine or a library prints must not corrupt the protocol
    sys.stdout = sys.stderr
    engine_log = logging.getLogger("ctfm_engine")
    engine_log.setLevel(logging.INFO)
    engine_log.addHandler(_LogToProtocol(protocol))
    cancel, requests = threading.Event(), queue.Queue()
    threading.Thread(target=_read_requests, args=(requests, cancel), daemon=True).start()
    try:
        from ctfm_engine.errors import CTFMError

        importlib.import_module(ENGINE_MODULES[task])  # torch and MONAI load while the job is still queued
    except ImportError as error:
        protocol.emit("error", exit_code=4, kind="ModelError",
                      message=f"{sys.executable} cannot import the CT-FM engine ({error}); install the module's "
                              f"dependencies (Model section, Install) and try again")
        return 4
    try:
        request = json.loads((folder / "request.json").read_text())
        protocol.emit("started", pid=os.getpid(), task=task)
        if task == SEARCH_WORKER:
            _serve_search(folder, request, protocol, requests)
        else:
            {"segment": _run_segment, "triage": _run_triage, "features": _run_features}[task](
                folder, request, protocol, cancel)
    except CTFMError as error:
        protocol.emit("error", exit_code=error.exit_code, message=str(error), kind=type(error).__name__)
        return error.exit_code
    except Exception as error:  # the worker reports every failure as one event; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        protocol.emit("error", exit_code=1, message=f"{type(error).__name__}: {error}", kind=type(error).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
