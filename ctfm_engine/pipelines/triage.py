"""Head-CT triage from input scan to probability, decision and input checks, once, for every face.

:func:`run_triage` judges the scan before any model loads (a scan the classifier cannot judge is refused with an
InputError; a partial head carries the ``accept_partial`` remedy each face words), resolves the triage weights by
the one policy, picks the threshold (requested, else the checkpoint's, else 0.5), runs the classifier on PyTorch or
onnxruntime and returns the result with its provenance; the outcome writes its own DICOM SR.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctfm_engine import __version__
from ctfm_engine.errors import UsageError
from ctfm_engine.models.checkpoint import Checkpoint
from ctfm_engine.models.registry import TRIAGE, announce, resolve_weights
from ctfm_engine.models.triage import TriageClassifier
from ctfm_engine.pipelines.inputs import Scan, as_source, read_scan
from ctfm_engine.progress import CancelCheck, Progress, check_cancelled
from ctfm_engine.runtime.backends import Backend, check_backend_choice
from ctfm_engine.tasks.triage import (
    TriageResult,
    check_threshold,
    decision_threshold,
    load_triage_model,
    require_head_ct,
    triage,
    triage_input,
)
from ctfm_engine.volume import CTVolume

log = logging.getLogger("ctfm_engine.triage")



@dataclass(frozen=True)
class TriageRequest:
    """One head-CT triage.  ``weights`` None lets the policy choose (``CTFM_TRIAGE_WEIGHTS``, then the cache);
    ``threshold`` None takes the checkpoint's (else 0.5); ``accept_partial`` judges a head CT covering less than a
    whole head along S."""

    input: Scan
    weights: str | Path | None = None
    series_uid: str | None = None
    hu_offset: float | None = None
    threshold: float | None = None
    accept_partial: bool = False
    backend: str = "torch"
    onnx_file: Path | None = None
    device: str = "cpu"
    progress: Progress | None = field(default=None, compare=False)
    cancel: CancelCheck | None = field(default=None, compare=False)

    def check(self) -> None:
        check_backend_choice(self.backend, self.onnx_file)
        if self.threshold is not None:
            try:
                check_threshold(self.threshold)
            except ValueError:
                raise UsageError(f"threshold {self.threshold}: give a probability between 0 and 1") from None


@dataclass(frozen=True)
class TriageOutcome:
    """The triage result (probability, decision, checks) with its threshold's source and provenance."""

    result: TriageResult
    volume: CTVolume
    checkpoint: Checkpoint
    threshold_source: str  # "requested", "checkpoint" or "default"
    preprocessing: dict[str, Any]
    notes: list[str]
    backend: str
    device: str
    seconds: float

    @property
    def weights(self) -> dict[str, Any]:
        return self.checkpoint.identity

    def algorithm(self) -> Any:
        from ctfm_engine.dicom.seg import Algorithm

        return Algorithm.from_identity(self.weights, __version__)

    def write_sr(self, path: str | Path) -> Any:
        """The result as a Comprehensive 3D SR (TID 1500) referencing the input series (needs a DICOM input)."""
        from ctfm_engine.dicom.sr import write_triage_sr

        return write_triage_sr(self.result, self.volume, path, algorithm=self.algorithm())


def open_model(weights: str | Path | None = None) -> tuple[TriageClassifier, Checkpoint]:
    """The triage classifier the policy picks (announced when it is a demonstration model)."""
    network, checkpoint = load_triage_model(resolve_weights(weights, TRIAGE))
    announce(checkpoint)
    return network, checkpoint


def run_triage(request: TriageRequest) -> TriageOutcome:
    """Triage ``request.input``: refuse what cannot be judged, load the model, classify."""
    request.check()
    volume = read_scan(as_source(request.input, request.series_uid, request.hu_offset))
    screened = require_head_ct(volume, accept_partial=request.accept_partial)  # judged before a model loads
    from ctfm_engine.runtime.device import resolve_device

    device = resolve_device(request.device)
    network, checkpoint = open_model(request.weights)
    threshold, threshold_source = decision_threshold(network, request.threshold)
    check_cancelled(request.cancel)
    started = time.perf_counter()
    model_input = triage_input(volume, network.preprocessing, screened=screened)
    for note in model_input.checks.notes:
        log.warning("%s: %s", volume.source, note)
    backend = triage_backend(request, network, checkpoint, model_input, device)
    log.info("triage model %s (sha256 %s), %s", checkpoint.name, checkpoint.sha256[:12], backend.name)
    result = triage(volume, backend, network.preprocessing, threshold, model_input=model_input,
                    accept_partial=request.accept_partial, progress=request.progress, cancel=request.cancel)
    return TriageOutcome(result, volume, checkpoint, threshold_source, network.preprocessing.describe(),
                         list(model_input.checks.notes), backend.name, str(device), time.perf_counter() - started)


def triage_backend(request: TriageRequest, network: TriageClassifier, checkpoint: Checkpoint, model_input: Any,
                   device: Any) -> Backend:
    """PyTorch, or onnxruntime on the given file or on the cached export (made and validated on this scan)."""
    from ctfm_engine.runtime.backends import OnnxBackend, TorchBackend

    if request.backend == "torch":
        return TorchBackend(network, device)
    from ctfm_engine.runtime.onnx_export import onnx_for

    sample = torch.from_numpy(model_input.image)[None, None]
    path = request.onnx_file or onnx_for(checkpoint, "triage", network, sample)
    return OnnxBackend.open(path, checkpoint, "triage", device, batch_shape=tuple(sample.shape))
