"""Runtime backends: one call signature for every way of running a network.

A backend maps a float32 batch ``(B, C, Z, Y, X)`` to the network's float32 output ``(B, K, Z', Y', X')``
(segmentation logits, or ``(B, 1)`` triage logits).  Tasks (sliding-window segmentation, triage) call backends and
never care whether PyTorch, onnxruntime or OpenVINO does the work, nor in which precision.  ``output_device`` says
where the returned tensor lives, so blending can stay on the GPU when the backend runs there.
:class:`OnnxBackend` (onnxruntime: CPU, CUDA, TensorRT) lives in :mod:`ctfm_engine.runtime.onnx_backend` and
:class:`~ctfm_engine.runtime.openvino_backend.OpenVinoBackend` in its own module; their runtimes are imported only
when one is made.  Which one runs by default is chosen by measurement (:mod:`ctfm_engine.runtime.selection`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Protocol

import torch

from ctfm_engine.runtime.onnx_backend import OnnxBackend

__all__ = ["Backend", "TorchBackend", "OnnxBackend", "BACKENDS", "PRECISIONS", "check_backend_choice",
           "cpu_has_bf16"]

BACKENDS = ("auto", "torch", "onnx", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16")


def check_backend_choice(backend: str, onnx_file: object | None = None, precision: str | None = None) -> None:
    """UsageError unless ``backend`` and ``precision`` are ones this engine runs, and an ONNX file comes only with a
    runtime that reads it (onnx, openvino)."""
    from ctfm_engine.errors import UsageError

    if backend not in BACKENDS:
        raise UsageError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if onnx_file is not None and backend not in ("onnx", "openvino"):
        raise UsageError("an ONNX file goes with the onnx or openvino backend")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class Backend(Protocol):
    name: str  # e.g. "torch:cpu", "onnxruntime:CPUExecutionProvider"
    output_device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    """PyTorch eager.  ``precision`` fp32 (default); fp16 on CUDA and bf16 (on CPU with channels-last 3-D weights,
    which oneDNN runs fastest) run the forward under autocast, outputs returned as fp32.  fp16 on a CPU and bf16 on
    a CPU without native bf16 fall back on fp32 (``precision`` says what runs).  ``fp16=True`` is the older
    spelling of ``precision="fp16"``."""

    def __init__(self, network: torch.nn.Module, device: torch.device | str = "cpu", fp16: bool = False,
                 precision: str = "fp32") -> None:
        self.device = torch.device(device)
        if fp16:
            precision = "fp16"
        if precision == "fp16" and self.device.type != "cuda":
            precision = "fp32"
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            precision = "fp32"
        self.precision = precision
        self.network = network.to(self.device).eval()
        self.channels_last = precision == "bf16" and self.device.type == "cpu"
        if self.channels_last:  # a converted copy: the caller's network keeps its layout (exports trace it)
            self.network = copy.deepcopy(self.network).to(memory_format=torch.channels_last_3d)
        self.fp16 = precision == "fp16"
        self.output_device = self.device
        self.name = f"torch:{self.device}" + ("" if precision == "fp32" else f":{precision}")

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, dtype=torch.float32, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            output = self.network(batch)
        if isinstance(output, (list, tuple)):  # SegResNetDS in training mode returns deep-supervision levels
            output = output[0]
        return output.float().contiguous()
