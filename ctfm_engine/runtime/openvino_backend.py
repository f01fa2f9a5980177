"""OpenVINO as a :class:`~ctfm_engine.runtime.backends.Backend`: the checkpoint's ONNX export compiled for the CPU.

OpenVINO reads the same ONNX file onnxruntime runs (:func:`ctfm_engine.runtime.onnx_export.onnx_for`, which records
the checkpoint's sha256 and task; :meth:`OpenVinoBackend.open` refuses a file made from another checkpoint).  The
graph is reshaped to the batch the caller sends at most (static shapes are what OpenVINO optimises best; a smaller
batch is padded and cropped) and compiled with an inference precision: ``fp32`` (f32) or ``bf16`` (on CPUs with
AVX-512 BF16 or AMX; OpenVINO's bf16 keeps fp32 accumulation).  Compiled blobs are cached under
``<ctfm cache>/openvino`` so the next process starts in a fraction of the compile time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctfm_engine.errors import ModelError, UsageError
from ctfm_engine.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)

OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def openvino_module() -> Any:
    """The ``openvino`` module, or a UsageError saying which extra installs it."""
    try:
        import openvino
    except ImportError:
        raise UsageError("the openvino backend needs OpenVINO (pip install 'ctfm-engine[openvino]')") from None
    return openvino


def openvino_version() -> str | None:
    try:
        return openvino_module().__version__
    except UsageError:
        return None


class OpenVinoBackend:
    """An ONNX export compiled by OpenVINO for the CPU: float32 (B, C, Z, Y, X) in, float32 output out."""

    def __init__(self, model: str | Path, precision: str = "fp32", *, batch_shape: Sequence[int],
                 cache_folder: Path | None = None) -> None:
        ov = openvino_module()
        if precision not in OPENVINO_PRECISIONS:
            raise UsageError(f"precision {precision!r}: the openvino backend runs fp32 or bf16")
        core = ov.Core()
        if cache_folder is not None:
            cache_folder.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_folder)})
        try:
            network = core.read_model(str(model))
            network.reshape({network.inputs[0].get_any_name(): ov.PartialShape([int(n) for n in batch_shape])})
            self.compiled = core.compile_model(network, "CPU", {
                "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            })
        except RuntimeError as error:
            raise ModelError(f"{model}: OpenVINO cannot compile it ({str(error).splitlines()[0][:300]})") from None
        self.request = self.compiled.create_infer_request()
        self.batch_shape = tuple(int(n) for n in batch_shape)
        self.precision = precision
        self.output_device = torch.device("cpu")
        self.name = f"openvino:CPU:{precision}"

    @classmethod
    def open(cls, path: str | Path, checkpoint: Checkpoint, task: str, precision: str = "fp32", *,
             batch_shape: Sequence[int]) -> OpenVinoBackend:
        """The export at ``path`` if it was made from ``checkpoint`` for ``task`` (ModelError naming it otherwise)."""
        from ctfm_engine.models.registry import cache_dir
        from ctfm_engine.runtime.onnx_backend import check_export

        check_export(path, checkpoint, task)
        return cls(path, precision, batch_shape=batch_shape, cache_folder=cache_dir() / "openvino")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        count = array.shape[0]
        if array.shape != self.batch_shape:
            if count > self.batch_shape[0] or array.shape[1:] != self.batch_shape[1:]:
                raise ValueError(f"batch {array.shape} does not fit the compiled shape {self.batch_shape}")
            padded = np.zeros(self.batch_shape, dtype=np.float32)
            padded[:count] = array
            array = padded
        output = self.request.infer({0: array})[self.compiled.output(0)]
        return torch.from_numpy(np.array(output[:count], dtype=np.float32, copy=True))
