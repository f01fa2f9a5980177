"""Training data: manifests of scans, the intra-sample crop dataset, and an epoch-seeded sampler.

A manifest is a CSV (header row) or JSON list naming one scan per row: ``path`` (file or DICOM folder, relative
paths resolved against the manifest's folder) and optionally ``labels`` (label map), ``label`` (class), ``split``.
Unreadable scans are skipped and counted, never fatal: a long run must survive a bad file.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from ctfm_engine.errors import CTFMError, InputError
from ctfm_engine.preprocess import Preprocessing, preprocess
from ctfm_engine.readers import read_volume
from ctfm_engine.training.augment import CTFM_VIEW_AUGMENTATION, ViewAugmentation

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "labels", "label", "split")


@dataclass(frozen=True)
class ManifestEntry:
    path: Path
    labels: Path | None = None
    label: str | None = None
    split: str | None = None


def read_manifest(manifest: str | Path, split: str | None = None) -> list[ManifestEntry]:
    """The entries of a CSV or JSON manifest (only those of ``split`` when given); InputError when malformed."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise InputError(f"{manifest}: manifest does not exist")
    try:
        if manifest.suffix.lower() == ".json":
            rows = json.loads(manifest.read_text())
            rows = rows.get("scans", rows) if isinstance(rows, dict) else rows
        else:
            with open(manifest, newline="") as stream:
                rows = list(csv.DictReader(stream))
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as error:
        raise InputError(f"{manifest}: is not a readable CSV or JSON manifest ({error})") from None
    entries = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("path"):
            raise InputError(f"{manifest}: row {number} has no 'path' (columns: {', '.join(MANIFEST_COLUMNS)})")

        def resolve(value: str | None) -> Path | None:
            return None if not value else (manifest.parent / value).resolve()

        entries.append(
            ManifestEntry(
                path=resolve(row["path"]),  # type: ignore[arg-type]
                labels=resolve(row.get("labels")),
                label=row.get("label") or None,
                split=row.get("split") or None,
            )
        )
    selected = [entry for entry in entries if split is None or entry.split == split]
    if not selected:
        raise InputError(f"{manifest}: holds no scans" + (f" of split {split!r}" if split else ""))
    return selected


class PreprocessedScans:
    """Reads and preprocesses manifest scans on demand, keeping them in memory when ``keep`` is set.

    A scan that cannot be read gives None (logged once, counted in ``skipped``) instead of an exception.
    """

    def __init__(self, entries: Sequence[ManifestEntry], preprocessing: Preprocessing, keep: bool = True) -> None:
        self.entries = list(entries)
        self.preprocessing = preprocessing
        self.keep = keep
        self._images: dict[int, np.ndarray | None] = {}
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def image(self, index: int) -> np.ndarray | None:
        if index in self._images:
            return self._images[index]
        try:
            image = preprocess(read_volume(self.entries[index].path), self.preprocessing).image
        except CTFMError as error:
            log.warning("skipping unreadable scan %d of the manifest: %s", index, error)
            self.skipped.add(index)
            image = None
        if self.keep or image is None:
            self._images[index] = image
        return image


def pad_to_patch(image: np.ndarray, patch_size_zyx: Sequence[int]) -> np.ndarray:
    """Pad at the end with 0 (= -1024 HU after the window) so every axis is at least the patch size."""
    padding = [(0, max(0, int(size) - extent)) for size, extent in zip(patch_size_zyx, image.shape, strict=True)]
    return np.pad(image, padding) if any(after for _, after in padding) else image


def random_crops(image: np.ndarray, patch_size_zyx: Sequence[int], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` patches (count, z, y, x) at uniformly random positions (MONAI RandSpatialCropSamples)."""
    image = pad_to_patch(image, patch_size_zyx)
    size = np.array(patch_size_zyx)
    crops = np.empty((count, *size), dtype=np.float32)
    for index in range(count):
        start = [int(rng.integers(0, extent - s + 1)) for extent, s in zip(image.shape, size, strict=True)]
        box = tuple(slice(first, first + extent) for first, extent in zip(start, size, strict=True))
        crops[index] = image[box]
    return crops


class IntraSampleCrops(Dataset):
    """Item = one scan's ``crops_per_scan`` crops, each as two independently augmented views.

    Keys are (index, epoch) pairs from :class:`EpochSampler`; the randomness of an item is seeded by
    (seed, epoch, index), so it does not depend on workers, order or resumption.  Returns a float tensor
    (crops, 2, 1, z, y, x), or None when the scan cannot be read.  With ``visits_per_epoch`` > 1 an epoch visits
    every scan that many times, each with other crops (small data sets then get more steps per epoch).
    """

    def __init__(
        self,
        scans: PreprocessedScans,
        patch_size_zyx: Sequence[int],
        crops_per_scan: int,
        augmentation: ViewAugmentation = CTFM_VIEW_AUGMENTATION,
        seed: int = 0,
        visits_per_epoch: int = 1,
    ) -> None:
        if crops_per_scan < 2:
            raise ValueError("intra-sample contrastive learning needs at least 2 crops per scan")
        if visits_per_epoch < 1:
            raise ValueError("visits_per_epoch must be at least 1")
        self.scans = scans
        self.patch_size_zyx = tuple(int(s) for s in patch_size_zyx)
        self.crops_per_scan = crops_per_scan
        self.augmentation = augmentation
        self.seed = seed
        self.visits_per_epoch = visits_per_epoch

    def __len__(self) -> int:
        return len(self.scans) * self.visits_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor | None:
        index, epoch = key
        image = self.scans.image(index % len(self.scans))
        if image is None:
            return None
        rng = np.random.default_rng([self.seed, epoch, index])
        crops = torch.from_numpy(random_crops(image, self.patch_size_zyx, self.crops_per_scan, rng))[:, None]
        views = [[self.augmentation(crop, rng) for _ in range(2)] for crop in crops]
        return torch.stack([torch.stack(pair) for pair in views])


def collate_skipping_unreadable(items: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, int]:
    """Stack the readable items; also return how many were unreadable (None)."""
    readable = [item for item in items if item is not None]
    return (torch.stack(readable) if readable else None), len(items) - len(readable)


class EpochSampler(Sampler):
    """Yields (index, epoch) keys in an order seeded by (seed, epoch); shards by rank under DDP.

    Lightning calls ``set_epoch`` each epoch.  Under torch.distributed every rank gets an equal share (the
    permutation is padded by wrapping around), as DistributedSampler does.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return math.ceil(self.length / self._shard()[1])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = self._shard()
        order = np.arange(self.length)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        total = len(self) * world
        order = np.resize(order, total)  # wraps around to give every rank the same count
        return iter([(int(index), self.epoch) for index in order[rank::world]])
