"""Checkpoints as a user sees them: which one a task would use, what it holds, what the cache has, and the download.

:func:`describe_weights` applies the one weights policy for a model kind (encoder by default: ``CTFM_WEIGHTS``, the
published ct_fm_feature_extractor in the cache, then the bundled demonstration model -- announced) and reports the
checkpoint; :func:`cached_checkpoints` lists ``<ctfm cache>/models``; :func:`pull_checkpoint` downloads a hub repo
there (the only step that needs a network).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctfm_engine.errors import UsageError
from ctfm_engine.models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    checkpoint_name,
    demonstration_sha256s,
    read_checkpoint,
    sha256_of,
)
from ctfm_engine.models.registry import (
    ENCODER,
    SEGMENTATION,
    TRIAGE,
    ModelKind,
    announce,
    cache_dir,
    pull_weights,
    resolve_weights,
)

MODEL_KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (ENCODER, SEGMENTATION, TRIAGE)}


@dataclass(frozen=True)
class CheckpointDescription:
    """A checkpoint folder: its identity, constructor config and size."""

    checkpoint: Checkpoint

    @property
    def folder(self) -> Path:
        return self.checkpoint.folder

    @property
    def weights(self) -> dict[str, Any]:
        return self.checkpoint.identity

    @property
    def config(self) -> dict[str, Any]:
        return self.checkpoint.config

    @property
    def tensors(self) -> int:
        return len(self.checkpoint.state_dict)

    @property
    def values(self) -> int:
        """How many numbers the weights hold (parameters and buffers)."""
        return sum(int(tensor.numel()) for tensor in self.checkpoint.state_dict.values())


def model_kind(name: str) -> ModelKind:
    try:
        return MODEL_KINDS[name]
    except KeyError:
        raise UsageError(f"model kind {name!r}: choose one of {', '.join(MODEL_KINDS)}") from None


def describe_weights(weights: str | Path | None = None, kind: str = "encoder") -> CheckpointDescription:
    """The checkpoint the policy picks for ``kind`` given ``weights`` (a folder, a hub repo id or None), read and
    announced when it is a demonstration model."""
    checkpoint = read_checkpoint(resolve_weights(weights, model_kind(kind)))
    announce(checkpoint)
    return CheckpointDescription(checkpoint)


def weights_record(weights: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{"name", "sha256", "demonstration"}`` of a stored weights record that may lack the flag (a scan index's
    provenance keeps name and sha256): a bundled demonstration model is recognised by its sha256.  A record of a
    checkpoint just read keeps its ``published`` statement."""
    if weights is None:
        return None
    record = {"name": weights["name"], "sha256": weights["sha256"],
              "demonstration": weights["sha256"] in demonstration_sha256s()}
    if weights.get("published"):
        record["published"] = weights["published"]
    return record


def pull_checkpoint(repo_id: str, revision: str | None = None) -> CheckpointDescription:
    """Download the hub repo ``repo_id`` into the cache (``<cache>/models/owner--name``) and read it."""
    return CheckpointDescription(read_checkpoint(pull_weights(repo_id, revision)))


def models_folder() -> Path:
    """Where pulled checkpoints live: ``<ctfm cache>/models``."""
    return cache_dir() / "models"


def cached_checkpoints() -> list[Path]:
    """The checkpoint folders in :func:`models_folder`, by name."""
    folder = models_folder()
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if (path / CONFIG_FILE).is_file())


@dataclass(frozen=True)
class WeightsLocation:
    """Where the policy finds a checkpoint and who it is, without reading its tensors (for pickers in a UI)."""

    folder: Path
    name: str
    sha256: str
    demonstration: bool

    @property
    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "demonstration": self.demonstration}


_SHA256_BY_FILE: dict[tuple[str, int, int], str] = {}


def locate_weights(weights: str | Path | None = None, kind: str = "encoder") -> WeightsLocation:
    """The checkpoint folder the policy picks for ``kind`` given ``weights`` (a folder, a hub repo id or None), its
    name, the sha256 of its weights file (remembered per path, size and modification time) and whether it is a
    demonstration model; ModelError when the folder is not a checkpoint."""
    from ctfm_engine.errors import ModelError

    folder = Path(resolve_weights(weights, model_kind(kind))).expanduser().resolve()
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"{folder}: not a CT-FM checkpoint folder (no {' or '.join(missing)}); choose a folder "
                         f"holding config.json and model.safetensors")
    status = (folder / WEIGHTS_FILE).stat()
    key = (str(folder / WEIGHTS_FILE), status.st_size, status.st_mtime_ns)
    if key not in _SHA256_BY_FILE:
        _SHA256_BY_FILE[key] = sha256_of(folder / WEIGHTS_FILE)
    sha256 = _SHA256_BY_FILE[key]
    return WeightsLocation(folder, checkpoint_name(folder), sha256, sha256 in demonstration_sha256s())


def published_repo(kind: str) -> str | None:
    """The published CT-FM checkpoint of a model kind (None for triage: none is published)."""
    return model_kind(kind).published_repo
