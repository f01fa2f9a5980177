"""Intra-sample losses and heads: hand-computed values, per-scan independence, stop-gradient, head layouts."""

from __future__ import annotations

import math

import pytest
import torch

from ctfm_engine.training.heads import (
    ProjectionHead,
    SimSiamPredictionHead,
    SimSiamProjectionHead,
    VICRegProjectionHead,
)
from ctfm_engine.training.losses import IntraSampleNTXent, IntraSampleSimSiam, IntraSampleVICReg

# One scan, two crops, 2-D features; not unit length, to exercise the normalisation. Normalised:
# view 0 crop 0 a0 = (1, 0), crop 1 a1 = (0, 1); view 1 crop 0 b0 = (0.6, 0.8), crop 1 b1 = (-1, 0).
NTXENT_VIEW0 = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
NTXENT_VIEW1 = torch.tensor([[[3.0, 4.0], [-5.0, 0.0]]], dtype=torch.float64)


def _scans(scans: int, crops: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    view0 = torch.randn(scans, crops, features, generator=generator, dtype=torch.float64)
    view1 = view0 + 0.3 * torch.randn(scans, crops, features, generator=generator, dtype=torch.float64)
    return view0, view1


def _per_scan_losses(loss: torch.nn.Module, *views: torch.Tensor) -> list[torch.Tensor]:
    return [loss(*(view[b : b + 1] for view in views)) for b in range(views[0].shape[0])]


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("symmetric", [False, True])
def test_ntxent_matches_hand_computed_value(temperature: float, symmetric: bool) -> None:
    t = temperature
    # Each crop loss is log(exp(pos/t) + sum exp(neg/t)) - pos/t.
    # a0: positive cos(a0, b0) = 0.6; negatives cos(a0, a1) = 0, cos(a0, b1) = -1.
    anchor_a0 = math.log(math.exp(0.6 / t) + math.exp(0.0 / t) + math.exp(-1.0 / t)) - 0.6 / t
    # a1: positive cos(a1, b1) = 0; negatives cos(a1, a0) = 0, cos(a1, b0) = 0.8.
    anchor_a1 = math.log(math.exp(0.0 / t) + math.exp(0.0 / t) + math.exp(0.8 / t)) - 0.0 / t
    # b0: positive cos(b0, a0) = 0.6; negatives cos(b0, a1) = 0.8, cos(b0, b1) = -0.6.
    anchor_b0 = math.log(math.exp(0.6 / t) + math.exp(0.8 / t) + math.exp(-0.6 / t)) - 0.6 / t
    # b1: positive cos(b1, a1) = 0; negatives cos(b1, a0) = -1, cos(b1, b0) = -0.6.
    anchor_b1 = math.log(math.exp(0.0 / t) + math.exp(-1.0 / t) + math.exp(-0.6 / t)) - 0.0 / t
    view0_anchored = (anchor_a0 + anchor_a1) / 2
    view1_anchored = (anchor_b0 + anchor_b1) / 2
    expected = (view0_anchored + view1_anchored) / 2 if symmetric else view0_anchored

    loss = IntraSampleNTXent(temperature=temperature, symmetric=symmetric)(NTXENT_VIEW0, NTXENT_VIEW1)

    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_ntxent_hand_computed_values_at_ctfm_temperature() -> None:
    code = IntraSampleNTXent(temperature=0.1, symmetric=False)(NTXENT_VIEW0, NTXENT_VIEW1)
    paper = IntraSampleNTXent(temperature=0.1, symmetric=True)(NTXENT_VIEW0, NTXENT_VIEW1)

    assert code.item() == pytest.approx(4.001573248840359, rel=1e-12)
    assert paper.item() == pytest.approx(2.533149053229152, rel=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_ntxent_batch_is_mean_of_single_scan_losses(symmetric: bool) -> None:
    loss = IntraSampleNTXent(symmetric=symmetric)
    view0, view1 = _scans(scans=3, crops=4, features=8, seed=0)

    singles = _per_scan_losses(loss, view0, view1)

    torch.testing.assert_close(loss(view0, view1), torch.stack(singles).mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_ntxent_negatives_never_cross_scans(symmetric: bool) -> None:
    loss = IntraSampleNTXent(symmetric=symmetric)
    view0, view1 = _scans(scans=2, crops=3, features=4, seed=1)
    # Scan 1 holds an exact copy of scan 0's first anchor: a cross-scan loss would see it as a hard negative.
    view0[1, 2] = view0[0, 0]
    view0.requires_grad_(True)
    view1.requires_grad_(True)

    batch = loss(view0, view1)
    scan0_alone = loss(view0[:1], view1[:1])
    scan1_alone = loss(view0[1:], view1[1:])
    batch_gradients = torch.autograd.grad(batch, (view0, view1))
    scan0_gradients = torch.autograd.grad(scan0_alone, (view0, view1))

    torch.testing.assert_close(2 * batch - scan1_alone, scan0_alone, rtol=1e-12, atol=0)
    for batch_gradient, scan0_gradient in zip(batch_gradients, scan0_gradients, strict=True):
        torch.testing.assert_close(batch_gradient[0], scan0_gradient[0] / 2, rtol=1e-12, atol=0)
        assert torch.count_nonzero(scan0_gradient[1]) == 0
    # The same crops pooled into one batch (the cross-scan loss) does change scan 0's loss: the check above can fail.
    pooled = loss(view0.detach().reshape(1, 6, 4), view1.detach().reshape(1, 6, 4))
    assert not torch.isclose(pooled, batch.detach())


def test_ntxent_prefers_aligned_well_separated_crops() -> None:
    loss = IntraSampleNTXent()
    aligned = torch.eye(8, dtype=torch.float64)[:4].unsqueeze(0)
    random0, random1 = (torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(s)) for s in (2, 3))

    aligned_loss = loss(aligned, aligned.clone())

    # Positive logit 1/0.1 = 10 against six zero logits: log(e^10 + 6) - 10.
    assert aligned_loss.item() == pytest.approx(math.log(math.exp(10) + 6) - 10, rel=1e-12)
    assert aligned_loss < loss(random0, random1)


def test_ntxent_gradients_are_finite() -> None:
    view0, view1 = _scans(scans=2, crops=3, features=4, seed=4)
    view0.requires_grad_(True)

    IntraSampleNTXent()(view0, view1).backward()

    assert torch.isfinite(view0.grad).all()


@pytest.mark.parametrize(
    "loss",
    [IntraSampleNTXent(), IntraSampleVICReg()],
    ids=["ntxent", "vicreg"],
)
def test_single_crop_per_scan_is_rejected(loss: torch.nn.Module) -> None:
    view = torch.randn(2, 1, 4)
    with pytest.raises(ValueError, match="at least 2 crops per scan"):
        loss(view, view)


def test_mismatched_or_flat_views_are_rejected() -> None:
    with pytest.raises(ValueError, match="same shape"):
        IntraSampleNTXent()(torch.randn(1, 3, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="scans, crops, features"):
        IntraSampleNTXent()(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="temperature"):
        IntraSampleNTXent(temperature=0.0)


def test_simsiam_matches_hand_computed_value() -> None:
    p0 = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]], dtype=torch.float64)
    z1 = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]], dtype=torch.float64)
    p1 = torch.tensor([[[1.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    z0 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    # cos(p0, z1) per crop: 0 and 0.6; cos(p1, z0): 1/sqrt(2) and -1.
    expected = 0.5 * -((0.0 + 0.6) / 2) + 0.5 * -((1 / math.sqrt(2) - 1.0) / 2)

    loss = IntraSampleSimSiam()(z0, p0, z1, p1)

    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert loss.item() == pytest.approx(-0.07677669529663686, rel=1e-12)


def test_simsiam_stops_gradient_into_projections() -> None:
    generator = torch.Generator().manual_seed(5)
    z0, z1, h0, h1 = (torch.randn(2, 3, 4, generator=generator, requires_grad=True) for _ in range(4))
    predictor = torch.randn(4, 4, generator=generator, requires_grad=True)
    p0, p1 = h0 @ predictor, h1 @ predictor

    IntraSampleSimSiam()(z0, p0, z1, p1).backward()

    for z in (z0, z1):
        assert z.grad is None or torch.count_nonzero(z.grad) == 0
    for leaf in (h0, h1, predictor):
        assert leaf.grad is not None and torch.count_nonzero(leaf.grad) > 0


def test_simsiam_is_minus_one_for_identical_predictions_and_projections() -> None:
    z = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    loss = IntraSampleSimSiam()(z, z.clone(), z.clone(), z.clone())

    assert loss.item() == pytest.approx(-1.0, rel=1e-12)


def test_simsiam_batch_is_mean_of_single_scan_losses() -> None:
    loss = IntraSampleSimSiam()
    generator = torch.Generator().manual_seed(7)
    z0, p0, z1, p1 = (torch.randn(3, 4, 5, generator=generator, dtype=torch.float64) for _ in range(4))

    singles = _per_scan_losses(loss, z0, p0, z1, p1)

    torch.testing.assert_close(loss(z0, p0, z1, p1), torch.stack(singles).mean(), rtol=1e-12, atol=0)


def test_vicreg_matches_hand_computed_value() -> None:
    view0 = torch.tensor([[[0.0, 0.0], [0.5, 1.0], [1.0, 0.5]]], dtype=torch.float64)
    view1 = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]]], dtype=torch.float64)
    eps = 1e-4
    # Invariance: differences (0, 0), (0.5, 0), (1, -1.5); squares sum to 0.25 + 1 + 2.25 = 3.5 over 6 entries.
    invariance = 3.5 / 6
    # View 0: both features are {0, 0.5, 1} up to order, mean 0.5, unbiased var (0.25 + 0 + 0.25) / 2 = 0.25.
    variance0 = ((1 - math.sqrt(0.25 + eps)) + (1 - math.sqrt(0.25 + eps))) / 2
    # View 1: feature 0 is constant (var 0, std 0.01); feature 1 is {0, 1, 2}, var 1, std > 1, so no hinge.
    variance1 = ((1 - math.sqrt(0.0 + eps)) + 0.0) / 2
    # View 0 centred: feature 0 (-0.5, 0, 0.5), feature 1 (-0.5, 0.5, 0); cov01 = (0.25 + 0 + 0) / 2 = 0.125.
    # Two off-diagonal entries, divided by D = 2. View 1's cov01 is 0 because feature 0 is constant.
    covariance0 = (0.125**2 + 0.125**2) / 2
    covariance1 = 0.0
    expected = 25 * invariance + 25 * (variance0 + variance1) / 2 + 1 * (covariance0 + covariance1)

    loss = IntraSampleVICReg()(view0, view1)

    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert loss.item() == pytest.approx(27.03520845830834, rel=1e-12)


def test_vicreg_invariance_vanishes_for_identical_views() -> None:
    view, _ = _scans(scans=2, crops=5, features=3, seed=8)

    invariance_only = IntraSampleVICReg(invariance_weight=1.0, variance_weight=0.0, covariance_weight=0.0)

    assert invariance_only(view, view.clone()).item() == 0.0
    assert invariance_only(view, view + 1.0).item() == pytest.approx(1.0, rel=1e-12)


def test_vicreg_batch_statistics_never_cross_scans() -> None:
    loss = IntraSampleVICReg()
    view0, view1 = _scans(scans=3, crops=4, features=5, seed=9)
    view1[2] = 10 * view1[2] + 3  # scan 2 far off scan 0's scale and centre
    view0.requires_grad_(True)

    singles = _per_scan_losses(loss, view0, view1)
    batch = loss(view0, view1)
    (batch_gradient,) = torch.autograd.grad(batch, view0)
    (scan0_gradient,) = torch.autograd.grad(singles[0], view0)

    torch.testing.assert_close(batch, torch.stack(singles).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(batch_gradient[0], scan0_gradient[0] / 3, rtol=1e-12, atol=0)
    assert torch.count_nonzero(scan0_gradient[1:]) == 0
    pooled = loss(view0.detach().reshape(1, 12, 5), view1.reshape(1, 12, 5))
    assert not torch.isclose(pooled, batch.detach())


def test_projection_head_matches_lightly_layout() -> None:
    head = ProjectionHead()

    assert list(head.state_dict()) == ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]
    assert head.layers[0].weight.shape == (256, 512)
    assert head.layers[2].weight.shape == (128, 256)
    assert head(torch.randn(3, 512)).shape == (3, 128)


@pytest.mark.parametrize(
    ("head", "in_dim", "out_dim"),
    [
        (ProjectionHead(16, 8, 4), 16, 4),
        (SimSiamProjectionHead(16, 32, 24), 16, 24),
        (SimSiamPredictionHead(24, 8, 24), 24, 24),
        (VICRegProjectionHead(16, 32, 40), 16, 40),
    ],
    ids=["simclr", "simsiam-projection", "simsiam-prediction", "vicreg"],
)
def test_head_output_shapes(head: torch.nn.Module, in_dim: int, out_dim: int) -> None:
    assert head(torch.randn(5, in_dim)).shape == (5, out_dim)


def test_batchnorm_heads_layouts() -> None:
    simsiam = SimSiamProjectionHead(16, 32, 24)
    last_norm = simsiam.layers[-1]

    assert isinstance(last_norm, torch.nn.BatchNorm1d) and not last_norm.affine
    assert [type(layer).__name__ for layer in simsiam.layers] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + [
        "Linear",
        "BatchNorm1d",
    ]
    assert [type(layer).__name__ for layer in SimSiamPredictionHead(24, 8, 24).layers] == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
    ]
    assert [type(layer).__name__ for layer in VICRegProjectionHead(16, 32, 40).layers] == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
    ] * 2 + ["Linear"]
