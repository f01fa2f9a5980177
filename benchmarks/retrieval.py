"""Scan-retrieval speed, memory and recall: exact search (ours, numpy) vs FAISS HNSW vs FAISS IVF-Flat, side by side.

For each collection size n, synthetic 512-d unit vectors drawn around 1000 Gaussian cluster centres (generated in
chunks, so the generator never holds the collection) are added to a ScanIndex on disk, and each method is measured
through the index's own code path (``ScanIndex.query``, the one ``ctfm index query`` uses): build time (exact: adding
the vectors, i.e. writing segments; HNSW/IVF: building the FAISS structure from them), writing it, resident memory
growth, bytes on disk, mean and p95 latency of single queries (k = 10) and recall@10 against the exact result.
Queries are fresh draws from the same clusters.  2 threads (BLAS and FAISS OpenMP).  Clustered synthetic data
flatters IVF recall compared with real embeddings.

    .venv/bin/python benchmarks/retrieval.py                          # n = 1e4, 1e5, 1e6
    .venv/bin/python benchmarks/retrieval.py --sizes 10000 100000     # quicker
    .venv/bin/python benchmarks/retrieval.py --hnsw-max 100000        # no HNSW above 1e5 (its build is the slow part)
"""

from __future__ import annotations

import os

THREADS = "2"
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, THREADS)

import argparse  # noqa: E402
import gc  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from ctfm_engine.tasks.scan_index import (  # noqa: E402
    EmbeddingProvenance,
    IndexEntry,
    ScanIndex,
    SearchParameters,
)

DIMENSION = 512
CLUSTERS = 1000
NOISE_PER_AXIS = 0.035  # noise norm ~0.8 against unit centres: same-cluster cosine ~0.6, other clusters ~0
CHUNK = 100_000
K = 10
GiB = 1 << 30
PROVENANCE = EmbeddingProvenance({"name": "synthetic-clusters", "sha256": "0" * 64})


class ClusteredVectors:
    """Unit vectors around fixed random cluster centres, reproducible, drawn chunk by chunk."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((CLUSTERS, DIMENSION)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(self, count: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, CLUSTERS, count)
        points = self.centres[labels] + NOISE_PER_AXIS * rng.standard_normal((count, DIMENSION), dtype=np.float32)
        return points / np.linalg.norm(points, axis=1, keepdims=True)


def rss() -> int:
    return psutil.Process().memory_info().rss


def latencies(index: ScanIndex, queries: np.ndarray, kind: str) -> tuple[np.ndarray, list[list[str]]]:
    """Per-query seconds and the ids found, after three warm-up queries."""
    for query in queries[:3]:
        index.query(query, K, kind=kind)
    seconds, found = [], []
    for query in queries:
        started = time.perf_counter()
        matches = index.query(query, K, kind=kind)
        seconds.append(time.perf_counter() - started)
        found.append([match.id for match in matches])
    return np.array(seconds), found


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]))


def measure_size(n: int, vectors: ClusteredVectors, queries: np.ndarray, work: Path, search: SearchParameters,
                 ef_values: list[int], nprobe_values: list[int], hnsw_max: int) -> list[dict]:
    folder = work / f"index-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    rows = []
    gc.collect()
    before = rss()
    started = time.perf_counter()
    with ScanIndex.create(folder, dimension=DIMENSION, provenance=PROVENANCE, search=search) as index:
        for first in range(0, n, CHUNK):
            count = min(CHUNK, n - first)
            entries = [IndexEntry(f"v{number}", "synthetic") for number in range(first, first + count)]
            index.add(entries, vectors.draw(count, seed=1 + first // CHUNK), PROVENANCE)
        index.compact()
    build = time.perf_counter() - started
    started = time.perf_counter()
    index = ScanIndex.open(folder, writable=True)
    opened = time.perf_counter() - started
    seconds, truth = latencies(index, queries, "exact")
    rows.append({"n": n, "method": "exact", "build": build, "write": None, "rss": (rss() - before) / GiB,
                 "bytes": index.info()["bytes"] / GiB, "mean_ms": 1e3 * seconds.mean(),
                 "p95_ms": 1e3 * np.percentile(seconds, 95), "recall": 1.0})
    print(f"  n={n:>9,} exact: added in {build:.1f} s, opened in {opened:.2f} s (entries parsed), "
          f"{rows[-1]['mean_ms']:.2f} ms/query", flush=True)
    sweeps = {"hnsw": ("hnsw_ef_search", "ef", ef_values), "ivf": ("ivf_nprobe", "nprobe", nprobe_values)}
    for kind, (field, label, values) in sweeps.items():
        if kind == "hnsw" and n > hnsw_max:
            print(f"  n={n:>9,} hnsw: skipped (--hnsw-max {hnsw_max:,})", flush=True)
            continue
        gc.collect()
        before = rss()
        started = time.perf_counter()
        index.query(queries[0], K, kind=kind)  # the first query builds the structure from the stored vectors
        build = time.perf_counter() - started
        grown = (rss() - before) / GiB
        started = time.perf_counter()
        index.save_structure(kind)
        write = time.perf_counter() - started
        record = index.info()["structures"][kind]
        for value in values:  # query-time settings: the same structure serves them all
            index.set_search_parameters(replace(search, **{field: value}))
            seconds, found = latencies(index, queries, kind)
            rows.append({"n": n, "method": f"{kind} {label} {value}", "build": build, "write": write, "rss": grown,
                         "bytes": (folder / record["file"]).stat().st_size / GiB, "mean_ms": 1e3 * seconds.mean(),
                         "p95_ms": 1e3 * np.percentile(seconds, 95), "recall": recall(found, truth)})
            print(f"  n={n:>9,} {kind}: built in {build:.1f} s {record['settings']}, {label} {value}: "
                  f"{rows[-1]['mean_ms']:.3f} ms/query, recall@10 {rows[-1]['recall']:.4f}", flush=True)
        index.set_search_parameters(search)
        index.release_structures()  # free it before the next method
    index.close()
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=300, help="single queries per method (default 300)")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=SearchParameters().hnsw_ef_construction)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256, 512],
                        help="HNSW efSearch values to measure on the same graph")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32],
                        help="IVF lists probed per query, values to measure on the same lists")
    parser.add_argument("--hnsw-max", type=int, default=10**9, help="skip HNSW above this n")
    parser.add_argument("--work-dir", type=Path, help="where the indexes are written (default: a temporary folder)")
    args = parser.parse_args()

    faiss.omp_set_num_threads(int(THREADS))
    search = SearchParameters(hnsw_m=args.hnsw_m, hnsw_ef_construction=args.ef_construction)
    vectors = ClusteredVectors()
    queries = vectors.draw(args.queries, seed=10**6)
    print(f"retrieval benchmark: {DIMENSION}-d float32 unit vectors, {CLUSTERS} Gaussian clusters, k = {K}, "
          f"{args.queries} single queries per method, {THREADS} threads; faiss {faiss.__version__}, numpy "
          f"{np.__version__}; CPU load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"HNSW: M {search.hnsw_m}, efConstruction {search.hnsw_ef_construction}, efSearch {args.ef_search}; "
          f"IVF-Flat: nlist about 4 sqrt(n) (at most n/39), nprobe {args.nprobe}, k-means 10 iterations on <= 64 "
          f"points a list; ctfm defaults: efSearch {search.hnsw_ef_search}, nprobe {search.ivf_nprobe}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        for n in args.sizes:
            rows += measure_size(n, vectors, queries, Path(work), search, args.ef_search, args.nprobe,
                                 args.hnsw_max)

    print()
    header = (f"{'n':>9} {'method':<15} {'build s':>8} {'write s':>8} {'RSS +GiB':>9} {'disk GiB':>9} "
              f"{'mean ms':>8} {'p95 ms':>8} {'speed-up':>9} {'recall@10':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        exact = next(r for r in rows if r["n"] == row["n"] and r["method"] == "exact")
        write = "" if row["write"] is None else f"{row['write']:.1f}"
        print(f"{row['n']:>9,} {row['method']:<15} {row['build']:>8.1f} {write:>8} {row['rss']:>9.2f} "
              f"{row['bytes']:>9.3f} {row['mean_ms']:>8.3f} {row['p95_ms']:>8.3f} "
              f"{exact['mean_ms'] / row['mean_ms']:>8.1f}x {row['recall']:>10.4f}")
    print("\nbuild: exact = adding the vectors to the index (segments written, merged, compacted); hnsw/ivf = the "
          "FAISS structure built from the stored vectors. write: storing that structure. RSS +GiB: growth of this "
          "process during the build (exact: build, open and queries, the memory-mapped vectors included). "
          "speed-up: exact mean latency / method mean latency.")
    largest = [row for row in rows if row["n"] == max(args.sizes)]
    goal = [f"{row['method']} {row['mean_ms']:.2f} ms (recall {row['recall']:.3f})" for row in largest]
    print(f"goal < 50 ms per query at n = {max(args.sizes):,}: " + ", ".join(goal))


if __name__ == "__main__":
    main()
