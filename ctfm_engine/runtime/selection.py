"""Which runtime runs a model on this machine: chosen by measurement, among those that give PyTorch fp32's labels.

For a model (its weights' sha256), a window size and a batch, every runtime this machine has -- PyTorch fp32, and
bf16 with channels-last where the CPU computes bf16 natively; onnxruntime; OpenVINO fp32 and bf16; on an NVIDIA GPU
PyTorch fp16 and onnxruntime's CUDA/TensorRT fp16 -- segments one window of real CT (the bundled sample, through the
model's own preprocessing).  A runtime qualifies when its labels agree with PyTorch fp32's on at least
:data:`AGREEMENT` of the foreground voxels (voxels either labels as a structure: a structure's voxels gained count
as much as those lost).  The fastest qualifying one
is the choice.  The trials and the choice are cached per machine, runtime versions, model, window and batch, so
the measurement runs once (about ten windows' time) and every later run starts at once.

The threshold, in clinical terms: 0.999 of the foreground voxels keep their label, so no structure's volume changes
by more than 0.1 % (1.5 mL of a 1.5 L liver) and the label maps' per-structure Dice stays >= 0.999 on average;
within the rounding of the volumes we report.  bf16 paths measured 0.981 - 0.997 with the shipped trained model on
real CT (README, Benchmarks): they are selectable (``--precision bf16``) but not chosen by default where they fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctfm_engine.io import atomic_output

log = logging.getLogger(__name__)

AGREEMENT = 0.999
FORMAT = 1


@dataclass(frozen=True)
class Runtime:
    """A runtime and its precision: backend ``torch`` | ``onnx`` | ``openvino``, precision ``fp32`` | ``bf16`` |
    ``fp16``."""

    backend: str
    precision: str

    def __str__(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass(frozen=True)
class Trial:
    """One runtime measured: seconds per window (after a warm-up), agreement with PyTorch fp32, or why it failed."""

    runtime: Runtime
    seconds: float | None
    foreground_agreement: float | None
    agreement: float | None
    error: str | None = None

    @property
    def qualifies(self) -> bool:
        return self.error is None and self.foreground_agreement is not None and \
            self.foreground_agreement >= AGREEMENT

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.runtime.backend, "precision": self.runtime.precision, "seconds": self.seconds,
                "foreground_agreement": self.foreground_agreement, "agreement": self.agreement,
                "qualifies": self.qualifies, "error": self.error}


@dataclass(frozen=True)
class Choice:
    """The chosen runtime, how it was chosen ("measured", "cached" or "requested") and the trials behind it."""

    runtime: Runtime
    how: str
    trials: tuple[Trial, ...] = ()

    def describe(self) -> dict[str, Any]:
        reference = next((t for t in self.trials if t.runtime == Runtime("torch", "fp32") and t.seconds), None)
        chosen = next((t for t in self.trials if t.runtime == self.runtime and t.seconds), None)
        speedup = None if reference is None or chosen is None else round(reference.seconds / chosen.seconds, 2)
        return {"backend": self.runtime.backend, "precision": self.runtime.precision, "chosen": self.how,
                "agreement_threshold": AGREEMENT if self.how != "requested" else None,
                "speedup_vs_torch_fp32": speedup, "trials": [trial.as_dict() for trial in self.trials]}


def requested(backend: str, precision: str | None) -> Choice | None:
    """The runtime a request forces (a backend other than auto, or ``CTFM_BACKEND`` pinning the default), or None
    when it is to be chosen by measurement."""
    import os

    from ctfm_engine.runtime.backends import check_backend_choice

    pinned = os.environ.get("CTFM_BACKEND") or "auto"
    if backend == "auto" and pinned != "auto":
        backend = pinned
        check_backend_choice(backend)
    if backend == "auto":
        return None
    return Choice(Runtime(backend, precision or "fp32"), "requested")


def candidates(device: torch.device) -> list[Runtime]:
    """The runtimes worth measuring on ``device``, PyTorch fp32 (the reference) first."""
    from ctfm_engine.runtime.backends import cpu_has_bf16

    if device.type == "cuda":
        found = [Runtime("torch", "fp32"), Runtime("torch", "fp16")]
        if _importable("onnxruntime"):
            found.append(Runtime("onnx", "fp16"))
        return found
    bf16 = cpu_has_bf16()
    found = [Runtime("torch", "fp32")] + ([Runtime("torch", "bf16")] if bf16 else [])
    if _importable("onnxruntime"):
        found.append(Runtime("onnx", "fp32"))
    if _importable("openvino"):
        found += [Runtime("openvino", "fp32")] + ([Runtime("openvino", "bf16")] if bf16 else [])
    return found


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def machine_key(device: torch.device) -> dict[str, Any]:
    """What makes a measurement valid: this CPU/GPU, its thread count, and the runtimes' versions."""
    from ctfm_engine.runtime.backends import cpu_has_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"torch": torch.__version__}
    for module in ("onnxruntime", "openvino"):
        if _importable(module):
            versions[module] = __import__(module).__version__
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "bf16": cpu_has_bf16(), "threads": torch.get_num_threads(), "device": str(device),
            "gpu": gpu, "versions": versions}


def labels_of(output: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor] | None) -> np.ndarray:
    """Arg-max labels of a backend's output (features turned into logits by ``head`` when given)."""
    output = output.float().cpu()
    if head is not None:
        output = torch.einsum("kc,bczyx->bkzyx", head[0].cpu(), output) + head[1].cpu()[None, :, None, None, None]
    return output.argmax(dim=1).numpy()


Compare = Callable[[torch.Tensor, torch.Tensor], tuple[float, float]]


def label_agreement(head: tuple[torch.Tensor, torch.Tensor] | None) -> Compare:
    """Segmentation: (foreground agreement, all-voxel agreement) of a candidate's labels with the reference's;
    foreground is every voxel either labels as a structure, so voxels gained count as much as voxels lost."""

    def compare(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
        labels, expected = labels_of(output, head), labels_of(reference, head)
        foreground = (expected != 0) | (labels != 0)
        agreement = float(np.mean(labels == expected))
        return (float(np.mean(labels[foreground] == expected[foreground])) if foreground.any() else agreement,
                agreement)

    return compare


def probability_agreement(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Classification (triage): 1 - the largest difference of the sigmoid probabilities, so the threshold 0.999
    means probabilities within 0.001 of PyTorch fp32's."""
    difference = float((torch.sigmoid(output.float()) - torch.sigmoid(reference.float())).abs().max())
    return 1.0 - difference, 1.0 - difference


def feature_agreement(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Dense feature maps (C, Z, Y, X): (the lowest per-cell cosine similarity with the reference's features, the
    share of cells whose most similar other cell stays the same).  The cosine decides: similarities then move by
    at most about 1 - cosine, and a search's ranking changes only between near-equal candidates; the share of
    unchanged nearest cells is recorded but not required (cells of air are near-equal, their order arbitrary)."""
    cells = torch.nn.functional.normalize(output.float().reshape(output.shape[0], -1).T, dim=1)
    expected = torch.nn.functional.normalize(reference.float().reshape(reference.shape[0], -1).T, dim=1)
    cosine = (cells * expected).sum(dim=1)
    ranked, reference_ranked = cells @ cells.T, expected @ expected.T
    ranked.fill_diagonal_(-2.0)
    reference_ranked.fill_diagonal_(-2.0)
    same_best = float((ranked.argmax(dim=1) == reference_ranked.argmax(dim=1)).float().mean())
    return float(cosine.min()), same_best


def measure(runtime: Runtime, build: Callable[[Runtime], Any], sample: torch.Tensor, compare: Compare,
            reference: torch.Tensor | None) -> tuple[Trial, torch.Tensor | None]:
    """Build ``runtime``, run the sample once to warm it up, then time one run and compare its output with the
    reference's (None: this is the reference)."""
    try:
        backend = build(runtime)
        backend(sample)
        started = time.perf_counter()
        output = backend(sample)
        seconds = time.perf_counter() - started
    except Exception as error:  # a runtime that cannot run this model here is simply not a candidate
        log.info("runtime %s: not usable here (%s: %s)", runtime, type(error).__name__, str(error)[:200])
        return Trial(runtime, None, None, None, f"{type(error).__name__}: {str(error)[:200]}"), None
    output = output.float().cpu()
    if reference is None:
        return Trial(runtime, seconds, 1.0, 1.0), output
    primary, overall = compare(output, reference)
    return Trial(runtime, seconds, primary, overall), output


def choose_runtime(key: dict[str, Any], device: torch.device, build: Callable[[Runtime], Any],
                   sample: Callable[[], torch.Tensor], compare: Compare, cache_file: Path,
                   progress: Callable[[str], None] | None = None, precision: str | None = None,
                   allowed: Callable[[Runtime], bool] | None = None) -> Choice:
    """The fastest runtime whose labels agree with PyTorch fp32 on ``sample``, from the cache when this machine,
    these runtime versions and ``key`` (model sha256, window, batch) were measured before.  ``compare`` gives a
    candidate's (agreement, overall agreement) with the reference output; ``allowed`` narrows the candidates (e.g.
    to runtimes that can run this network's input shapes).  With ``precision``
    the choice is among that precision's runtimes, and their agreement is recorded but does not exclude them:
    the precision was asked for."""
    identity = {"format": FORMAT, "machine": machine_key(device), **key}
    cached = _read_cache(cache_file, identity)
    if cached is not None:
        return cached
    window = sample()
    found = candidates(device)
    if precision is not None:
        found = found[:1] + [runtime for runtime in found[1:] if runtime.precision == precision]
    if allowed is not None:
        found = found[:1] + [runtime for runtime in found[1:] if allowed(runtime)]
    if progress is not None:
        progress(f"choosing the fastest runtime for this machine and model (once): {', '.join(map(str, found))}")
    reference_trial, reference = measure(found[0], build, window, compare, None)
    trials = [reference_trial]
    for runtime in found[1:]:
        trial, _ = measure(runtime, build, window, compare, reference)
        trials.append(trial)
    for trial in trials:
        log.info("runtime %-14s %s", str(trial.runtime), "failed: " + trial.error if trial.error else
                 f"{trial.seconds:.2f} s per run, agreement {trial.foreground_agreement:.5f}")
    choice = Choice(best_trial(trials, precision).runtime, "measured", tuple(trials))
    _write_cache(cache_file, identity, choice)
    return choice


def best_trial(trials: list[Trial], precision: str | None = None) -> Trial:
    """The fastest trial that qualifies (agreement with the reference, the first trial), or of ``precision`` when
    one was asked for; the reference when none does."""
    usable = [trial for trial in trials if trial.seconds is not None and trial.error is None and (
        trial.qualifies if precision is None else trial.runtime.precision == precision)]
    return min(usable, key=lambda trial: trial.seconds) if usable else trials[0]


def _read_cache(path: Path, identity: dict[str, Any]) -> Choice | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if document.get("identity") != json.loads(json.dumps(identity)):
        return None
    try:
        trials = tuple(Trial(Runtime(t["backend"], t["precision"]), t["seconds"], t["foreground_agreement"],
                             t["agreement"], t["error"]) for t in document["trials"])
        runtime = Runtime(**document["choice"])
    except (KeyError, TypeError):
        return None
    return Choice(runtime, "cached", trials)


def _write_cache(path: Path, identity: dict[str, Any], choice: Choice) -> None:
    document = {"identity": identity, "choice": asdict(choice.runtime),
                "trials": [trial.as_dict() for trial in choice.trials]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as temporary:
            temporary.write_text(json.dumps(document, indent=2) + "\n")
    except OSError as error:  # a read-only cache costs the measurement next time, nothing else
        log.warning("could not cache the runtime choice in %s (%s)", path, error)


def cache_name(task: str, sha256: str, key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{task}-{sha256[:16]}-{digest}.json"
