"""The message protocol between the CTFM module (:mod:`CTFMLib.jobs`, the client) and its worker process
(:mod:`CTFMLib.worker`): what each side writes in the job folder and on the worker's stdin and stdout.

A job folder is private to one worker.  The client writes the input volume (``volume.npy`` + ``volume.json``:
voxels (z, y, x) in HU, int16 or float32, and their LPS geometry) and ``request.json``, then runs
``python worker.py TASK FOLDER``.  The worker prints one JSON object per line on stdout (anything else it or a
library prints goes to stderr):

``{"event": "started", "pid": int, "task": str}``
    the engine is imported; the job is running (until then it is queued).
``{"event": "progress", "done": int, "total": int, "stage": str}``
    stages are ``reading input``, ``loading model``, then the task's own (``segmenting`` counts sliding windows).
``{"event": "log", "level": str, "message": str}``
    an engine log record (the engine logs no patient-identifying data), among them the weights policy's warning
    that a demonstration model is in use.
``{"event": "result", ..., "weights": {"name", "sha256", "demonstration"}, "arrays": {name: file},
"scales": {name: float}}``
    the task's result; arrays are ``.npy`` files written atomically in the job folder, loaded by the client's reader
    thread.  An array named in ``scales`` travels as uint8 codes and means ``code * scale`` (float32): search
    heatmaps, in [0, 1], go at steps of 1/255 (finer than a 256-entry colour map shows), a quarter of the bytes of
    float32 (a 512 x 512 x 300 scan's heatmap on the model grid: 17 MB, not 66 MB, per click).
``{"event": "error", "exit_code": int, "message": str, "kind": str}``
    the engine's error, its remedy worded for Slicer (exit codes as the ``ctfm`` command: 2 usage, 3 input,
    4 model, 1 other, 130 cancelled).

The client appends ``{"event": "cancelled"}`` and, for a worker that dies without an error event, an ``error``
event of its own.  A job folder is removed when the job ends whatever the outcome, so no partial output remains.

Requests go to the worker's stdin, one JSON object per line: ``{"op": "cancel"}`` for any job; the persistent
search worker (task ``search-worker``) also takes ``load`` (a volume written as ``<stem>.npy``/``<stem>.json``:
compute its features), ``search`` (a point in one loaded volume, searched in others) and ``close``.  It answers
``ready`` (the encoder is loaded), ``loaded`` and per-request ``result``/``error`` events carrying the request id.

Slicer-free, Qt-free and engine-free at import, so the module loads it before its dependencies are installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ctfm_engine.volume import CTVolume, Grid

# The worker's tasks: one-shot jobs, and the persistent search worker.
TASKS = ("segment", "triage", "features")
SEARCH_WORKER = "search-worker"
REQUEST_FILE = "request.json"
VOLUME_STEM = "volume"
CANCELLED_EXIT_CODE = 130

# Events, worker -> client (the client adds CANCELLED itself).
STARTED, PROGRESS, LOG, RESULT, ERROR = "started", "progress", "log", "result", "error"
READY, LOADED = "ready", "loaded"  # the search worker's
CANCELLED = "cancelled"
# Requests, client -> worker.
CANCEL, LOAD, SEARCH, CLOSE = "cancel", "load", "search", "close"

HEATMAP_CODES = 255  # search heatmaps travel as uint8 codes: value = code / 255


def event_line(event: str, **fields: Any) -> str:
    """One protocol line (JSON, newline-terminated)."""
    return json.dumps({"event": event, **fields}, default=str) + "\n"


def read_event(line: str) -> dict[str, Any] | None:
    """The event on a line of the worker's stdout; a line that is not an event becomes a ``log`` event (level
    ``STDOUT``); None for a blank line."""
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict) or "event" not in event:
        return {"event": LOG, "level": "STDOUT", "message": line}
    return event


# --- volumes ---------------------------------------------------------------------------------------------------


def write_volume(volume: CTVolume, folder: Path, stem: str = VOLUME_STEM) -> None:
    """Store a CTVolume losslessly in ``folder``: ``<stem>.npy`` (voxels (z, y, x), int16 stays int16) and
    ``<stem>.json`` (LPS geometry, source, series UID and the non-identifying DICOM references)."""
    np.save(folder / f"{stem}.npy", np.ascontiguousarray(volume.voxels), allow_pickle=False)
    geometry = {
        "spacing_xyz_mm": list(volume.spacing_xyz_mm),
        "origin_lps_mm": list(volume.origin_lps_mm),
        "direction": np.asarray(volume.direction, dtype=float).tolist(),
        "source": volume.source,
        "series_instance_uid": volume.series_instance_uid,
        "dicom": volume.dicom.as_dict(),
    }
    (folder / f"{stem}.json").write_text(json.dumps(geometry, default=str))


def read_volume(folder: Path, stem: str = VOLUME_STEM, *, check_ct: bool = True) -> CTVolume:
    """The CTVolume :func:`write_volume` stored, as float32 HU, refused (InputError) when it cannot be CT in HU
    unless ``check_ct`` is False (the job's ``skip_ct_check``: the user says it is CT)."""
    from ctfm_engine.volume import CTVolume, DicomReferences, check_hounsfield

    geometry = json.loads((folder / f"{stem}.json").read_text())
    voxels = np.load(folder / f"{stem}.npy", allow_pickle=False).astype(np.float32, copy=False)
    volume = CTVolume(voxels=voxels, spacing_xyz_mm=tuple(geometry["spacing_xyz_mm"]),
                      origin_lps_mm=tuple(geometry["origin_lps_mm"]), direction=np.array(geometry["direction"]),
                      source=geometry["source"], series_instance_uid=geometry.get("series_instance_uid"),
                      dicom=DicomReferences.from_dict(geometry.get("dicom") or {}))
    if check_ct:
        check_hounsfield(volume.voxels, volume.source)
    return volume


def remove_volume(folder: Path, stem: str) -> None:
    for suffix in (".npy", ".json"):
        (folder / f"{stem}{suffix}").unlink(missing_ok=True)


# --- result arrays ---------------------------------------------------------------------------------------------


def save_array(folder: Path, name: str, array: np.ndarray) -> str:
    """Write ``<name>.npy`` atomically in the job folder (the client never sees half a file); its file name."""
    from ctfm_engine.io import atomic_output

    path = folder / f"{name}.npy"
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        np.save(stream, array, allow_pickle=False)
    return path.name


def heatmap_codes(heatmap: np.ndarray) -> tuple[np.ndarray, float]:
    """(uint8 codes, scale) of a heatmap in [0, 1]: ``codes * scale`` is within half a step (1/510) of it."""
    codes = np.rint(np.clip(heatmap, 0.0, 1.0) * HEATMAP_CODES).astype(np.uint8)
    return codes, 1.0 / HEATMAP_CODES


def load_arrays(event: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A result event with its array files replaced by the arrays (codes decoded by their scale), the files
    removed; an ``error`` event when one is unreadable."""
    scales = dict(event.pop("scales", {}))
    for name, file in dict(event.pop("arrays", {})).items():
        path = folder / Path(file).name
        try:
            event[name] = np.load(path, allow_pickle=False)
            if name in scales:
                event[name] = np.multiply(event[name], np.float32(scales[name]), dtype=np.float32)
        except (OSError, ValueError) as error:
            return {"event": ERROR, "exit_code": 1, "kind": "CTFMError", "request": event.get("request"),
                    "message": f"the worker's result {path.name} is unreadable ({error})"}
        path.unlink(missing_ok=True)
    return event


# --- grids -----------------------------------------------------------------------------------------------------


def grid_to_event(grid: Grid) -> dict[str, Any]:
    """A ``Grid`` as a target entry's ``heatmap_grid`` (JSON); :func:`grid_from_event` reads it back."""
    return {"shape_zyx": list(grid.shape_zyx), "spacing_xyz_mm": list(grid.spacing_xyz_mm),
            "origin_lps_mm": list(grid.origin_lps_mm), "direction": np.asarray(grid.direction, dtype=float).tolist()}


def grid_from_event(entry: dict[str, Any]) -> Grid:
    """The ``Grid`` (patient LPS) a search result's heatmap sits on, from a target entry's ``heatmap_grid``."""
    from ctfm_engine.volume import Grid

    geometry = entry["heatmap_grid"]
    return Grid(tuple(geometry["shape_zyx"]), tuple(geometry["spacing_xyz_mm"]), tuple(geometry["origin_lps_mm"]),
                np.array(geometry["direction"], dtype=float))
