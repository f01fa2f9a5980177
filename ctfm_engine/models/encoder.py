"""The CT-FM encoder (MONAI SegResNetDS encoder) and a memory-bounded, exact forward pass to its last feature map."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from monai.networks.nets.segresnet_ds import SegResEncoder
from torch import nn

# The published config of project-lighter/ct_fm_feature_extractor (77.8 M parameters).
CTFM_ENCODER_CONFIG: dict[str, Any] = {
    "blocks_down": [1, 2, 2, 4, 4],
    "in_channels": 1,
    "init_filters": 32,
    "spatial_dims": 3,
}

ENCODER_ARGUMENTS = {"spatial_dims", "init_filters", "in_channels", "act", "norm", "blocks_down", "anisotropic_scales"}

# Activation memory the two full-resolution levels may use at once; 3 GiB keeps a 512x512x300 CT under 4 GB of
# peak RSS on CPU at the speed of the untiled pass (benchmarks/embed.py).
DEFAULT_MEMORY_BUDGET_BYTES = 3 << 30

# Halo (input voxels along z) that makes each slab of the first two levels exact; both even so slabs stay
# aligned with the stride-2 downsampling: level 0 = conv_init + one block (3 convs) + downsample -> 4;
# level 1 = two blocks (4 convs) + downsample -> 5, rounded up to 6.
_LEVEL_HALO = (4, 6)


def encoder_config(init_filters: int = 32) -> dict[str, Any]:
    """The CT-FM encoder config at another width (narrow variants keep depth and block layout)."""
    return {**CTFM_ENCODER_CONFIG, "init_filters": int(init_filters)}


def build_encoder(config: dict[str, Any]) -> SegResEncoder:
    """A SegResEncoder from a ``config.json`` dictionary (ValueError on unknown arguments)."""
    unknown = set(config) - ENCODER_ARGUMENTS
    if unknown:
        raise ValueError(f"unknown SegResEncoder arguments {sorted(unknown)}")
    return SegResEncoder(**config)


def embedding_size(encoder: SegResEncoder) -> int:
    """Channels of the last feature map: init_filters * 2**(levels - 1) (512 for CT-FM)."""
    return int(encoder.layers[-1]["blocks"][-1].conv2.out_channels)


def scan_embedding(
    encoder: SegResEncoder, image: torch.Tensor, *, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
) -> torch.Tensor:
    """Global-average-pooled last feature map of a whole volume (B, 1, Z, Y, X) -> (B, C)."""
    return last_feature_map(encoder, image, memory_budget_bytes=memory_budget_bytes).mean(dim=(2, 3, 4))


def last_feature_map(
    encoder: SegResEncoder, image: torch.Tensor, *, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
) -> torch.Tensor:
    """The encoder's last (stride-16) feature map, computing the two full-resolution levels in z-slabs.

    The first two levels hold ~90% of the activations; running them in slabs with an exact halo bounds peak
    memory while the result equals the whole-volume forward (BatchNorm must be in eval mode, so every layer is
    a convolution or a per-voxel map).  Deeper levels run whole.
    """
    if encoder.training:
        raise RuntimeError("last_feature_map needs the encoder in eval mode (BatchNorm running statistics)")
    level0, level1 = encoder.layers[0], encoder.layers[1]

    def first_level(x: torch.Tensor) -> torch.Tensor:
        return level0["downsample"](level0["blocks"](encoder.conv_init(x)))

    def second_level(x: torch.Tensor) -> torch.Tensor:
        return level1["downsample"](level1["blocks"](x))

    width = int(encoder.conv_init.out_channels)
    x = _in_slabs(first_level, image, _LEVEL_HALO[0], width, memory_budget_bytes)
    x = _in_slabs(second_level, x, _LEVEL_HALO[1], 2 * width, memory_budget_bytes)
    for index in range(2, len(encoder.layers)):
        level = encoder.layers[index]
        x = level["blocks"](x)
        if index < len(encoder.layers) - 1:
            x = level["downsample"](x)
    return x


def _in_slabs(
    stage: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    halo: int,
    channels: int,
    memory_budget_bytes: int,
) -> torch.Tensor:
    """Run a stride-2 stage over z-slabs of ``x`` with ``halo`` context slices, keeping only exact outputs."""
    depth = x.shape[2]
    # About four activation tensors of `channels` channels are alive at once inside a SegResBlock.
    bytes_per_slice = 4 * channels * x.shape[0] * x.shape[3] * x.shape[4] * x.element_size()
    core = int(memory_budget_bytes // max(bytes_per_slice, 1)) - 2 * halo
    core = max(2, core - core % 2)
    if core >= depth:
        return stage(x)
    pieces = []
    for start in range(0, depth, core):
        stop = min(start + core, depth)
        first = max(start - halo, 0)
        last = min(stop + halo, depth)
        out = stage(x[:, :, first:last])
        offset = first // 2
        pieces.append(out[:, :, start // 2 - offset : math.ceil(stop / 2) - offset])
    return torch.cat(pieces, dim=2)


def patch_embeddings(encoder: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """Embeddings (N, C) of a batch of patches (N, 1, z, y, x): last feature map, global average pool."""
    return encoder(patches)[-1].mean(dim=(2, 3, 4))
