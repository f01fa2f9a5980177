"""Export of CT-FM networks to ONNX, validated against PyTorch on a real CT patch before anything is written.

Tasks: ``segmentation`` (SegResNetDS in eval mode: logits (B, K, Z, Y, X)); ``segmentation-trunk`` (the same
network without its 1x1x1 output head: decoder features (B, init_filters, Z, Y, X), which the sliding window blends
before applying the head once per voxel, see :class:`~ctfm_engine.models.segmentation.SegmentationTrunk`); ``triage``
(:class:`~ctfm_engine.models.triage.TriageClassifier`: logits (B,)); ``encoder`` (SegResEncoder: its last,
stride-16 feature map).  The TorchScript exporter writes opset 17 with the batch and the three spatial axes
dynamic, so one file serves every window size the network accepts (multiples of 16 for the segmentation net).
Exports are cached per checkpoint and task under ``<ctfm cache>/onnx/`` (:func:`onnx_for`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ctfm_engine import __version__
from ctfm_engine.errors import ModelError
from ctfm_engine.io import atomic_output
from ctfm_engine.models.checkpoint import Checkpoint
from ctfm_engine.runtime.onnx_backend import (
    CHECKPOINT_NAME_KEY,
    CHECKPOINT_SHA256_KEY,
    INPUT_NAME,
    TASK_KEY,
    OnnxBackend,
    check_export,
    onnx_modules,
)
from ctfm_engine.volume import CTVolume

log = logging.getLogger(__name__)

TASKS = ("segmentation", "segmentation-trunk", "triage", "encoder")
SEGMENTATION_TASKS = ("segmentation", "segmentation-trunk")
OPSET = 17
# Largest |torch - onnxruntime| accepted on any output value (fp32 logits or features).  Measured on the shipped
# whole-body model over real CT windows: 5e-6 to 8e-6 on logits reaching +-17, so 1e-3 leaves a margin of over 100
# while still catching a wrong graph; a logit error of 1e-3 moves a probability by at most 2.5e-4 and can change a
# label only where the two best classes are within 2e-3 of each other.
DEFAULT_TOLERANCE = 1e-3
OUTPUT_NAMES = {"segmentation": "logits", "segmentation-trunk": "features", "triage": "logit", "encoder": "features"}


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how closely onnxruntime (CPU) reproduced PyTorch on the validation sample."""

    output: Path
    task: str
    weights: dict[str, str]
    tolerance: float
    max_abs_difference: float
    label_agreement: float | None  # segmentation (trunk: after the head): share of voxels with the same arg-max
    sample_shape: tuple[int, ...]
    out_channels: int
    export_seconds: float
    torch_seconds: float
    onnxruntime_seconds: float  # session creation and the one run

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "output": str(self.output), "sample_shape": list(self.sample_shape)}


class _LastFeatureMap(nn.Module):
    """The encoder's deepest feature map alone: the one CT-FM embeddings pool (``encoder(x)[-1]``)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)[-1]


def checkpoint_task(checkpoint: Checkpoint) -> str:
    """``segmentation`` when the weights hold a decoder (``up_layers.*``), ``triage`` for a head (``head.*``), else
    ``encoder``."""
    keys = checkpoint.state_dict
    if any(key.startswith("up_layers.") for key in keys):
        return "segmentation"
    if any(key.startswith("head.") for key in keys):
        return "triage"
    return "encoder"


def shape_factor(network: nn.Module) -> tuple[int, ...]:
    """What each spatial size must be a multiple of: the product of the encoder's downsampling strides (16)."""
    factor = [1, 1, 1]
    for name, module in network.named_modules():
        if name.endswith("downsample") and isinstance(module, nn.Conv3d):
            factor = [f * int(s) for f, s in zip(factor, module.stride, strict=True)]
    return tuple(factor)


def validation_sample(
    volume: CTVolume, task: str, preprocessing: Any, roi_size_zyx: Sequence[int] | None = None
) -> torch.Tensor:
    """A real CT patch (1, 1, Z, Y, X) as the ``task`` network sees it, to validate an export on.

    Segmentation, its trunk and the encoder (``preprocessing`` a :class:`~ctfm_engine.preprocess.Preprocessing`):
    the window of ``roi_size_zyx`` model voxels at the centre of the preprocessed scan, padded with 0 (air after
    scaling, as the sliding window pads) where the scan is smaller.  Triage (``preprocessing`` a
    :class:`~ctfm_engine.head_ct.HeadCTPreprocessing`): the whole stacked head-CT input the checkpoint expects, so
    ``roi_size_zyx`` must be None.
    """
    from ctfm_engine.head_ct import HeadCTPreprocessing, head_ct_input

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if (task == "triage") != isinstance(preprocessing, HeadCTPreprocessing):
        raise ValueError(f"a {task} sample needs {'head-CT' if task == 'triage' else 'CT-FM'} preprocessing, got "
                         f"{type(preprocessing).__name__}")
    if task == "triage":
        if roi_size_zyx is not None:
            raise ValueError("the triage input size is fixed by the checkpoint's spatial_size_zyx; give no window")
        return torch.from_numpy(head_ct_input(volume, preprocessing).image)[None, None]
    from ctfm_engine.preprocess import preprocess

    if roi_size_zyx is None or len(roi_size_zyx) != 3 or min(roi_size_zyx) < 1:
        raise ValueError(f"a validation window needs three positive sizes (z, y, x), got {roi_size_zyx}")
    image = preprocess(volume, preprocessing).image
    window = np.zeros(tuple(int(n) for n in roi_size_zyx), dtype=np.float32)
    source, target = [], []
    for size, roi in zip(image.shape, window.shape, strict=True):
        start = abs(size - roi) // 2
        source.append(slice(start, start + roi) if size >= roi else slice(0, size))
        target.append(slice(0, roi) if size >= roi else slice(start, start + size))
    window[tuple(target)] = image[tuple(source)]
    return torch.from_numpy(window)[None, None]


def export_onnx(
    network: nn.Module,
    checkpoint: Checkpoint,
    task: str,
    out_path: str | Path,
    sample: torch.Tensor,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Export ``network`` (built from ``checkpoint``) for ``task`` to ``out_path``, validated on ``sample``.

    ``network`` is the whole SegResNetDS for both segmentation tasks.  ``sample`` is a real CT patch, float32
    (B, C, Z, Y, X) (see :func:`validation_sample`); for segmentation each spatial size must be a multiple of 16.
    PyTorch and onnxruntime (CPU, fp32) both run it; when any output value differs by more than ``tolerance``
    (default 1e-3, see ``DEFAULT_TOLERANCE``), or either output is not finite, ModelError (exit code 4) and nothing
    is written.  For segmentation the share of voxels with the same arg-max label (for the trunk: after the head) is
    reported too.  The file records task, checkpoint name, sha256 and config, output channels, ctfm version,
    tolerance and the measured difference in its ``metadata_props``; it appears complete or not at all.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    onnx_modules()
    if not tolerance > 0 or not math.isfinite(tolerance):
        raise ValueError(f"the tolerance must be a positive number, got {tolerance}")
    if sample.ndim != 5:
        raise ValueError(f"the validation sample must be (B, C, Z, Y, X), got shape {tuple(sample.shape)}")
    sample = sample.detach().to("cpu", torch.float32).contiguous()
    factor = shape_factor(network)
    if task in SEGMENTATION_TASKS and any(n % f for n, f in zip(sample.shape[2:], factor, strict=True)):
        raise ValueError(f"validation sample {'x'.join(map(str, sample.shape[2:]))}: each spatial size must be a "
                         f"multiple of {'x'.join(map(str, factor))} (the network halves the grid four times)")
    if any(parameter.device.type != "cpu" for parameter in network.parameters()):
        raise ValueError("export the network from the CPU (call network.cpu() first)")
    was_training = network.training
    network.eval()
    try:
        exported, head = _exported_module(network, task)
        started = time.perf_counter()
        with torch.no_grad():
            reference = exported(sample).float().numpy()
        torch_seconds = time.perf_counter() - started
        started = time.perf_counter()
        model_bytes = _trace(exported, sample, task, checkpoint)
        export_seconds = time.perf_counter() - started
    finally:
        network.train(was_training)

    started = time.perf_counter()
    output = OnnxBackend(model_bytes)(sample).numpy()
    onnxruntime_seconds = time.perf_counter() - started
    if output.shape != reference.shape:
        raise ModelError(f"{checkpoint.name}: the ONNX graph returns shape {output.shape} where PyTorch returns "
                         f"{reference.shape}; the export is wrong and was not written")
    difference = float(np.max(np.abs(output - reference))) if reference.size else 0.0
    agreement = None
    if task in SEGMENTATION_TASKS:
        labels = [_logits(values, head).argmax(1) for values in (output, reference)]
        agreement = float(np.mean(labels[0] == labels[1]))
    out_path = Path(out_path)
    if not difference <= tolerance:  # also catches NaN
        raise ModelError(f"{checkpoint.name}: onnxruntime differs from PyTorch by up to {difference:.3g} on the "
                         f"validation sample, more than the tolerance {tolerance:g}; {out_path} was not written")
    out_channels = int(reference.shape[1]) if reference.ndim > 1 else 1
    metadata = {
        TASK_KEY: task,
        CHECKPOINT_NAME_KEY: checkpoint.name,
        CHECKPOINT_SHA256_KEY: checkpoint.sha256,
        "ctfm.checkpoint.config": json.dumps(checkpoint.config, sort_keys=True),
        "ctfm.out_channels": str(out_channels),
        "ctfm.spatial_multiple": json.dumps(list(factor) if task in SEGMENTATION_TASKS else [1, 1, 1]),
        "ctfm.version": __version__,
        "ctfm.torch_version": torch.__version__,
        "ctfm.tolerance": repr(float(tolerance)),
        "ctfm.max_abs_difference": repr(difference),
        "ctfm.validation_shape": json.dumps(list(sample.shape)),
    }
    if agreement is not None:
        metadata["ctfm.label_agreement"] = repr(agreement)
    _write_with_metadata(model_bytes, metadata, out_path)
    log.info("exported %s (%s) to %s: max |torch - onnxruntime| %.3g", checkpoint.name, task, out_path, difference)
    return ExportReport(out_path, task, checkpoint.identity, float(tolerance), difference, agreement,
                        tuple(sample.shape), out_channels, round(export_seconds, 3), round(torch_seconds, 3),
                        round(onnxruntime_seconds, 3))


def _exported_module(network: nn.Module, task: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor] | None]:
    """The module to trace for ``task`` and, for the segmentation trunk, the head (weight, bias) it leaves out."""
    if task == "encoder":
        return _LastFeatureMap(network), None
    if task != "segmentation-trunk":
        return network, None
    from ctfm_engine.models.segmentation import SegmentationTrunk, feature_head

    head = feature_head(network)
    if head is None:
        raise ValueError("this segmentation network has no 1x1x1 output head to apply after blending; export the "
                         "task 'segmentation' instead")
    return SegmentationTrunk(network).eval(), head


def _logits(values: np.ndarray, head: tuple[torch.Tensor, torch.Tensor] | None) -> np.ndarray:
    """Segmentation logits (B, K, Z, Y, X): ``values`` themselves, or trunk features through the 1x1x1 head."""
    if head is None:
        return values
    weight, bias = (tensor.numpy() for tensor in head)
    return np.einsum("kc,bczyx->bkzyx", weight, values) + bias[None, :, None, None, None]


def _trace(exported: nn.Module, sample: torch.Tensor, task: str, checkpoint: Checkpoint) -> bytes:
    spatial = {2: "z", 3: "y", 4: "x"}
    outputs = {"segmentation": {0: "batch", **spatial}, "segmentation-trunk": {0: "batch", **spatial},
               "triage": {0: "batch"},
               "encoder": {0: "batch", 2: "z16", 3: "y16", 4: "x16"}}[task]
    stream = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # The legacy exporter announces itself, and MONAI's shape check is traced as the constant it is.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(exported, (sample,), stream, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAMES[task]],
                              dynamic_axes={INPUT_NAME: {0: "batch", **spatial}, OUTPUT_NAMES[task]: outputs})
    except Exception as error:  # the exporter raises many types (TorchExportError, RuntimeError, ...)
        raise ModelError(f"{checkpoint.name}: PyTorch cannot export this {task} network to ONNX "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:300]})") from None
    return stream.getvalue()


def _write_with_metadata(model_bytes: bytes, metadata: dict[str, str], out_path: Path) -> None:
    onnx, _ = onnx_modules()
    model = onnx.load_from_string(model_bytes)
    onnx.helper.set_model_props(model, metadata)
    model.doc_string = f"CT-FM {metadata[TASK_KEY]} network of {metadata[CHECKPOINT_NAME_KEY]}, exported by ctfm"
    with atomic_output(out_path) as temporary:
        temporary.write_bytes(model.SerializeToString())


def cached_onnx_path(checkpoint: Checkpoint, task: str) -> Path:
    """Where :func:`onnx_for` keeps the export of ``checkpoint`` for ``task``."""
    from ctfm_engine.models.registry import cache_dir

    return cache_dir() / "onnx" / f"{task}-{checkpoint.sha256[:16]}.onnx"


def onnx_for(
    checkpoint: Checkpoint,
    task: str,
    network: nn.Module,
    sample: torch.Tensor,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    """The cached export of ``checkpoint`` for ``task``; exported (validated on ``sample``) when absent or unusable."""
    path = cached_onnx_path(checkpoint, task)
    if path.is_file():
        try:
            check_export(path, checkpoint, task)
            return path
        except ModelError as error:
            log.warning("exporting again: the cached file is unusable (%s)", error)
    export_onnx(network, checkpoint, task, path, sample, tolerance)
    return path
