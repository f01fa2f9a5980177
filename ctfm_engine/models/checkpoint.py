"""Checkpoints in the Hugging Face layout the CT-FM authors publish: ``config.json`` + ``model.safetensors``.

Keys are kept exactly as MONAI names them, so ``project-lighter/ct_fm_feature_extractor`` (encoder keys),
``ct_fm_segresnet`` and ``whole_body_segmentation`` (``encoder.*`` + ``up_layers.*``) load unchanged.  Every
checkpoint is identified by the sha256 of its weights file, and one that is or claims to be a published checkpoint
says whether it is (:mod:`ctfm_engine.models.published`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ctfm_engine.errors import ModelError
from ctfm_engine.io import atomic_folder, default_mode
from ctfm_engine.models.published import PublishedStatus, published_status

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
ENCODER_PREFIX = "encoder."
# Demonstration checkpoints trained by this project's own training stack (training/), shipped with the package.
BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEMONSTRATION_NOTICE = "demonstration model {name}, not CT-FM, not for clinical use"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder read from disk: constructor config, state dict, and identity."""

    folder: Path
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    sha256: str
    weights_bytes: int  # size of model.safetensors

    @property
    def name(self) -> str:
        return checkpoint_name(self.folder)

    @property
    def demonstration(self) -> bool:
        """True for a bundled demonstration checkpoint (or a copy of one): not CT-FM, not for clinical use."""
        return self.sha256 in demonstration_sha256s()

    @functools.cached_property
    def published(self) -> PublishedStatus | None:
        """Whether this is a published CT-FM checkpoint (verified by sha256, or only by size and key layout), or
        differs from the one its name claims; None when it is none and claims none (our own, demonstration)."""
        return published_status(self.name, self.sha256, self.weights_bytes, self.config, self.state_dict)

    @property
    def identity(self) -> dict[str, Any]:
        """The ``{"name", "sha256", "demonstration"}`` record every result carries, with ``published`` (repo,
        status, statement, source) for a checkpoint that is or claims to be a published one."""
        identity: dict[str, Any] = {"name": self.name, "sha256": self.sha256, "demonstration": self.demonstration}
        if self.published is not None:
            identity["published"] = self.published.as_dict()
        return identity


@functools.cache
def demonstration_sha256s() -> frozenset[str]:
    """The sha256 of every bundled demonstration checkpoint's weights: a copy elsewhere is still a demonstration."""
    if not BUNDLED_WEIGHTS_DIR.is_dir():
        return frozenset()
    return frozenset(sha256_of(folder / WEIGHTS_FILE) for folder in sorted(BUNDLED_WEIGHTS_DIR.iterdir())
                     if (folder / WEIGHTS_FILE).is_file())


def checkpoint_name(folder: Path) -> str:
    """A readable name: the hub repo id for a Hugging Face cache snapshot or a ctfm cache folder (``models/
    owner--name``, where ``ctfm weights pull`` puts it), else the folder name."""
    resolved = folder.resolve()
    for part in resolved.parts:
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/")
    if resolved.parent.name == "models" and resolved.name.count("--") == 1:
        return resolved.name.replace("--", "/")
    return resolved.name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read ``config.json`` and ``model.safetensors`` from ``folder``; ModelError with the reason otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: weights folder does not exist (expected config.json + model.safetensors)")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise ModelError(
                f"{folder}: has no {required.name}; a CT-FM checkpoint holds config.json and model.safetensors"
            )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{config_path}: is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_path}: must hold a JSON object of model arguments")
    try:
        state_dict = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelError(f"{weights_path}: is not a readable safetensors file ({error})") from None
    return Checkpoint(folder=folder, config=config, state_dict=state_dict, sha256=sha256_of(weights_path),
                      weights_bytes=weights_path.stat().st_size)


def load_state_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load every key or none: missing, unexpected and mis-shaped keys are a ModelError naming them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label} key(s): {shown}")
    if problems:
        raise ModelError(f"{source}: weights do not fit the model ({'; '.join(problems)})")
    model.load_state_dict(state_dict, strict=True)


def encoder_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The encoder's state dict, from an encoder checkpoint or the ``encoder.*`` part of a SegResNetDS one."""
    state = checkpoint.state_dict
    if any(key.startswith(ENCODER_PREFIX) for key in state):
        return {key[len(ENCODER_PREFIX) :]: value for key, value in state.items() if key.startswith(ENCODER_PREFIX)}
    return state


def save_checkpoint(
    model: nn.Module,
    folder: str | Path,
    config: dict[str, Any],
    card: str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write ``config.json``, ``model.safetensors`` (and a model card) atomically; returns the weights' sha256.

    The folder appears complete or not at all (see :func:`ctfm_engine.io.atomic_folder`).  ``dtype`` (e.g.
    ``torch.float16``, to ship small files) converts floating-point tensors; loading casts them back to the model's.
    """
    with atomic_folder(folder) as staging:
        state = {}
        for key, value in model.state_dict().items():
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            state[key] = value.detach().cpu().contiguous()
        save_file(state, str(staging / WEIGHTS_FILE))
        os.chmod(staging / WEIGHTS_FILE, default_mode(0o666))  # safetensors writes owner-only files
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if card is not None:
            (staging / CARD_FILE).write_text(card)
    return sha256_of(Path(folder) / WEIGHTS_FILE)
