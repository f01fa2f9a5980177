"""Runtime backends: one call signature for every way of running a network.

A backend maps a float32 batch ``(B, C, Z, Y, X)`` to the network's float32 output ``(B, K, Z', Y', X')``
(segmentation logits, or ``(B, 1)`` triage logits).  Tasks (sliding-window segmentation, triage) call backends and
never care whether PyTorch or onnxruntime does the work.  ``output_device`` says where the returned tensor lives, so
blending can stay on the GPU when the backend runs there.  :class:`OnnxBackend` (onnxruntime: CPU, CUDA, TensorRT)
lives in :mod:`ctfm_engine.runtime.onnx_backend` and is re-exported here; onnxruntime is imported only when one is
made.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ctfm_engine.runtime.onnx_backend import OnnxBackend

__all__ = ["Backend", "TorchBackend", "OnnxBackend", "BACKENDS", "check_backend_choice"]

BACKENDS = ("torch", "onnx")


def check_backend_choice(backend: str, onnx_file: object | None = None) -> None:
    """UsageError unless ``backend`` is one this engine runs, and an ONNX file comes only with the onnx backend."""
    from ctfm_engine.errors import UsageError

    if backend not in BACKENDS:
        raise UsageError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if onnx_file is not None and backend != "onnx":
        raise UsageError("an ONNX file goes with the onnx backend")


class Backend(Protocol):
    name: str  # e.g. "torch:cpu", "onnxruntime:CPUExecutionProvider"
    output_device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    """PyTorch eager, fp32; on CUDA with ``fp16=True`` the forward runs under autocast (outputs returned as fp32)."""

    def __init__(self, network: torch.nn.Module, device: torch.device | str = "cpu", fp16: bool = False) -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.fp16 = fp16 and self.device.type == "cuda"
        self.output_device = self.device
        self.name = f"torch:{self.device}" + (":fp16" if self.fp16 else "")

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, dtype=torch.float32, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            output = self.network(batch)
        if isinstance(output, (list, tuple)):  # SegResNetDS in training mode returns deep-supervision levels
            output = output[0]
        return output.float()
