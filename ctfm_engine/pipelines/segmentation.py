"""Whole-body segmentation from input scan to labels on the source grid, once, for every face.

:func:`run_segmentation` reads and validates the input, resolves the weights by the one policy
(:mod:`ctfm_engine.models.registry`), loads the checkpoint with the settings it was trained with, builds the runtime
backend (PyTorch, or onnxruntime on an exported file), runs the streamed sliding window and maps the labels back
onto the input's own grid.  The result knows how to write itself (label map, volume table, DICOM-SEG, measurement
table and measurement SR) so no face assembles a writer's arguments either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_engine import __version__
from ctfm_engine.errors import InputError, UsageError
from ctfm_engine.labels import Label
from ctfm_engine.models.registry import SEGMENTATION, announce, resolve_weights
from ctfm_engine.pipelines.inputs import Scan, ScanSource, as_source, read_scan, sample_ct_path
from ctfm_engine.preprocess import Preprocessing
from ctfm_engine.progress import CancelCheck, Progress, check_cancelled
from ctfm_engine.runtime.backends import Backend, check_backend_choice
from ctfm_engine.runtime.selection import Choice, Runtime
from ctfm_engine.tasks.measure import StructureStatistics, structure_statistics, write_measurement_table
from ctfm_engine.tasks.segment import (
    MemoryEstimate,
    Segmentation,
    SegmentationModel,
    available_memory_bytes,
    check_window,
    estimate_memory,
    open_segmentation_model,
    segment,
    write_volume_table,
)
from ctfm_engine.volume import CTVolume

log = logging.getLogger("ctfm_engine.segmentation")

SEG_ENCODINGS = ("binary", "binary-j2k", "labelmap", "labelmap-rle", "labelmap-jpegls")


@dataclass(frozen=True)
class SegmentationRequest:
    """One segmentation: the input, the model, the runtime, the window, the post-processing.

    ``weights`` is a checkpoint folder or hub repo id; None lets the weights policy choose (``CTFM_SEG_WEIGHTS``,
    the published whole_body_segmentation in the cache, then the bundled demonstration model).  ``roi_size_zyx``
    and ``overlap`` default to the checkpoint's own.  ``needs_dicom`` refuses, before any model loads, an input
    that is not a DICOM series (a DICOM-SEG must reference one).
    """

    input: Scan
    weights: str | Path | None = None
    series_uid: str | None = None
    hu_offset: float | None = None
    # "auto": the fastest runtime of this machine whose labels agree with PyTorch fp32 (measured once, cached;
    # CTFM_BACKEND pins another default); "torch", "onnx" or "openvino" force one
    backend: str = "auto"
    onnx_file: Path | None = None
    device: str = "cpu"
    fp16: bool = False  # the older spelling of precision="fp16"
    precision: str | None = None  # fp32 | bf16 | fp16; None: fp32 (auto: whichever qualifies)
    roi_size_zyx: tuple[int, int, int] | None = None
    overlap: float | None = None
    batch_size: int = 1
    largest_component: bool | None = None  # None: the model's own post-processing (the published model: on)
    spacing: str | float | None = None  # None: the spacing the model was trained at; "native"; or mm (isotropic)
    needs_dicom: bool = False
    progress: Progress | None = field(default=None, compare=False)
    cancel: CancelCheck | None = field(default=None, compare=False)

    def check(self) -> None:
        """UsageError for settings no model could run with; called before anything is read."""
        check_backend_choice(self.backend, self.onnx_file, self.precision)
        if self.backend == "auto" and self.onnx_file is not None:
            raise UsageError("an ONNX file goes with the onnx or openvino backend, not auto")
        if self.batch_size < 1:
            raise UsageError(f"batch size {self.batch_size}: must be at least 1")
        if self.roi_size_zyx is not None or self.overlap is not None:
            check_window(self.roi_size_zyx or (16, 16, 16), 0.0 if self.overlap is None else self.overlap)
        spacing_choice(self.spacing)


@dataclass(frozen=True)
class SegmentationOutcome:
    """Labels on the input's own grid, what they mean, and where they came from."""

    segmentation: Segmentation
    model: SegmentationModel
    roi_size_zyx: tuple[int, int, int]
    overlap: float
    backend: str
    device: str
    seconds: float
    largest_component: bool
    spacing: str  # "trained", "native" or "set"
    memory: MemoryEstimate | None = None
    runtime: Choice | None = None

    @property
    def labels(self) -> np.ndarray:
        """The label map (z, y, x) on the input's own grid."""
        return self.segmentation.labels

    @property
    def volume(self) -> CTVolume:
        return self.segmentation.volume

    @property
    def names(self) -> dict[int, str]:
        return self.model.names

    @property
    def label_table(self) -> dict[int, Label]:
        return self.model.labels()

    @property
    def weights(self) -> dict[str, Any]:
        """``{"name", "sha256", "demonstration"}`` of the checkpoint used."""
        return self.model.checkpoint.identity

    def structures(self) -> list[dict[str, Any]]:
        """Present structures, largest first: label, name, voxels and volume in mL."""
        return self.segmentation.structures(self.names)

    def label_rows(self) -> list[dict[str, Any]]:
        """Each present structure with its coding (value, name, laterality, SNOMED), voxels, mL, removed voxels."""
        table, rows = self.label_table, []
        for row in self.structures():
            described = table[row["label"]].as_dict() if row["label"] in table else {"value": row["label"]}
            rows.append({**described, "name": row["name"], "voxels": row["voxels"], "volume_ml": row["volume_ml"],
                         "removed_voxels": self.segmentation.removed_voxels.get(row["label"], 0)})
        return rows

    def describe_model(self) -> dict[str, Any]:
        """How the model was run: its settings with this run's window, spacing and post-processing."""
        spacing = self.preprocessing.describe()["spacing_zyx_mm"]
        return {**self.model.describe(), "preprocessing": self.preprocessing.describe(),
                "roi_size_zyx": list(self.roi_size_zyx), "overlap": self.overlap,
                "spacing": {"choice": self.spacing, "spacing_zyx_mm": spacing,
                            "meaning": SPACING_MEANINGS[self.spacing]},
                "largest_component": self.largest_component,
                "runtime": None if self.runtime is None else self.runtime.describe(),
                "post_processing": ("largest connected component of each label, in model space before inversion"
                                    if self.largest_component else "none (arg-max labels as they are)")}

    @property
    def preprocessing(self) -> Preprocessing:
        return self.segmentation.preprocessing or self.model.preprocessing

    def write_labels(self, path: str | Path) -> Path:
        """The label map (NIfTI/NRRD/MHA) on the input's grid, atomically."""
        return self.segmentation.write(path)

    def write_volume_table(self, path: str | Path) -> Path:
        """The per-structure table (value, name, voxels, mL, laterality, SNOMED, colour) as CSV, atomically."""
        return write_volume_table(self.structures(), self.label_table, path)

    def algorithm(self) -> Any:
        """The DICOM algorithm record (name, version, weights sha256, demonstration, published status, spacing and
        post-processing) of this result."""
        from ctfm_engine.dicom.seg import Algorithm

        spacing = self.preprocessing.describe()["spacing_zyx_mm"]
        settings = {"spacing_zyx_mm": spacing if spacing == "native" else "x".join(f"{mm:g}" for mm in spacing),
                    "largest_component": "on" if self.largest_component else "off"}
        return Algorithm.from_identity(self.weights, __version__, settings)

    def write_dicom_seg(self, path: str | Path, encoding: str = "binary") -> Any:
        """The labels as a DICOM-SEG of the input series (needs a DICOM input and at least one structure)."""
        from ctfm_engine.dicom.seg import SegEncoding, write_dicom_seg

        if not self.labels.any():
            raise InputError(f"{self.volume.source}: no structure was found, and a DICOM-SEG needs at least one")
        return write_dicom_seg(self.labels, self.volume, self.label_table, path, algorithm=self.algorithm(),
                               encoding=SegEncoding(encoding))

    @cached_property
    def statistics(self) -> list[StructureStatistics]:
        """Volume and HU statistics of each present structure on the input's grid, in label-value order (computed
        once; :mod:`ctfm_engine.tasks.measure`)."""
        return structure_statistics(self.labels, self.volume, self.names)

    def measurements(self) -> list[dict[str, Any]]:
        """:attr:`statistics` as JSON-ready rows: value, name, voxels, volume_ml and the hu_* statistics."""
        return [row.as_dict() for row in self.statistics]

    def write_measurements(self, path: str | Path) -> Path:
        """The measurements as CSV or JSON (by the suffix), atomically."""
        return write_measurement_table(self.measurements(), path)

    def write_measurements_sr(self, path: str | Path, seg_info: Any) -> Any:
        """The measurements as a TID 1500 measurement SR referencing the segments of the DICOM-SEG that
        :meth:`write_dicom_seg` wrote (``seg_info``) and the input series."""
        from ctfm_engine.dicom.measurements_sr import write_measurements_sr

        if not self.labels.any():
            raise InputError(f"{self.volume.source}: no structure was found, and a measurement SR needs at least one")
        return write_measurements_sr(self.statistics, self.volume, seg_info, self.label_table, path,
                                     algorithm=self.algorithm())


def open_model(weights: str | Path | None = None) -> SegmentationModel:
    """The segmentation model the policy picks for ``weights`` (announced when it is a demonstration model)."""
    model = open_segmentation_model(resolve_weights(weights, SEGMENTATION))
    announce(model.checkpoint)
    return model


SPACING_MEANINGS = {
    "trained": "the voxel size the model was trained at (default)",
    "native": "the scan's own voxels, as the model card's snippet",
    "set": "a voxel size chosen for this run",
}


def spacing_choice(spacing: str | float | None) -> tuple[str, tuple[float, float, float] | None]:
    """("trained" | "native" | "set", the mm for "set") of a request's spacing; UsageError for anything else."""
    if spacing is None or spacing == "trained":
        return "trained", None
    if isinstance(spacing, str) and spacing.strip().lower() == "native":
        return "native", None
    try:
        mm = float(spacing)
    except (TypeError, ValueError):
        raise UsageError(f"spacing {spacing!r}: give 'native' or a voxel size in mm (e.g. 1.5)") from None
    if not 0.1 <= mm <= 10.0:
        raise UsageError(f"spacing {mm:g} mm: a CT voxel size is between 0.1 and 10 mm")
    return "set", (mm, mm, mm)


def run_segmentation(request: SegmentationRequest) -> SegmentationOutcome:
    """Segment ``request.input``: validate settings and input, load the model, run, map back to the source grid."""
    request.check()
    volume = read_scan(as_source(request.input, request.series_uid, request.hu_offset))
    if request.needs_dicom and not volume.dicom.files:
        raise InputError(f"{volume.source}: a DICOM-SEG needs the DICOM series it describes, and this input is an "
                         f"image file; give the series folder")
    from ctfm_engine.runtime.device import resolve_device

    device = resolve_device(request.device)
    model = open_model(request.weights)
    roi = tuple(request.roi_size_zyx) if request.roi_size_zyx is not None else model.roi_size_zyx
    overlap = model.overlap if request.overlap is None else float(request.overlap)
    spacing, set_mm = spacing_choice(request.spacing)
    preprocessing = model.preprocessing
    if spacing != "trained":
        preprocessing = replace(preprocessing, spacing_zyx_mm=set_mm)
    largest_component = model.largest_component if request.largest_component is None else request.largest_component
    memory = check_memory(volume, preprocessing, model, roi, request.batch_size)
    check_cancelled(request.cancel)
    choice = runtime_choice(model, request, device, roi)
    backend, head = segmentation_backend(model, volume, request, device, roi, choice.runtime)
    log.info("segmentation model %s (sha256 %s), %s, windows %s overlap %.3g, spacing %s, largest component %s",
             model.checkpoint.name, model.checkpoint.sha256[:12], backend.name, "x".join(map(str, roi)), overlap,
             preprocessing.describe()["spacing_zyx_mm"], "on" if largest_component else "off")
    started = time.perf_counter()
    result = segment(volume, preprocessing=preprocessing, roi_size_zyx=roi, overlap=overlap, backend=backend,
                     head=head, batch_size=request.batch_size, largest_component=largest_component,
                     progress=request.progress, cancel=request.cancel)
    return SegmentationOutcome(result, model, roi, overlap, backend.name, str(device),
                               time.perf_counter() - started, largest_component, spacing, memory, choice)


def check_memory(volume: CTVolume, preprocessing: Preprocessing, model: SegmentationModel,
                 roi: tuple[int, int, int], batch_size: int) -> MemoryEstimate:
    """The run's peak memory from its grids, refused (InputError) before anything is allocated when it is more than
    this machine has available."""
    estimate = estimate_memory(volume.grid, preprocessing, int(model.network.init_filters), roi, batch_size)
    available = available_memory_bytes()
    log.info("model grid %s voxels (z, y, x), about %.1f GiB at the peak", "x".join(map(str, estimate.model_shape_zyx)),
             estimate.bytes_needed / 2**30)
    if available is not None and estimate.bytes_needed > available:
        spacing = " x ".join(f"{mm:g}" for mm in preprocessing.spacing_for(volume.grid))
        size = " x ".join(map(str, volume.shape_zyx))
        raise InputError(f"{volume.source}: at {spacing} mm voxels (z, y, x) its {size} voxels become "
                         f"{estimate.describe()}, more than the {available / 2**30:.1f} GiB this machine has "
                         f"available", remedy="spacing")
    return estimate


def runtime_choice(model: SegmentationModel, request: SegmentationRequest, device: Any,
                   roi: tuple[int, int, int]) -> Choice:
    """The runtime this segmentation runs on: the one requested, or with ``auto`` the fastest of this machine whose
    labels agree with PyTorch fp32 on a real CT window (measured once per machine, model, window and batch;
    :mod:`ctfm_engine.runtime.selection`).  ``CTFM_BACKEND`` pins another default than auto."""
    from ctfm_engine.runtime.selection import cache_name, choose_runtime, label_agreement, requested

    precision = request.precision or ("fp16" if request.fp16 else None)
    forced = requested(request.backend, precision)
    if forced is not None:
        return forced
    from ctfm_engine.models.registry import cache_dir
    from ctfm_engine.models.segmentation import inference_network

    key = {"task": "segmentation", "weights_sha256": model.checkpoint.sha256, "roi_size_zyx": list(roi),
           "batch_size": request.batch_size, "precision": precision}
    _, head = inference_network(model.network)
    sample_volume: list[CTVolume] = []

    def sample() -> Any:
        from ctfm_engine.runtime.onnx_export import validation_sample

        sample_volume.append(read_scan(ScanSource(sample_ct_path())))
        return validation_sample(sample_volume[0], "segmentation", model.preprocessing, roi)

    def build(runtime: Runtime) -> Backend:
        return segmentation_backend(model, sample_volume[0], request, device, roi, runtime)[0]

    return choose_runtime(key, device, build, sample, label_agreement(head), cache_dir() / "runtime" / cache_name(
        "segmentation", model.checkpoint.sha256, key), progress=lambda line: log.warning("%s", line),
        precision=precision)


def segmentation_backend(model: SegmentationModel, volume: CTVolume, request: SegmentationRequest, device: Any,
                         roi: tuple[int, int, int], runtime: Runtime) -> tuple[Backend, Any]:
    """(backend, head) for ``runtime``: the backend runs the network's trunk and the 1x1x1 head is applied after
    blending, unless an ONNX file exported with full logits (task ``segmentation``) is given."""
    from ctfm_engine.models.segmentation import feature_head, inference_network
    from ctfm_engine.runtime.backends import OnnxBackend, TorchBackend

    module, head = inference_network(model.network)
    if runtime.backend == "torch":
        return TorchBackend(module, device, precision=runtime.precision), head
    from ctfm_engine.runtime.onnx_backend import TASK_KEY, read_export_metadata
    from ctfm_engine.runtime.onnx_export import onnx_for, validation_sample

    task = "segmentation-trunk" if head is not None else "segmentation"
    if request.onnx_file is not None:
        task = read_export_metadata(request.onnx_file).get(TASK_KEY, "segmentation")
        head = feature_head(model.network) if task == "segmentation-trunk" else None
        path = request.onnx_file
    else:
        sample = validation_sample(volume, task, model.preprocessing, roi)
        path = onnx_for(model.checkpoint, task, model.network, sample)  # the trunk is cut out by the exporter
    channels = int(model.checkpoint.config.get("in_channels", 1))
    batch_shape = (request.batch_size, channels, *roi)
    if runtime.backend == "openvino":
        from ctfm_engine.runtime.openvino_backend import OpenVinoBackend

        if device.type != "cpu":  # a torch.device: run_segmentation resolved it
            raise UsageError("the openvino backend runs on the CPU here: pass --device cpu, or another backend")
        return OpenVinoBackend.open(path, model.checkpoint, task, runtime.precision, batch_shape=batch_shape), head
    backend = OnnxBackend.open(path, model.checkpoint, task, device, fp16=runtime.precision == "fp16",
                               batch_shape=batch_shape)
    return backend, head

