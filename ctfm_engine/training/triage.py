"""Head-CT triage fine-tuning of :class:`~ctfm_engine.models.triage.TriageClassifier` (re-exported here).

The input is the head-CT preprocessing of :mod:`ctfm_engine.head_ct` (four HU windows stacked along z).  A scan's
randomness (the train-time RandAffine) is seeded by (seed, epoch, index), so a resumed run sees what the
uninterrupted one would have.  Unreadable scans are skipped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import RandAffine
from monai.utils import convert_to_tensor
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.functional.classification import binary_auroc

from ctfm_engine.errors import CTFMError, InputError
from ctfm_engine.head_ct import HEAD_CT_PREPROCESSING, HeadCTPreprocessing, head_ct_hu, window_stack
from ctfm_engine.io import atomic_output
from ctfm_engine.models.registry import load_encoder_into
from ctfm_engine.models.triage import TriageClassifier
from ctfm_engine.models.triage import triage_config as triage_config  # re-exported: recipes and tests import it here
from ctfm_engine.readers import read_volume
from ctfm_engine.training.data import ManifestEntry, read_manifest

log = logging.getLogger(__name__)

LABELS = {"0": 0.0, "1": 1.0}  # 0 normal, 1 abnormal
CACHES = ("memory", "disk", "none")


@dataclass(frozen=True)
class TriageRow:
    """One manifest row: its 1-based number, the scan, and its label (None where the row has none)."""

    number: int
    entry: ManifestEntry
    label: float | None

    @property
    def split(self) -> str | None:
        return self.entry.split


def read_triage_manifest(manifest: str | Path) -> list[TriageRow]:
    """Every row of a ``path,label,split`` manifest; InputError naming the file when a label is not 0 or 1."""
    rows = []
    for number, entry in enumerate(read_manifest(manifest), start=1):
        text = None if entry.label is None else str(entry.label).strip()
        if text is not None and text not in LABELS:
            raise InputError(f"{manifest}: row {number} has label {text!r}; triage labels are 0 (normal) or "
                             f"1 (abnormal)")
        rows.append(TriageRow(number, entry, None if text is None else LABELS[text]))
    return rows


@dataclass(frozen=True)
class TriageAugmentation:
    """CT-FM's train-time RandAffine on the stacked input (``evaluation/sinoct.yaml``).

    As in CT-FM the affine acts on the whole (4*z, y, x) stack, so a rotation about its centre tilts the four
    window blocks into each other at their borders; ``per_window`` instead applies one affine to each block
    alike.  Outside the image the value is 0 (CT-FM's "constant" padding).
    """

    probability: float = 0.2
    rotate_range_rad: float = 0.26
    scale_range: float = 0.2
    per_window: bool = False
    windows: int = len(HEAD_CT_PREPROCESSING.windows)

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """``image`` (1, 4*z, y, x) -> same shape; every random choice comes from ``rng``."""
        affine = RandAffine(prob=self.probability, rotate_range=(self.rotate_range_rad,) * 3,
                            scale_range=(self.scale_range,) * 3, padding_mode="zeros", mode="bilinear")
        affine.set_random_state(seed=int(rng.integers(2**31)))
        if self.per_window:
            blocks = image.reshape(self.windows, image.shape[1] // self.windows, *image.shape[2:])
            out = affine(blocks).reshape(image.shape)
        else:
            out = affine(image)
        return convert_to_tensor(out, dtype=torch.float32, track_meta=False)


class HeadCTScans(Dataset):
    """Item = (input (1, 4*z, y, x), label) of one manifest row, or None when the scan cannot be read.

    Keys are (index, epoch) pairs from :class:`~ctfm_engine.training.data.EpochSampler`.  The HU volume on the
    model grid is cached (``memory``; ``disk``: one ``.npy`` per scan under ``cache_dir``, shared by workers and
    runs; ``none``) so the windows and augmentation run on every visit.  With ``visits_per_epoch`` > 1 an epoch
    visits every scan that many times (small data sets then get more steps per epoch).
    """

    def __init__(self, rows: Sequence[TriageRow], preprocessing: HeadCTPreprocessing = HEAD_CT_PREPROCESSING,
                 augmentation: TriageAugmentation | None = None, seed: int = 0, cache: str = "memory",
                 cache_dir: str | Path | None = None, visits_per_epoch: int = 1) -> None:
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        if cache == "disk" and cache_dir is None:
            raise ValueError("a disk cache needs cache_dir")
        if visits_per_epoch < 1:
            raise ValueError("visits_per_epoch must be at least 1")
        self.rows = list(rows)
        self.preprocessing = preprocessing
        self.augmentation = augmentation
        self.seed = seed
        self.cache = cache
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.visits_per_epoch = visits_per_epoch
        self._hu: dict[int, np.ndarray | None] = {}
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.rows) * self.visits_per_epoch

    def hu(self, index: int) -> np.ndarray | None:
        """The row's HU volume on the model grid, or None (logged by row number, counted) when unreadable."""
        if index in self._hu:
            return self._hu[index]
        cached = self._cache_file(index)
        if cached is not None and cached.is_file():
            return np.load(cached)
        try:
            hu, _, _ = head_ct_hu(read_volume(self.rows[index].entry.path), self.preprocessing)
        except CTFMError as error:
            # The message names the file, and file names can identify patients: log the row and the kind only.
            log.warning("skipping unreadable scan in manifest row %d (%s)", self.rows[index].number,
                        type(error).__name__)
            self.skipped.add(index)
            self._hu[index] = None
            return None
        if cached is not None:
            with atomic_output(cached) as temporary:
                with open(temporary, "wb") as stream:
                    np.save(stream, hu)
        if self.cache == "memory":
            self._hu[index] = hu
        return hu

    def _cache_file(self, index: int) -> Path | None:
        if self.cache != "disk" or self.cache_dir is None:
            return None
        key = json.dumps([str(self.rows[index].entry.path), self.preprocessing.describe()], sort_keys=True)
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"

    def image(self, index: int) -> torch.Tensor | None:
        """The network input (1, 4*z, y, x) of row ``index`` without augmentation, or None."""
        hu = self.hu(index)
        return None if hu is None else torch.from_numpy(window_stack(hu, self.preprocessing.windows))[None]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        index, epoch = key
        row = index % len(self.rows)
        image = self.image(row)
        if image is None:
            return None
        if self.augmentation is not None:
            image = self.augmentation(image, np.random.default_rng([self.seed, epoch, index]))
        label = self.rows[row].label
        return image, torch.tensor(float("nan") if label is None else label)


def collate_labelled(items: list[tuple[torch.Tensor, torch.Tensor] | None]) -> tuple[Any, Any, int]:
    """Stack the readable (image, label) items; also return how many were unreadable (None)."""
    readable = [item for item in items if item is not None]
    if not readable:
        return None, None, len(items)
    return torch.stack([image for image, _ in readable]), torch.stack([label for _, label in readable]), \
        len(items) - len(readable)


class TriageFinetuning(L.LightningModule):
    """The classifier, encoder optionally from a CT-FM encoder checkpoint; BCE-with-logits, AdamW, warm-up cosine.

    With ``freeze_encoder_epochs`` > 0 the encoder takes no gradient steps and keeps its BatchNorm statistics
    (eval mode) for that many epochs (CT-FM's Freezer stopped only the gradients: BN statistics kept updating).
    Under DDP a frozen phase needs ``strategy: ddp_find_unused_parameters_true``.  Validation logs ``val/loss`` and
    ``val/auroc`` (NaN while the validation scans hold only one class).
    """

    def __init__(self, network_config: dict[str, Any], encoder_weights: str | None = None,
                 learning_rate: float = 1e-4, weight_decay: float = 1e-5, warmup_epochs: int = 0,
                 warmup_multiplier: float = 0.1, end_learning_rate: float = 1e-6, schedule_epochs: int = 40,
                 freeze_encoder_epochs: int = 0, encoder_sha256: str | None = None) -> None:
        super().__init__()
        self.network = TriageClassifier(**network_config)
        if encoder_weights is not None:
            encoder_sha256 = load_encoder_into(self.network.encoder, encoder_weights)
        self.save_hyperparameters(ignore=["encoder_weights"])
        self.hparams["encoder_sha256"] = encoder_sha256
        self.loss = nn.BCEWithLogitsLoss()
        self._validation: list[torch.Tensor] = []

    @property
    def encoder_frozen(self) -> bool:
        return self.current_epoch < self.hparams.freeze_encoder_epochs

    def on_train_epoch_start(self) -> None:
        frozen = self.encoder_frozen
        for parameter in self.network.encoder.parameters():
            parameter.requires_grad_(not frozen)
        self.network.encoder.train(not frozen)

    def training_step(self, batch: tuple[Any, Any, int], batch_index: int) -> torch.Tensor | None:
        images, labels, unreadable = batch
        self.log("train/unreadable_scans", float(unreadable), reduce_fx="sum", on_step=False, on_epoch=True,
                 batch_size=1)
        if images is None:
            return None
        loss = self.loss(self.network(images), labels.float())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=images.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._validation = []

    def validation_step(self, batch: tuple[Any, Any, int], batch_index: int) -> None:
        images, labels, unreadable = batch
        # Unreadable scans keep a place (label -1) so every rank gathers as many rows as the others.
        rows = [torch.full((unreadable, 2), -1.0, device=self.device)]
        if images is not None:
            logits = self.network(images)
            self.log("val/loss", self.loss(logits, labels.float()), on_step=False, on_epoch=True,
                     batch_size=images.shape[0], sync_dist=True)
            rows.append(torch.stack([torch.sigmoid(logits.float()), labels.float()], dim=1))
        self._validation.append(torch.cat(rows))

    def on_validation_epoch_end(self) -> None:
        if not self._validation:
            return
        rows = self.all_gather(torch.cat(self._validation)).reshape(-1, 2)
        rows = rows[rows[:, 1] >= 0]
        both = rows.numel() and bool((rows[:, 1] == 1).any() and (rows[:, 1] == 0).any())
        auroc = binary_auroc(rows[:, 0], rows[:, 1].long()) if both else torch.tensor(float("nan"))
        # Identical on every rank (gathered above); sync_dist only keeps Lightning from warning under DDP.
        self.log("val/auroc", auroc.float().to(self.device), prog_bar=True, on_epoch=True, sync_dist=True)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities of "abnormal" for a batch (B, 1, 4*z, y, x), model in eval mode."""
        self.network.eval()
        return torch.sigmoid(self.network(images.to(self.device)).float()).cpu()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate,
                                      weight_decay=self.hparams.weight_decay)
        schedule = WarmupCosineSchedule(optimizer, warmup_steps=self.hparams.warmup_epochs,
                                        t_total=self.hparams.schedule_epochs,
                                        warmup_multiplier=self.hparams.warmup_multiplier,
                                        end_lr=self.hparams.end_learning_rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
