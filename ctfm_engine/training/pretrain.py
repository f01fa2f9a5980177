"""Intra-sample self-supervised pre-training of the CT-FM encoder as a Lightning module (SimCLR, SimSiam, VICReg).

Each batch holds B scans x N crops x 2 views.  By default the encoder runs once per (crop, view) on the B scans,
as CT-FM's code does, so BatchNorm statistics cover one crop index of the batch's scans (``bn_per_crop_call``);
turning it off runs all crops in one call.  Losses never use another scan's crops as negatives.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from monai.optimizers import WarmupCosineSchedule

from ctfm_engine.models.encoder import build_encoder, embedding_size, patch_embeddings
from ctfm_engine.training.heads import (
    ProjectionHead,
    SimSiamPredictionHead,
    SimSiamProjectionHead,
    VICRegProjectionHead,
)
from ctfm_engine.training.losses import IntraSampleNTXent, IntraSampleSimSiam, IntraSampleVICReg

METHODS = ("simclr", "simsiam", "vicreg")


class IntraSamplePretraining(L.LightningModule):
    """The encoder, its method's heads and loss, AdamW and a warm-up cosine schedule stepped per epoch."""

    def __init__(
        self,
        encoder_config: dict[str, Any],
        method: str = "simclr",
        temperature: float = 0.1,
        symmetric: bool = True,
        bn_per_crop_call: bool = True,
        head_hidden_dim: int = 256,
        head_out_dim: int = 128,
        predictor_hidden_dim: int = 512,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-6,
        warmup_epochs: int = 10,
        schedule_epochs: int = 500,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.save_hyperparameters()
        self.encoder = build_encoder(encoder_config)
        width = embedding_size(self.encoder)
        if method == "simclr":
            self.projection_head = ProjectionHead(width, head_hidden_dim, head_out_dim)
            self.loss = IntraSampleNTXent(temperature=temperature, symmetric=symmetric)
        elif method == "simsiam":
            self.projection_head = SimSiamProjectionHead(width, head_hidden_dim, head_out_dim)
            self.prediction_head = SimSiamPredictionHead(head_out_dim, predictor_hidden_dim, head_out_dim)
            self.loss = IntraSampleSimSiam()
        else:
            self.projection_head = VICRegProjectionHead(width, head_hidden_dim, head_out_dim)
            self.loss = IntraSampleVICReg()

    def pooled(self, patches: torch.Tensor) -> torch.Tensor:
        """(M, 1, z, y, x) -> (M, C): last feature map, global average pool."""
        return patch_embeddings(self.encoder, patches)

    def features(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 2, 1, z, y, x) -> pooled features of view 0 and view 1, each (B, N, C)."""
        scans, count = crops.shape[:2]
        if self.hparams.bn_per_crop_call:
            per_view = [torch.stack([self.pooled(crops[:, i, view]) for i in range(count)], dim=1) for view in (0, 1)]
            return per_view[0], per_view[1]
        pooled = self.pooled(crops.flatten(0, 2)).reshape(scans, count, 2, -1)
        return pooled[:, :, 0], pooled[:, :, 1]

    def _project(self, features: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
        return head(features.flatten(0, 1)).reshape(*features.shape[:2], -1)

    def compute_loss(self, crops: torch.Tensor) -> torch.Tensor:
        view0, view1 = self.features(crops)
        z0, z1 = self._project(view0, self.projection_head), self._project(view1, self.projection_head)
        if self.hparams.method == "simsiam":
            p0, p1 = self._project(z0, self.prediction_head), self._project(z1, self.prediction_head)
            return self.loss(z0, p0, z1, p1)
        return self.loss(z0, z1)

    def training_step(self, batch: tuple[torch.Tensor | None, int], batch_index: int) -> torch.Tensor | None:
        crops, unreadable = batch
        self.log("train/unreadable_scans", float(unreadable), reduce_fx="sum", on_step=False, on_epoch=True,
                 batch_size=1)
        if crops is None:
            return None
        loss = self.compute_loss(crops)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=crops.shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        schedule = WarmupCosineSchedule(
            optimizer, warmup_steps=self.hparams.warmup_epochs, t_total=self.hparams.schedule_epochs
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
