"""``ctfm index``: scan retrieval -- an index of CT-FM scan embeddings (build from a manifest, add, remove, query,
info), searched by cosine similarity, exactly or with FAISS HNSW/IVF for large archives."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from ctfm_engine.cli.common import SKIP_CT_CHECK_HELP, progress_bar, scan_source, weights_lines
from ctfm_engine.errors import UsageError

INDEX_WEIGHTS_HELP = ("checkpoint folder or hub repo id (default: CTFM_WEIGHTS, then the weights that built the "
                      "index, then project-lighter/ct_fm_feature_extractor in the cache, then the bundled "
                      "demonstration model ctfm-mini)")


def add_parser(commands: Any, common: argparse.ArgumentParser, inputs: argparse.ArgumentParser) -> None:
    index = commands.add_parser("index", help="scan retrieval: an index of CT-FM scan embeddings searched by cosine "
                                "similarity (exact, or FAISS HNSW/IVF for large archives)")
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    kinds = ("exact", "hnsw", "ivf")
    embedding = argparse.ArgumentParser(add_help=False)
    embedding.add_argument("index", type=Path, metavar="INDEX", help="index folder (created by the first batch)")
    embedding.add_argument("--weights", help=INDEX_WEIGHTS_HELP)
    embedding.add_argument("--kind", choices=kinds, help="how queries search: exact (default for a new index), or "
                           "FAISS hnsw / ivf, built and stored beside the vectors")
    embedding.add_argument("--level", choices=("scan", "patch"), help="scan (default for a new index) or sliding "
                           "patches aggregated per scan; an existing index keeps its own")
    embedding.add_argument("--aggregation", choices=("min", "mean", "max"), help="patch level: how patches combine "
                           "(default min, the 3D-MIR recipe)")
    embedding.add_argument("--batch-size", type=int, default=8, metavar="N",
                           help="scans per committed batch (and per Ray task); an interrupted run loses at most one")

    build = actions.add_parser("build", parents=[common, embedding], help="embed the scans of a manifest into "
                               "INDEX, resuming where an interrupted run stopped")
    build.add_argument("--manifest", required=True, type=Path, metavar="FILE.csv|txt", help="one NIfTI/NRRD/MHA "
                       "file or DICOM series folder a line, or a CSV with a 'path' column (optional 'id', "
                       "'series_instance_uid'); relative paths are relative to the manifest")
    build.add_argument("--hu-offset", type=float, metavar="HU", help="add this to every voxel of every scan (as for "
                       "`ctfm embed`)")
    build.add_argument("--skip-ct-check", action="store_true", help=SKIP_CT_CHECK_HELP)
    build.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: here, one scan after another; ray: Ray Data actors "
                       "(pip install 'ctfm-engine[ray]')")
    build.add_argument("--ray-address", default="", metavar="ADDR", help="with --engine ray: empty starts a Ray "
                       "cluster on this machine; 'auto' or ray://HOST:10001 joins a running one")
    build.add_argument("--workers", type=int, metavar="N", help="with --engine ray: embedding actors (default: as "
                       "many as the cluster's CPUs, or GPUs with --device cuda, hold)")
    build.add_argument("--cpus-per-worker", type=int, default=1, metavar="N",
                       help="with --engine ray: CPU threads per actor (default 1); --device cuda gives each one GPU")

    add = actions.add_parser("add", parents=[common, inputs, embedding], help="embed scans into INDEX")
    add.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder "
                     "(its id in the index: the path as given)")

    remove = actions.add_parser("remove", parents=[common], help="remove entries from INDEX by id")
    remove.add_argument("index", type=Path, metavar="INDEX", help="index folder")
    remove.add_argument("ids", nargs="+", metavar="ID", help="ids of the entries to remove")

    query = actions.add_parser("query", parents=[common, inputs], help="the scans of INDEX most similar to a scan")
    query.add_argument("index", type=Path, metavar="INDEX", help="index folder")
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--scan", metavar="INPUT", help="a CT (NIfTI/NRRD/MHA file or DICOM series folder), embedded "
                      "with the index's weights and recipe")
    what.add_argument("--id", help="an entry of the index (itself left out of the matches)")
    what.add_argument("--embedding", type=Path, metavar="FILE.npz", help="an embedding from `ctfm embed --out`")
    query.add_argument("--row", type=int, default=0, help="with --embedding: which row of the file (default 0)")
    query.add_argument("--top-k", type=int, default=10, metavar="K", help="matches to return (default 10)")
    query.add_argument("--kind", choices=kinds, help="search method (default: the index's)")
    query.add_argument("--weights", help=f"with --scan: {INDEX_WEIGHTS_HELP}")

    info = actions.add_parser("info", parents=[common], help="size, provenance and search structures of INDEX")
    info.add_argument("index", type=Path, metavar="INDEX", help="index folder")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.pipelines.weights import weights_record
    from ctfm_engine.tasks.scan_index import ScanIndex

    if args.index_command in ("build", "add"):
        document = _index_scans(args)
    elif args.index_command == "query":
        document = _query_index(args)
    elif args.index_command == "info":
        with ScanIndex.open(args.index) as index:
            document = index.info()
    else:
        with ScanIndex.open(args.index, writable=True) as index:
            index.remove(args.ids)
            document = {"index": str(args.index), "weights": index.weights, "removed": args.ids,
                        "entries": len(index)}
    # An index keeps the name and sha256 of its weights; every document also says whether they are a demonstration.
    return {"command": f"index {args.index_command}", **document, "weights": weights_record(document["weights"])}


def _index_scans(args: argparse.Namespace) -> dict[str, Any]:
    """``index build`` (rows from a manifest) and ``index add`` (rows from the command line)."""
    from ctfm_engine.tasks.archive_builder import (
        EmbeddingRecipe,
        RayOptions,
        index_scans,
        read_manifest,
        rows_from_inputs,
    )

    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    engine = getattr(args, "engine", "local")
    if engine == "ray" and args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")
    if engine == "ray" and args.cpus_per_worker < 1:
        raise UsageError(f"--cpus-per-worker {args.cpus_per_worker}: must be at least 1")
    if args.index_command == "build":
        rows = read_manifest(args.manifest)
    else:
        rows = rows_from_inputs(args.inputs, args.series)
    recipe = None
    if args.level is not None or args.aggregation is not None:
        recipe = EmbeddingRecipe(args.level or "scan", args.aggregation or "min")
    device = args.device or "cpu"
    ray_options = None
    if engine == "ray":
        ray_options = RayOptions(address=args.ray_address or None, workers=args.workers,
                                 cpus_per_worker=args.cpus_per_worker,
                                 gpus_per_worker=1.0 if device.startswith("cuda") else 0.0)
    started = time.perf_counter()
    # Ray may print on stdout, which belongs to the --json document.
    with progress_bar(args, "indexing", "scan") as progress, \
            contextlib.redirect_stdout(sys.stderr) if engine == "ray" else contextlib.nullcontext():
        report = index_scans(args.index, rows, weights=args.weights, recipe=recipe, hu_offset=args.hu_offset,
                             check_ct=not args.skip_ct_check, kind=args.kind, engine=engine, device=device,
                             batch_size=args.batch_size, ray_options=ray_options, progress=progress)
    return {
        "index": str(args.index),
        "engine": engine,
        "weights": report.weights,
        "kind": report.kind,
        "rows": len(rows),
        "added": report.added,
        "already_indexed": report.already_indexed,
        "skipped": [item.as_dict() for item in report.skipped],
        "entries": report.entries,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _query_index(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.tasks.archive_builder import embed_for_index, read_embedding_file
    from ctfm_engine.tasks.scan_index import ScanIndex

    if args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: must be at least 1")
    with ScanIndex.open(args.index) as index:
        kind = args.kind or index.kind
        weights = index.weights
        if args.id is not None:
            query: dict[str, Any] = {"id": args.id}
            matches = index.neighbours(args.id, args.top_k, kind=kind)
        elif args.embedding is not None:
            query = {"embedding": str(args.embedding), "row": args.row}
            matches = index.query(read_embedding_file(args.embedding, args.row, index), args.top_k, kind=kind)
        else:
            volume = scan_source(args.scan, args).read()
            vector, checkpoint = embed_for_index(index, volume, weights=args.weights, device=args.device or "cpu")
            query = {"scan": str(args.scan), "series_instance_uid": volume.series_instance_uid}
            matches = index.query(vector, args.top_k, kind=kind)
            weights = checkpoint.identity
        if kind != "exact":
            index.save_structure_if_free(kind)  # a structure the query had to bring up to date, for the next one
        return {
            "index": str(args.index),
            "weights": weights,
            "kind": kind,
            "top_k": args.top_k,
            "query": query,
            "matches": [match.as_dict() for match in matches],
        }


def human_lines(document: dict[str, Any]) -> list[str]:
    lines = weights_lines(document)
    command = document["command"]
    if command in ("index build", "index add"):
        lines += [f"skipped {item['id']}: {item['reason']}" for item in document["skipped"]]
        lines.append(f"{document['index']}: {document['added']} added, {document['already_indexed']} already "
                     f"indexed, {len(document['skipped'])} skipped; {document['entries']} entries, {document['kind']} "
                     f"search ({document['seconds']:.1f} s)")
    elif command == "index query":
        lines += [f"{rank:>3}  similarity {match['similarity']:.4f}  {match['id']}  ({match['source']})"
                  for rank, match in enumerate(document["matches"], start=1)]
        if not document["matches"]:
            lines.append(f"no matches: {document['index']} holds no other entries")
    elif command == "index remove":
        lines.append(f"removed {len(document['removed'])} from {document['index']}; {document['entries']} entries "
                     "left")
    else:
        provenance = document["provenance"]
        lines.append(f"{document['index']}: {document['entries']} entries, {document['dimension']}-d "
                     f"{provenance['level']}-level embeddings"
                     + (f" ({provenance['aggregation']} of patches)" if provenance["aggregation"] else "")
                     + f", {document['kind']} search, {document['segments']} segments, {document['tombstones']} "
                     f"tombstones, {document['bytes'] / 1e6:.1f} MB")
    return lines
