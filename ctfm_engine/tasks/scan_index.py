"""Scan retrieval: an on-disk index of scan embeddings with their provenance, searched by cosine similarity.

Search is exact by default (unit vectors, one matrix product per block of rows, ``argpartition`` for the top k);
FAISS ``IndexHNSWFlat`` or ``IndexIVFFlat`` (inner product on unit vectors = cosine) serve large collections.
Ties in similarity go to the entry added first.

An index is a folder (format version 1)::

    index.json          the header and the only commit point: format, version, dimension, provenance (weights
                        name + sha256, level, aggregation, preprocessing, windows), kind, segments, tombstones,
                        FAISS structures
    seg-000007.npy      (n, D) float32 unit vectors, one row per entry, memory-mapped when read
    seg-000007.jsonl    the entries of those rows, one JSON object a line: seq, id, source, series_instance_uid,
                        norm (|embedding|, so unit vector x norm gives the embedding back)
    hnsw-000009.faiss   optional FAISS structures (faiss.write_index), ids = the entries' seq numbers
    .lock               writers hold an exclusive lock on it (one writer at a time; readers never wait)

Every file is written once, under a new name, through :func:`ctfm_engine.io.atomic_output`; ``index.json`` is
replaced last.  A run killed at any moment leaves the previous ``index.json`` and the files it names intact; files
it does not name are leftovers that the next writer deletes.  Every entry of an index shares one provenance:
vectors from other weights, of another dimension or another embedding recipe are refused.

Removal writes tombstones (seq numbers in ``index.json``); a removed row leaves the files when its segment is merged.
Segments merge like a binary counter (the newest two, while the newest holds at least as many rows as the one before
it), so an index built batch by batch keeps O(log n) segments and rewrites each row O(log n) times; tombstones above
20 % of the rows merge everything.  FAISS structures are kept up to date incrementally (new entries added, removed
ones filtered out with an ``IDSelector``) and rebuilt when 20 % of their ids are dead or, for IVF, when the
collection outgrew its number of lists by a factor of 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ctfm_engine.errors import CTFMError, InputError, ModelError, UsageError
from ctfm_engine.io import atomic_output

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer at a time is then the caller's duty
    fcntl = None  # type: ignore[assignment]

FORMAT = "ctfm-scan-index"
FORMAT_VERSION = 1
HEADER_FILE = "index.json"
LOCK_FILE = ".lock"
KINDS = ("exact", "hnsw", "ivf")
APPROXIMATE_KINDS = ("hnsw", "ivf")
DEAD_FRACTION = 0.2
SCORE_BUDGET_BYTES = 256 << 20  # scores held at once by the exact search: rows per matrix product = this / 4 Q
IVF_KMEANS_ITERATIONS = 10
IVF_TRAINING_POINTS_PER_LIST = 64
TIE_MARGIN = 16  # approximate searches fetch k + max(k, this) candidates to order ties as the exact search does
_DATA_FILE = re.compile(r"^(seg-\d+\.(npy|jsonl)|(hnsw|ivf)-\d+\.faiss)$")
_TEMPORARY_FILE = re.compile(r"^\..+\.partial$")


@dataclass(frozen=True)
class IndexEntry:
    """One scan in the index: its id, where it came from (file or DICOM folder) and its series when known."""

    id: str
    source: str
    series_instance_uid: str | None = None


@dataclass(frozen=True)
class Match:
    """A search result: the entry and its cosine similarity to the query."""

    id: str
    source: str
    series_instance_uid: str | None
    similarity: float

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "series_instance_uid": self.series_instance_uid,
                "similarity": self.similarity}


@dataclass(frozen=True)
class EmbeddingProvenance:
    """What produced an index's vectors: weights ``{"name", "sha256"}``, level, aggregation, preprocessing, windows."""

    weights: Mapping[str, str]
    level: str = "scan"
    aggregation: str | None = None
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    windows: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        # Through JSON, so tuples and lists compare equal before and after a round trip through index.json.
        return json.loads(json.dumps({
            "weights": {"name": self.weights["name"], "sha256": self.weights["sha256"]},
            "level": self.level, "aggregation": self.aggregation,
            "preprocessing": dict(self.preprocessing), "windows": None if self.windows is None else dict(self.windows),
        }))

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EmbeddingProvenance:
        return cls(weights=dict(record["weights"]), level=record["level"], aggregation=record.get("aggregation"),
                   preprocessing=dict(record.get("preprocessing") or {}), windows=record.get("windows"))

    def describe(self) -> str:
        recipe = f"{self.level}-level" + (f" ({self.aggregation} of patches)" if self.aggregation else "")
        return f"{recipe} embeddings of {self.weights['name']} (sha256 {self.weights['sha256'][:12]})"


@dataclass(frozen=True)
class SearchParameters:
    """FAISS settings.  HNSW: graph degree M, beam widths at build and at search.  IVF: number of lists (None: about
    4 sqrt(n), at most n / 39 so k-means has 39 points per centroid) and lists probed per query."""

    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 128
    ivf_nlist: int | None = None
    ivf_nprobe: int = 16

    def as_dict(self) -> dict[str, Any]:
        return {"hnsw_m": self.hnsw_m, "hnsw_ef_construction": self.hnsw_ef_construction,
                "hnsw_ef_search": self.hnsw_ef_search, "ivf_nlist": self.ivf_nlist, "ivf_nprobe": self.ivf_nprobe}

    def nlist(self, rows: int) -> int:
        if self.ivf_nlist is not None:
            return max(1, min(self.ivf_nlist, rows))
        return max(1, min(round(4 * math.sqrt(rows)), rows // 39))

    def build_settings(self, kind: str, rows: int) -> dict[str, int]:
        """What a structure is built with; a stored structure built otherwise is rebuilt."""
        if kind == "hnsw":
            return {"m": self.hnsw_m, "ef_construction": self.hnsw_ef_construction}
        return {"nlist": self.nlist(rows)}


def faiss_module() -> Any:
    """The faiss package, or a UsageError saying how to install it."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU-feature probe at INFO
    try:
        import faiss
    except ImportError:
        raise UsageError("approximate search (--kind hnsw or ivf) needs FAISS: pip install 'ctfm-engine[faiss]'") \
            from None
    return faiss


def degenerate_rows(vectors: np.ndarray) -> np.ndarray:
    """Row numbers of ``vectors`` that have no direction (zero, or not finite), so no cosine similarity."""
    norms = np.linalg.norm(np.asarray(vectors, dtype=np.float64), axis=1)
    return np.flatnonzero(~np.isfinite(norms) | (norms == 0))


def unit_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors, norms) of the rows of ``vectors`` as float32; ValueError for a zero or non-finite row."""
    vectors = np.asarray(vectors, dtype=np.float32)
    degenerate = degenerate_rows(vectors)
    if len(degenerate):
        raise ValueError(f"row {int(degenerate[0])} is not a finite non-zero vector")
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    return (vectors / norms[:, None]).astype(np.float32), norms.astype(np.float32)


def _best(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (rows, scores), best first, ties to the lower row; -inf scores (removed rows) never count."""
    if len(scores) > k:
        kth = scores[np.argpartition(scores, len(scores) - k)[len(scores) - k]]
        keep = np.flatnonzero(scores >= kth)  # every row tied with the k-th stays a candidate
        rows, scores = rows[keep], scores[keep]
    finite = np.isfinite(scores)
    rows, scores = rows[finite], scores[finite]
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def exact_top_k(
    blocks: Iterable[np.ndarray], queries: np.ndarray, k: int, live: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, the k rows of the stacked ``blocks`` with the largest inner product: (row numbers, scores).

    ``queries`` (Q, D) and the blocks' rows should be unit vectors (then the score is the cosine similarity);
    ``live`` (rows,) masks removed rows out.  Rows are numbered across blocks in order; ties go to the lower row.
    """
    empty = (np.empty(0, np.int64), np.empty(0, np.float32))
    best = [empty] * len(queries)
    offset = 0
    rows_per_product = max(1024, SCORE_BUDGET_BYTES // (4 * max(1, len(queries))))
    for block in blocks:
        for start in range(0, len(block), rows_per_product):
            chunk = np.asarray(block[start : start + rows_per_product])  # a view of the memory-mapped rows
            scores = queries @ chunk.T  # (Q, rows)
            first = offset + start
            if live is not None:
                scores[:, ~live[first : first + len(chunk)]] = -np.inf
            numbers = np.arange(first, first + len(chunk), dtype=np.int64)
            for query, (rows, kept) in enumerate(best):
                chunk_rows, chunk_scores = _best(numbers, scores[query], k)
                best[query] = _best(np.concatenate([rows, chunk_rows]), np.concatenate([kept, chunk_scores]), k)
        offset += len(block)
    return best


@dataclass
class _Segment:
    name: str
    vectors: np.ndarray  # (n, D) float32 unit rows, memory-mapped
    seqs: np.ndarray  # (n,) int64, increasing


@dataclass
class _Structure:
    """A FAISS index (IndexIDMap over HNSW or IVF) over seq numbers, in memory."""

    kind: str
    index: Any
    settings: dict[str, int]
    through_seq: int  # every entry with seq <= this was added
    dirty: bool = False  # differs from the stored file
    state: int = -1  # the index state it was brought up to date with
    selector: tuple[Any, ...] | None = None  # filters removed entries out of searches


class ScanIndex:
    """An on-disk index of scan embeddings: add, remove, query (exact, HNSW or IVF), persisted after every change.

    Open with :meth:`open` (``writable=True`` takes the writer's lock) or :meth:`create`; use as a context manager
    or call :meth:`close` to release the lock.
    """

    def __init__(self, folder: Path, header: dict[str, Any], segments: list[_Segment],
                 entries: list[dict[str, Any]], lock: IO[str] | None) -> None:
        self.folder = folder
        self._header = header
        self._segments = segments
        self._lock = lock
        self._ids = [entry["id"] for entry in entries]
        self._sources = [entry["source"] for entry in entries]
        self._series = [entry.get("series_instance_uid") for entry in entries]
        self._norms = np.array([entry["norm"] for entry in entries], dtype=np.float32)
        self._seqs = np.concatenate([s.seqs for s in segments]) if segments else np.empty(0, np.int64)
        self._live = ~np.isin(self._seqs, np.array(header["removed"], dtype=np.int64))
        self._row_of = {entry_id: row for row, entry_id in enumerate(self._ids) if self._live[row]}
        self._structures: dict[str, _Structure] = {}
        self._state = 0  # counts changes of the entries, so cached FAISS structures know when to catch up

    # -- opening -----------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        folder: str | Path,
        *,
        dimension: int,
        provenance: EmbeddingProvenance,
        kind: str = "exact",
        search: SearchParameters = SearchParameters(),
        weights_folder: str | Path | None = None,
    ) -> ScanIndex:
        """A new, empty index in ``folder`` (which must not exist or be empty), open for writing."""
        folder = Path(folder)
        _check_kind(kind)
        if dimension < 1:
            raise ValueError(f"dimension must be positive, got {dimension}")
        if folder.exists() and (not folder.is_dir() or any(p.name != LOCK_FILE for p in folder.iterdir())):
            raise UsageError(f"{folder}: exists and is not empty; an index is created in a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        lock = _lock(folder)
        header = {
            "format": FORMAT, "version": FORMAT_VERSION, "dimension": int(dimension),
            "provenance": provenance.as_dict(), "kind": kind, "search": search.as_dict(),
            # Where the weights were; a hint for adding and querying by scan later (the sha256 is what counts).
            "weights_folder": None if weights_folder is None else str(Path(weights_folder).resolve()),
            "generation": 0, "next_seq": 0, "segments": [], "removed": [], "structures": {},
        }
        try:
            _write_json(folder / HEADER_FILE, header)
        except BaseException:
            _unlock(lock)
            raise
        return cls(folder, header, [], [], lock)

    @classmethod
    def open(cls, folder: str | Path, *, writable: bool = False) -> ScanIndex:
        """Open an index; ``writable`` takes the writer's lock (CTFMError when another process holds it)."""
        folder = Path(folder)
        if not (folder / HEADER_FILE).is_file():
            if folder.is_dir():
                raise InputError(f"{folder}: is not a ctfm scan index (no {HEADER_FILE}); give a folder made by "
                                 f"`ctfm index build`")
            raise InputError(f"{folder}: no such index; create one with `ctfm index build` or `ctfm index add`")
        lock = _lock(folder) if writable else None
        try:
            for attempt in range(3):  # a writer may merge segments between our reading the header and the files
                header = _read_header(folder)
                try:
                    segments, entries = _read_segments(folder, header)
                    break
                except FileNotFoundError as error:
                    if attempt == 2:
                        raise InputError(f"{folder}: {Path(error.filename).name} named by {HEADER_FILE} is missing; "
                                         f"the index is damaged") from None
            index = cls(folder, header, segments, entries, lock)
        except BaseException:
            _unlock(lock)
            raise
        if writable:
            index._delete_leftovers()
        return index

    def close(self) -> None:
        _unlock(self._lock)
        self._lock = None

    def __enter__(self) -> ScanIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it holds -----------------------------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        return int(self._header["dimension"])

    @property
    def provenance(self) -> EmbeddingProvenance:
        return EmbeddingProvenance.from_dict(self._header["provenance"])

    @property
    def weights(self) -> dict[str, str]:
        return dict(self._header["provenance"]["weights"])

    @property
    def weights_folder(self) -> Path | None:
        folder = self._header.get("weights_folder")
        return None if folder is None else Path(folder)

    @property
    def kind(self) -> str:
        return str(self._header["kind"])

    @property
    def search_parameters(self) -> SearchParameters:
        return SearchParameters(**self._header["search"])

    @property
    def ids(self) -> list[str]:
        """Ids of the entries, in the order they were added."""
        return [self._ids[row] for row in np.flatnonzero(self._live)]

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._row_of

    def entry(self, entry_id: str) -> IndexEntry:
        row = self._row(entry_id)
        return IndexEntry(self._ids[row], self._sources[row], self._series[row])

    def vector(self, entry_id: str) -> np.ndarray:
        """The embedding as it was added (unit vector times its norm)."""
        row = self._row(entry_id)
        return self._unit(row) * self._norms[row]

    def unit_vectors(self) -> np.ndarray:
        """(len, D) float32 unit vectors of the live entries, in the order of :attr:`ids`."""
        return self._live_vectors()[1]

    def info(self) -> dict[str, Any]:
        header = self._header
        files = [self.folder / HEADER_FILE, *self._data_files()]
        return {
            "index": str(self.folder), "format_version": header["version"], "dimension": self.dimension,
            "entries": len(self), "rows": int(len(self._seqs)), "tombstones": len(header["removed"]),
            "segments": len(self._segments), "kind": self.kind, "search": header["search"],
            "provenance": header["provenance"], "weights": self.weights,
            "structures": {kind: {key: record[key] for key in ("file", "through_seq", "settings")}
                           for kind, record in header["structures"].items()},
            "bytes": sum(path.stat().st_size for path in files if path.is_file()),
        }

    def check_provenance(self, provenance: EmbeddingProvenance) -> None:
        """ModelError for vectors of other weights, UsageError for another embedding recipe."""
        mine = self.provenance
        if provenance.weights["sha256"] != mine.weights["sha256"]:
            raise ModelError(
                f"{self.folder}: holds embeddings of weights {mine.weights['name']} (sha256 "
                f"{mine.weights['sha256'][:12]}), not of {provenance.weights['name']} (sha256 "
                f"{provenance.weights['sha256'][:12]}); use the index's weights or build a new index"
            )
        theirs = provenance.as_dict()
        for key in ("level", "aggregation", "preprocessing", "windows"):
            if theirs[key] != mine.as_dict()[key]:
                raise UsageError(f"{self.folder}: holds {mine.describe()}, these are {provenance.describe()} with "
                                 f"another {key}; one index holds one kind of embedding")

    # -- changing it -------------------------------------------------------------------------------------------

    def add(self, entries: Sequence[IndexEntry], vectors: np.ndarray, provenance: EmbeddingProvenance) -> None:
        """Add entries and their embeddings (N, D), committed to disk before returning."""
        self._require_writable()
        self.check_provenance(provenance)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise ModelError(f"{self.folder}: holds {self.dimension}-d embeddings, these are "
                             f"{vectors.shape[-1]}-d (another model); build a new index for them")
        if len(entries) != len(vectors):
            raise ValueError(f"{len(entries)} entries but {len(vectors)} vectors")
        seen: set[str] = set()
        for entry in entries:
            if entry.id in self._row_of or entry.id in seen:
                raise InputError(f"{self.folder}: id {entry.id!r} is already in the index; remove it first or "
                                 f"give the scan another id")
            seen.add(entry.id)
        degenerate = degenerate_rows(vectors)
        if len(degenerate):
            raise InputError(f"{self.folder}: the embedding of {entries[degenerate[0]].id!r} is not a finite "
                             f"non-zero vector; it cannot be searched by cosine similarity")
        if not entries:
            return
        unit, norms = unit_rows(vectors)
        header = dict(self._header)
        seqs = np.arange(header["next_seq"], header["next_seq"] + len(entries), dtype=np.int64)
        segment = self._write_segment(header["generation"] + 1, unit, seqs, [
            {"seq": int(seq), "id": entry.id, "source": entry.source,
             "series_instance_uid": entry.series_instance_uid, "norm": float(norm)}
            for seq, entry, norm in zip(seqs, entries, norms, strict=True)
        ])
        header["segments"] = [*header["segments"], {"name": segment.name, "rows": len(seqs)}]
        header["next_seq"] = int(seqs[-1]) + 1
        self._commit(header)
        first = len(self._seqs)
        self._segments.append(segment)
        self._ids += [entry.id for entry in entries]
        self._sources += [entry.source for entry in entries]
        self._series += [entry.series_instance_uid for entry in entries]
        self._norms = np.concatenate([self._norms, norms])
        self._seqs = np.concatenate([self._seqs, seqs])
        self._live = np.concatenate([self._live, np.ones(len(seqs), dtype=bool)])
        self._row_of.update({entry.id: first + offset for offset, entry in enumerate(entries)})
        self._merge_if_due()

    def remove(self, entry_ids: Sequence[str]) -> None:
        """Remove entries by id (all or none: an unknown id is an InputError and nothing changes)."""
        self._require_writable()
        unknown = [entry_id for entry_id in entry_ids if entry_id not in self._row_of]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise InputError(f"{self.folder}: no entry with id {unknown[0]!r}{more}; nothing was removed")
        rows = sorted({self._row_of[entry_id] for entry_id in entry_ids})
        if not rows:
            return
        header = dict(self._header)
        header["removed"] = sorted([*header["removed"], *(int(self._seqs[row]) for row in rows)])
        self._commit(header)
        for row in rows:
            self._live[row] = False
            del self._row_of[self._ids[row]]
        self._merge_if_due()

    def set_kind(self, kind: str) -> None:
        """Make ``kind`` the index's default search (its FAISS structure is built on the next query or save)."""
        self._require_writable()
        _check_kind(kind)
        if kind != self.kind:
            self._commit({**self._header, "kind": kind})

    def set_search_parameters(self, search: SearchParameters) -> None:
        """Store other FAISS settings: efSearch and nprobe apply from the next query; other build settings make
        the structure be rebuilt."""
        self._require_writable()
        if search.as_dict() != self._header["search"]:
            self._commit({**self._header, "search": search.as_dict()})

    def save_structure(self, kind: str | None = None) -> bool:
        """Bring the FAISS structure of ``kind`` (default: the index's) up to date and store it; True if written."""
        self._require_writable()
        kind = kind or self.kind
        if kind == "exact" or len(self) == 0:
            return False
        structure = self._structure(kind)
        if not structure.dirty:
            return False
        faiss = faiss_module()
        generation = self._header["generation"] + 1
        name = f"{kind}-{generation:06d}.faiss"
        with atomic_output(self.folder / name) as temporary:
            faiss.write_index(structure.index, str(temporary))
        record = {"file": name, "through_seq": structure.through_seq, "settings": structure.settings}
        self._commit({**self._header, "structures": {**self._header["structures"], kind: record}})
        structure.dirty = False
        self._delete_leftovers()
        return True

    def save_structure_if_free(self, kind: str | None = None) -> bool:
        """From a read-only index: store a structure a query brought up to date, when no writer is busy and the
        index did not change since it was opened; False otherwise (the structure is then rebuilt next time)."""
        kind = kind or self.kind
        if self._lock is not None:
            return self.save_structure(kind)
        if kind not in self._structures or not self._structures[kind].dirty:
            return False
        try:
            self._lock = _lock(self.folder)
        except CTFMError:  # busy, or a folder this user may not write: the structure stays in memory only
            return False
        try:
            if _read_header(self.folder)["generation"] != self._header["generation"]:
                return False
            return self.save_structure(kind)
        except OSError:
            return False
        finally:
            self.close()

    def release_structures(self) -> None:
        """Free the FAISS structures held in memory (the next approximate query reads or rebuilds them)."""
        self._structures.clear()

    def compact(self) -> None:
        """Merge every segment into one and drop removed rows."""
        self._require_writable()
        if len(self._segments) > 1 or self._header["removed"]:
            self._merge(0)

    # -- searching ---------------------------------------------------------------------------------------------

    def query(self, vector: np.ndarray, k: int = 10, *, kind: str | None = None) -> list[Match]:
        """The k entries most similar (cosine) to one embedding, best first."""
        return self.query_many(np.asarray(vector)[None], k, kind=kind)[0]

    def query_many(self, vectors: np.ndarray, k: int = 10, *, kind: str | None = None) -> list[list[Match]]:
        """The k best matches of each of several embeddings (Q, D)."""
        kind = kind or self.kind
        _check_kind(kind)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise ModelError(f"{self.folder}: holds {self.dimension}-d embeddings; a {vectors.shape[-1]}-d query "
                             f"comes from another model")
        try:
            queries, _ = unit_rows(vectors)
        except ValueError:
            raise InputError("the query embedding is not a finite non-zero vector") from None
        if len(self) == 0:
            return [[] for _ in queries]
        if kind == "exact":
            live = None if len(self) == len(self._live) else self._live
            found = exact_top_k((segment.vectors for segment in self._segments), queries, k, live)
        else:
            found = self._approximate(kind, queries, k)
        return [[Match(self._ids[row], self._sources[row], self._series[row], float(score))
                 for row, score in zip(rows, scores, strict=True)] for rows, scores in found]

    def neighbours(self, entry_id: str, k: int = 10, *, kind: str | None = None) -> list[Match]:
        """The k entries most similar to an entry of the index, the entry itself left out."""
        unit = self._unit(self._row(entry_id))
        return [match for match in self.query(unit, k + 1, kind=kind) if match.id != entry_id][:k]

    # -- internals ---------------------------------------------------------------------------------------------

    def _row(self, entry_id: str) -> int:
        try:
            return self._row_of[entry_id]
        except KeyError:
            raise InputError(f"{self.folder}: no entry with id {entry_id!r}") from None

    def _unit(self, row: int) -> np.ndarray:
        for segment in self._segments:
            if row < len(segment.seqs):
                return np.array(segment.vectors[row], dtype=np.float32)
            row -= len(segment.seqs)
        raise IndexError(row)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """Unit vectors of the given (increasing) rows."""
        parts, first = [], 0
        for segment in self._segments:
            inside = rows[(rows >= first) & (rows < first + len(segment.seqs))] - first
            if len(inside):
                parts.append(np.asarray(segment.vectors[inside]))
            first += len(segment.seqs)
        return np.concatenate(parts) if parts else np.empty((0, self.dimension), np.float32)

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(seqs, unit vectors) of the live entries, in a contiguous array."""
        vectors = np.empty((len(self), self.dimension), dtype=np.float32)
        filled, first = 0, 0
        for segment in self._segments:
            live = self._live[first : first + len(segment.seqs)]
            count = int(live.sum())
            vectors[filled : filled + count] = segment.vectors[live] if count < len(live) else segment.vectors
            filled, first = filled + count, first + len(segment.seqs)
        return self._seqs[self._live], vectors

    def _require_writable(self) -> None:
        if self._lock is None:
            raise UsageError(f"{self.folder}: opened read-only; open it with writable=True to change it")

    def _commit(self, header: dict[str, Any]) -> None:
        header = {**header, "generation": self._header["generation"] + 1}
        _write_json(self.folder / HEADER_FILE, header)
        self._header = header
        self._state += 1

    def _write_segment(self, generation: int, unit: np.ndarray, seqs: np.ndarray,
                       entries: list[dict[str, Any]]) -> _Segment:
        name = f"seg-{generation:06d}"
        with atomic_output(self.folder / f"{name}.npy") as temporary, open(temporary, "wb") as stream:
            np.save(stream, np.ascontiguousarray(unit, dtype=np.float32))
        with atomic_output(self.folder / f"{name}.jsonl") as temporary, open(temporary, "w") as stream:
            stream.writelines(json.dumps(entry) + "\n" for entry in entries)
        return _Segment(name, np.load(self.folder / f"{name}.npy", mmap_mode="r"), seqs)

    def _merge_if_due(self) -> None:
        if len(self._header["removed"]) > DEAD_FRACTION * len(self._seqs):
            self._merge(0)
            return
        sizes = [len(segment.seqs) for segment in self._segments]
        first, merged = len(sizes) - 1, sizes[-1] if sizes else 0
        while first >= 1 and merged >= sizes[first - 1]:  # binary counter: equal neighbours carry into one
            first -= 1
            merged += sizes[first]
        if first < len(sizes) - 1:
            self._merge(first)

    def _merge(self, first: int) -> None:
        """Rewrite segments ``first``.. as one segment without their removed rows."""
        start = sum(len(segment.seqs) for segment in self._segments[:first])
        live = self._live[start:]
        rows = start + np.flatnonzero(live)
        merged = [segment.vectors for segment in self._segments[first:]]
        unit = np.concatenate(merged)[live] if merged else np.empty((0, self.dimension), np.float32)
        seqs = self._seqs[rows]
        entries = [{"seq": int(self._seqs[row]), "id": self._ids[row], "source": self._sources[row],
                    "series_instance_uid": self._series[row], "norm": float(self._norms[row])} for row in rows]
        header = dict(self._header)
        kept = header["segments"][:first]
        if len(rows):
            segment = self._write_segment(header["generation"] + 1, unit, seqs, entries)
            kept = [*kept, {"name": segment.name, "rows": len(rows)}]
        dropped = {int(seq) for seq in self._seqs[start:][~live]}
        header["segments"] = kept
        header["removed"] = [seq for seq in header["removed"] if seq not in dropped]
        self._commit(header)
        self._segments = self._segments[:first] + ([segment] if len(rows) else [])
        keep = np.concatenate([np.arange(start), rows]).astype(np.int64)
        self._ids = [self._ids[row] for row in keep]
        self._sources = [self._sources[row] for row in keep]
        self._series = [self._series[row] for row in keep]
        self._norms, self._seqs, self._live = self._norms[keep], self._seqs[keep], self._live[keep]
        self._row_of = {self._ids[row]: row for row in np.flatnonzero(self._live)}
        self._delete_leftovers()

    def _data_files(self) -> list[Path]:
        names = [f"{s['name']}.{suffix}" for s in self._header["segments"] for suffix in ("npy", "jsonl")]
        names += [record["file"] for record in self._header["structures"].values()]
        return [self.folder / name for name in names]

    def _delete_leftovers(self) -> None:
        """Files of interrupted or superseded writes: not named by the header (only the writer calls this)."""
        named = {path.name for path in self._data_files()}
        for path in self.folder.iterdir():
            if (_DATA_FILE.match(path.name) and path.name not in named) or _TEMPORARY_FILE.match(path.name):
                with contextlib.suppress(OSError):  # e.g. still memory-mapped on Windows: deleted next time
                    path.unlink(missing_ok=True)

    def _structure(self, kind: str) -> _Structure:
        """The FAISS structure of ``kind`` over every live entry: cached, read from disk, updated or rebuilt."""
        faiss = faiss_module()
        structure = self._structures.get(kind)
        if structure is not None and structure.state == self._state:
            return structure
        parameters = self.search_parameters
        live_seqs = self._seqs[self._live]
        record = self._header["structures"].get(kind)
        if structure is None and record is not None:
            try:
                stored = faiss.read_index(str(self.folder / record["file"]))
            except RuntimeError:
                stored = None  # a damaged or missing cache is rebuilt below
            if stored is not None:
                structure = _Structure(kind, stored, record["settings"], record["through_seq"])
        if structure is not None and self._stale(structure, parameters, live_seqs):
            structure = None
        if structure is None:
            seqs, vectors = self._live_vectors()
            settings = parameters.build_settings(kind, len(seqs))
            structure = _Structure(kind, build_structure(kind, vectors, seqs, settings), settings,
                                   int(self._header["next_seq"]) - 1, dirty=True)
        else:
            new_rows = np.flatnonzero(self._live & (self._seqs > structure.through_seq))
            if len(new_rows):
                structure.index.add_with_ids(self._gather(new_rows), self._seqs[new_rows])
                structure.dirty = True
            structure.through_seq = int(self._header["next_seq"]) - 1
        stored_ids = faiss.vector_to_array(structure.index.id_map)
        dead = np.setdiff1d(stored_ids, live_seqs, assume_unique=True)
        structure.selector = None
        if dead.size:  # removed entries stay in the structure and are filtered out of every search
            batch = faiss.IDSelectorBatch(dead)
            structure.selector = (faiss.IDSelectorNot(batch), batch)  # the Not selector points into the batch
        structure.state = self._state
        self._structures[kind] = structure
        return structure

    def _stale(self, structure: _Structure, parameters: SearchParameters, live_seqs: np.ndarray) -> bool:
        """A structure to rebuild: too many dead ids, other build settings, or IVF lists for another size."""
        stored_ids = faiss_module().vector_to_array(structure.index.id_map)
        if np.setdiff1d(stored_ids, live_seqs, assume_unique=True).size > DEAD_FRACTION * max(1, len(stored_ids)):
            return True
        wanted = parameters.build_settings(structure.kind, len(live_seqs))
        if structure.kind == "hnsw" or parameters.ivf_nlist is not None:
            return wanted != structure.settings
        nlist = structure.settings["nlist"]
        return not nlist / 2 < wanted["nlist"] < 2 * nlist

    def _approximate(self, kind: str, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        faiss = faiss_module()
        structure = self._structure(kind)
        parameters = self.search_parameters
        selector = None if structure.selector is None else structure.selector[0]
        # FAISS orders equal scores arbitrarily: fetch beyond k so that entries tied with the k-th are candidates
        # and the earliest-added of them wins, as in the exact search.
        fetch = min(len(self), k + max(k, TIE_MARGIN))
        if kind == "hnsw":
            search = faiss.SearchParametersHNSW(efSearch=max(parameters.hnsw_ef_search, fetch), sel=selector)
        else:
            search = faiss.SearchParametersIVF(nprobe=parameters.ivf_nprobe, sel=selector)
        with _single_thread(faiss, len(queries) == 1):
            scores, seqs = structure.index.search(queries, fetch, params=search)
        found = []
        for query_scores, query_seqs in zip(scores, seqs, strict=True):
            valid = query_seqs >= 0
            rows = np.searchsorted(self._seqs, query_seqs[valid])
            kept = query_scores[valid].astype(np.float32)
            order = np.lexsort((rows, -kept))[:k]
            found.append((rows[order], kept[order]))
        return found


def build_structure(kind: str, unit_vectors: np.ndarray, ids: np.ndarray, settings: Mapping[str, int]) -> Any:
    """A FAISS IndexIDMap over HNSW-Flat or IVF-Flat (inner product) holding ``unit_vectors`` under ``ids``."""
    faiss = faiss_module()
    dimension = unit_vectors.shape[1]
    vectors = np.ascontiguousarray(unit_vectors, dtype=np.float32)
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dimension, int(settings["m"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(settings["ef_construction"])
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(dimension)
        inner = faiss.IndexIVFFlat(quantizer, dimension, int(settings["nlist"]), faiss.METRIC_INNER_PRODUCT)
        # k-means on at most 64 points per list (drawn reproducibly), 10 iterations: FAISS's 25 took 37-59 s for
        # 1265 lists (n = 1e5) on 2 busy cores and grow with nlist squared; the lists only steer the search.
        inner.cp.niter = IVF_KMEANS_ITERATIONS
        inner.cp.min_points_per_centroid = 1  # small collections get few lists (nlist <= n / 39) by design
        sample = min(len(vectors), IVF_TRAINING_POINTS_PER_LIST * int(settings["nlist"]))
        picks = np.sort(np.random.default_rng(0).choice(len(vectors), sample, replace=False))
        inner.train(vectors[picks])
    else:
        raise ValueError(f"no FAISS structure for kind {kind!r}")
    index = faiss.IndexIDMap(inner)  # faiss's Python layer keeps inner (and the quantizer) alive with it
    if len(vectors):
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    return index


@contextlib.contextmanager
def _single_thread(faiss: Any, single: bool) -> Iterator[None]:
    """One OpenMP thread for a single query: FAISS parallelises over queries, so more threads only add their
    start-up and spin-waiting, which on a busy 2-core machine cost 11 ms against 0.4 ms for the search itself."""
    if not single:
        yield
        return
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UsageError(f"--kind {kind}: choose one of {', '.join(KINDS)}")


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(document, indent=1) + "\n")


def _read_header(folder: Path) -> dict[str, Any]:
    path = folder / HEADER_FILE
    try:
        header = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: cannot be read as an index header ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InputError(f"{path}: is not a ctfm scan index header")
    if header.get("version") != FORMAT_VERSION:
        raise InputError(f"{path}: index format version {header.get('version')}; this ctfm reads version "
                         f"{FORMAT_VERSION} (upgrade ctfm, or rebuild the index)")
    missing = {"dimension", "provenance", "kind", "search", "generation", "next_seq", "segments", "removed",
               "structures"} - set(header)
    if missing:
        raise InputError(f"{path}: the index header lacks {sorted(missing)}; the index is damaged")
    return header


def _read_segments(folder: Path, header: Mapping[str, Any]) -> tuple[list[_Segment], list[dict[str, Any]]]:
    segments, entries = [], []
    for record in header["segments"]:
        name, rows = record["name"], int(record["rows"])
        try:
            vectors = np.load(folder / f"{name}.npy", mmap_mode="r")
            with open(folder / f"{name}.jsonl") as stream:
                segment_entries = [json.loads(line) for line in stream]
        except ValueError as error:  # includes JSONDecodeError
            raise InputError(f"{folder / name}: cannot be read ({error}); the index is damaged") from None
        if vectors.shape != (rows, header["dimension"]) or len(segment_entries) != rows:
            raise InputError(f"{folder / name}: holds {vectors.shape[0]} vectors and {len(segment_entries)} entries "
                             f"where {HEADER_FILE} says {rows}; the index is damaged")
        segments.append(_Segment(name, vectors, np.array([e["seq"] for e in segment_entries], dtype=np.int64)))
        entries += segment_entries
    return segments, entries


def _lock(folder: Path) -> IO[str]:
    try:
        handle = open(folder / LOCK_FILE, "a")  # held open until close(): the lock lives as long as the handle
    except OSError as error:
        raise CTFMError(f"{folder}: cannot write to this index ({error.strerror}); check the folder's permissions") \
            from None
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise CTFMError(f"{folder}: another process is writing this index; try again when it has finished") \
                from None
    return handle


def _unlock(handle: IO[str] | None) -> None:
    if handle is not None:
        handle.close()  # closing the file releases the flock

