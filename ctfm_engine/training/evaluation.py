"""Label-based checks of what an encoder learned, on labelled real CT.

Organ semantic-search hit rate: for each organ labelled in both a source and a target scan, embed a patch centred
on the organ's centroid in the source, slide the same patch over the target (the reference app's exhaustive
search), and count a hit when the best-matching window's centre lies inside the same organ in the target.  The
distance from the match to the target organ's centroid (mm) is the OCD of the CT-FM paper, without its bugs
(a true mask lookup; labels resampled nearest-neighbour; mm, not cm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctfm_engine.models.encoder import patch_embeddings
from ctfm_engine.preprocess import ModelInput, preprocess, read_labels_on
from ctfm_engine.tasks.embed import Embedder, PatchWindows
from ctfm_engine.volume import CTVolume, read_volume

# The reference semantic-search app's window: 16x64x64 voxels at 3x1x1 mm, overlap 0.625 (facts §6.1).
APP_WINDOWS = PatchWindows((16, 64, 64), 0.625)


@dataclass(frozen=True, eq=False)
class LabelledScan:
    """A CT volume and its label map resampled (nearest) onto the CT's own grid."""

    volume: CTVolume
    labels: np.ndarray

    @classmethod
    def read(cls, image: str | Path, labels: str | Path) -> LabelledScan:
        volume = read_volume(image)
        return cls(volume, read_labels_on(labels, volume.grid))

    def centroid_lps(self, label: int) -> np.ndarray:
        return self.volume.zyx_index_to_lps(np.argwhere(self.labels == label).mean(axis=0))

    def label_at(self, point_lps: np.ndarray) -> int:
        index = np.rint(self.volume.lps_to_zyx_index(point_lps)).astype(int)
        if np.any(index < 0) or np.any(index >= np.array(self.labels.shape)):
            return 0
        return int(self.labels[tuple(index)])


@dataclass(frozen=True)
class SearchResult:
    organ: int
    hit: bool
    distance_mm: float
    similarity: float


def query_vector(embedder: Embedder, model_input: ModelInput, point_lps: np.ndarray, size_zyx: tuple) -> np.ndarray:
    """Embedding of the patch centred on ``point_lps`` in model space (zero-padded where it leaves the volume)."""
    centre = np.rint(model_input.grid.lps_to_zyx_index(point_lps)).astype(int)
    size = np.array(size_zyx)
    start = centre - size // 2
    padded = np.pad(model_input.image, [(s, s) for s in size])
    first = start + size
    patch = padded[tuple(slice(f, f + s) for f, s in zip(first, size, strict=True))]
    with torch.inference_mode():
        batch = torch.from_numpy(np.ascontiguousarray(patch))[None, None].to(embedder.device)
        return patch_embeddings(embedder.encoder, batch)[0].float().cpu().numpy()


def organ_search(
    embedder: Embedder,
    source: LabelledScan,
    target: LabelledScan,
    organs: list[int],
    windows: PatchWindows = APP_WINDOWS,
) -> list[SearchResult]:
    """Search every organ of ``organs`` from ``source`` in ``target`` (see the module docstring)."""
    source_input, target_input = preprocess(source.volume), preprocess(target.volume)
    vectors, centres = embedder.patch_vectors(target_input, windows, batch_size=8)
    normalised = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    results = []
    for organ in organs:
        query = query_vector(embedder, source_input, source.centroid_lps(organ), windows.size_zyx)
        similarity = normalised @ (query / max(np.linalg.norm(query), 1e-12))
        best = int(np.argmax(similarity))
        match = centres[best]
        results.append(
            SearchResult(
                organ=organ,
                hit=target.label_at(match) == organ,
                distance_mm=float(np.linalg.norm(match - target.centroid_lps(organ))),
                similarity=float(similarity[best]),
            )
        )
    return results


def shared_organs(first: LabelledScan, second: LabelledScan, minimum_voxels: int = 50) -> list[int]:
    """Labels present (with at least ``minimum_voxels``) in both scans."""

    def present(scan: LabelledScan) -> set[int]:
        values, counts = np.unique(scan.labels, return_counts=True)
        return {int(v) for v, c in zip(values, counts, strict=True) if v != 0 and c >= minimum_voxels}

    return sorted(present(first) & present(second))
