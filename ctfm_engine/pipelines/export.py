"""Export of a checkpoint to ONNX, validated against PyTorch on a real CT before anything is written, once, for every
face.

:func:`run_export` checks the settings and reads the validation CT before any model loads, resolves the checkpoint
(a folder or a hub repo id in the cache), decides what to export from its keys (segmentation when it holds a
decoder, triage when it holds a classifier head, else the encoder's last feature map), loads the network the way
its task does (a demonstration model is announced) and writes the ONNX file only when onnxruntime reproduces
PyTorch within the tolerance.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ctfm_engine.errors import UsageError
from ctfm_engine.models.checkpoint import Checkpoint, read_checkpoint
from ctfm_engine.models.registry import resolve_weights
from ctfm_engine.pipelines.inputs import Scan, as_source, read_scan, sample_ct_path, scan_name
from ctfm_engine.runtime.onnx_export import (
    DEFAULT_TOLERANCE,
    OPSET,
    SEGMENTATION_TASKS,
    TASKS,
    ExportReport,
    cached_onnx_path,
    checkpoint_task,
    export_onnx,
    validation_sample,
)

log = logging.getLogger("ctfm_engine.export")

# The real CT an export is validated on unless another is given (an abdominal CT shipped with the package).
# The validation window of an encoder export, in model voxels (segmentation uses its checkpoint's window).
ENCODER_CHECK_WINDOW = (32, 128, 128)


@dataclass(frozen=True)
class ExportRequest:
    """Export ``weights`` (a checkpoint folder or hub repo id) for ``task`` ("auto" decides from the checkpoint's
    keys) to ``out`` (default: the ONNX cache, where the onnx backend looks), validated on ``check_input`` (default:
    the bundled sample CT) within ``tolerance`` (largest |PyTorch - onnxruntime| on any output value).  ``roi_size_zyx``
    is the validation window in model voxels (multiples of 16); a triage model uses its own fixed input size."""

    weights: str | Path
    out: Path | None = None
    task: str = "auto"
    check_input: Scan | None = None
    series_uid: str | None = None
    hu_offset: float | None = None
    roi_size_zyx: tuple[int, int, int] | None = None
    tolerance: float | None = None  # None: DEFAULT_TOLERANCE

    @property
    def accepted_difference(self) -> float:
        return DEFAULT_TOLERANCE if self.tolerance is None else self.tolerance

    def check(self) -> None:
        from ctfm_engine.runtime.onnx_backend import onnx_modules
        from ctfm_engine.tasks.segment import check_window

        onnx_modules()
        if self.task != "auto" and self.task not in TASKS:
            raise UsageError(f"export task {self.task!r}: choose auto or one of {', '.join(TASKS)}")
        if self.out is not None and Path(self.out).suffix.lower() != ".onnx":
            raise UsageError(f"{self.out}: an ONNX export is written as .onnx")
        if not (self.accepted_difference > 0 and math.isfinite(self.accepted_difference)):
            raise UsageError(f"tolerance {self.tolerance}: must be a positive number (default {DEFAULT_TOLERANCE:g})")
        if self.roi_size_zyx is not None:
            if self.task == "triage":
                raise UsageError("a triage model is validated on its own fixed input size; give no window")
            check_window(self.roi_size_zyx, 0.0)


@dataclass(frozen=True)
class ExportOutcome:
    """The ONNX file written, how closely onnxruntime reproduced PyTorch, and the checkpoint it holds."""

    report: ExportReport
    checkpoint: Checkpoint
    check_input: str
    tolerance: float
    opset: int = OPSET

    @property
    def weights(self) -> dict[str, Any]:
        return self.checkpoint.identity

    @property
    def output(self) -> Path:
        return self.report.output

    @property
    def task(self) -> str:
        return self.report.task


def run_export(request: ExportRequest) -> ExportOutcome:
    """Export and validate; settings and the validation CT are checked before the checkpoint is read."""
    request.check()
    check_input = request.check_input if request.check_input is not None else sample_ct_path()
    volume = read_scan(as_source(check_input, request.series_uid, request.hu_offset))
    checkpoint = read_checkpoint(resolve_weights(request.weights))
    task = checkpoint_task(checkpoint) if request.task == "auto" else request.task
    if task == "triage" and request.roi_size_zyx is not None:
        raise UsageError(f"{checkpoint.name} is a triage model, validated on its own fixed input size; give no window")
    network, checkpoint, preprocessing, window = network_to_export(checkpoint, task)
    roi = None if task == "triage" else tuple(request.roi_size_zyx or window)
    sample = validation_sample(volume, task, preprocessing, roi)
    out = Path(request.out) if request.out is not None else cached_onnx_path(checkpoint, task)
    report = export_onnx(network, checkpoint, task, out, sample, request.accepted_difference)
    return ExportOutcome(report, checkpoint, scan_name(as_source(check_input)), request.accepted_difference)


def network_to_export(
    checkpoint: Checkpoint, task: str
) -> tuple[nn.Module, Checkpoint, Any, tuple[int, int, int] | None]:
    """The network of ``checkpoint`` for ``task`` loaded as that task loads it, the checkpoint, its preprocessing and
    its validation window (None for triage, whose input size is fixed)."""
    if task in SEGMENTATION_TASKS:
        from ctfm_engine.pipelines.segmentation import open_model

        model = open_model(checkpoint.folder)
        return model.network, model.checkpoint, model.preprocessing, model.roi_size_zyx
    if task == "encoder":
        from ctfm_engine.pipelines.embedding import open_encoder
        from ctfm_engine.preprocess import CTFM_PREPROCESSING

        encoder, checkpoint = open_encoder(checkpoint.folder)
        return encoder, checkpoint, CTFM_PREPROCESSING, ENCODER_CHECK_WINDOW
    from ctfm_engine.pipelines.triage import open_model as open_triage_model

    network, checkpoint = open_triage_model(checkpoint.folder)
    return network, checkpoint, network.preprocessing, None
