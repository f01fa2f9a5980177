"""Intra-sample self-supervised losses of CT-FM pre-training and its ablations (CT-FM's ``loss/*.py``).

Every loss takes per-view tensors of shape (B, N, D): B scans, N crops per scan, D features. Each scan's crops form
a batch of their own, as in CT-FM's ``IntraSampleNTXEntLoss`` and ``IntraSampleWrapper``: negatives and batch
statistics never cross scans, so a scan's loss depends only on its own embeddings. The batch loss is the mean of the
per-scan losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_views(*views: torch.Tensor, min_crops: int) -> None:
    """Raise ``ValueError`` unless all views share one (B, N, D) shape with B >= 1 and N >= ``min_crops``."""
    shape = views[0].shape
    if len(shape) != 3:
        raise ValueError(f"expected (scans, crops, features) tensors, got shape {tuple(shape)}")
    for view in views[1:]:
        if view.shape != shape:
            raise ValueError(f"all views must have the same shape, got {tuple(shape)} and {tuple(view.shape)}")
    if shape[0] < 1:
        raise ValueError("the batch holds no scans")
    if shape[1] < min_crops:
        raise ValueError(
            f"intra-sample losses compare crops of the same scan: need at least {min_crops} crops per scan, "
            f"got {shape[1]}"
        )


class IntraSampleNTXent(nn.Module):
    """NT-Xent whose negatives are the other crops of the same scan (CT-FM's ``IntraSampleNTXEntLoss``).

    ``view0`` and ``view1`` are (B, N, D) projections, N >= 2; the result is a scalar. Embeddings are L2-normalised.
    For scan b and crop i the anchor ``view0[b, i]`` has the positive ``view1[b, i]`` and the 2(N - 1) negatives
    ``view0[b, j]``, ``view1[b, j]`` for j != i; logits are cosines / ``temperature`` (0.1 in CT-FM's config), and the
    crop's loss is the cross-entropy with the positive as target. A scan's loss is the mean over its crops.

    ``symmetric=True`` (default) is the paper's formula, (l_{1,2} + l_{2,1}) / 2: each ``view1[b, i]`` is also an
    anchor, with positive ``view0[b, i]`` and the same negatives, and both directions are averaged.
    ``symmetric=False`` reproduces CT-FM's code, which anchors on view 0 only (the paper's formula is symmetric).
    """

    def __init__(self, temperature: float = 0.1, symmetric: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.symmetric = symmetric

    def forward(self, view0: torch.Tensor, view1: torch.Tensor) -> torch.Tensor:
        """Mean over scans of the per-scan NT-Xent of (B, N, D) ``view0`` against ``view1``."""
        _check_views(view0, view1, min_crops=2)
        scans, crops, _ = view0.shape
        # Rows 0..N-1 are view 0 and N..2N-1 view 1 of the same scan; a row's positive is N rows away and every other
        # row but itself is a negative, which is exactly the 2(N - 1) same-scan negatives.
        embeddings = F.normalize(torch.cat([view0, view1], dim=1), dim=-1)
        logits = embeddings @ embeddings.transpose(1, 2) / self.temperature
        self_pairs = torch.eye(2 * crops, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(self_pairs, float("-inf"))
        positives = (torch.arange(2 * crops, device=logits.device) + crops) % (2 * crops)
        anchors = 2 * crops if self.symmetric else crops
        # Every scan has the same number of anchors, so the mean over all anchors is the mean of per-scan means.
        return F.cross_entropy(
            logits[:, :anchors].reshape(scans * anchors, 2 * crops),
            positives[:anchors].repeat(scans),
        )


class IntraSampleSimSiam(nn.Module):
    """SimSiam loss per scan, with the stop-gradient on the projections (CT-FM's final code
    bypasses both the prediction head and the stop-gradient; its 2024 code, which the ablations ran, had them).

    ``z0``, ``p0``, ``z1``, ``p1`` are (B, N, D) projections and predictions of views 0 and 1; N >= 1. Per scan the
    loss is 1/2 NegCos(p0, sg(z1)) + 1/2 NegCos(p1, sg(z0)), NegCos = minus the mean cosine over the scan's crops
    (lightly's ``NegativeCosineSimilarity``); the result is the mean over scans. CT-FM's refactored code lost the
    stop-gradient (and the predictor); this applies it, as the 2024 code behind the published ablations did.
    """

    def forward(self, z0: torch.Tensor, p0: torch.Tensor, z1: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
        """Mean over scans of the symmetric negative cosine between predictions and detached projections."""
        _check_views(z0, p0, z1, p1, min_crops=1)
        cosine01 = F.cosine_similarity(p0, z1.detach(), dim=-1)
        cosine10 = F.cosine_similarity(p1, z0.detach(), dim=-1)
        return -0.5 * (cosine01.mean(dim=1) + cosine10.mean(dim=1)).mean()


class IntraSampleVICReg(nn.Module):
    """VICReg computed per scan with that scan's N crops as the batch (CT-FM's ``IntraSampleWrapper(VICRegLoss)``).

    ``view0`` and ``view1`` are (B, N, D) embeddings, N >= 2; the result is a scalar. Per scan:
    invariance = MSE(view0, view1); variance = the mean over both views of mean_d relu(1 - sqrt(var_d + eps)), var
    unbiased over the crops; covariance = the sum over both views of the squared off-diagonal entries of the crops'
    covariance matrix (centred, divided by N - 1) divided by D; loss = lambda inv + mu var + nu cov, averaged over
    scans. The defaults 25, 25, 1 and eps 1e-4 are Bardes et al. 2022 and lightly's ``VICRegLoss`` used by the
    CT-FM ablation. The variance term averages (not sums) the two views, as lightly and the VICReg authors' code do.
    """

    def __init__(
        self,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.invariance_weight = invariance_weight
        self.variance_weight = variance_weight
        self.covariance_weight = covariance_weight
        self.eps = eps

    def forward(self, view0: torch.Tensor, view1: torch.Tensor) -> torch.Tensor:
        """Mean over scans of the per-scan VICReg loss of (B, N, D) ``view0`` and ``view1``."""
        _check_views(view0, view1, min_crops=2)
        invariance = (view0 - view1).pow(2).mean(dim=(1, 2))
        variance = 0.5 * (self._variance(view0) + self._variance(view1))
        covariance = self._covariance(view0) + self._covariance(view1)
        per_scan = (
            self.invariance_weight * invariance + self.variance_weight * variance + self.covariance_weight * covariance
        )
        return per_scan.mean()

    def _variance(self, view: torch.Tensor) -> torch.Tensor:
        """Per-scan hinge on the standard deviation of each feature over the crops, shape (B,)."""
        std = torch.sqrt(view.var(dim=1) + self.eps)
        return F.relu(1.0 - std).mean(dim=-1)

    @staticmethod
    def _covariance(view: torch.Tensor) -> torch.Tensor:
        """Per-scan sum of squared off-diagonal covariances over the crops divided by D, shape (B,)."""
        crops, features = view.shape[1], view.shape[2]
        centred = view - view.mean(dim=1, keepdim=True)
        covariance = centred.transpose(1, 2) @ centred / (crops - 1)
        off_diagonal = ~torch.eye(features, dtype=torch.bool, device=view.device)
        return covariance[:, off_diagonal].pow(2).sum(dim=-1) / features
