"""Where weights come from: ``--weights``, ``CTFM_WEIGHTS``, the user cache, the Hugging Face cache; and the pull.

Order of resolution: an explicit folder or hub repo id, then the ``CTFM_WEIGHTS`` environment variable, then the
default repo in the ctfm cache (``$CTFM_CACHE``, else ``~/.cache/ctfm``) or in the Hugging Face hub cache.
Nothing here touches the network except :func:`pull_weights`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from monai.networks.nets.segresnet_ds import SegResEncoder
from torch import nn

from ctfm_engine.errors import ModelError
from ctfm_engine.io import atomic_folder
from ctfm_engine.models.checkpoint import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    encoder_state,
    load_state_strict,
    read_checkpoint,
)
from ctfm_engine.models.encoder import ENCODER_ARGUMENTS, build_encoder

DEFAULT_ENCODER_REPO = "project-lighter/ct_fm_feature_extractor"
PUBLISHED_REPOS = (
    "project-lighter/ct_fm_feature_extractor",
    "project-lighter/ct_fm_segresnet",
    "project-lighter/whole_body_segmentation",
)


# Demonstration checkpoints trained by this project's own training stack (see training/), shipped with the package.
BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


def bundled_weights(name: str) -> Path | None:
    """The shipped demonstration checkpoint ``name`` (e.g. ``ctfm-mini``), or None when it is not installed."""
    folder = BUNDLED_WEIGHTS_DIR / name
    return folder if _is_checkpoint(folder) else None


def cache_dir() -> Path:
    return Path(os.environ.get("CTFM_CACHE") or Path.home() / ".cache" / "ctfm").expanduser()


def cached_repo_folder(repo_id: str) -> Path:
    """The folder of a hub repo inside the ctfm cache (``owner--name``)."""
    return cache_dir() / "models" / repo_id.replace("/", "--")


def _hub_cache_snapshots(repo_id: str) -> list[Path]:
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or hf_home / "hub"
    snapshots = Path(hub).expanduser() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return []
    return sorted(snapshots.iterdir(), key=lambda folder: folder.stat().st_mtime, reverse=True)


def _is_checkpoint(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def find_cached(repo_id: str) -> Path | None:
    for folder in (cached_repo_folder(repo_id), *_hub_cache_snapshots(repo_id)):
        if _is_checkpoint(folder):
            return folder
    return None


def resolve_weights(weights: str | Path | None = None, default_repo: str = DEFAULT_ENCODER_REPO) -> Path:
    """The checkpoint folder to use, or a ModelError that says how to provide one."""
    spec = str(weights) if weights else os.environ.get("CTFM_WEIGHTS")
    if spec:
        folder = Path(spec).expanduser()
        if folder.exists():
            return folder
        if _looks_like_repo_id(spec):
            cached = find_cached(spec)
            if cached is not None:
                return cached
            raise ModelError(
                f"{spec}: no local copy of this hub repo in {cached_repo_folder(spec)} or the Hugging Face cache; "
                f"run `ctfm weights pull {spec}` where a network allows, or pass the folder with --weights"
            )
        raise ModelError(f"{spec}: weights folder does not exist")
    cached = find_cached(default_repo)
    if cached is not None:
        return cached
    raise ModelError(
        f"no CT-FM weights found: pass --weights FOLDER (config.json + model.safetensors), set CTFM_WEIGHTS, or "
        f"copy {default_repo} into {cached_repo_folder(default_repo)} (`ctfm weights pull {default_repo}` does "
        f"this where a network allows)"
    )


def load_encoder(weights: str | Path | None = None) -> tuple[SegResEncoder, Checkpoint]:
    """The CT-FM encoder in eval mode with strictly loaded weights, and the checkpoint it came from.

    Accepts an encoder checkpoint or a SegResNetDS one (its ``encoder.*`` part), as published.
    """
    checkpoint = read_checkpoint(resolve_weights(weights))
    state = encoder_state(checkpoint)
    # A segmentation checkpoint's config also holds decoder arguments; an encoder checkpoint's must not.
    config = {key: value for key, value in checkpoint.config.items() if key in ENCODER_ARGUMENTS}
    if state is checkpoint.state_dict and set(checkpoint.config) - ENCODER_ARGUMENTS:
        extra = sorted(set(checkpoint.config) - ENCODER_ARGUMENTS)
        raise ModelError(
            f"{checkpoint.folder / CONFIG_FILE}: not a CT-FM encoder config (unexpected arguments {extra})"
        )
    try:
        encoder = build_encoder(config)
    except (TypeError, ValueError) as error:
        raise ModelError(f"{checkpoint.folder / CONFIG_FILE}: cannot build the encoder from it ({error})") from None
    load_state_strict(encoder, state, str(checkpoint.folder / WEIGHTS_FILE))
    return encoder.eval(), checkpoint


def pull_weights(repo_id: str, revision: str | None = None) -> Path:
    """Download a hub repo's config, weights and card into the ctfm cache; ModelError with advice when offline."""
    if not _looks_like_repo_id(repo_id):
        raise ModelError(f"{repo_id}: not a hub repo id (expected owner/name, e.g. {DEFAULT_ENCODER_REPO})")
    from huggingface_hub import snapshot_download

    target = cached_repo_folder(repo_id)
    try:
        with atomic_folder(target) as staging:
            snapshot_download(
                repo_id,
                revision=revision,
                local_dir=staging,
                allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE],
            )
            if not _is_checkpoint(staging):
                raise ModelError(
                    f"{repo_id}: the repo has no {CONFIG_FILE} + {WEIGHTS_FILE}; it is not a CT-FM checkpoint"
                )
            shutil.rmtree(staging / ".cache", ignore_errors=True)
    except ModelError:
        raise
    except Exception as error:  # the hub client raises many types for "no network"; all mean the same here
        raise ModelError(
            f"{repo_id}: cannot download from the Hugging Face hub ({type(error).__name__}); this machine looks "
            f"offline: on a connected machine run `huggingface-cli download {repo_id} --local-dir DIR`, copy DIR "
            f"to {target} here, or pass it with --weights"
        ) from None
    return target


def load_encoder_into(encoder: nn.Module, weights: str | Path) -> str:
    """Copy a CT-FM encoder checkpoint strictly into ``encoder`` (e.g. a SegResNetDS's); the checkpoint's sha256."""
    source, checkpoint = load_encoder(weights)
    load_state_strict(encoder, source.state_dict(), str(checkpoint.folder))
    return checkpoint.sha256
