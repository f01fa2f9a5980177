"""Whole-body segmentation fine-tuning: SegResNetDS with the CT-FM encoder, deep-supervised Dice+CE.

Patches are centred on a voxel of a uniformly chosen present foreground class (MONAI RandCropByLabelClasses with
ratios [0] + [1] * classes); validation runs Gaussian-blended sliding-window inference on whole held-out scans
and reports per-class Dice (classes present in the reference only, as ``ignore_empty``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.networks.nets import SegResNetDS
from monai.optimizers import WarmupCosineSchedule
from torch.utils.data import Dataset

from ctfm_engine.errors import CTFMError
from ctfm_engine.models.registry import load_encoder_into
from ctfm_engine.preprocess import Preprocessing, preprocess, read_labels_on
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks.segment import predict_model_space
from ctfm_engine.training.data import ManifestEntry, pad_to_patch


def segmentation_config(out_channels: int = 118, init_filters: int = 32, dsdepth: int = 4) -> dict[str, Any]:
    """The constructor config of CT-FM's whole-body SegResNetDS (``project-lighter/whole_body_segmentation``)."""
    return {"spatial_dims": 3, "in_channels": 1, "out_channels": out_channels, "init_filters": init_filters,
            "blocks_down": [1, 2, 2, 4, 4], "dsdepth": dsdepth}


def labelled_model_space(entry: ManifestEntry, preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The preprocessed image and its label map resampled (nearest) onto the same model grid."""
    model_input = preprocess(read_volume(entry.path), preprocessing)
    return model_input.image, read_labels_on(entry.labels, model_input.grid)


class LabelledPatches(Dataset):
    """Item = one (image, label) patch pair (1, z, y, x) centred on a random present class; keys (index, epoch)."""

    def __init__(self, entries: Sequence[ManifestEntry], preprocessing: Preprocessing, patch_size_zyx: Sequence[int],
                 seed: int = 0, visits_per_epoch: int = 1) -> None:
        self.pairs = []
        for entry in entries:
            if entry.labels is None:
                raise CTFMError(f"{entry.path}: the segmentation manifest needs a 'labels' column for every scan")
            self.pairs.append(labelled_model_space(entry, preprocessing))
        self.patch_size_zyx = tuple(int(s) for s in patch_size_zyx)
        self.seed = seed
        self.visits_per_epoch = visits_per_epoch

    def __len__(self) -> int:
        return len(self.pairs) * self.visits_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key
        image, labels = self.pairs[index % len(self.pairs)]
        rng = np.random.default_rng([self.seed, epoch, index])
        classes = np.unique(labels[labels > 0])
        chosen = np.argwhere(labels == rng.choice(classes))
        centre = chosen[rng.integers(len(chosen))]
        size = np.array(self.patch_size_zyx)
        image, labels = pad_to_patch(image, size), pad_to_patch(labels, size)
        start = np.clip(centre - size // 2, 0, np.array(image.shape) - size)
        box = tuple(slice(first, first + extent) for first, extent in zip(start, size, strict=True))
        # Labels travel as float: deep supervision resizes them (nearest), which torch does not do for integers.
        return torch.from_numpy(image[box].copy())[None], torch.from_numpy(labels[box].astype(np.float32))[None]


def dice_per_class(prediction: np.ndarray, reference: np.ndarray) -> dict[int, float]:
    """Dice of every class present in ``reference`` (classes absent there are ignored, as ``ignore_empty``)."""
    scores = {}
    for label in np.unique(reference[reference > 0]):
        predicted, expected = prediction == label, reference == label
        scores[int(label)] = float(2 * np.logical_and(predicted, expected).sum() / (predicted.sum() + expected.sum()))
    return scores


class SegmentationFinetuning(L.LightningModule):
    """SegResNetDS, encoder optionally from a CT-FM encoder checkpoint; AdamW + warm-up cosine per epoch."""

    def __init__(self, network_config: dict[str, Any], encoder_weights: str | None = None,
                 learning_rate: float = 2e-4, weight_decay: float = 1e-5, warmup_epochs: int = 3,
                 schedule_epochs: int = 300, roi_size_zyx: Sequence[int] = (96, 160, 160), overlap: float = 0.625,
                 encoder_sha256: str | None = None) -> None:
        super().__init__()
        self.network = SegResNetDS(**network_config)
        if encoder_weights is not None:
            encoder_sha256 = load_encoder_into(self.network.encoder, encoder_weights)
        self.save_hyperparameters(ignore=["encoder_weights"])
        self.hparams["encoder_sha256"] = encoder_sha256
        base = DiceCELoss(softmax=True, to_onehot_y=True, include_background=True, squared_pred=True,
                          smooth_nr=0.0, smooth_dr=1e-5)
        self.loss = DeepSupervisionLoss(base, weight_mode="exp")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        image, labels = batch
        outputs = self.network(image)
        loss = self.loss(outputs if isinstance(outputs, list) else [outputs], labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=image.shape[0])
        return loss

    def predict_labels(self, image: np.ndarray) -> np.ndarray:
        """Argmax label map of a whole model-space image (Gaussian-blended sliding window)."""
        return predict_model_space(self.network, image, self.hparams.roi_size_zyx, self.hparams.overlap, self.device)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate,
                                      weight_decay=self.hparams.weight_decay)
        schedule = WarmupCosineSchedule(optimizer, warmup_steps=self.hparams.warmup_epochs,
                                        t_total=self.hparams.schedule_epochs, warmup_multiplier=0.1,
                                        end_lr=0.01 * self.hparams.learning_rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
