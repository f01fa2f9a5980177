"""The segmentation network as the sliding window runs it: SegResNetDS's decoder trunk and its 1x1x1 output head.

SegResNetDS's finest output head is a 1x1x1 convolution (per-voxel linear), so the windows' decoder features can be
blended and the head applied once per voxel; these pieces are shared by segmentation (tasks) and ONNX export (runtime).
"""

from __future__ import annotations

import torch
from monai.networks.nets import SegResNetDS

__all__ = ["SegmentationTrunk", "feature_head", "inference_network"]


class SegmentationTrunk(torch.nn.Module):
    """A SegResNetDS without its output heads: the full-resolution decoder features (``init_filters`` channels).

    In eval mode SegResNetDS still computes every deep-supervision head and returns the finest; the trunk computes
    none.  The finest head is a 1x1x1 convolution, i.e. per-voxel linear, so blending windows' features and applying
    the head once per voxel gives the same logits as blending the windows' logits, with ``init_filters`` instead of
    ``out_channels`` values per voxel to blend (8 or 32 instead of 118).
    """

    def __init__(self, network: SegResNetDS) -> None:
        super().__init__()
        self.encoder = network.encoder
        self.up_layers = network.up_layers

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(image)[::-1]
        features = skips[0]
        for level, skip in zip(self.up_layers, skips[1:], strict=True):
            features = level["blocks"](level["upsample"](features) + skip)
        return features


def feature_head(network: SegResNetDS) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The finest head as (weight (classes, channels), bias (classes,)) when it is a 1x1x1 convolution, else None."""
    head = network.up_layers[-1]["head"] if "head" in network.up_layers[-1] else None
    if not isinstance(head, torch.nn.Conv3d) or tuple(head.kernel_size) != (1, 1, 1) or head.groups != 1:
        return None
    weight = head.weight.detach().reshape(head.out_channels, head.in_channels).float()
    bias = torch.zeros(head.out_channels) if head.bias is None else head.bias.detach().float()
    return weight, bias


def inference_network(network: SegResNetDS) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor] | None]:
    """What the backend should run and the head to apply after blending: (trunk, head), or (network, None)."""
    head = feature_head(network)
    return (SegmentationTrunk(network).eval(), head) if head is not None else (network, None)
