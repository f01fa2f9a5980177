"""Whether the checkpoint on disk is the published one: "published checkpoint, verified" only on the recorded sha256,
"matches the published size and key layout" where no sha256 is on record, "differs" naming what, and nothing for a
checkpoint that claims no published name.

The published files cannot be downloaded here, so the checkpoints are lighter-zoo's full-size random-weight writes of
the published architectures (the shared ``published_cache``) and altered copies of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from conftest import (
    ENCODER_CONFIG,
    ENCODER_REPO,
    SEGMENTATION_REPO,
    SHIPPED_ENCODER,
    SHIPPED_SEG,
    require_module,
    run_cli,
)
from safetensors.torch import load_file, save_file

from ctfm_engine.models import published
from ctfm_engine.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint
from ctfm_engine.models.published import PUBLISHED_CHECKPOINTS, key_fingerprint, key_layout

SEGRESNET_REPO = "project-lighter/ct_fm_segresnet"
SIZE_AND_KEYS = "matches the published size and key layout (sha256 not on record)"


def cached(cache: Path, repo: str) -> Path:
    return cache / "models" / repo.replace("/", "--")


def copy_checkpoint(source: Path, target: Path, config: dict | None = None) -> Path:
    """A copy of a checkpoint folder (the weights hard-linked: 300 MB need not be written again)."""
    target.mkdir(parents=True)
    os.link(source / WEIGHTS_FILE, target / WEIGHTS_FILE)
    config_text = (source / CONFIG_FILE).read_text() if config is None else json.dumps(config)
    (target / CONFIG_FILE).write_text(config_text)
    return target


def test_recorded_fingerprints_are_those_of_the_published_architectures_as_lighter_zoo_writes_them(
        published_cache, tmp_path):
    lighter_zoo = require_module("lighter_zoo", "the published layout is written by lighter-zoo (installed by make)")
    for entry in PUBLISHED_CHECKPOINTS.values():
        assert key_fingerprint(entry.layout()) == entry.key_fingerprint, entry.repo  # MONAI's network itself
    lighter_zoo.SegResNet(**ENCODER_CONFIG).save_pretrained(cached(tmp_path, SEGRESNET_REPO))
    for folder in (cached(published_cache, ENCODER_REPO), cached(published_cache, SEGMENTATION_REPO),
                   cached(tmp_path, SEGRESNET_REPO)):
        entry = PUBLISHED_CHECKPOINTS[read_checkpoint(folder).name]
        assert (folder / WEIGHTS_FILE).stat().st_size == entry.weights.size, entry.repo
        assert key_fingerprint(key_layout(load_file(str(folder / WEIGHTS_FILE)))) == entry.key_fingerprint
        if entry.config.size is not None:
            assert (folder / CONFIG_FILE).stat().st_size == entry.config.size, entry.repo


def test_the_whole_body_checkpoint_where_pull_puts_it_matches_the_published_size_and_key_layout(published_cache):
    identity = read_checkpoint(cached(published_cache, SEGMENTATION_REPO)).identity
    assert identity["published"] == {
        "repo": SEGMENTATION_REPO, "status": "size-and-keys", "statement": SIZE_AND_KEYS,
        "source": PUBLISHED_CHECKPOINTS[SEGMENTATION_REPO].weights.source,
    }
    assert identity["demonstration"] is False


def test_random_weights_where_the_feature_extractor_belongs_differ_from_its_published_sha256(published_cache):
    checkpoint = read_checkpoint(cached(published_cache, ENCODER_REPO))
    record = checkpoint.identity["published"]
    assert (record["repo"], record["status"]) == (ENCODER_REPO, "differs")
    assert record["statement"] == (
        f"differs from the published checkpoint (sha256 {checkpoint.sha256[:12]}..., published "
        f"{PUBLISHED_CHECKPOINTS[ENCODER_REPO].weights.sha256[:12]}...; same size and key layout: other weight values)")


def test_a_checkpoint_with_the_recorded_sha256_is_verified_wherever_it_lies(published_cache, tmp_path, monkeypatch):
    folder = cached(published_cache, ENCODER_REPO)
    on_disk = read_checkpoint(folder).sha256
    entry = PUBLISHED_CHECKPOINTS[ENCODER_REPO]
    # The published sha256 cannot match random weights; recording this file's tests the comparison itself.
    monkeypatch.setattr(published, "PUBLISHED_CHECKPOINTS", MappingProxyType({
        **PUBLISHED_CHECKPOINTS, ENCODER_REPO: dataclasses.replace(
            entry, weights=dataclasses.replace(entry.weights, sha256=on_disk))}))
    for where in (folder, copy_checkpoint(folder, tmp_path / "my-ctfm")):
        assert read_checkpoint(where).identity["published"] == {
            "repo": ENCODER_REPO, "status": "verified", "statement": "published checkpoint, verified",
            "source": entry.weights.source,
        }
    # The published weights with a config.json that builds another network are not the published checkpoint.
    changed = copy_checkpoint(folder, tmp_path / "leaky", {**ENCODER_CONFIG, "act": "leakyrelu"})
    record = read_checkpoint(changed).identity["published"]
    assert record["status"] == "differs"
    assert record["statement"] == 'differs from the published checkpoint (config.json adds act="leakyrelu")'


def test_an_altered_copy_under_the_published_name_says_what_differs(published_cache, tmp_path):
    state = load_file(str(cached(published_cache, SEGMENTATION_REPO) / WEIGHTS_FILE))
    del state["up_layers.0.blocks.0.conv1.weight"]
    state["up_layers.3.head.weight"] = torch.zeros(2, 32, 1, 1, 1)  # a two-class head instead of 118
    state["up_layers.3.head.bias"] = torch.zeros(2)
    folder = cached(tmp_path, SEGMENTATION_REPO)
    folder.mkdir(parents=True)
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({**ENCODER_CONFIG, "out_channels": 2, "dsdepth": 4}))
    record = read_checkpoint(folder).identity["published"]
    size = (folder / WEIGHTS_FILE).stat().st_size
    assert (record["repo"], record["status"]) == (SEGMENTATION_REPO, "differs")
    assert record["statement"] == (
        f"differs from the published checkpoint ({size:,} bytes, published 348,968,896; "
        "1 missing key(s): up_layers.0.blocks.0.conv1.weight; "
        "2 mis-shaped key(s): up_layers.3.head.bias [2], published [118], "
        "up_layers.3.head.weight [2, 32, 1, 1, 1], published [118, 32, 1, 1, 1]; "
        "config.json out_channels=2, published 118)")


def test_the_demonstration_models_and_our_own_checkpoints_claim_no_published_name(narrow_weights):
    for folder in (SHIPPED_ENCODER, SHIPPED_SEG, narrow_weights):
        assert set(read_checkpoint(folder).identity) == {"name", "sha256", "demonstration"}, folder
    info = run_cli("weights", "info", "--json", "-q")
    assert info.code == 0 and "published" not in info.document["weights"]


def test_ctfm_weights_info_shows_the_statement_in_json_and_in_words(published_cache, monkeypatch):
    monkeypatch.setenv("CTFM_CACHE", str(published_cache))
    by_repo = run_cli("weights", "info", SEGMENTATION_REPO, "--json", "-q")
    assert by_repo.code == 0, by_repo.stderr
    assert by_repo.document["weights"]["published"]["status"] == "size-and-keys"
    by_policy = run_cli("weights", "info", "--kind", "segmentation", "-q")
    assert by_policy.code == 0, by_policy.stderr
    assert f"published: {SEGMENTATION_REPO}: {SIZE_AND_KEYS}" in by_policy.stdout.splitlines()


def test_the_dicom_algorithm_record_and_the_slicer_weights_line_carry_the_statement():
    require_module("highdicom", "DICOM-SEG and SR writing needs highdicom (the [dicom] extra)")
    from ctfm_engine.dicom.seg import Algorithm

    claim = {"repo": SEGMENTATION_REPO, "status": "size-and-keys", "statement": SIZE_AND_KEYS, "source": "test"}
    weights = {"name": SEGMENTATION_REPO, "sha256": "ab" * 32, "demonstration": False, "published": claim}
    algorithm = Algorithm.from_identity(weights, "0.1.0")
    assert algorithm.parameters == {"weights_sha256": "ab" * 32, "published": "size-and-keys"}
    assert "published=size-and-keys" in algorithm.identification()[0].AlgorithmParameters
    assert "published" not in Algorithm.from_identity({**weights, "published": None}, "0.1.0").parameters
    with pytest.raises(ValueError, match="published must be one of verified, size-and-keys, differs"):
        Algorithm("model", "0.1.0", "ab" * 32, published="probably")

    require_module("slicer_core", "the Slicer session needs the PyPI package slicer-core (Qt-free MRML)")
    from CTFMLib import session

    assert session.describe_weights(weights) == f"{SEGMENTATION_REPO} (sha256 abababababab), {SIZE_AND_KEYS}"
