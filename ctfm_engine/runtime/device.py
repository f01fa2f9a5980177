"""Choosing the torch device a command runs on."""

from __future__ import annotations

import torch

from ctfm_engine.errors import UsageError


def resolve_device(name: str = "cpu") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present, else CPU); UsageError when CUDA is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r}: not a device name (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {name!r}: this PyTorch build sees no CUDA GPU (torch {torch.__version__}); install the CUDA "
            f"build of PyTorch (see README) or run on the CPU"
        )
    if device.type not in {"cpu", "cuda"}:
        raise UsageError(f"device {name!r}: only cpu and cuda are supported")
    return device
