"""Projection and prediction heads of CT-FM pre-training and its ablations (lightly's SimCLR, SimSiam and Barlow
Twins heads as CT-FM's ``models/frameworks/*.py`` build them).

Each head keeps its layers in ``self.layers`` (an ``nn.Sequential``) so that state-dict keys match lightly's heads,
which CT-FM uses (raw checkpoints hold ``model.projection_head.layers.{0,2}.*``). As in lightly, a Linear followed by
BatchNorm has no bias, since the BatchNorm shift makes it redundant.
"""

from __future__ import annotations

import torch
from torch import nn


class _Head(nn.Module):
    """A head is its ``layers``; only their composition differs."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, in_dim) -> (batch, out_dim)."""
        return self.layers(x)


def _hidden(in_dim: int, out_dim: int) -> list[nn.Module]:
    """Linear (no bias: BatchNorm's shift makes it redundant) -> BatchNorm -> ReLU."""
    return [nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU()]


class ProjectionHead(_Head):
    """SimCLR head Linear-ReLU-Linear, as lightly's ``SimCLRProjectionHead(512, 256, 128, batch_norm=False)``."""

    def __init__(self, in_dim: int = 512, hidden_dim: int = 256, out_dim: int = 128) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


class SimSiamProjectionHead(_Head):
    """SimSiam projector: 3 Linear layers, BatchNorm after each (last one affine-free); lightly / Chen & He 2021."""

    def __init__(self, in_dim: int = 512, hidden_dim: int = 2048, out_dim: int = 2048) -> None:
        super().__init__(
            *_hidden(in_dim, hidden_dim),
            *_hidden(hidden_dim, hidden_dim),
            nn.Linear(hidden_dim, out_dim, bias=False),
            nn.BatchNorm1d(out_dim, affine=False),
        )


class SimSiamPredictionHead(_Head):
    """SimSiam predictor Linear-BN-ReLU-Linear (bottleneck hidden layer); lightly / Chen & He 2021."""

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 512, out_dim: int = 2048) -> None:
        super().__init__(*_hidden(in_dim, hidden_dim), nn.Linear(hidden_dim, out_dim))


class VICRegProjectionHead(_Head):
    """VICReg expander (Linear-BN-ReLU) x 2 + Linear, lightly's ``BarlowTwinsProjectionHead``; Bardes et al. 2022."""

    def __init__(self, in_dim: int = 512, hidden_dim: int = 8192, out_dim: int = 8192) -> None:
        super().__init__(*_hidden(in_dim, hidden_dim), *_hidden(hidden_dim, hidden_dim), nn.Linear(hidden_dim, out_dim))
