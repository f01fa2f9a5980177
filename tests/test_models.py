"""CT-FM encoder checkpoints: published layout, lighter-zoo compatibility, strict loading, weight resolution."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import SAMPLE_CT, SHIPPED_ENCODER, randomise_batchnorm, require_module, run_cli
from safetensors.torch import load_file, save_file

from ctfm_engine.errors import ModelError
from ctfm_engine.models.checkpoint import read_checkpoint, save_checkpoint
from ctfm_engine.models.encoder import CTFM_ENCODER_CONFIG, build_encoder, encoder_config, last_feature_map
from ctfm_engine.models.registry import cached_repo_folder, load_encoder, resolve_weights
from ctfm_engine.preprocess import preprocess
from ctfm_engine.readers import read_volume

lighter_zoo = require_module("lighter_zoo", "lighter-zoo (test-only dependency) is not installed")


@pytest.fixture(scope="module")
def real_patch() -> torch.Tensor:
    """A 32x96x96 patch of the real sample CT in model space."""
    image = preprocess(read_volume(SAMPLE_CT)).image
    return torch.from_numpy(np.ascontiguousarray(image[:, 90:186, 120:216]))[None, None]


def test_full_width_encoder_is_the_published_ct_fm_architecture():
    encoder = build_encoder(CTFM_ENCODER_CONFIG)
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == 77_760_992
    assert len(encoder.state_dict()) == 161
    assert tuple(encoder.state_dict()["conv_init.weight"].shape) == (32, 1, 3, 3, 3)
    assert encoder_config(8)["blocks_down"] == [1, 2, 2, 4, 4]


def test_checkpoint_written_by_lighter_zoo_loads_bit_identically(tmp_path, real_patch):
    torch.manual_seed(1)
    theirs = lighter_zoo.SegResEncoder(spatial_dims=3, in_channels=1, init_filters=8, blocks_down=[1, 2, 2, 4, 4])
    randomise_batchnorm(theirs, seed=1)
    theirs.save_pretrained(tmp_path / "lighter")
    ours, checkpoint = load_encoder(tmp_path / "lighter")
    with torch.inference_mode():
        expected = theirs.eval()(real_patch)
        actual = ours(real_patch)
    assert all(torch.equal(a, b) for a, b in zip(actual, expected, strict=True))
    assert checkpoint.sha256 == hashlib.sha256((tmp_path / "lighter" / "model.safetensors").read_bytes()).hexdigest()


def test_our_checkpoint_loads_into_lighter_zoo_bit_identically(tmp_path, narrow_weights, real_patch):
    ours, _ = load_encoder(narrow_weights)
    theirs = lighter_zoo.SegResEncoder.from_pretrained(str(narrow_weights)).eval()
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(theirs(real_patch), ours(real_patch), strict=True))
    assert set(load_file(str(narrow_weights / "model.safetensors"))) == set(theirs.state_dict())


def test_segmentation_checkpoint_provides_its_encoder_only_when_asked(tmp_path, real_patch):
    torch.manual_seed(2)
    network = lighter_zoo.SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8,
                                    blocks_down=[1, 2, 2, 4, 4])
    network.save_pretrained(tmp_path / "segresnet")
    with pytest.raises(ModelError, match="segmentation model") as refused:
        load_encoder(tmp_path / "segresnet")
    assert refused.value.remedy == "segmentation_encoder"
    encoder, _ = load_encoder(tmp_path / "segresnet", allow_segmentation_encoder=True)
    with torch.inference_mode():
        assert torch.equal(encoder(real_patch)[-1], network.eval().encoder(real_patch)[-1])


def _corrupt(folder, tmp_path, edit):
    target = tmp_path / "edited"
    shutil.copytree(folder, target)
    state = load_file(str(target / "model.safetensors"))
    edit(state)
    save_file(state, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: s.pop("layers.4.blocks.3.conv2.weight"), ["1 missing", "layers.4.blocks.3.conv2.weight"]),
        (lambda s: s.__setitem__("head.weight", torch.zeros(2)), ["1 unexpected", "head.weight"]),
        (lambda s: s.__setitem__("conv_init.weight", torch.zeros(16, 1, 3, 3, 3)),
         ["1 mis-shaped", "conv_init.weight (16, 1, 3, 3, 3) != (8, 1, 3, 3, 3)"]),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_wrong_weights_are_refused_naming_the_keys(tmp_path, narrow_weights, edit, words):
    folder = _corrupt(narrow_weights, tmp_path, edit)
    with pytest.raises(ModelError) as error:
        load_encoder(folder)
    assert error.value.exit_code == 4
    assert all(word in str(error.value) for word in words), str(error.value)
    result = run_cli("embed", SAMPLE_CT, "--weights", folder)
    assert result.code == 4 and "model.safetensors" in result.stderr and words[1] in result.stderr


def test_unreadable_or_incomplete_checkpoints_are_model_errors(tmp_path, narrow_weights):
    broken = tmp_path / "broken"
    shutil.copytree(narrow_weights, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    no_config = tmp_path / "no-config"
    shutil.copytree(narrow_weights, no_config)
    (no_config / "config.json").unlink()
    wrong_config = tmp_path / "wrong-config"
    shutil.copytree(narrow_weights, wrong_config)
    (wrong_config / "config.json").write_text(json.dumps({**encoder_config(16)}))
    for folder, words in [(broken, "not a readable safetensors"), (no_config, "has no config.json"),
                          (wrong_config, "mis-shaped")]:
        result = run_cli("embed", SAMPLE_CT, "--weights", folder, "--json")
        assert result.code == 4, (folder, result.stderr)
        assert words in result.document["error"]["message"]


def test_save_is_atomic_and_records_sha256(tmp_path):
    encoder = build_encoder(encoder_config(4))
    sha = save_checkpoint(encoder, tmp_path / "model", encoder_config(4), card="# card\n")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert read_checkpoint(tmp_path / "model").sha256 == sha
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind
    umask = os.umask(0)
    os.umask(umask)
    # a shipped or shared checkpoint must be readable by others as any file the user writes would be
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()} == {
        name: 0o666 & ~umask for name in ("README.md", "config.json", "model.safetensors")}


def test_exact_slab_forward_equals_whole_volume_forward_on_real_ct(narrow_weights):
    encoder, _ = load_encoder(narrow_weights)
    image = torch.from_numpy(preprocess(read_volume(SAMPLE_CT)).image)[None, None]
    with torch.inference_mode():
        whole = encoder(image)[-1]
        # a budget small enough to force many slabs of a few slices each
        slabs = last_feature_map(encoder, image, memory_budget_bytes=4 * 8 * 284 * 353 * 4 * 14)
    assert slabs.shape == whole.shape
    torch.testing.assert_close(slabs, whole, rtol=1e-4, atol=1e-5)


def test_weights_resolve_from_option_then_environment_then_caches(tmp_path, narrow_weights, monkeypatch,
                                                                  isolated_cache):
    assert resolve_weights(None) == SHIPPED_ENCODER  # nothing given or cached: the bundled demonstration model
    monkeypatch.setenv("CTFM_WEIGHTS", str(narrow_weights))
    assert resolve_weights(None) == narrow_weights
    assert resolve_weights(tmp_path) == tmp_path  # an explicit folder wins over the environment
    monkeypatch.delenv("CTFM_WEIGHTS")
    hub_snapshot = isolated_cache / "hf" / "hub" / "models--project-lighter--ct_fm_feature_extractor" / "snapshots"
    shutil.copytree(narrow_weights, hub_snapshot / "abc123")
    assert resolve_weights(None) == hub_snapshot / "abc123"
    assert load_encoder(None)[1].name == "project-lighter/ct_fm_feature_extractor"
    shutil.copytree(narrow_weights, cached_repo_folder("project-lighter/ct_fm_feature_extractor"))
    assert resolve_weights(None) == cached_repo_folder("project-lighter/ct_fm_feature_extractor")
    with pytest.raises(ModelError, match="ctfm weights pull someone/elses_model"):
        resolve_weights("someone/elses_model")


def test_weights_pull_fails_with_a_clear_offline_message(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline, whatever the network
    result = run_cli("weights", "pull", "project-lighter/ct_fm_feature_extractor", "--json")
    assert result.code == 4
    message = result.document["error"]["message"]
    assert "offline" in message and "huggingface-cli download" in message and "--weights" in message


def test_weights_info_reports_identity(narrow_weights):
    result = run_cli("weights", "info", narrow_weights, "--json")
    assert result.code == 0
    document = result.document
    assert document["config"] == encoder_config(8)
    assert document["weights"]["sha256"] == hashlib.sha256(
        (narrow_weights / "model.safetensors").read_bytes()).hexdigest()


def test_weights_info_describes_what_each_task_would_use_and_announces_a_demonstration_model(isolated_cache):
    result = run_cli("weights", "info", "--json", "-q")  # the encoder `ctfm embed` would use
    assert result.code == 0, result.stderr
    assert result.document["folder"] == str(SHIPPED_ENCODER)
    assert result.document["weights"] == {**read_checkpoint(SHIPPED_ENCODER).identity, "demonstration": True}
    assert result.stderr.splitlines() == ["ctfm: demonstration model ctfm-mini, not CT-FM, not for clinical use"]
    segmentation = run_cli("weights", "info", "--kind", "segmentation", "--json", "-q")
    assert segmentation.document["weights"]["name"] == "ctfm-mini-wholebody-seg"
    triage = run_cli("weights", "info", "--kind", "triage", "--json")
    assert triage.code == 4 and "ctfm finetune" in triage.document["error"]["message"]


def test_weights_list_shows_the_checkpoints_in_the_cache(narrow_weights, isolated_cache):
    assert run_cli("weights", "list", "--json").document["folders"] == []
    shutil.copytree(narrow_weights, cached_repo_folder("project-lighter/ct_fm_feature_extractor"))
    result = run_cli("weights", "list")
    assert result.code == 0 and result.stdout.splitlines() == [
        str(isolated_cache / "models" / "project-lighter--ct_fm_feature_extractor")]
