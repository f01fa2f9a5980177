"""The published CT-FM checkpoints' fingerprints, and whether a checkpoint read from disk is one of them.

The hub cannot be reached from here, so what identifies each published ``model.safetensors`` is recorded below with
where it was read: its size in bytes, its sha256 where a record of it was found (never guessed), and the
fingerprint of its key layout.  The key fingerprint is the sha256 of the compact JSON list ``[[key, [shape...],
dtype], ...]`` of the state dict, sorted by key (dtype as torch names it without ``torch.``, e.g. ``float32``); for
these checkpoints it follows from the architecture alone, as lighter-zoo (the authors' wrapper) saves it, so it is
computed from MONAI's network here and recorded for comparison.

A checkpoint is **verified** when its weights' sha256 is the recorded one (wherever its folder lies); one whose name
claims a published repo (loaded by repo id, or found in ``<cache>/models/owner--name`` or the Hugging Face cache)
either **matches the published size and key layout** (only where no sha256 is on record: never called verified) or
**differs**, naming what (sha256, size, keys, or config.json arguments other than the published constructor's).
Any other checkpoint makes no claim and gets no statement.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

VERIFIED = "verified"
SIZE_AND_KEYS = "size-and-keys"
DIFFERS = "differs"
STATUSES = (VERIFIED, SIZE_AND_KEYS, DIFFERS)

VERIFIED_STATEMENT = "published checkpoint, verified"
SIZE_AND_KEYS_STATEMENT = "matches the published size and key layout (sha256 not on record)"
DIFFERS_STATEMENT = "differs from the published checkpoint ({differences})"

# How many keys a statement names before "and N more".
_KEYS_SHOWN = 3

KeyLayout = list[tuple[str, tuple[int, ...], str]]


@dataclass(frozen=True)
class PublishedFile:
    """One file of a published repo as recorded: size in bytes and sha256 (None where no record was found)."""

    name: str
    size: int | None
    sha256: str | None
    source: str


@dataclass(frozen=True)
class PublishedCheckpoint:
    """A published CT-FM repo: its architecture (a MONAI ``segresnet_ds`` class and the constructor arguments of its
    ``config.json``), its files as recorded, and the fingerprint of the key layout its weights file holds."""

    repo: str
    architecture: str  # "SegResEncoder" or "SegResNetDS" (monai.networks.nets.segresnet_ds)
    arguments: Mapping[str, Any]
    arguments_source: str
    weights: PublishedFile
    config: PublishedFile
    key_fingerprint: str

    def layout(self) -> KeyLayout:
        """The key layout of the architecture, built without memory (meta device) from MONAI's network."""
        from monai.networks.nets.segresnet_ds import SegResEncoder, SegResNetDS

        network = {"SegResEncoder": SegResEncoder, "SegResNetDS": SegResNetDS}[self.architecture]
        with torch.device("meta"):
            return key_layout(network(**self.arguments).state_dict())


_CTFM_ENCODER_ARGUMENTS = MappingProxyType(
    {"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1, "init_filters": 32, "spatial_dims": 3})
_HUB = "https://huggingface.co/"

PUBLISHED_CHECKPOINTS: Mapping[str, PublishedCheckpoint] = MappingProxyType({
    checkpoint.repo: checkpoint for checkpoint in (
        PublishedCheckpoint(
            repo="project-lighter/ct_fm_feature_extractor",
            architecture="SegResEncoder",
            arguments=_CTFM_ENCODER_ARGUMENTS,
            arguments_source=f"{_HUB}project-lighter/ct_fm_feature_extractor config.json",
            weights=PublishedFile(
                "model.safetensors", 311_116_176,
                "b521ff13764ad0fce67f8ad2e5aa9ccc0823f69e4544b446581d8a2dee686215",
                f"{_HUB}project-lighter/ct_fm_feature_extractor/tree/main lists model.safetensors at 311 MB; the "
                "exact size and the sha256 are those public download manifests check the file against (hub LFS "
                "page not reachable offline)"),
            config=PublishedFile("config.json", 123, None,
                                 f"{_HUB}project-lighter/ct_fm_feature_extractor/tree/main"),
            key_fingerprint="9a4e34c5c98134ac04bd04b4f3ad403ae4229de05c4b24cc4f5bc38619248c39",
        ),
        PublishedCheckpoint(
            repo="project-lighter/whole_body_segmentation",
            architecture="SegResNetDS",
            arguments=MappingProxyType({**_CTFM_ENCODER_ARGUMENTS, "out_channels": 118, "dsdepth": 4}),
            arguments_source="https://pypi.org/project/lighter-zoo/ (the model's constructor in its README)",
            weights=PublishedFile(
                "model.safetensors", 348_968_896, None,
                f"public code downloading {_HUB}project-lighter/whole_body_segmentation/resolve/main/"
                "model.safetensors records its size; no record of its sha256 was found"),
            config=PublishedFile("config.json", None, None, "no record of the hub's file list was found"),
            key_fingerprint="85bf16929d6513270ae9e341d2bfb0f9d9faf9caca7e69955eb9f0fdf0c5a152",
        ),
        PublishedCheckpoint(
            repo="project-lighter/ct_fm_segresnet",
            architecture="SegResNetDS",
            # Its 123-byte config.json has room for the four encoder arguments only: SegResNetDS defaults otherwise.
            arguments=_CTFM_ENCODER_ARGUMENTS,
            arguments_source=f"{_HUB}project-lighter/ct_fm_segresnet/tree/main (config.json, 123 bytes)",
            weights=PublishedFile(
                "model.safetensors", 348_740_128, None,
                f"{_HUB}project-lighter/ct_fm_segresnet/tree/main lists model.safetensors at 349 MB; the exact "
                "size is what lighter-zoo writes for this architecture (the same computation gives the two sizes "
                "recorded above); no record of its sha256 was found"),
            config=PublishedFile("config.json", 123, None, f"{_HUB}project-lighter/ct_fm_segresnet/tree/main"),
            key_fingerprint="c85269674ab7e535b9d780df9d9ecf9fc2bc583b5101dce97346ae6f824b4ab0",
        ),
    )
})


@dataclass(frozen=True)
class PublishedStatus:
    """How a checkpoint relates to a published one: ``status`` is one of :data:`STATUSES`, ``statement`` the
    sentence a user reads, ``source`` where the compared facts were recorded."""

    repo: str
    status: str
    statement: str
    source: str

    def as_dict(self) -> dict[str, str]:
        return {"repo": self.repo, "status": self.status, "statement": self.statement, "source": self.source}


def key_layout(state_dict: Mapping[str, torch.Tensor]) -> KeyLayout:
    """``(key, shape, dtype)`` of every tensor, sorted by key."""
    return sorted((key, tuple(int(size) for size in tensor.shape), str(tensor.dtype).removeprefix("torch."))
                  for key, tensor in state_dict.items())


def key_fingerprint(layout: KeyLayout) -> str:
    """The sha256 of the compact JSON of a key layout (see the module docstring)."""
    return hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()


def published_status(
    name: str,
    sha256: str,
    size: int,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
) -> PublishedStatus | None:
    """Whether the checkpoint ``name`` (weights file of ``size`` bytes with ``sha256``, constructor ``config``) is a
    published one; None when it neither has a published sha256 nor claims a published name."""
    claimed = next((entry for entry in PUBLISHED_CHECKPOINTS.values() if entry.weights.sha256 == sha256), None)
    claimed = claimed or PUBLISHED_CHECKPOINTS.get(name)
    if claimed is None:
        return None
    layout = key_layout(state_dict)
    layout_matches = key_fingerprint(layout) == claimed.key_fingerprint
    size_matches = claimed.weights.size is None or size == claimed.weights.size
    differences = []
    if claimed.weights.sha256 is not None and sha256 != claimed.weights.sha256:
        differences.append(f"sha256 {sha256[:12]}..., published {claimed.weights.sha256[:12]}...")
        if size_matches and layout_matches:
            differences.append("same size and key layout: other weight values")
    if not size_matches:
        differences.append(f"{size:,} bytes, published {claimed.weights.size:,}")
    if not layout_matches:
        differences.extend(_layout_differences(layout, claimed.layout()))
    differences.extend(_config_differences(config, claimed.arguments))
    if differences:
        return PublishedStatus(claimed.repo, DIFFERS, DIFFERS_STATEMENT.format(differences="; ".join(differences)),
                               claimed.weights.source)
    if claimed.weights.sha256 is not None:
        return PublishedStatus(claimed.repo, VERIFIED, VERIFIED_STATEMENT, claimed.weights.source)
    return PublishedStatus(claimed.repo, SIZE_AND_KEYS, SIZE_AND_KEYS_STATEMENT, claimed.weights.source)


def _listed(items: list[str]) -> str:
    more = len(items) - _KEYS_SHOWN
    return ", ".join(items[:_KEYS_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _layout_differences(layout: KeyLayout, published: KeyLayout) -> list[str]:
    """What differs between two key layouts: missing, unexpected, mis-shaped and re-typed keys, a few named."""
    mine = {key: (shape, dtype) for key, shape, dtype in layout}
    theirs = {key: (shape, dtype) for key, shape, dtype in published}
    common = sorted(set(mine) & set(theirs))
    groups = (
        ("missing", sorted(set(theirs) - set(mine))),
        ("unexpected", sorted(set(mine) - set(theirs))),
        ("mis-shaped", [f"{key} {list(mine[key][0])}, published {list(theirs[key][0])}" for key in common
                        if mine[key][0] != theirs[key][0]]),
        ("of another dtype", [f"{key} {mine[key][1]}, published {theirs[key][1]}" for key in common
                              if mine[key][1] != theirs[key][1]]),
    )
    return [f"{len(keys)} {label} key(s): {_listed(keys)}" for label, keys in groups if keys]


def _config_differences(config: Mapping[str, Any], arguments: Mapping[str, Any]) -> list[str]:
    """config.json arguments that contradict or add to the published constructor (one it leaves out is not a
    difference: the weights' layout shows whether the model can still be built)."""
    found = []
    for key, value in sorted(config.items()):
        if key not in arguments:
            found.append(f"config.json adds {key}={json.dumps(value)}")
        elif json.dumps(value) != json.dumps(arguments[key]):
            found.append(f"config.json {key}={json.dumps(value)}, published {json.dumps(arguments[key])}")
    return found
