"""The ``ctfm`` command: ``embed``, ``weights``, ``pretrain``, ``finetune``, ``demo`` (others arrive with issues).

Exit codes: 0 success, 2 usage error, 3 unacceptable input data, 4 model or weights problem, 1 anything else.
With ``--json`` one JSON document goes to stdout (also on failure: ``{"error": {...}}``); logs and progress
go to stderr.  Inputs are validated before any model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_engine import __version__
from ctfm_engine.errors import CTFMError, UsageError
from ctfm_engine.volume import CTVolume, read_volume

log = logging.getLogger("ctfm")

# Volumes read for validation are kept for the run below this many voxels in total, else read again.
KEEP_VALIDATED_VOXELS = 300_000_000


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cpu; training: the recipe's accelerator)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    return common


def _input_options() -> argparse.ArgumentParser:
    inputs = argparse.ArgumentParser(add_help=False)
    inputs.add_argument("--series", metavar="UID", help="the series to use when a DICOM folder holds several")
    inputs.add_argument(
        "--hu-offset",
        type=float,
        metavar="HU",
        help="add this to every voxel (e.g. -1024 for CT stored as HU+1024 without a rescale); "
        "for DICOM CT the offset is detected, and --hu-offset 0 turns that off",
    )
    return inputs


def build_parser() -> argparse.ArgumentParser:
    common, inputs = _common_options(), _input_options()
    parser = argparse.ArgumentParser(prog="ctfm", description="CT-FM, the CT foundation model, on your CT scans.")
    parser.add_argument("--version", action="version", version=f"ctfm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed", parents=[common, inputs], help="CT-FM embeddings of CT scans (512-d with the published weights)"
    )
    embed.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI/NRRD/MHA file or DICOM series folder")
    embed.add_argument("--weights", help="checkpoint folder or hub repo id (default: CTFM_WEIGHTS, then the cache)")
    embed.add_argument("--level", choices=("scan", "patch"), default="scan", help="whole scan, or sliding patches")
    embed.add_argument("--out", type=Path, metavar="FILE.npz", help="write embeddings and provenance here")
    embed.add_argument("--aggregation", choices=("min", "mean", "max"), default="min", help="patch level (min)")
    embed.add_argument(
        "--patch-size", type=int, nargs=3, default=(24, 128, 128), metavar=("Z", "Y", "X"),
        help="patch size in model voxels at 3x1x1 mm (default 24 128 128, the 3D-MIR recipe)",
    )
    embed.add_argument("--overlap", type=float, default=0.625, help="patch overlap fraction (default 0.625)")
    embed.add_argument("--batch-size", type=int, default=4, help="patches per forward pass (default 4)")

    weights = commands.add_parser("weights", help="find, inspect and download CT-FM checkpoints")
    weight_commands = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    pull = weight_commands.add_parser("pull", parents=[common], help="download a hub repo into the cache")
    pull.add_argument("repo", help="hub repo id, e.g. project-lighter/ct_fm_feature_extractor")
    pull.add_argument("--revision", help="branch, tag or commit")
    weight_commands.add_parser("list", parents=[common], help="checkpoints in the cache")
    info = weight_commands.add_parser("info", parents=[common], help="config, size and sha256 of a checkpoint")
    info.add_argument("weights", nargs="?", help="folder or hub repo id (default: the one `embed` would use)")

    for name, text in (("pretrain", "self-supervised pre-training of the encoder from a recipe"),
                       ("finetune", "fine-tune a task model (segmentation, head-CT triage) from a recipe")):
        train = commands.add_parser(name, parents=[common], help=text)
        train.add_argument("--config", required=True, type=Path, help="recipe YAML (see training/)")
        train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a recipe key, e.g. --set trainer.max_epochs=2 (repeatable)")
        train.add_argument("--resume", metavar="CKPT", help="continue from a Lightning checkpoint (e.g. last.ckpt)")

    demo = commands.add_parser("demo", parents=[common], help="the main job end to end on the bundled sample CT")
    demo.add_argument("--out-dir", type=Path, default=Path("ctfm-demo"), help="where results go (ctfm-demo)")
    demo.add_argument("--weights", help="checkpoint folder or hub repo id (default: as for embed)")
    demo.add_argument("--seg-weights", help="segmentation checkpoint folder, e.g. a local copy of "
                      "project-lighter/whole_body_segmentation (default: the shipped ctfm-mini-wholebody-seg)")
    return parser


def _progress_bar(args: argparse.Namespace, description: str, unit: str, total: int | None = None) -> Any:
    """A tqdm bar on stderr, or None with --quiet."""
    if args.quiet:
        return None
    from tqdm import tqdm

    return tqdm(desc=description, unit=unit, total=total, file=sys.stderr, leave=False)


def read_inputs(paths: Sequence[str], args: argparse.Namespace) -> list[CTVolume | None]:
    """Read and validate every input before any model loads; keep the volumes when they fit in memory."""
    volumes: list[CTVolume | None] = []
    kept_voxels = 0
    for path in paths:
        volume = read_volume(path, series_uid=args.series, hu_offset=args.hu_offset)
        kept_voxels += volume.voxels.size
        volumes.append(volume if kept_voxels <= KEEP_VALIDATED_VOXELS else None)
    return volumes


def run_embed(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.models.registry import load_encoder
    from ctfm_engine.runtime.device import resolve_device
    from ctfm_engine.tasks.embed import Embedder, PatchWindows, write_embeddings

    if args.out is not None and args.out.suffix != ".npz":
        raise UsageError(f"--out {args.out}: embeddings are written as .npz (numpy.load opens them)")
    try:
        windows = PatchWindows(tuple(args.patch_size), args.overlap)
    except ValueError as error:
        raise UsageError(f"--patch-size/--overlap: {error}") from None
    volumes = read_inputs(args.inputs, args)
    device = resolve_device(args.device or "cpu")
    encoder, checkpoint = load_encoder(args.weights)
    log.info("weights %s (sha256 %s) on %s", checkpoint.name, checkpoint.sha256[:12], device)
    embedder = Embedder(encoder, device)
    results = []
    scans = _progress_bar(args, "embedding", "scan", total=len(args.inputs)) if len(args.inputs) > 1 else None
    for path, volume in zip(args.inputs, volumes, strict=True):
        volume = volume or read_volume(path, series_uid=args.series, hu_offset=args.hu_offset)
        patches = _progress_bar(args, Path(path).name, "patch") if args.level == "patch" else None
        results.append(
            embedder.embed(volume, args.level, windows=windows, aggregation=args.aggregation,
                           batch_size=args.batch_size, progress=None if patches is None else _tqdm_progress(patches))
        )
        if patches is not None:
            patches.close()
        if scans is not None:
            scans.update(1)
    if scans is not None:
        scans.close()
    if args.out is not None:
        write_embeddings(results, args.out, weights=checkpoint.identity, preprocessing=embedder.preprocessing)
    return {
        "command": "embed",
        "weights": checkpoint.identity,
        "device": str(device),
        "level": args.level,
        "aggregation": args.aggregation if args.level == "patch" else None,
        "preprocessing": embedder.preprocessing.describe(),
        "output": None if args.out is None else str(args.out),
        "results": [
            {
                "input": item.input,
                "series_instance_uid": item.series_instance_uid,
                "embedding": [float(value) for value in item.vector],
                "model_shape_zyx": list(item.model_shape_zyx),
                "patches": None if item.patch_vectors is None else len(item.patch_vectors),
            }
            for item in results
        ],
    }


def _tqdm_progress(bar: Any) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update


def run_weights(args: argparse.Namespace) -> dict[str, Any]:
    from ctfm_engine.models import registry
    from ctfm_engine.models.checkpoint import read_checkpoint

    if args.weights_command == "pull":
        folder = registry.pull_weights(args.repo, args.revision)
        checkpoint = read_checkpoint(folder)
        return {"command": "weights pull", "folder": str(folder), "weights": checkpoint.identity}
    if args.weights_command == "list":
        models = registry.cache_dir() / "models"
        found = sorted(p for p in models.iterdir() if (p / "config.json").is_file()) if models.is_dir() else []
        return {"command": "weights list", "cache": str(models), "folders": [str(p) for p in found]}
    checkpoint = read_checkpoint(registry.resolve_weights(args.weights))
    parameters = sum(int(np.prod(tensor.shape)) for tensor in checkpoint.state_dict.values())
    return {
        "command": "weights info",
        "folder": str(checkpoint.folder),
        "weights": checkpoint.identity,
        "config": checkpoint.config,
        "tensors": len(checkpoint.state_dict),
        "values": parameters,
    }


def _print_human(document: dict[str, Any]) -> None:
    command = document["command"]
    if command != "demo" and isinstance(document.get("weights"), dict):
        print(f"weights: {document['weights']['name']} (sha256 {document['weights']['sha256']})")
    if command == "embed":
        for item in document["results"]:
            vector = np.asarray(item["embedding"])
            print(f"{item['input']}: {vector.size}-d embedding, norm {np.linalg.norm(vector):.3f}, "
                  f"model space {'x'.join(map(str, item['model_shape_zyx']))} (z,y,x at 3x1x1 mm)"
                  + (f", {item['patches']} patches" if item["patches"] else ""))
        if document["output"]:
            print(f"wrote {document['output']}")
    elif command == "weights list":
        print("\n".join(document["folders"]) or f"no checkpoints in {document['cache']}")
    elif command == "demo":
        print("\n".join(document["summary"]))
    else:
        print(json.dumps({k: v for k, v in document.items() if k != "command"}, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO,
        format="ctfm: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "embed":
            document = run_embed(args)
        elif args.command == "weights":
            document = run_weights(args)
        elif args.command in ("pretrain", "finetune"):
            from ctfm_engine.training.recipe import run_recipe

            accelerator = None if args.device is None else {"cpu": "cpu", "auto": "auto"}.get(args.device, "gpu")
            # Lightning draws progress and summaries on stdout, which belongs to the --json document.
            with contextlib.redirect_stdout(sys.stderr):
                document = run_recipe(args.command, args.config, args.set, resume=args.resume,
                                      accelerator=accelerator, quiet=args.quiet)
        else:
            from ctfm_engine.demo import run_demo

            document = run_demo(args.out_dir, weights=args.weights, seg_weights=args.seg_weights,
                                device_name=args.device or "cpu", quiet=args.quiet)
    except CTFMError as error:
        return _fail(args, error.exit_code, str(error))
    except KeyboardInterrupt:
        return _fail(args, 130, "interrupted; no partial output was left behind")
    except Exception as error:  # a bug, not a user error: say so in one line, the traceback with -v
        log.debug("traceback", exc_info=True)
        return _fail(args, 1, f"unexpected {type(error).__name__}: {error} (run with -v for the traceback)")
    if args.json:
        print(json.dumps(document))
    else:
        _print_human(document)
    return 0


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    print(f"ctfm: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": {"exit_code": code, "message": message}}))
    return code


if __name__ == "__main__":
    sys.exit(main())
