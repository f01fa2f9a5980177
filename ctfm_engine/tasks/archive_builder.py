"""Embedding an archive of CT scans into a scan index: batch by batch, resumable, here or on a Ray cluster.

A run turns a source of scans into :class:`ScanRow`s, skips the rows already in the index (same id; the index
holds one weights sha256), embeds the rest with CT-FM and commits the index after every batch, so a killed run
loses at most one batch and the next run carries on.  A row that cannot be read as CT (not CT, unreadable, missing)
is skipped and reported, never fatal to the archive (and tried again by the next run); only when no row of the
source is in the index at the end does the run fail (InputError, exit code 3).

:func:`read_manifest` is the one place where a source becomes rows: a manifest file today; a PACS query (a later
issue) plugs in as another reader yielding the same rows, and the engines, the index and resumption stay as they
are.  Logs name a row by its manifest line and its id or file name, never by its full path, which can name a patient.

Engines: ``local`` embeds here, one scan after another; ``ray`` fans the rows out to a pool of Ray Data actors (each
loads the encoder once), on a local Ray cluster or an existing one, and the driver commits their results in
manifest order as batches complete.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from ctfm_engine.errors import CTFMError, InputError, ModelError, UsageError
from ctfm_engine.models.checkpoint import Checkpoint, read_checkpoint
from ctfm_engine.models.registry import announce, load_encoder, resolve_weights
from ctfm_engine.preprocess import CTFM_PREPROCESSING
from ctfm_engine.progress import Progress
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks.embed import AGGREGATIONS, LEVELS, Embedder, PatchWindows
from ctfm_engine.tasks.scan_index import APPROXIMATE_KINDS, EmbeddingProvenance, IndexEntry, ScanIndex, faiss_module
from ctfm_engine.volume import CTVolume

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class ScanRow:
    """One scan to index: its id, its file or DICOM series folder, the series to pick, and its manifest line."""

    id: str
    path: str
    series_instance_uid: str | None = None
    line: int | None = None
    named: bool = False  # the id was given (not derived from the path)

    @property
    def label(self) -> str:
        """How logs name the row: manifest line and id, or the file name when the id is the path."""
        name = self.id if self.named else PurePath(self.path).name
        return name if self.line is None else f"line {self.line} ({name})"


@dataclass(frozen=True)
class Skipped:
    """A row that was not indexed, and why (in words that do not repeat its path)."""

    row: ScanRow
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.row.id, "line": self.row.line, "reason": self.reason}


@dataclass(frozen=True)
class EmbeddingRecipe:
    """How scans are embedded: level, patch aggregation and windows; and how they are read: an HU offset for every
    scan, and whether a scan that does not look like CT in HU is skipped (``check_ct``) or read."""

    level: str = "scan"
    aggregation: str = "min"
    windows: PatchWindows = PatchWindows()
    hu_offset: float | None = None
    check_ct: bool = True

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise UsageError(f"--level {self.level}: choose one of {', '.join(LEVELS)}")
        if self.aggregation not in AGGREGATIONS:
            raise UsageError(f"--aggregation {self.aggregation}: choose one of {', '.join(AGGREGATIONS)}")

    def provenance(self, weights: dict[str, str]) -> EmbeddingProvenance:
        patch = self.level == "patch"
        windows = {"size_zyx": list(self.windows.size_zyx), "overlap": self.windows.overlap} if patch else None
        return EmbeddingProvenance(weights=weights, level=self.level, aggregation=self.aggregation if patch else None,
                                   preprocessing=CTFM_PREPROCESSING.describe(), windows=windows)

    @classmethod
    def of_index(cls, index: ScanIndex, hu_offset: float | None = None) -> EmbeddingRecipe:
        """The recipe that made an index's vectors (to embed more scans, or a query scan, the same way)."""
        provenance = index.provenance
        if provenance.level == "patch":
            windows = provenance.windows or {}
            size_zyx = tuple(int(size) for size in windows["size_zyx"])
            return cls("patch", provenance.aggregation or "min", PatchWindows(size_zyx, windows["overlap"]),  # type: ignore[arg-type]
                       hu_offset)
        return cls("scan", hu_offset=hu_offset)

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "aggregation": self.aggregation, "size_zyx": list(self.windows.size_zyx),
                "overlap": self.windows.overlap, "hu_offset": self.hu_offset, "check_ct": self.check_ct}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> EmbeddingRecipe:
        return cls(record["level"], record["aggregation"], PatchWindows(tuple(record["size_zyx"]), record["overlap"]),
                   record["hu_offset"], record["check_ct"])


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs.

    ``address`` None or "": a local Ray cluster on this machine; "auto" or "ray://host:10001": an existing cluster.
    ``workers``: embedding actors (default: as many as the cluster's CPUs, or GPUs, allow);
    ``cpus_per_worker``: CPU threads of each; ``gpus_per_worker``: GPUs of each (> 0 embeds on CUDA).
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0


@dataclass
class IndexingReport:
    """What a run did: rows added, rows already indexed, rows skipped (with reasons)."""

    index: Path
    engine: str
    weights: dict[str, str] | None = None
    weights_folder: Path | None = None
    kind: str | None = None
    added: int = 0
    already_indexed: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    entries: int = 0


@dataclass(frozen=True)
class _Outcome:
    """An embedded row (vector) or a skipped one (reason)."""

    row: ScanRow
    vector: np.ndarray | None = None
    series_instance_uid: str | None = None
    reason: str | None = None


# -- sources of rows -----------------------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> list[ScanRow]:
    """The rows of a manifest: a CSV file with a ``path`` column (optional ``id`` and ``series_instance_uid``), or
    a text file with one path a line (blank lines and ``#`` comments ignored).

    Paths are NIfTI/NRRD/MHA files or DICOM series folders, relative to the manifest's folder unless absolute.  A
    row's id is its ``id`` cell, else the path as written; ids are unique.  The single place where a source becomes
    rows: a PACS source (a later issue) is another function returning the same rows.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot be read as a text manifest ({error})") from None
    base = path.parent
    rows: list[ScanRow] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "path" not in columns:
            raise InputError(f"{path}: a CSV manifest needs a 'path' column (found: {', '.join(columns) or 'none'})")
        for line, record in enumerate(reader, start=2):
            written = (record.get(columns["path"]) or "").strip()
            if not written:
                raise InputError(f"{path}: line {line} has no path")
            given_id = (record.get(columns.get("id", ""), "") or "").strip() if "id" in columns else ""
            series = (record.get(columns.get("series_instance_uid", ""), "") or "").strip() or None
            rows.append(_row(written, base, given_id, series, line))
    else:
        for line, content in enumerate(text.splitlines(), start=1):
            written = content.strip()
            if written and not written.startswith("#"):
                rows.append(_row(written, base, "", None, line))
    if not rows:
        raise InputError(f"{path}: the manifest lists no scans")
    first_line: dict[str, int | None] = {}
    for row in rows:
        if row.id in first_line:
            raise InputError(f"{path}: line {row.line} repeats the id {row.id!r} of line {first_line[row.id]}; "
                             f"ids must be unique (add an 'id' column)")
        first_line[row.id] = row.line
    return rows


def rows_from_inputs(inputs: Sequence[str | Path], series_uid: str | None = None) -> list[ScanRow]:
    """Rows for scans given on the command line: id = the path as given."""
    rows = [_row(str(item), Path.cwd(), "", series_uid, None) for item in inputs]
    if len({row.id for row in rows}) != len(rows):
        raise UsageError("the same input is given twice")
    return rows


def _row(written: str, base: Path, given_id: str, series: str | None, line: int | None) -> ScanRow:
    location = Path(written).expanduser()
    absolute = os.path.abspath(location if location.is_absolute() else base / location)
    return ScanRow(id=given_id or str(PurePath(written)), path=absolute, series_instance_uid=series, line=line,
                   named=bool(given_id))


# -- the run -------------------------------------------------------------------------------------------------------


def index_scans(
    folder: str | Path,
    rows: Sequence[ScanRow],
    *,
    weights: str | Path | None = None,
    recipe: EmbeddingRecipe | None = None,
    hu_offset: float | None = None,
    check_ct: bool = True,
    kind: str | None = None,
    engine: str = "local",
    device: str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    ray_options: RayOptions | None = None,
    progress: Progress | None = None,
) -> IndexingReport:
    """Embed the rows not yet in the index at ``folder`` (created on the first batch) and add them batch by batch.

    ``recipe`` None: the index's own recipe, or scan level for a new index (a recipe other than the index's is a
    UsageError); ``hu_offset`` is added to every scan (see :func:`read_volume`); ``check_ct`` False reads a scan that
    does not look like CT in Hounsfield units instead of skipping it; ``kind`` None: the index's search
    kind, or exact; ``progress(done, total)`` is called after every committed batch, over the rows left to do.
    Raises InputError when no row is in the index at the end, ModelError when the weights are not the index's.
    """
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if engine == "local":
        from ctfm_engine.runtime.device import resolve_device

        resolve_device(device)  # a usage error before any work
    if kind in APPROXIMATE_KINDS:
        faiss_module()
    folder = Path(folder)
    index = _open_for_writing(folder)
    try:
        if index is not None:
            if index.kind in APPROXIMATE_KINDS and kind is None:
                faiss_module()
            if recipe is not None:
                index.check_provenance(recipe.provenance(index.weights))  # UsageError naming the difference
            recipe = EmbeddingRecipe.of_index(index)
        recipe = replace(recipe or EmbeddingRecipe(), hu_offset=hu_offset, check_ct=check_ct)
        report = IndexingReport(folder, engine, weights=None if index is None else index.weights)
        pending = [row for row in rows if index is None or row.id not in index]
        report.already_indexed = len(rows) - len(pending)
        if pending:
            index = _run(folder, index, pending, report, weights=weights, recipe=recipe, kind=kind, engine=engine,
                         device=device, batch_size=batch_size, ray_options=ray_options or RayOptions(),
                         progress=progress)
        if index is not None:
            if kind is not None:
                index.set_kind(kind)
            index.save_structure()
            report.entries, report.kind = len(index), index.kind
        return report
    finally:
        if index is not None:
            index.close()


def _run(folder: Path, index: ScanIndex | None, pending: list[ScanRow], report: IndexingReport, *,
         weights: str | Path | None, recipe: EmbeddingRecipe, kind: str | None, engine: str, device: str,
         batch_size: int, ray_options: RayOptions, progress: Progress | None) -> ScanIndex | None:
    def check(checkpoint: Checkpoint) -> None:
        provenance = recipe.provenance(checkpoint.identity)
        if index is not None:
            index.check_provenance(provenance)
        report.weights, report.weights_folder = checkpoint.identity, checkpoint.folder

    requested = weights_for(index, weights)
    if engine == "local":
        outcomes = _embed_here(pending, requested, recipe, device, check)
    else:
        outcomes = _embed_with_ray(pending, requested, recipe, ray_options, batch_size, check)
    done, created = 0, None
    try:
        for batch in _batched(outcomes, batch_size):
            entries, vectors = [], []
            for outcome in batch:
                if outcome.vector is None:
                    report.skipped.append(Skipped(outcome.row, str(outcome.reason)))
                    log.warning("skipped %s: %s", outcome.row.label, outcome.reason)
                else:
                    entries.append(IndexEntry(outcome.row.id, outcome.row.path, outcome.series_instance_uid))
                    vectors.append(outcome.vector)
            if entries:
                assert report.weights is not None  # set by check() when the model loaded
                provenance = recipe.provenance(report.weights)
                if index is None:
                    index = created = ScanIndex.create(folder, dimension=len(vectors[0]), provenance=provenance,
                                                       kind=kind or "exact", weights_folder=report.weights_folder)
                index.add(entries, np.stack(vectors), provenance)
                report.added += len(entries)
            done += len(batch)
            if progress is not None:
                progress(done, len(pending))
    except BaseException:
        if created is not None:
            created.close()
        raise
    if report.added == 0 and report.already_indexed == 0:
        first = report.skipped[0]
        raise InputError(f"none of the {len(pending)} scans could be indexed; {first.row.label}: {first.reason}")
    if report.skipped:
        log.warning("%d of %d scans skipped (listed under 'skipped' with --json)", len(report.skipped), len(pending))
    return index


def weights_for(index: ScanIndex | None, requested: str | Path | None) -> str | Path | None:
    """The weights to embed with: as requested, else CTFM_WEIGHTS, else the folder that built the index (when it is
    still there), else the default (see :func:`ctfm_engine.models.registry.resolve_weights`)."""
    if requested or os.environ.get("CTFM_WEIGHTS") or index is None:
        return requested
    folder = index.weights_folder
    return folder if folder is not None and folder.is_dir() else None


def _open_for_writing(folder: Path) -> ScanIndex | None:
    """The index at ``folder``, or None when there is none yet (a missing or empty folder)."""
    if folder.is_dir() and not any(p.name != ".lock" for p in folder.iterdir()):
        return None
    if not folder.exists():
        return None
    return ScanIndex.open(folder, writable=True)


def _batched(items: Iterator[_Outcome], size: int) -> Iterator[list[_Outcome]]:
    batch: list[_Outcome] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- queries -------------------------------------------------------------------------------------------------------


def embed_for_index(index: ScanIndex, volume: CTVolume, *, weights: str | Path | None = None,
                    device: str = "cpu") -> tuple[np.ndarray, Checkpoint]:
    """A scan embedded the way the index's entries were (same weights, level, aggregation), to query it with;
    ModelError when the weights are not the index's."""
    from ctfm_engine.runtime.device import resolve_device

    target = resolve_device(device)
    encoder, checkpoint = load_encoder(weights_for(index, weights))
    announce(checkpoint)
    recipe = EmbeddingRecipe.of_index(index)
    index.check_provenance(recipe.provenance(checkpoint.identity))
    embedding = Embedder(encoder, target).embed(volume, recipe.level, windows=recipe.windows,
                                                aggregation=recipe.aggregation)
    return embedding.vector, checkpoint


def read_embedding_file(path: str | Path, row: int, index: ScanIndex) -> np.ndarray:
    """Row ``row`` of an embeddings file written by ``ctfm embed --out``, checked against the index's provenance."""
    import json

    path = Path(path)
    try:
        with np.load(path) as saved:
            vectors, metadata = saved["embeddings"], json.loads(str(saved["metadata"]))
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{path}: not an embeddings file written by `ctfm embed --out` ({error})") from None
    if not 0 <= row < len(vectors):
        raise UsageError(f"--row {row}: {path} holds {len(vectors)} embeddings (rows 0 to {len(vectors) - 1})")
    provenance = EmbeddingProvenance(weights=metadata["weights"], level=metadata["level"],
                                     aggregation=metadata.get("aggregation"),
                                     preprocessing=metadata["preprocessing"], windows=index.provenance.windows)
    index.check_provenance(provenance)
    return np.asarray(vectors[row], dtype=np.float32)


# -- reading and embedding one row (both engines) ------------------------------------------------------------------


class _PathsAsLabels(logging.Filter):
    """Rewrites a row's path into its label in log records (readers log the paths they read)."""

    def __init__(self, row: ScanRow) -> None:
        super().__init__()
        self.row = row

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.row.path in message:
            record.msg, record.args = message.replace(self.row.path, self.row.label), ()
        return True


@contextlib.contextmanager
def _logging_labels(row: ScanRow) -> Iterator[None]:
    handlers = logging.getLogger().handlers
    masking = _PathsAsLabels(row)
    for handler in handlers:
        handler.addFilter(masking)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(masking)


def _reason(error: Exception, row: ScanRow) -> str:
    """An error message about a row without its path: messages start with "PATH: "; other mentions become the
    row's label."""
    message = str(error)
    if message.startswith(f"{row.path}: "):
        message = message[len(row.path) + 2 :]
    return message.replace(row.path, row.label)


def _read(row: ScanRow, recipe: EmbeddingRecipe) -> CTVolume | str:
    """The row's volume, or why it cannot be indexed."""
    try:
        with _logging_labels(row):
            return read_volume(row.path, series_uid=row.series_instance_uid, hu_offset=recipe.hu_offset,
                               check_hu=recipe.check_ct)
    except InputError as error:
        return _reason(error, row)


def _embed(embedder: Embedder, volume: CTVolume, row: ScanRow, recipe: EmbeddingRecipe) -> _Outcome:
    try:
        with _logging_labels(row):
            embedding = embedder.embed(volume, recipe.level, windows=recipe.windows, aggregation=recipe.aggregation)
    except InputError as error:
        return _Outcome(row, reason=_reason(error, row))
    return _Outcome(row, embedding.vector.astype(np.float32), volume.series_instance_uid)


def _embed_here(rows: Sequence[ScanRow], weights: str | Path | None, recipe: EmbeddingRecipe, device: str,
                check: Callable[[Checkpoint], None]) -> Iterator[_Outcome]:
    """Rows embedded one after the other in this process; the encoder loads at the first readable scan, so a run
    whose scans are all bad fails on the data (exit 3) even without weights."""
    from ctfm_engine.runtime.device import resolve_device

    embedder = None
    for row in rows:
        volume = _read(row, recipe)
        if isinstance(volume, str):
            yield _Outcome(row, reason=volume)
            continue
        if embedder is None:
            target = resolve_device(device)
            encoder, checkpoint = load_encoder(weights)
            announce(checkpoint)
            check(checkpoint)
            log.info("weights %s (sha256 %s) on %s", checkpoint.name, checkpoint.sha256[:12], target)
            embedder = Embedder(encoder, target)
        yield _embed(embedder, volume, row, recipe)


# -- Ray -----------------------------------------------------------------------------------------------------------


class EmbedActor:
    """Ray Data callable class: loads the encoder once per actor, then embeds batches of rows.

    A batch is a dict of numpy columns ``row`` (position), ``id``, ``path``, ``series``; the result holds ``row``,
    ``vector`` (n, D), ``series`` (found SeriesInstanceUID or "") and ``reason`` ("" when embedded).
    """

    def __init__(self, weights: str, sha256: str, recipe: dict[str, Any], device: str, threads: int) -> None:
        import torch

        from ctfm_engine.models.encoder import embedding_size
        from ctfm_engine.runtime.device import resolve_device

        torch.set_num_threads(max(1, threads))
        encoder, checkpoint = load_encoder(weights)
        if checkpoint.sha256 != sha256:
            raise ModelError(f"{weights}: the weights on this Ray node (sha256 {checkpoint.sha256[:12]}) differ from "
                             f"the driver's (sha256 {sha256[:12]}); give every node the same checkpoint")
        self.embedder = Embedder(encoder, resolve_device(device))
        self.recipe = EmbeddingRecipe.from_dict(recipe)
        self.dimension = embedding_size(encoder)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors, series, reasons = [], [], []
        for row_id, path, series_uid in zip(batch["id"], batch["path"], batch["series"], strict=True):
            row = ScanRow(str(row_id), str(path), str(series_uid) or None)
            volume = _read(row, self.recipe)
            outcome = _Outcome(row, reason=volume) if isinstance(volume, str) else \
                _embed(self.embedder, volume, row, self.recipe)
            vectors.append(np.zeros(self.dimension, np.float32) if outcome.vector is None else outcome.vector)
            series.append(outcome.series_instance_uid or "")
            reasons.append(outcome.reason or "")
        return {"row": np.asarray(batch["row"]), "vector": np.stack(vectors), "series": np.array(series, dtype=object),
                "reason": np.array(reasons, dtype=object)}


def ray_module() -> Any:
    """The ray package (with Ray Data), or a UsageError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--engine ray needs Ray Data: pip install 'ctfm-engine[ray]'") from None
    return ray


def _embed_with_ray(rows: Sequence[ScanRow], weights: str | Path | None, recipe: EmbeddingRecipe,
                    options: RayOptions, batch_size: int, check: Callable[[Checkpoint], None]) -> Iterator[_Outcome]:
    """Rows embedded by a pool of Ray Data actors; yielded in manifest order as their batches complete."""
    ray = ray_module()
    missing = [row for row in rows if not os.path.exists(row.path)]
    for row in missing:  # cheap to know here; spares the cluster rows it cannot read
        yield _Outcome(row, reason="does not exist")
    rows = [row for row in rows if os.path.exists(row.path)]
    if not rows:
        return
    checkpoint = read_checkpoint(resolve_weights(weights))  # exit 4 here, before any cluster starts
    check(checkpoint)
    started_here = not ray.is_initialized()
    if started_here:
        _start_ray(ray, options)
    try:
        workers = _ray_workers(ray, options)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # commit in manifest order: deterministic indexes
        context.enable_progress_bars = False  # the driver draws its own
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # per-dataset execution notes; errors still show
        device = "cuda" if options.gpus_per_worker > 0 else "cpu"
        log.info("Ray: %d embedding workers (%d CPU%s each), weights %s (sha256 %s)", workers,
                 options.cpus_per_worker, f", {options.gpus_per_worker:g} GPU" if device == "cuda" else "",
                 checkpoint.name, checkpoint.sha256[:12])
        items = [{"row": number, "id": row.id, "path": row.path, "series": row.series_instance_uid or ""}
                 for number, row in enumerate(rows)]
        dataset = ray.data.from_items(items).map_batches(
            EmbedActor,
            fn_constructor_kwargs={"weights": str(checkpoint.folder), "sha256": checkpoint.sha256,
                                   "recipe": recipe.as_dict(), "device": device, "threads": options.cpus_per_worker},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
        )
        try:
            for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
                for number, vector, series, reason in zip(batch["row"], batch["vector"], batch["series"],
                                                          batch["reason"], strict=True):
                    row = rows[int(number)]
                    if reason:
                        yield _Outcome(row, reason=str(reason))
                    else:
                        yield _Outcome(row, np.asarray(vector, dtype=np.float32), str(series) or None)
        except ray.exceptions.RayError as error:
            raise _ray_failure(error) from None
    finally:
        if started_here:
            ray.shutdown()


def _start_ray(ray: Any, options: RayOptions) -> None:
    address = options.address or None
    try:
        if address is None:
            cpus = (options.workers or 0) * options.cpus_per_worker or os.cpu_count() or 1
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     object_store_memory=512 << 20)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = "a local Ray cluster" if address is None else f"the Ray cluster at {address}"
        raise CTFMError(f"cannot start or reach {where}: {str(error).splitlines()[0] if str(error) else error}; "
                        f"check `ray status` there") from None


def _ray_workers(ray: Any, options: RayOptions) -> int:
    """Actors to start: as asked (checked against the cluster), else as many as its CPUs or GPUs allow."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    fit = cpus // max(1, options.cpus_per_worker)
    if options.gpus_per_worker > 0:
        fit = min(fit, int(gpus // options.gpus_per_worker))
    if options.workers is None:
        if fit < 1:
            raise UsageError(f"the Ray cluster ({cpus} CPUs, {gpus:g} GPUs) cannot hold one worker of "
                             f"{options.cpus_per_worker} CPUs and {options.gpus_per_worker:g} GPUs")
        return fit
    if options.workers > fit:
        raise UsageError(f"--workers {options.workers}: the Ray cluster ({cpus} CPUs, {gpus:g} GPUs) holds at most "
                         f"{fit} workers of {options.cpus_per_worker} CPUs and {options.gpus_per_worker:g} GPUs")
    return options.workers


def _ray_failure(error: Exception) -> CTFMError:
    """A Ray error as the CTFMError it wraps (e.g. a ModelError raised in an actor), else one line, exit code 1."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, CTFMError):
        return cause
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return CTFMError(f"the Ray workers failed: {first[:300]}")
