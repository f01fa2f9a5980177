"""The CTFM module's worker process: ``python worker.py TASK FOLDER`` runs one task of the engine's task layer
(``ctfm_engine.pipelines``) on the volume in FOLDER and speaks :mod:`CTFMLib.protocol` on its stdout and stdin.

Tasks: ``segment`` (``run_segmentation``), ``triage`` (``run_triage``), ``features`` (a scan's search features into
the feature cache) and ``search-worker`` (``open_searcher``, then ``load``/``search`` requests until ``close``).
The weights policy, defaults and preprocessing are the engine's: a request without weights passes None.  Errors
are reported by the engine's boundary handler, their remedies worded in the module's own terms.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script by the client: make the CTFMLib package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from CTFMLib import install, protocol  # noqa: E402

install.use_bundled_engine()  # the engine the module carries (install tree) or the source checkout's, first

if TYPE_CHECKING:
    from ctfm_engine.pipelines import Searcher
    from ctfm_engine.volume import CTVolume

# The engine's remedy keys in the module's words (the checkbox labels are those in Resources/UI/CTFM.ui).
ACCEPT_NOT_CT = ('if it is a CT in Hounsfield units, tick "Accept images that do not look like CT" in the Inputs '
                 "section to use it anyway")
REMEDIES = {"accept_partial": 'tick "Accept a head CT that does not cover the whole head" in the Triage section '
                              "to judge it anyway",
            "ct_check": ACCEPT_NOT_CT, "hu_offset": ACCEPT_NOT_CT}
# Bugs' tracebacks go to stderr, which the client shows in the module's log (its Python console).
tracebacks = logging.getLogger("CTFMLib.worker")


class EventWriter:
    """Writes events to the protocol stream (the worker's original stdout), one JSON object per line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        with self.lock:
            self.stream.write(protocol.event_line(event, **fields))
            self.stream.flush()

    def progress(self, stage: str, done: int, total: int) -> None:
        self.emit(protocol.PROGRESS, done=int(done), total=int(total), stage=stage)

    def error(self, code: int, message: str, error: BaseException, request: int | None = None) -> None:
        """The engine's boundary handler's report, as an ``error`` event (of ``request`` in the search worker)."""
        fields = {} if request is None else {"request": request}
        self.emit(protocol.ERROR, **fields, exit_code=code, message=message, kind=type(error).__name__)


class LogToProtocol(logging.Handler):
    """Engine log records (``ctfm_engine`` and below, e.g. the weights policy's demonstration warning) as events."""

    def __init__(self, events: EventWriter) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        self.events.emit(protocol.LOG, level=record.levelname, message=record.getMessage())


def _weights(request: dict[str, Any]) -> str | None:
    return request.get("weights") or None


def _device(request: dict[str, Any]) -> str:
    return request.get("device") or "cpu"


def _check_ct(request: dict[str, Any]) -> bool:
    """Whether the input must look like CT in HU (the module's "Accept images that do not look like CT" unticked)."""
    return not request.get("skip_ct_check")


# --- one-shot tasks --------------------------------------------------------------------------------------------


def segmentation_job(folder: Path, request: dict[str, Any], events: EventWriter, cancel: threading.Event) -> None:
    from ctfm_engine.pipelines import SegmentationRequest, run_segmentation

    events.progress("reading input", 0, 1)
    volume = protocol.read_volume(folder, check_ct=_check_ct(request))
    roi = request.get("roi_size_zyx")
    events.progress("loading model", 0, 1)
    outcome = run_segmentation(SegmentationRequest(
        input=volume, weights=_weights(request), device=_device(request),
        roi_size_zyx=None if roi is None else tuple(roi), overlap=request.get("overlap"),
        largest_component=request.get("largest_component"),
        progress=lambda done, total: events.progress("segmenting", done, total), cancel=cancel))
    events.progress("writing result", 0, 1)
    labels = protocol.save_array(folder, "labels", outcome.labels)
    events.emit(protocol.RESULT, arrays={"labels": labels}, names={str(k): v for k, v in outcome.names.items()},
                structures=outcome.structures(), measurements=outcome.measurements(), weights=outcome.weights,
                model={**outcome.describe_model(), "backend": outcome.backend},
                device=outcome.device, seconds=round(outcome.seconds, 3))


def triage_job(folder: Path, request: dict[str, Any], events: EventWriter, cancel: threading.Event) -> None:
    from ctfm_engine.pipelines import TriageRequest, run_triage

    events.progress("reading input", 0, 1)
    volume = protocol.read_volume(folder, check_ct=_check_ct(request))
    events.progress("loading model", 0, 1)  # after the input check, which runs first inside run_triage
    outcome = run_triage(TriageRequest(
        input=volume, weights=_weights(request), device=_device(request), threshold=request.get("threshold"),
        accept_partial=bool(request.get("accept_partial")),
        progress=lambda done, total: events.progress("triage", done, total), cancel=cancel))
    document = outcome.result.as_dict()
    document.pop("input", None)
    events.emit(protocol.RESULT, **document, threshold_source=outcome.threshold_source, weights=outcome.weights,
                notes=outcome.notes, device=outcome.device)


def open_request_searcher(request: dict[str, Any], events: EventWriter) -> Searcher:
    from ctfm_engine.pipelines import open_searcher
    from ctfm_engine.tasks.search import SearchSettings

    events.progress("loading model", 0, 1)
    return open_searcher(_weights(request), device=_device(request),
                         settings=SearchSettings(top_k=int(request.get("top_k") or 5)),
                         cache_folder=request.get("cache_dir"))


def features_job(folder: Path, request: dict[str, Any], events: EventWriter, cancel: threading.Event) -> None:
    from ctfm_engine.progress import check_cancelled

    events.progress("reading input", 0, 1)
    volume = protocol.read_volume(folder, check_ct=_check_ct(request))
    searcher = open_request_searcher(request, events)
    check_cancelled(cancel)
    key = searcher.search.key(volume)
    cached = searcher.search.cache.get(key) is not None
    events.progress("features", 0, 1)
    features = searcher.search.features(volume, key=key)
    events.progress("features", 1, 1)
    events.emit(protocol.RESULT, key=key, cached=cached, feature_shape=list(features.features.shape),
                weights=searcher.weights)


ONE_SHOT: dict[str, Callable[[Path, dict[str, Any], EventWriter, threading.Event], None]] = {
    "segment": segmentation_job, "triage": triage_job, "features": features_job}


# --- the persistent search worker ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedScan:
    """A scan kept for later clicks with its feature-cache key, hashed once when it was loaded."""

    volume: CTVolume
    feature_key: str


class SearchService:
    """Answers the search worker's requests with one open searcher and the scans loaded so far (by client key)."""

    def __init__(self, folder: Path, searcher: Searcher, events: EventWriter, check_ct: bool = True) -> None:
        self.folder, self.searcher, self.events, self.check_ct = folder, searcher, events, check_ct
        self.scans: dict[str, LoadedScan] = {}

    def load(self, message: dict[str, Any]) -> None:
        started = time.perf_counter()
        volume = protocol.read_volume(self.folder, message["stem"], check_ct=self.check_ct)
        protocol.remove_volume(self.folder, message["stem"])
        key = self.searcher.search.key(volume)
        self.searcher.search.features(volume, key=key)
        self.scans[message["key"]] = LoadedScan(volume, key)
        self.events.emit(protocol.LOADED, request=message["request"], key=message["key"],
                         seconds=round(time.perf_counter() - started, 3))

    def search(self, message: dict[str, Any]) -> None:
        from ctfm_engine.errors import UsageError

        started = time.perf_counter()
        missing = [key for key in (message["source"], *message["targets"]) if key not in self.scans]
        if missing:
            raise UsageError(f"the search worker could not load {', '.join(missing)}; add the volumes again")
        source, targets = self.scans[message["source"]], [self.scans[key] for key in message["targets"]]
        result = self.searcher.search.search(
            source.volume, message["point_lps"], [target.volume for target in targets], method="fast",
            heatmaps=bool(message.get("heatmaps", True)), heatmap_grid=message.get("heatmap_grid", "source"),
            source_key=source.feature_key, target_keys=[target.feature_key for target in targets])
        arrays, scales, entries = {}, {}, []
        for index, (key, target) in enumerate(zip(message["targets"], result.targets, strict=True)):
            if target.heatmap is not None:
                name = f"heatmap_{index}"
                codes, scales[name] = protocol.heatmap_codes(target.heatmap)
                arrays[name] = protocol.save_array(self.folder, f"{name}-{message['request']}", codes)
            entry = {"key": key, "matches": [{"point_lps": list(m.point_lps), "similarity": m.similarity}
                                             for m in target.matches],
                     "flat": target.flat, "cached": target.cached, "windows": target.windows}
            if target.heatmap_grid is not None:
                entry["heatmap_grid"] = protocol.grid_to_event(target.heatmap_grid)
            entries.append(entry)
        self.events.emit(protocol.RESULT, request=message["request"], point_lps=list(result.point_lps),
                         targets=entries, notes=result.notes, weights=self.searcher.weights, arrays=arrays,
                         scales=scales, seconds=round(time.perf_counter() - started, 3))

    def serve(self, requests: queue.Queue) -> None:
        """Answer requests until ``close`` or the end of stdin."""
        handlers = {protocol.LOAD: self.load, protocol.SEARCH: self.search}
        for message in iter(requests.get, None):
            if message.get("op") == protocol.CLOSE:
                return
            if message.get("op") in handlers:
                self.answer(handlers[message["op"]], message)

    def answer(self, handler: Callable[[dict[str, Any]], None], message: dict[str, Any]) -> None:
        """Run one request at the engine's boundary: a failure is that request's ``error`` event (a bug's traceback
        goes to stderr) and the worker goes on with the next."""
        from ctfm_engine.errors import guarded

        number = message.get("request")
        guarded(lambda: handler(message), lambda code, text, error: self.events.error(code, text, error, number),
                remedies=REMEDIES, log=tracebacks)


def serve_search(folder: Path, request: dict[str, Any], events: EventWriter, requests: queue.Queue) -> None:
    searcher = open_request_searcher(request, events)
    events.emit(protocol.READY, weights=searcher.weights)
    SearchService(folder, searcher, events, check_ct=_check_ct(request)).serve(requests)


# --- the process -----------------------------------------------------------------------------------------------


def read_requests(requests: queue.Queue, cancel: threading.Event) -> None:
    """The worker's stdin: ``cancel`` sets the event the engine checks; other requests are queued."""
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("op") == protocol.CANCEL:
            cancel.set()
        else:
            requests.put(message)
    requests.put(None)


def protocol_stream() -> IO[str]:
    """The protocol's own copy of stdout; stdout itself then goes to stderr, so that whatever the engine or a
    library prints cannot corrupt the protocol."""
    stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def worker_main(argv: Sequence[str]) -> int:
    """Entry point of the worker process: ``worker.py TASK FOLDER``; returns the exit code."""
    tasks = (*protocol.TASKS, protocol.SEARCH_WORKER)
    if len(argv) != 2 or argv[0] not in tasks:
        print(f"usage: worker.py {{{','.join(tasks)}}} JOB_FOLDER", file=sys.stderr)
        return 2
    task, folder = argv[0], Path(argv[1])
    events = EventWriter(protocol_stream())
    engine_log = logging.getLogger("ctfm_engine")
    engine_log.setLevel(logging.INFO)
    engine_log.addHandler(LogToProtocol(events))
    tracebacks.addHandler(logging.StreamHandler(sys.stderr))
    tracebacks.setLevel(logging.DEBUG)
    cancel, requests = threading.Event(), queue.Queue()
    threading.Thread(target=read_requests, args=(requests, cancel), daemon=True).start()
    try:
        from ctfm_engine.errors import guarded

        importlib.import_module("ctfm_engine.pipelines")  # torch and MONAI load while the job is still queued
    except ImportError as error:
        events.emit(protocol.ERROR, exit_code=4, kind="ModelError",
                    message=f"{sys.executable} cannot import the CT-FM engine ({error}); install the module's "
                            f"dependencies (Model section, Install) and try again")
        return 4

    def run() -> None:
        request = json.loads((folder / protocol.REQUEST_FILE).read_text())
        events.emit(protocol.STARTED, pid=os.getpid(), task=task)
        if task == protocol.SEARCH_WORKER:
            serve_search(folder, request, events, requests)
        else:
            ONE_SHOT[task](folder, request, events, cancel)

    code, _ = guarded(run, events.error, remedies=REMEDIES, log=tracebacks)
    return code


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
