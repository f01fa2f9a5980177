"""Label-based checks of what an encoder learned, on labelled real CT.

Organ search (the OCD of the CT-FM paper) is :func:`ctfm_engine.tasks.ocd.organ_centroid_distances`; this module
holds the scans it and the checks below run on (:class:`LabelledScan`).

Patch label transfer: organ search made dense, for statistical power on few scans.  Every window of the target
whose centre lies in a labelled structure is matched to its most similar window of the source; a hit is a match
whose centre lies in the same kind of structure (``structure_group``: laterality, lung lobe, vertebra and rib level
ignored).  Chance is the hit rate of a match drawn uniformly from the source windows.

Held-out view matching (label-free): the pre-training task itself on scans the encoder never saw.  Random crops of
a held-out scan are augmented twice with the pre-training augmentations; a hit is a first view whose most similar
second view (cosine of the pooled encoder features, not of the projection head) comes from the same crop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctfm_engine.models.encoder import patch_embeddings
from ctfm_engine.preprocess import CTFM_PREPROCESSING, Preprocessing, preprocess, read_labels_on
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks.embed import Embedder, PatchWindows
from ctfm_engine.tasks.ocd import centroid_lps, label_at
from ctfm_engine.training.augment import CTFM_VIEW_AUGMENTATION, ViewAugmentation
from ctfm_engine.training.data import random_crops
from ctfm_engine.volume import CTVolume

# The reference semantic-search app's window: 16x64x64 voxels at 3x1x1 mm, overlap 0.625.
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
        return centroid_lps(self.volume, self.labels, label)

    def label_at(self, point_lps: np.ndarray) -> int:
        return label_at(self.volume, self.labels, point_lps)


def structure_group(name: str) -> str:
    """The kind of structure a TotalSegmentator v2 label belongs to: ``rib_left_7`` and ``rib_right_9`` -> ``rib``,
    ``vertebrae_L1`` -> ``vertebrae``, ``lung_upper_lobe_left`` -> ``lung``, ``kidney_right`` -> ``kidney``."""
    name = re.sub(r"_(left|right)$", "", name)
    name = re.sub(r"_(left|right)_\d+$", "", name)
    name = re.sub(r"_(upper|middle|lower)_lobe$", "", name)
    return re.sub(r"^vertebrae_[A-Z]\d+$", "vertebrae", name)


@dataclass(frozen=True)
class TransferResult:
    hits: int
    queries: int
    chance: float


def patch_label_transfer(
    embedder: Embedder,
    source: LabelledScan,
    target: LabelledScan,
    names: dict[str, str],
    windows: PatchWindows = APP_WINDOWS,
    centre_features: bool = True,
    preprocessing: Preprocessing = CTFM_PREPROCESSING,
) -> TransferResult:
    """Dense structure search from ``target`` windows into ``source`` windows (see the module docstring).

    ``centre_features`` subtracts the mean embedding of both scans' windows before the cosine: pooled ReLU
    features share a large common component that otherwise dominates every similarity.
    """
    sides = []
    for scan in (source, target):
        vectors, centres = embedder.patch_vectors(preprocess(scan.volume, preprocessing), windows, batch_size=8)
        groups = np.array([structure_group(names[str(label)]) if label else "" for label in
                           (scan.label_at(centre) for centre in centres)])
        sides.append((vectors, groups))
    (source_vectors, source_groups), (target_vectors, target_groups) = sides
    if centre_features:
        mean = np.concatenate([source_vectors, target_vectors]).mean(axis=0)
        source_vectors, target_vectors = source_vectors - mean, target_vectors - mean

    def unit(vectors: np.ndarray) -> np.ndarray:
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    queries = target_groups != ""
    best = np.argmax(unit(target_vectors[queries]) @ unit(source_vectors).T, axis=1)
    hits = int(np.sum(source_groups[best] == target_groups[queries]))
    chance = float(np.mean([np.mean(source_groups == group) for group in target_groups[queries]]))
    return TransferResult(hits, int(queries.sum()), chance)


def view_matching(
    encoder: torch.nn.Module,
    image: np.ndarray,
    patch_size_zyx: tuple[int, int, int] = (16, 64, 64),
    crops: int = 16,
    rounds: int = 4,
    seed: int = 0,
    augmentation: ViewAugmentation = CTFM_VIEW_AUGMENTATION,
) -> TransferResult:
    """Held-out view matching on one preprocessed scan (see the module docstring); chance is ``1 / crops``."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(rounds):
        patches = torch.from_numpy(random_crops(image, patch_size_zyx, crops, rng))[:, None]
        views = [torch.stack([augmentation(patch, rng) for patch in patches]) for _ in range(2)]
        with torch.inference_mode():
            first, second = (torch.nn.functional.normalize(patch_embeddings(encoder, view).float(), dim=1)
                             for view in views)
        hits += int((torch.argmax(first @ second.T, dim=1) == torch.arange(crops)).sum())
    return TransferResult(hits, crops * rounds, 1.0 / crops)
