"""Where weights come from: one policy for every task and every face, and the download into the cache.

Order of resolution, the same for the encoder, the segmentation and the triage model: an explicit folder or hub
repo id (``--weights``/``--model``), then the model kind's environment variable (``CTFM_WEIGHTS``,
``CTFM_SEG_WEIGHTS``, ``CTFM_TRIAGE_WEIGHTS``), then the published checkpoint in the ctfm cache (``$CTFM_CACHE``,
else ``~/.cache/ctfm``, where ``ctfm weights pull`` puts it) or in the Hugging Face hub cache, then the bundled
demonstration model -- which is never used silently: :func:`announce` logs one warning line and every result's
``weights`` record says ``"demonstration": true``.  Nothing here touches the network except :func:`pull_weights`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from monai.networks.nets.segresnet_ds import SegResEncoder
from torch import nn

from ctfm_engine.errors import ModelError
from ctfm_engine.io import atomic_folder
from ctfm_engine.models.checkpoint import (
    BUNDLED_WEIGHTS_DIR,
    CARD_FILE,
    CONFIG_FILE,
    DEMONSTRATION_NOTICE,
    WEIGHTS_FILE,
    Checkpoint,
    encoder_state,
    load_state_strict,
    read_checkpoint,
)
from ctfm_engine.models.encoder import ENCODER_ARGUMENTS, build_encoder

log = logging.getLogger("ctfm_engine.weights")


@dataclass(frozen=True)
class ModelKind:
    """What a task needs: where its weights may come from, in the policy's order."""

    name: str  # "encoder", "segmentation", "triage": used in messages
    environment: str  # the variable naming a folder or hub repo id
    published_repo: str | None  # the CT-FM checkpoint looked for in the caches
    cache_name: str | None  # a folder of <cache>/models/ looked for when there is no published repo
    bundled: str | None  # the shipped demonstration checkpoint, the last resort


ENCODER = ModelKind("encoder", "CTFM_WEIGHTS", "project-lighter/ct_fm_feature_extractor", None, "ctfm-mini")
SEGMENTATION = ModelKind("segmentation", "CTFM_SEG_WEIGHTS", "project-lighter/whole_body_segmentation", None,
                         "ctfm-mini-wholebody-seg")
# No triage model is published or shipped: one comes from `ctfm finetune` with a triage recipe.
TRIAGE = ModelKind("triage", "CTFM_TRIAGE_WEIGHTS", None, "triage", None)
TRIAGE_RECIPE = "training/finetune_triage_sinoct_paper.yaml"

DEFAULT_ENCODER_REPO = ENCODER.published_repo


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


def resolve_weights(weights: str | Path | None = None, kind: ModelKind = ENCODER) -> Path:
    """The checkpoint folder the policy picks for ``kind``, or a ModelError that says what is missing."""
    spec, origin = (str(weights), "given") if weights else (os.environ.get(kind.environment), kind.environment)
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
                f"`ctfm weights pull {spec}` puts it there where a network allows"
            )
        where = "" if origin == "given" else f" (from {origin})"
        raise ModelError(f"{spec}{where}: {kind.name} weights folder does not exist")
    if kind.published_repo is not None:
        cached = find_cached(kind.published_repo)
        if cached is not None:
            return cached
    if kind.cache_name is not None and _is_checkpoint(cache_dir() / "models" / kind.cache_name):
        return cache_dir() / "models" / kind.cache_name
    shipped = bundled_weights(kind.bundled) if kind.bundled else None
    if shipped is not None:
        return shipped
    raise ModelError(_nothing_found(kind))


def _nothing_found(kind: ModelKind) -> str:
    if kind is TRIAGE:
        return (f"no head-CT triage model: none is published or ships with ctfm; train one with `ctfm finetune "
                f"--config {TRIAGE_RECIPE}`, then give its exported folder, set {kind.environment} to it, or copy it "
                f"into {cache_dir() / 'models' / kind.cache_name}")
    return (f"no {kind.name} weights: none given, {kind.environment} is not set, {kind.published_repo} is not in "
            f"{cached_repo_folder(kind.published_repo)} or the Hugging Face cache, and the bundled demonstration "
            f"model {kind.bundled} is not installed")


def announce(checkpoint: Checkpoint) -> None:
    """One warning line (stderr in the CLI, the log elsewhere) when a demonstration model is opened."""
    if checkpoint.demonstration:
        log.warning(DEMONSTRATION_NOTICE.format(name=checkpoint.name))


def load_encoder(weights: str | Path | None = None, *,
                 allow_segmentation_encoder: bool = False) -> tuple[SegResEncoder, Checkpoint]:
    """The CT-FM encoder in eval mode with strictly loaded weights (resolved by the policy), and its checkpoint.

    An encoder checkpoint; the ``encoder.*`` part of a SegResNetDS one only with ``allow_segmentation_encoder``:
    a segmentation model's encoder was trained on with its decoder (whole_body_segmentation was fully fine-tuned,
    the freezer switched off), so its embeddings are not CT-FM's (ModelError otherwise).
    """
    checkpoint = read_checkpoint(resolve_weights(weights, ENCODER))
    state = encoder_state(checkpoint)
    if state is not checkpoint.state_dict and not allow_segmentation_encoder:
        kind, task = (("a segmentation model (SegResNetDS: encoder and decoder)", "segmentation")
                      if any(key.startswith("up_layers.") for key in checkpoint.state_dict)
                      else ("a fine-tuned task model (an encoder with a task head)", "its task"))
        raise ModelError(f"{checkpoint.name}: is {kind}; its encoder was trained further for {task}, so its "
                         f"embeddings are not CT-FM's", remedy="segmentation_encoder")
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
    source, checkpoint = load_encoder(weights, allow_segmentation_encoder=True)
    load_state_strict(encoder, source.state_dict(), str(checkpoint.folder))
    return checkpoint.sha256
