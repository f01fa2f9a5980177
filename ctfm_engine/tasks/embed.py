"""Scan and patch embeddings with CT-FM, and the npz file that carries them with their provenance.

Scan level: the whole preprocessed volume through the encoder, last feature map, global average pool (facts
§1.3).  Patch level: a sliding window over the preprocessed volume (3D-MIR recipe: 24x128x128 voxels, overlap
0.625, zero end-padding) whose patch embeddings are aggregated by element-wise min, mean or max.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets.segresnet_ds import SegResEncoder

from ctfm_engine.io import atomic_output
from ctfm_engine.models.encoder import DEFAULT_MEMORY_BUDGET_BYTES, patch_embeddings, scan_embedding
from ctfm_engine.preprocess import CTFM_PREPROCESSING, ModelInput, Preprocessing, preprocess
from ctfm_engine.volume import CTVolume

LEVELS = ("scan", "patch")
AGGREGATIONS = {"min": np.min, "mean": np.mean, "max": np.max}
MIR_PATCH_SIZE_ZYX = (24, 128, 128)
MIR_OVERLAP = 0.625

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PatchWindows:
    """Sliding-window layout: patch size in model voxels (z, y, x) and fractional overlap."""

    size_zyx: tuple[int, int, int] = MIR_PATCH_SIZE_ZYX
    overlap: float = MIR_OVERLAP

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if min(self.size_zyx) < 1:
            raise ValueError(f"patch size must be positive, got {self.size_zyx}")

    @property
    def step_zyx(self) -> tuple[int, ...]:
        return tuple(max(1, round(size * (1.0 - self.overlap))) for size in self.size_zyx)

    def starts(self, shape_zyx: Sequence[int]) -> list[tuple[int, int, int]]:
        """Patch corners covering the volume; the last patch on an axis may run past its end (zero-padded)."""
        per_axis = []
        for length, size, step in zip(shape_zyx, self.size_zyx, self.step_zyx, strict=True):
            count = 1 if length <= size else math.ceil((length - size) / step) + 1
            per_axis.append([index * step for index in range(count)])
        return list(product(*per_axis))  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class Embedding:
    """One input's embedding, with the patch embeddings it was aggregated from (patch level)."""

    input: str
    series_instance_uid: str | None
    vector: np.ndarray
    level: str
    model_shape_zyx: tuple[int, int, int]
    aggregation: str | None = None
    patch_vectors: np.ndarray | None = None
    patch_centres_lps: np.ndarray | None = None


class Embedder:
    """Embeds CTVolumes with one loaded encoder on one device."""

    def __init__(
        self,
        encoder: SegResEncoder,
        device: torch.device | str = "cpu",
        preprocessing: Preprocessing = CTFM_PREPROCESSING,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    ) -> None:
        self.device = torch.device(device)
        self.encoder = encoder.eval().to(self.device)
        self.preprocessing = preprocessing
        self.memory_budget_bytes = memory_budget_bytes

    def embed(
        self,
        volume: CTVolume,
        level: str = "scan",
        *,
        windows: PatchWindows = PatchWindows(),
        aggregation: str = "min",
        batch_size: int = 4,
        progress: Progress | None = None,
        model_input: ModelInput | None = None,
    ) -> Embedding:
        """Embed ``volume``; ``model_input`` may carry its preprocessing when the caller already has it."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if model_input is None:
            model_input = preprocess(volume, self.preprocessing)
        common = {
            "input": volume.source,
            "series_instance_uid": volume.series_instance_uid,
            "level": level,
            "model_shape_zyx": model_input.grid.shape_zyx,
        }
        if level == "scan":
            return Embedding(vector=self.scan_vector(model_input), **common)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {sorted(AGGREGATIONS)}, got {aggregation!r}")
        vectors, centres = self.patch_vectors(model_input, windows, batch_size, progress)
        return Embedding(
            vector=AGGREGATIONS[aggregation](vectors, axis=0).astype(np.float32),
            aggregation=aggregation,
            patch_vectors=vectors,
            patch_centres_lps=centres,
            **common,
        )

    @torch.inference_mode()
    def scan_vector(self, model_input: ModelInput) -> np.ndarray:
        image = torch.from_numpy(model_input.image)[None, None].to(self.device)
        vector = scan_embedding(self.encoder, image, memory_budget_bytes=self.memory_budget_bytes)
        return vector[0].float().cpu().numpy()

    @torch.inference_mode()
    def patch_vectors(
        self, model_input: ModelInput, windows: PatchWindows, batch_size: int, progress: Progress | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (N, C) of every window and the LPS centres (N, 3) of the windows."""
        image = model_input.image
        size = np.array(windows.size_zyx)
        starts = windows.starts(image.shape)
        vectors = []
        for first in range(0, len(starts), batch_size):
            batch = np.zeros((len(starts[first : first + batch_size]), 1, *size), dtype=np.float32)
            for row, (z, y, x) in enumerate(starts[first : first + batch_size]):
                patch = image[z : z + size[0], y : y + size[1], x : x + size[2]]
                batch[row, 0, : patch.shape[0], : patch.shape[1], : patch.shape[2]] = patch
            vectors.append(patch_embeddings(self.encoder, torch.from_numpy(batch).to(self.device)).float().cpu())
            if progress is not None:
                progress(min(first + batch_size, len(starts)), len(starts))
        centres_zyx = np.array(starts, dtype=np.float64) + (size - 1) / 2.0
        return torch.cat(vectors).numpy(), model_input.grid.zyx_index_to_lps(centres_zyx)


def write_embeddings(
    embeddings: Sequence[Embedding], path: str | Path, *, weights: dict[str, str], preprocessing: Preprocessing,
    preprocessing_choice: str | None = None,
) -> Path:
    """Write embeddings and their provenance to an ``.npz`` file atomically (numpy.load opens it).

    Arrays: ``embeddings`` (N, C) float32, ``inputs`` and ``series_instance_uids`` (N,); patch level adds
    ``patch_embeddings`` (M, C), ``patch_input_index`` (M,) and ``patch_centres_lps`` (M, 3) in mm.  ``metadata``
    holds a JSON document: weights name and sha256, preprocessing, level, aggregation, model-space shapes.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: embeddings are written as .npz")
    metadata = {
        "weights": weights,
        "preprocessing": preprocessing.describe(),
        "preprocessing_choice": preprocessing_choice,
        "level": embeddings[0].level,
        "aggregation": embeddings[0].aggregation,
        "model_shapes_zyx": [list(item.model_shape_zyx) for item in embeddings],
        "coordinates": "patient LPS millimetres",
    }
    arrays: dict[str, np.ndarray] = {
        "embeddings": np.stack([item.vector for item in embeddings]).astype(np.float32),
        "inputs": np.array([item.input for item in embeddings]),
        "series_instance_uids": np.array([item.series_instance_uid or "" for item in embeddings]),
        "metadata": np.array(json.dumps(metadata)),
    }
    if len({item.level for item in embeddings}) != 1:
        raise ValueError("one embeddings file holds one level (scan or patch)")
    if embeddings[0].level == "patch":
        arrays["patch_embeddings"] = np.concatenate([item.patch_vectors for item in embeddings]).astype(np.float32)
        arrays["patch_input_index"] = np.concatenate(
            [np.full(len(item.patch_vectors), index) for index, item in enumerate(embeddings)]
        )
        arrays["patch_centres_lps"] = np.concatenate([item.patch_centres_lps for item in embeddings])
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, **arrays)
    return path
