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
    # "auto": the fastest runtime whose probability stays within 0.001 of PyTorch fp32's (measured once, cached;
    # CTFM_BACKEND pins another default); "torch", "onnx" or "openvino" force one
    backend: str = "auto"
    onnx_file: Path | None = None
    device: str = "cpu"
    precision: str | None = None
    progress: Progress | None = field(default=None, compare=False)
    cancel: CancelCheck | None = field(default=None, compare=False)

    def check(self) -> None:
        check_backend_choice(self.backend, self.onnx_file, self.precision)
        if self.backend == "auto" and self.onnx_file is not None:
            raise UsageError("an ONNX file goes with the onnx or openvino backend, not auto")
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
    runtime: Any = None  # the runtime selection's Choice: runtime, precision, how chosen, trials

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
    choice = triage_runtime(request, network, checkpoint, model_input, device)
    backend = triage_backend(request, network, checkpoint, model_input, device, choice.runtime)
    log.info("triage model %s (sha256 %s), %s", checkpoint.name, checkpoint.sha256[:12], backend.name)
    result = triage(volume, backend, network.preprocessing, threshold, model_input=model_input,
                    accept_partial=request.accept_partial, progress=request.progress, cancel=request.cancel)
    return TriageOutcome(result, volume, checkpoint, threshold_source, network.preprocessing.describe(),
                         list(model_input.checks.notes), backend.name, str(device), time.perf_counter() - started,
                         choice)


def triage_runtime(request: TriageRequest, network: TriageClassifier, checkpoint: Checkpoint, model_input: Any,
                   device: Any) -> Any:
    """The runtime requested, or with ``auto`` the fastest whose probability on this (real, screened) head CT
    stays within 0.001 of PyTorch fp32's, measured once per machine and model and cached."""
    from ctfm_engine.models.registry import cache_dir
    from ctfm_engine.runtime.selection import cache_name, choose_runtime, probability_agreement, requested

    forced = requested(request.backend, request.precision)
    if forced is not None:
        return forced
    sample = torch.from_numpy(model_input.image)[None, None]
    key = {"task": "triage", "weights_sha256": checkpoint.sha256, "input_zyx": list(sample.shape[2:]),
           "precision": request.precision}
    return choose_runtime(
        key, torch.device(device), lambda runtime: triage_backend(request, network, checkpoint, model_input, device,
                                                                  runtime),
        lambda: sample, probability_agreement, cache_dir() / "runtime" / cache_name("triage", checkpoint.sha256, key),
        progress=lambda line: log.warning("%s", line), precision=request.precision)


def triage_backend(request: TriageRequest, network: TriageClassifier, checkpoint: Checkpoint, model_input: Any,
                   device: Any, runtime: Any) -> Backend:
    """``runtime`` (a :class:`~ctfm_engine.runtime.selection.Runtime`): PyTorch, or onnxruntime/OpenVINO on the
    given file or on the cached export (made and validated on this scan)."""
    from ctfm_engine.runtime.backends import OnnxBackend, TorchBackend

    if runtime.backend == "torch":
        return TorchBackend(network, device, precision=runtime.precision)
    from ctfm_engine.runtime.onnx_export import onnx_for

    sample = torch.from_numpy(model_input.image)[None, None]
    path = request.onnx_file or onnx_for(checkpoint, "triage", network, sample)
    if runtime.backend == "openvino":
        from ctfm_engine.runtime.openvino_backend import OpenVinoBackend

        if torch.device(device).type != "cpu":
            raise UsageError("the openvino backend runs on the CPU here: pass --device cpu, or another backend")
        return OpenVinoBackend.open(path, checkpoint, "triage", runtime.precision, batch_shape=tuple(sample.shape))
    return OnnxBackend.open(path, checkpoint, "triage", device, fp16=runtime.precision == "fp16",
                            batch_shape=tuple(sample.shape))
