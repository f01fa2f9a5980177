"""The head-CT triage classifier: CT-FM encoder + average-pool MLP head, one logit for "abnormal".

Pure PyTorch + MONAI, so inference needs no training extra; :mod:`ctfm_engine.training.triage` fine-tunes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ctfm_engine.head_ct import HEAD_CT_PREPROCESSING, HeadCTPreprocessing
from ctfm_engine.models.encoder import ENCODER_ARGUMENTS, build_encoder, embedding_size, encoder_config


def triage_config(init_filters: int = 32, preprocessing: HeadCTPreprocessing = HEAD_CT_PREPROCESSING) -> dict[str, Any]:
    """The classifier's ``config.json``: encoder arguments, head width, and the input grid it was trained on."""
    width = init_filters * 16  # channels of the encoder's last level (512 for CT-FM)
    return {**encoder_config(init_filters), "hidden_features": width // 2, "out_features": 1,
            "spacing_zyx_mm": list(preprocessing.spacing_zyx_mm),
            "spatial_size_zyx": list(preprocessing.spatial_size_zyx)}


class TriageClassifier(nn.Module):
    """SegResEncoder -> last feature map -> AdaptiveAvgPool3d(1) -> Flatten -> Linear(E, E/2) -> ReLU -> Linear(E/2, 1).

    The final CT-FM config (``evaluation/sinoct.yaml`` on main).  State-dict keys are ``encoder.*`` and ``head.*``,
    so :func:`ctfm_engine.models.registry.load_encoder` reads the fine-tuned encoder from an exported checkpoint.
    ``spacing_zyx_mm`` and ``spatial_size_zyx`` record the head-CT grid the model expects, and ``threshold`` (None:
    not recorded) the probability from which a scan is called abnormal; they build nothing.
    """

    def __init__(self, hidden_features: int | None = None, out_features: int = 1,
                 spacing_zyx_mm: Sequence[float] = HEAD_CT_PREPROCESSING.spacing_zyx_mm,
                 spatial_size_zyx: Sequence[int] = HEAD_CT_PREPROCESSING.spatial_size_zyx,
                 threshold: float | None = None,
                 **encoder_arguments: Any) -> None:
        super().__init__()
        unknown = set(encoder_arguments) - ENCODER_ARGUMENTS
        if unknown:
            raise ValueError(f"unknown triage classifier arguments {sorted(unknown)}")
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0
                                          and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a probability between 0 and 1, got {threshold!r}")
        self.encoder = build_encoder(encoder_arguments)
        width = embedding_size(self.encoder)
        hidden = int(hidden_features or width // 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(width, hidden), nn.ReLU(),
                                  nn.Linear(hidden, int(out_features)))
        self.preprocessing = HeadCTPreprocessing(spacing_zyx_mm=tuple(spacing_zyx_mm),  # type: ignore[arg-type]
                                                 spatial_size_zyx=tuple(spatial_size_zyx))  # type: ignore[arg-type]
        self.threshold = None if threshold is None else float(threshold)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, 4*z, y, x) -> logits (B,) of "abnormal"."""
        return self.head(self.encoder(image)[-1]).flatten()
