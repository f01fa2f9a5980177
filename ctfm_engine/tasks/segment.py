"""Whole-body segmentation with a SegResNetDS checkpoint: sliding window in model space, labels on the source grid.

The checkpoint is read strictly from the Hugging Face layout (``config.json`` holds only the SegResNetDS constructor
arguments, so lighter-zoo loads it too; an optional ``ctfm_inference.json`` beside it says how the model was trained
to see CT: spacing, HU window, foreground crop, window size, overlap and label names).  The CT goes through that
preprocessing; Gaussian-blended sliding-window logits are arg-maxed in model space; the label map is mapped back
(nearest neighbour) onto the input's own voxel grid: same size, spacing, origin and direction.

Memory stays bounded on large scans: windows are visited slab by slab along z, and a plane is arg-maxed and its
buffer dropped as soon as no later window covers it, so the blend buffer holds one window depth of planes, not the
whole volume.  And it blends features, not logits: SegResNetDS's output head is a 1x1x1 convolution (per-voxel
linear), so the windows' ``init_filters``-channel decoder features are blended and the head is applied once per
voxel, instead of computing and blending 118 logits per voxel in every window that covers it.  The blend is
MONAI's (same window positions, same Gaussian importance map), so the labels equal MONAI
``sliding_window_inference`` + arg-max up to float rounding (tested on real CT).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.data.utils import compute_importance_map
from monai.networks.nets import SegResNetDS

from ctfm_engine.errors import ModelError, UsageError
from ctfm_engine.io import atomic_output, write_image
from ctfm_engine.labels import Label, label_table, totalsegmentator_names
from ctfm_engine.models.checkpoint import Checkpoint, load_state_strict, read_checkpoint
from ctfm_engine.models.segmentation import inference_network
from ctfm_engine.preprocess import CTFM_PREPROCESSING, ModelInput, Preprocessing, preprocess
from ctfm_engine.progress import CancelCheck, Progress, check_cancelled
from ctfm_engine.runtime.backends import Backend, TorchBackend
from ctfm_engine.volume import CTVolume, Grid

__all__ = ["totalsegmentator_names", "SegmentationModel", "Segmentation", "segment", "load_segmentation_model",
           "open_segmentation_model", "sliding_window_labels", "predict_model_space"]

log = logging.getLogger(__name__)

# The window the shipped ctfm-mini-wholebody-seg was trained and validated with (training/finetune_seg_mini_cpu.yaml).
DEFAULT_ROI_ZYX = (32, 128, 128)
DEFAULT_OVERLAP = 0.5
INFERENCE_FILE = "ctfm_inference.json"  # beside config.json: how the model sees CT (never passed to SegResNetDS)

# project-lighter/whole_body_segmentation: trained on TotalSegmentator "processed" data, 1.5 mm isotropic (the
# TotalSegmentator scans the authors ship with their search app are; the card itself has no Spacing step), SPL,
# CropForeground on the scaled image (> -1024 HU), window -1024..2048, 96x160x160 windows at 0.625 (the CT-FM
# evaluation's inferer), and the card's post-processing: the largest connected component of each label, kept in
# model space before the labels are inverted onto the input.
PUBLISHED_WHOLE_BODY = {
    "spacing_zyx_mm": [1.5, 1.5, 1.5], "hu_window": [-1024.0, 2048.0], "foreground_above_hu": -1024.0,
    "roi_size_zyx": [96, 160, 160], "overlap": 0.625, "labels": "totalsegmentator_v2", "largest_component": True,
}


@dataclass(frozen=True)
class SegmentationModel:
    """A loaded segmentation network with everything inference needs to use it as it was trained."""

    network: SegResNetDS
    checkpoint: Checkpoint
    preprocessing: Preprocessing
    roi_size_zyx: tuple[int, int, int]
    overlap: float
    names: dict[int, str]
    settings_source: str  # "checkpoint", "published whole_body_segmentation recipe" or "defaults"
    largest_component: bool = False  # the post-processing this model runs with by default

    @property
    def out_channels(self) -> int:
        return int(self.network.out_channels)

    def labels(self) -> dict[int, Label]:
        return label_table(self.names)

    def describe(self) -> dict[str, Any]:
        return {"preprocessing": self.preprocessing.describe(), "roi_size_zyx": list(self.roi_size_zyx),
                "overlap": self.overlap, "out_channels": self.out_channels, "settings": self.settings_source,
                "largest_component": self.largest_component}


def inferred_decoder_config(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """``out_channels`` and ``dsdepth`` as the weights show them: one output head per deep-supervision level, the
    finest head's rows are the classes.  lighter-zoo loads a ``config.json`` without them (non-strictly); here they
    are read from the keys and shapes, and the strict load then checks every key and shape against them."""
    heads = sorted({int(key.split(".")[1]) for key in state_dict
                    if key.startswith("up_layers.") and key.endswith(".head.weight")})
    if not heads:
        return {}
    return {"out_channels": int(state_dict[f"up_layers.{heads[-1]}.head.weight"].shape[0]), "dsdepth": len(heads)}


def load_segmentation_model(weights: str | Path) -> tuple[SegResNetDS, Checkpoint]:
    """A SegResNetDS in eval mode with every weight of ``weights`` loaded (ModelError naming what is wrong)."""
    checkpoint = read_checkpoint(weights)
    if not any(key.startswith("up_layers.") for key in checkpoint.state_dict):
        raise ModelError(f"{checkpoint.folder}: not a segmentation checkpoint (no decoder in model.safetensors; "
                         "an encoder checkpoint embeds, it does not segment)")
    config = {**inferred_decoder_config(checkpoint.state_dict), **checkpoint.config}
    try:
        network = SegResNetDS(**config)
    except TypeError as error:
        raise ModelError(f"{checkpoint.folder}/config.json: not a SegResNetDS configuration ({error})") from None
    load_state_strict(network, checkpoint.state_dict, str(checkpoint.folder))
    return network.eval(), checkpoint


def read_inference_settings(folder: Path) -> dict | None:
    """The ``ctfm_inference.json`` of a checkpoint folder, or None when it has none."""
    path = Path(folder) / INFERENCE_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(settings, dict):
        raise ModelError(f"{path}: expected a JSON object of inference settings")
    return settings


def write_inference_settings(folder: Path, settings: dict) -> Path:
    """Write ``ctfm_inference.json`` into a checkpoint folder, atomically."""
    path = Path(folder) / INFERENCE_FILE
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(settings, indent=2) + "\n")
    return path


def open_segmentation_model(weights: str | Path, expect_channels: int | None = None) -> SegmentationModel:
    """Load a segmentation checkpoint and the settings it was trained with (config block, published recipe, defaults).

    ``expect_channels`` (e.g. 118 for whole-body) refuses a checkpoint with another number of classes.
    """
    network, checkpoint = load_segmentation_model(weights)
    channels = int(network.out_channels)
    if expect_channels is not None and channels != expect_channels:
        raise ModelError(f"{checkpoint.folder}: the checkpoint has {channels} output classes, not the "
                         f"{expect_channels} this task needs (whole body: background + 117 TotalSegmentator v2)")
    settings = read_inference_settings(checkpoint.folder)
    source = "checkpoint"
    if settings is None and channels == 118 and int(network.init_filters) == 32:
        settings, source = PUBLISHED_WHOLE_BODY, "published whole_body_segmentation recipe"
    elif settings is None:
        settings, source = {}, "defaults"
        log.warning("%s: config.json does not say how the model was trained to see CT; using CT-FM preprocessing "
                    "and %s windows", checkpoint.name, "x".join(map(str, DEFAULT_ROI_ZYX)))
    try:
        preprocessing = Preprocessing(
            spacing_zyx_mm=tuple(float(v) for v in settings.get("spacing_zyx_mm", CTFM_PREPROCESSING.spacing_zyx_mm)),
            hu_window=tuple(float(v) for v in settings.get("hu_window", CTFM_PREPROCESSING.hu_window)),
            foreground_above_hu=settings.get("foreground_above_hu", CTFM_PREPROCESSING.foreground_above_hu),
        )
        roi = tuple(int(v) for v in settings.get("roi_size_zyx", DEFAULT_ROI_ZYX))
        overlap = float(settings.get("overlap", DEFAULT_OVERLAP))
        largest_component = settings.get("largest_component", False)
        if not isinstance(largest_component, bool):
            raise TypeError(f"largest_component must be true or false, got {largest_component!r}")
    except (TypeError, ValueError) as error:
        raise ModelError(f"{checkpoint.folder}/{INFERENCE_FILE}: unreadable settings ({error})") from None
    labels = settings.get("labels", "totalsegmentator_v2" if channels == 118 else None)
    if isinstance(labels, dict):
        names = {int(key): str(name) for key, name in labels.items()}
    elif labels == "totalsegmentator_v2":
        names = totalsegmentator_names()
    else:
        names = {value: f"label_{value}" for value in range(1, channels)}
    return SegmentationModel(network, checkpoint, preprocessing, roi, overlap, names, source,  # type: ignore[arg-type]
                             largest_component)


# Peak activation memory of one SegResNetDS trunk window, as a multiple of (window voxels x init_filters x 4 bytes):
# measured as the peak-RSS growth of PyTorch eager on CPU under inference_mode: 5.6 (init_filters 32, 32x128x128),
# 5.7 (32, 96x160x160), 10.2 (8, 32x128x128: fixed buffers weigh more on a narrow network); the wide case rounded up,
# a narrow network is small whatever the factor.
ACTIVATION_FACTOR = 8


@dataclass(frozen=True)
class MemoryEstimate:
    """What a segmentation will hold at its peak, computed from the grids before anything is allocated."""

    model_shape_zyx: tuple[int, int, int]
    source_shape_zyx: tuple[int, int, int]
    bytes_needed: int

    def describe(self) -> str:
        shape = " x ".join(map(str, self.model_shape_zyx))
        return f"a {shape} model grid (z, y, x), about {self.bytes_needed / 2**30:.1f} GiB"


def estimate_memory(source: Grid, preprocessing: Preprocessing, width: int, roi_size_zyx,
                    batch_size: int = 1) -> MemoryEstimate:
    """The peak memory of :func:`segment` for a scan on ``source``, from its model grid (before the foreground
    crop: an upper bound): the resampled HU and the scaled image (float32 each), the window blend of ``width``
    (the network's init_filters) feature planes one window deep, the model-space labels, the network's activations
    for a batch of windows, and the labels and clean-up maps on the source grid."""
    from ctfm_engine.preprocess import spl_grid

    grid = spl_grid(source, preprocessing.spacing_zyx_mm)
    shape = tuple(max(n, r) for n, r in zip(grid.shape_zyx, roi_size_zyx, strict=True))
    model_voxels = math.prod(shape)
    source_voxels = math.prod(source.shape_zyx)
    window_voxels = math.prod(int(r) for r in roi_size_zyx)
    plane = shape[1] * shape[2]
    needed = (model_voxels * (4 + 4 + 2)  # resampled HU, scaled image, labels
              + (width + 1) * int(roi_size_zyx[0]) * plane * 4  # blended features and weights
              + ACTIVATION_FACTOR * window_voxels * width * 4 * batch_size
              + source_voxels * 4)  # on the source grid: labels, the resampler's output and copy, removed map
    return MemoryEstimate(grid.shape_zyx, source.shape_zyx, int(needed))


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now (MemAvailable on Linux), or None when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_window(roi_size_zyx, overlap: float) -> tuple[tuple[int, int, int], float]:
    roi = tuple(int(v) for v in roi_size_zyx)
    if len(roi) != 3 or any(v < 16 or v % 16 for v in roi):
        raise UsageError(f"window size {' x '.join(map(str, roi))} (z, y, x): each side must be a multiple of 16, "
                         "at least 16 (the network halves the grid four times)")
    if not 0.0 <= overlap < 1.0:
        raise UsageError(f"window overlap {overlap}: must be at least 0 and below 1")
    return roi, float(overlap)  # type: ignore[return-value]


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis as MONAI's sliding_window_inference places them (the last flush with the end)."""
    if roi >= size:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)
    count = next(n for n in range(math.ceil(size / interval)) if n * interval + roi >= size) + 1
    return [min(n * interval, size - roi) for n in range(count)]


def sliding_window_labels(
    image: np.ndarray,
    backend: Backend,
    roi_size_zyx,
    overlap: float,
    batch_size: int = 1,
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> np.ndarray:
    """Arg-max labels of a model-space image (z, y, x) from Gaussian-blended windows, streamed slab by slab along z.

    The backend returns logits, or with ``head`` = (weight, bias) of a 1x1x1 output convolution, features that are
    blended and turned into logits once per voxel.  Images smaller than a window are padded with 0 (air after
    scaling) to the window size, as MONAI does, and cropped back.
    """
    roi, overlap = check_window(roi_size_zyx, overlap)
    size = tuple(int(n) for n in image.shape)
    padded = tuple(max(n, r) for n, r in zip(size, roi, strict=True))
    before = tuple((p - n) // 2 for n, p in zip(size, padded, strict=True))
    if padded == size:
        volume = np.ascontiguousarray(image, dtype=np.float32)
    else:
        volume = np.zeros(padded, dtype=np.float32)
        volume[tuple(slice(b, b + n) for b, n in zip(before, size, strict=True))] = image
    starts = [window_starts(n, r, overlap) for n, r in zip(padded, roi, strict=True)]
    total = math.prod(len(s) for s in starts)
    device = backend.output_device
    weight = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device=device, dtype=torch.float32)
    if head is not None:
        head = (head[0].to(device), head[1].to(device))
    labels = np.zeros(padded, dtype=np.int16)
    # planes [base, base + roi_z) of the blended output (channels, roi_z, Y, X) and, with a head, of the weights
    blended: torch.Tensor | None = None
    weights = torch.zeros((roi[0], padded[1], padded[2]), device=device) if head is not None else None
    base, done, classes = 0, 0, 0

    def arg_max(first: int, count: int) -> np.ndarray:
        if head is None:
            return blended[:, first:first + count].argmax(dim=0).cpu().numpy()
        out = np.empty((count, padded[1], padded[2]), dtype=np.int16)
        for plane in range(first, first + count):  # one plane of logits at a time: classes x Y x X
            logits = torch.einsum("kc,cyx->kyx", head[0], blended[:, plane]) + head[1][:, None, None] * weights[plane]
            out[plane - first] = logits.argmax(dim=0).cpu().numpy()
        return out

    def flush(upto: int) -> None:
        nonlocal base
        if blended is None or upto <= base:
            return
        count = upto - base
        labels[base:upto] = arg_max(0, count)
        for buffer in (blended, weights):
            if buffer is None:
                continue
            if count < roi[0]:
                buffer[..., :roi[0] - count, :, :] = buffer[..., count:, :, :].clone()
            buffer[..., roi[0] - count:, :, :] = 0
        base = upto

    positions = [(y, x) for y in starts[1] for x in starts[2]]
    for z in starts[0]:
        flush(z)
        for first in range(0, len(positions), batch_size):
            check_cancelled(cancel)
            chunk = positions[first:first + batch_size]
            batch = np.stack([volume[z:z + roi[0], y:y + roi[1], x:x + roi[2]] for y, x in chunk])[:, None]
            outputs = backend(torch.from_numpy(batch))
            if blended is None:
                blended = torch.zeros((outputs.shape[1], roi[0], padded[1], padded[2]), dtype=torch.float32,
                                      device=device)
                classes = outputs.shape[1] if head is None else head[0].shape[0]
            for (y, x), window in zip(chunk, outputs, strict=True):
                blended[:, :, y:y + roi[1], x:x + roi[2]].addcmul_(window, weight)
                if weights is not None:
                    weights[:, y:y + roi[1], x:x + roi[2]] += weight
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    flush(padded[0])
    crop = tuple(slice(b, b + n) for b, n in zip(before, size, strict=True))
    return labels[crop].astype(np.uint8 if classes <= 256 else np.int16)


def predict_model_space(
    network: torch.nn.Module, image: np.ndarray, roi_size_zyx=DEFAULT_ROI_ZYX, overlap: float = DEFAULT_OVERLAP,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Arg-max labels (uint8 for <= 256 classes) of a preprocessed model-space image, PyTorch eager."""
    module, head = inference_network(network)
    return sliding_window_labels(image, TorchBackend(module, device), roi_size_zyx, overlap, head=head)


@dataclass(frozen=True)
class Segmentation:
    labels: np.ndarray  # on the source grid, (z, y, x)
    volume: CTVolume
    removed_voxels: dict[int, int] = field(default_factory=dict)  # source voxels the component clean-up removed
    preprocessing: Preprocessing | None = None  # how the scan was brought to the model

    def structures(self, names: dict[int, str]) -> list[dict]:
        """Present structures, largest first: label, name, voxels and volume in mL."""
        voxel_ml = float(np.prod(self.volume.spacing_xyz_mm)) / 1000.0
        values, counts = np.unique(self.labels, return_counts=True)
        rows = [{"label": int(v), "name": names.get(int(v), f"label_{int(v)}"), "voxels": int(c),
                 "volume_ml": round(int(c) * voxel_ml, 2)} for v, c in zip(values, counts, strict=True) if v != 0]
        return sorted(rows, key=lambda row: -row["voxels"])

    def write(self, path: str | Path) -> Path:
        """The label map as NIfTI/NRRD/MHA on the input's grid, written atomically."""
        path = Path(path)
        image = sitk.GetImageFromArray(self.labels)
        image.CopyInformation(self.volume.to_sitk())
        return write_image(image, path)


def keep_largest_components(labels: np.ndarray) -> np.ndarray | None:
    """Keep only the largest 26-connected component of each label, in place (MONAI's
    KeepLargestConnectedComponent on an arg-max map: every label independently, full connectivity; ties go to the
    component met first in C order).  Returns a map of the removed voxels (their former labels, 0 elsewhere), or
    None when nothing was removed."""
    from scipy import ndimage

    structure = np.ones((3, 3, 3), dtype=bool)
    removed: np.ndarray | None = None
    for index, box in enumerate(ndimage.find_objects(labels.astype(np.int32, copy=False))):
        value = index + 1
        if box is None:
            continue
        mask = labels[box] == value
        components, count = ndimage.label(mask, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        drop = mask & (components != int(sizes.argmax()))
        labels[box][drop] = 0
        if removed is None:
            removed = np.zeros_like(labels)
        removed[box][drop] = value
    return removed


def segment(
    volume: CTVolume,
    network: torch.nn.Module | None = None,
    preprocessing: Preprocessing = CTFM_PREPROCESSING,
    roi_size_zyx=DEFAULT_ROI_ZYX,
    overlap: float = DEFAULT_OVERLAP,
    device: torch.device | str = "cpu",
    *,
    backend: Backend | None = None,
    batch_size: int = 1,
    largest_component: bool = False,
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Segmentation:
    """Preprocess, sliding window, labels back on the source grid.

    With ``network`` (and no ``backend``) PyTorch eager runs its trunk and the head is applied after blending; a
    ``backend`` returns logits, or features when ``head`` is given.
    """
    if backend is None:
        if network is None:
            raise ValueError("segment() needs a network or a backend")
        module, head = inference_network(network)
        backend = TorchBackend(module, device)
    model_input = preprocess(volume, preprocessing)
    check_cancelled(cancel)
    labels = sliding_window_labels(model_input.image, backend, roi_size_zyx, overlap, batch_size, progress, cancel,
                                   head)
    return to_source(model_input, labels, volume, largest_component)


def to_source(model_input: ModelInput, labels: np.ndarray, volume: CTVolume,
              largest_component: bool = False) -> Segmentation:
    """The optional largest-component clean-up in model space (where the card does it: after the arg-max, before
    the inversion), then the labels onto the source grid (nearest).  What the clean-up removed is counted on the
    source grid, so its voxels compare with the structures' own."""
    removed_map = keep_largest_components(labels) if largest_component else None
    on_source = model_input.to_source(labels, interpolation="nearest", fill=0)
    removed: dict[int, int] = {}
    if removed_map is not None:
        counts = np.bincount(model_input.to_source(removed_map, interpolation="nearest", fill=0).ravel())
        removed = {int(value): int(count) for value, count in enumerate(counts) if value and count}
    return Segmentation(on_source, volume, removed, model_input.preprocessing)


def write_volume_table(rows: list[dict], labels: dict[int, Label], path: str | Path) -> Path:
    """The per-structure table (value, name, voxels, mL, laterality, SNOMED type and colour) as CSV, atomically."""
    path = Path(path)
    with atomic_output(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["value", "name", "voxels", "volume_ml", "laterality", "snomed_type_code",
                         "snomed_type_meaning", "snomed_modifier_code", "color_rgb"])
        for row in rows:
            label = labels.get(row["label"])
            type_code = None if label is None else label.type
            modifier = None if label is None else label.type_modifier or label.region_modifier
            writer.writerow([row["label"], row["name"], row["voxels"], f"{row['volume_ml']:.2f}",
                             "" if label is None else label.laterality or "",
                             "" if type_code is None else type_code.value,
                             "" if type_code is None else type_code.meaning,
                             "" if modifier is None else modifier.value,
                             "" if label is None else " ".join(map(str, label.color_rgb))])
    return path
