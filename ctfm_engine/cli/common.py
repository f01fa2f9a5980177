"""What every ``ctfm`` subcommand shares: the option parents, the progress bar, result file names, the
all-or-nothing writer and the weights line of the human output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctfm_engine.progress import Progress

if TYPE_CHECKING:
    from ctfm_engine.pipelines.inputs import ScanSource

DEMONSTRATION_TAG = " [demonstration model: not CT-FM, not for clinical use]"


def common_options() -> argparse.ArgumentParser:
    """--json, --device, -v, -q: every subcommand has them."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cpu; training: the recipe's accelerator)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr (a "
                        "demonstration model is still announced)")
    return common


SKIP_CT_CHECK_HELP = ("read the input even when its intensities do not look like CT in Hounsfield units (for a true "
                      "CT that fails the check, e.g. a crop of pure soft tissue); results on non-CT data are "
                      "meaningless")


def input_options() -> argparse.ArgumentParser:
    """--series, --hu-offset, --skip-ct-check: the subcommands that read CT scans have them."""
    inputs = argparse.ArgumentParser(add_help=False)
    inputs.add_argument("--series", metavar="UID", help="the series to use when a DICOM folder holds several")
    inputs.add_argument(
        "--hu-offset",
        type=float,
        metavar="HU",
        help="add this to every voxel (e.g. -1024 for CT stored as HU+1024 without a rescale); "
        "for DICOM CT the offset is detected, and --hu-offset 0 turns that off",
    )
    inputs.add_argument("--skip-ct-check", action="store_true", help=SKIP_CT_CHECK_HELP)
    return inputs


WEIGHTS_HELP = ("checkpoint folder or hub repo id (default: CTFM_WEIGHTS, then project-lighter/ct_fm_feature_extractor "
                "in the cache, then the bundled demonstration model ctfm-mini)")


def scan_source(path: str | Path, args: argparse.Namespace) -> ScanSource:
    """An input path with the run's --series, --hu-offset and --skip-ct-check."""
    from ctfm_engine.pipelines.inputs import ScanSource

    return ScanSource(path, args.series, args.hu_offset, check_ct=not args.skip_ct_check)


def add_runtime_options(parser: argparse.ArgumentParser, agreement: str) -> None:
    """--backend, --precision, --onnx: the subcommands that run a model through a runtime backend have them;
    ``agreement`` says what a runtime must agree on with PyTorch fp32 to be chosen by auto."""
    parser.add_argument("--backend", choices=("auto", "torch", "onnx", "openvino"), default="auto",
                        help=f"auto (default): the fastest runtime of this machine whose {agreement} PyTorch fp32's, "
                        "measured once per machine and model and cached (CTFM_BACKEND pins another default); torch "
                        "(PyTorch eager), onnx (onnxruntime: CUDA/TensorRT when present, else CPU) or openvino (CPU) "
                        "force one")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="force a precision: fp32 (default), "
                        "bf16 (CPUs with AVX-512 BF16/AMX: torch autocast + channels-last, or OpenVINO), fp16 "
                        "(GPUs); with --backend auto the fastest runtime of that precision")
    parser.add_argument("--onnx", type=Path, metavar="FILE.onnx", help="with --backend onnx or openvino: the file "
                        "`ctfm export` wrote (default: export to the cache)")


def check_onnx_option(args: argparse.Namespace) -> None:
    from ctfm_engine.errors import UsageError

    if args.onnx is not None and args.backend not in ("onnx", "openvino"):
        raise UsageError("--onnx FILE goes with --backend onnx or --backend openvino")


def add_encoder_choices(parser: argparse.ArgumentParser) -> None:
    """--preprocessing and --allow-segmentation-encoder: the subcommands that embed scans have them."""
    parser.add_argument("--preprocessing", choices=("pretraining", "card"), default="pretraining",
                        help="how scans are brought to the encoder: pretraining (CT-FM's own, default: 3x1x1 mm, "
                        "crop on HU > 0, as pre-training, retrieval and the search app) or card (the "
                        "ct_fm_feature_extractor card's snippet: native spacing, crop on HU > -1024)")
    parser.add_argument("--allow-segmentation-encoder", action="store_true",
                        help="accept the encoder of a segmentation checkpoint (refused by default: it was trained "
                        "further for segmentation, its embeddings are not CT-FM's)")


def device(args: argparse.Namespace) -> str:
    return args.device or "cpu"


@contextmanager
def progress_bar(args: argparse.Namespace, description: str, unit: str, total: int | None = None,
                 shown: bool = True) -> Iterator[Progress | None]:
    """A tqdm bar on stderr, as a ``(done, total)`` callback; None under --quiet or when not ``shown``."""
    if args.quiet or not shown:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=unit, total=total, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def output_stem(path: str | Path) -> str:
    """A result's name prefix: the input file's name without its image suffix, or the DICOM folder's name."""
    from ctfm_engine.volume import FILE_SUFFIXES

    name = Path(path).resolve().name
    suffix = next((suffix for suffix in FILE_SUFFIXES if name.lower().endswith(suffix)), "")
    return name[: len(name) - len(suffix)] or "input"


def write_together(writers: Sequence[tuple[Callable[[Path], Path], Path]]) -> list[Path]:
    """Run each (writer, path); if one fails, remove the files the others wrote, so a run leaves all or nothing."""
    written: list[Path] = []
    try:
        for write, path in writers:
            written.append(write(path))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def weights_line(weights: dict[str, Any], label: str = "weights") -> str:
    """``weights: NAME (sha256 …)``, tagged when the checkpoint is a bundled demonstration model."""
    return (f"{label}: {weights['name']} (sha256 {weights['sha256']})"
            + (DEMONSTRATION_TAG if weights.get("demonstration") else ""))


def weights_lines(document: dict[str, Any]) -> list[str]:
    """The weights line of a document that records its weights, else nothing."""
    weights = document.get("weights")
    return [weights_line(weights)] if isinstance(weights, dict) else []


def document_lines(document: dict[str, Any]) -> list[str]:
    """The document itself, indented, for results without a shorter human form."""
    return [json.dumps({key: value for key, value in document.items() if key != "command"}, indent=2)]
