"""onnxruntime as a :class:`~ctfm_engine.runtime.backends.Backend`, and the CT-FM metadata every export carries.

An ONNX file written by :func:`ctfm_engine.runtime.onnx_export.export_onnx` records in its ``metadata_props`` the
task and the sha256 of the checkpoint it came from; :meth:`OnnxBackend.open` refuses a file whose record does not
match the checkpoint and task in use, so results never carry one checkpoint's identity and another's numbers.

Execution providers: on ``cuda`` TensorRT, then CUDA, then CPU (whichever this onnxruntime build has); on ``cpu``
the CPU provider alone.  Half precision on a GPU: TensorRT builds fp16 engines (``trt_fp16_enable``); without
TensorRT the graph is converted to fp16 for the CUDA provider by onnxruntime's own converter
(:func:`half_precision`, fp32 input and output kept); on the CPU ``fp16`` is ignored, as with the torch backend.
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

INPUT_NAME = "image"

# metadata_props keys of a CT-FM export.
TASK_KEY = "ctfm.task"
CHECKPOINT_NAME_KEY = "ctfm.checkpoint.name"
CHECKPOINT_SHA256_KEY = "ctfm.checkpoint.sha256"

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)


def onnx_modules() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or a UsageError saying which extra installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise UsageError(f"ONNX export and the onnx backend need the [onnx] extra ({error.name} is not installed): "
                         "pip install 'ctfm-engine[onnx]', or [gpu] for CUDA and TensorRT") from None
    return onnx, onnxruntime


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file; ModelError naming the file when it is missing or not ONNX."""
    onnx, _ = onnx_modules()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: ONNX file does not exist; `ctfm export --model CHECKPOINT --out {path}` writes one")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError, onnx its own types; all mean "not an ONNX model"
        raise ModelError(f"{path}: is not a readable ONNX model ({type(error).__name__}); export the checkpoint "
                         f"again with `ctfm export`") from None
    if not model.graph.node:
        raise ModelError(f"{path}: holds no ONNX graph; export the checkpoint again with `ctfm export`")
    return {entry.key: entry.value for entry in model.metadata_props}


def check_export(path: str | Path, checkpoint: Checkpoint, task: str) -> dict[str, str]:
    """The metadata of a CT-FM export of ``checkpoint`` for ``task``; ModelError (one sentence) for any other file."""
    metadata = read_export_metadata(path)
    exported_sha256, exported_task = metadata.get(CHECKPOINT_SHA256_KEY), metadata.get(TASK_KEY)
    if not exported_sha256 or not exported_task:
        raise ModelError(f"{path}: has no CT-FM export metadata (task, checkpoint sha256), so nothing says which "
                         f"weights it holds; export {checkpoint.name} with `ctfm export --model {checkpoint.folder}`")
    if exported_sha256 != checkpoint.sha256:
        raise ModelError(f"{path}: was exported from checkpoint {metadata.get(CHECKPOINT_NAME_KEY, '?')} (sha256 "
                         f"{exported_sha256[:12]}), not from {checkpoint.name} (sha256 {checkpoint.sha256[:12]}); "
                         f"export this checkpoint with `ctfm export --model {checkpoint.folder}`")
    if exported_task != task:
        raise ModelError(f"{path}: holds the {exported_task} network of {checkpoint.name}, not the {task} one; "
                         f"export that with `ctfm export --model {checkpoint.folder} --task {task}`")
    return metadata


def execution_providers(
    device_type: str,
    available: Sequence[str],
    *,
    device_id: int = 0,
    fp16: bool = False,
    engine_cache: Path | None = None,
    batch_shape: Sequence[int] | None = None,
) -> list[str | tuple[str, dict[str, Any]]]:
    """The provider list for an InferenceSession: TensorRT > CUDA > CPU on ``cuda``, CPU alone on ``cpu``.

    ``engine_cache`` is where TensorRT keeps its engines (one folder per export: TensorRT's cache key does not
    include the weights).  ``batch_shape`` (B, C, Z, Y, X), the largest batch a caller sends, becomes TensorRT's
    optimisation profile (batch 1 to B at that window size), so a short last batch reuses the engine instead of
    building another; inputs outside the profile are then refused by TensorRT.
    """
    if device_type == "cpu":
        return [CPU]
    if device_type != "cuda":
        raise UsageError(f"device {device_type!r}: onnxruntime runs on cpu or cuda")
    if not any(provider in available for provider in GPU_PROVIDERS):
        raise UsageError("device 'cuda': this onnxruntime build has no CUDA or TensorRT provider (it offers "
                         f"{', '.join(available)}); install onnxruntime-gpu (the [gpu] extra) or run on the CPU")
    providers: list[str | tuple[str, dict[str, Any]]] = []
    if TENSORRT in available:
        tensorrt: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": bool(fp16)}
        if engine_cache is not None:
            tensorrt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(engine_cache),
                            trt_timing_cache_enable=True, trt_timing_cache_path=str(engine_cache))
        if batch_shape is not None:
            largest = "x".join(str(int(n)) for n in batch_shape)
            smallest = "x".join(str(int(n)) for n in (1, *batch_shape[1:]))
            tensorrt.update(trt_profile_min_shapes=f"{INPUT_NAME}:{smallest}",
                            trt_profile_opt_shapes=f"{INPUT_NAME}:{largest}",
                            trt_profile_max_shapes=f"{INPUT_NAME}:{largest}")
        providers.append((TENSORRT, tensorrt))
    if CUDA in available:
        # HEURISTIC: EXHAUSTIVE benchmarks cuDNN algorithms again for every new input shape, and DEFAULT falls back
        # to a slow algorithm with cuDNN 9 (onnxruntime#12880, #22705).
        providers.append((CUDA, {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}))
    providers.append(CPU)
    return providers


def half_precision(model: bytes) -> bytes:
    """The ONNX model with fp16 weights and arithmetic, fp32 input and output: for the CUDA provider's fp16 mode.

    Uses the converter shipped inside onnxruntime (no extra package).  On the shipped segmentation model it moved
    logits by at most 0.015 and labels on 0.04 % of voxels (CPU, one real 32x64x64 CT window).
    """
    onnx, _ = onnx_modules()
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load_from_string(model), keep_io_types=True).SerializeToString()


class OnnxBackend:
    """A network exported to ONNX, run by onnxruntime: float32 (B, C, Z, Y, X) in, the network's float32 output out.

    On a GPU provider the batch is bound in place on the GPU and the output stays there (``output_device`` is the
    CUDA device) when this onnxruntime can hand it to torch through DLPack; otherwise it comes back on the CPU.
    Use :meth:`open` for exports on disk: it checks which checkpoint and task the file was exported from.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        device: torch.device | str = "cpu",
        fp16: bool = False,
        *,
        batch_shape: Sequence[int] | None = None,
        engine_cache: Path | None = None,
    ) -> None:
        _, ort = onnx_modules()
        self.device = torch.device(device)
        device_id = self.device.index or 0
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            device_id = torch.cuda.current_device()
        if self.device.type == "cuda":
            self.device = torch.device("cuda", device_id)
        source = "the ONNX model" if isinstance(model, bytes) else str(model)
        providers = execution_providers(self.device.type, ort.get_available_providers(), device_id=device_id,
                                        fp16=fp16, engine_cache=engine_cache, batch_shape=batch_shape)
        names = [provider if isinstance(provider, str) else provider[0] for provider in providers]
        convert = fp16 and CUDA in names and TENSORRT not in names
        if convert:
            model = half_precision(model if isinstance(model, bytes) else Path(model).read_bytes())
        if engine_cache is not None and TENSORRT in names:
            engine_cache.mkdir(parents=True, exist_ok=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                providers=providers)
        except Exception as error:  # onnxruntime raises Fail/InvalidGraph/RuntimeException: all mean "cannot load"
            raise ModelError(f"{source}: onnxruntime cannot load it ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:300]})") from None
        self.provider = self.session.get_providers()[0]
        self.on_gpu = self.provider in GPU_PROVIDERS
        if self.device.type == "cuda" and not self.on_gpu:
            log.warning("%s: onnxruntime could not start a GPU provider; running on the CPU", source)
        self.fp16 = fp16 and self.on_gpu and (self.provider == TENSORRT or convert)
        self.name = f"onnxruntime:{self.provider}" + (":fp16" if self.fp16 else "")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.dlpack = self.on_gpu and hasattr(ort.OrtValue, "__dlpack__")
        self.output_device = self.device if self.dlpack else torch.device("cpu")

    @classmethod
    def open(
        cls,
        path: str | Path,
        checkpoint: Checkpoint,
        task: str,
        device: torch.device | str = "cpu",
        fp16: bool = False,
        *,
        batch_shape: Sequence[int] | None = None,
    ) -> OnnxBackend:
        """The export at ``path`` if it was made from ``checkpoint`` for ``task`` (ModelError naming it otherwise)."""
        from ctfm_engine.models.registry import cache_dir

        check_export(path, checkpoint, task)
        engine_cache = cache_dir() / "onnx" / "tensorrt" / f"{task}-{checkpoint.sha256[:16]}{'-fp16' if fp16 else ''}"
        return cls(path, device, fp16, batch_shape=batch_shape, engine_cache=engine_cache)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.on_gpu:
            return self._run_on_gpu(batch)
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        (output,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(output)

    def _run_on_gpu(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.detach().to(self.device, torch.float32).contiguous()
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", self.device.index, np.float32, tuple(batch.shape),
                           batch.data_ptr())
        binding.bind_output(self.output_name, "cuda", self.device.index)
        # onnxruntime computes on its own CUDA stream: the copy that filled ``batch`` must be finished first.
        torch.cuda.synchronize(self.device)
        self.session.run_with_iobinding(binding)
        if self.dlpack:
            return torch.from_dlpack(binding.get_outputs()[0])
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0])
