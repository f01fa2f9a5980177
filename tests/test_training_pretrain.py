"""Intra-sample pre-training on real CT: augmentations, data pipeline, a CPU smoke run, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_CT, SHARED, require_module, run_cli
from safetensors.torch import load_file

from ctfm_engine.preprocess import CTFM_PREPROCESSING, preprocess
from ctfm_engine.readers import read_volume
from ctfm_engine.training.augment import ViewAugmentation, histogram_shift, random_resized_crop
from ctfm_engine.training.data import (
    EpochSampler,
    IntraSampleCrops,
    PreprocessedScans,
    collate_skipping_unreadable,
    read_manifest,
)

require_module("lightning", "the [train] extra (lightning) is not installed")

RECIPE = Path(__file__).resolve().parents[1] / "training" / "pretrain_ctfm_mini_cpu.yaml"
# A few minutes of CPU at most: a tiny patch, few crops, few epochs.
SMOKE = ["data.crops_per_scan=4", "data.patch_size_zyx=[16,32,32]", "data.scans_per_batch=5",
         "data.visits_per_epoch=4", "trainer.log_every_n_steps=1", "optim.warmup_epochs=0",
         "optim.learning_rate=0.0001", "output.weights_dtype=float32"]


def write_manifest(folder: Path, paths: list[Path]) -> Path:
    manifest = folder / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in paths))
    return manifest


@pytest.fixture(scope="module")
def sample_crop() -> torch.Tensor:
    """A 16x64x64 model-space crop of the real sample CT, (1, z, y, x)."""
    image = preprocess(read_volume(SAMPLE_CT)).image
    return torch.from_numpy(np.ascontiguousarray(image[5:21, 100:164, 150:214]))[None]


def test_views_are_deterministic_per_generator_and_keep_shape(sample_crop):
    augmentation = ViewAugmentation()
    first = augmentation(sample_crop, np.random.default_rng([0, 1, 2]))
    again = augmentation(sample_crop, np.random.default_rng([0, 1, 2]))
    other = augmentation(sample_crop, np.random.default_rng([0, 1, 3]))
    assert first.shape == sample_crop.shape and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_resized_crop_zooms_into_a_sub_box(sample_crop):
    full = random_resized_crop(sample_crop, np.random.default_rng(0), (1.0, 1.0))
    torch.testing.assert_close(full, sample_crop)  # s = 1 keeps the crop
    zoomed = random_resized_crop(sample_crop, np.random.default_rng(0), (0.33, 0.34))
    assert zoomed.shape == sample_crop.shape and not torch.allclose(zoomed, sample_crop)


def test_histogram_shift_is_monotone_and_keeps_the_range(sample_crop):
    shifted = histogram_shift(sample_crop, np.random.default_rng(4), 5)
    order = torch.argsort(sample_crop.flatten())
    assert torch.all(torch.diff(shifted.flatten()[order]) >= -1e-6)
    assert np.isclose(shifted.min(), sample_crop.min()) and np.isclose(shifted.max(), sample_crop.max())
    assert not torch.allclose(shifted, sample_crop)


def test_epoch_sampler_is_seeded_by_epoch_and_covers_every_scan():
    sampler = EpochSampler(7, seed=3)
    epoch0 = [index for index, _ in sampler]
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch0) == list(range(7)) and {epoch for _, epoch in epoch1} == {1}
    assert [index for index, _ in epoch1] != epoch0
    sampler.set_epoch(0)
    assert [index for index, _ in sampler] == epoch0


def test_unreadable_scans_are_skipped_and_counted(tmp_path):
    manifest = write_manifest(tmp_path, [SAMPLE_CT, SHARED / "negative-controls" / "example_mr_sm.nii.gz",
                                         tmp_path / "missing.nii.gz"])
    scans = PreprocessedScans(read_manifest(manifest), CTFM_PREPROCESSING)
    dataset = IntraSampleCrops(scans, (16, 32, 32), crops_per_scan=3)
    items = [dataset[(index, 0)] for index in range(3)]
    assert items[0].shape == (3, 2, 1, 16, 32, 32) and items[1] is None and items[2] is None
    assert scans.skipped == {1, 2}
    batch, unreadable = collate_skipping_unreadable(items)
    assert batch.shape == (1, 3, 2, 1, 16, 32, 32) and unreadable == 2
    assert torch.equal(dataset[(0, 0)], items[0]) and not torch.equal(dataset[(0, 1)], items[0])


def pretrain(tmp_path: Path, name: str, *extra: str):
    result = run_cli("pretrain", "--config", RECIPE, "--json", "-q",
                     *[arg for override in [*SMOKE, f"output.dir={tmp_path / name}",
                                            f"output.export={tmp_path / name / 'encoder'}", *extra]
                       for arg in ("--set", override)])
    assert result.code == 0, result.stderr[-3000:]
    return result.document


def test_cpu_smoke_run_learns_and_exports_a_loadable_encoder(tmp_path):
    document = pretrain(tmp_path, "smoke", "trainer.max_epochs=8")
    losses = document["epoch_losses"]
    assert len(losses) == 8 and document["unreadable_scans"] == []
    assert np.mean(losses[-3:]) < losses[0]  # the contrastive loss goes down
    from ctfm_engine.models.registry import load_encoder

    encoder, checkpoint = load_encoder(document["export"])
    assert checkpoint.sha256 == document["weights"]["sha256"]
    card = (Path(document["export"]) / "README.md").read_text()
    assert "not for clinical use" in card and checkpoint.sha256 in card and "TotalSegmentator_0002" in card


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    whole = pretrain(tmp_path, "whole", "trainer.max_epochs=2")
    first = pretrain(tmp_path, "first", "trainer.max_epochs=1", "optim.schedule_epochs=2")
    result = run_cli("pretrain", "--config", RECIPE, "--json", "-q", "--resume", first["checkpoint"],
                     *[arg for override in [*SMOKE, "trainer.max_epochs=2", f"output.dir={tmp_path / 'first'}",
                                            f"output.export={tmp_path / 'resumed'}"] for arg in ("--set", override)])
    assert result.code == 0, result.stderr[-3000:]
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    reference = load_file(str(Path(whole["export"]) / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)
    # the metrics log keeps the epochs before the checkpoint: the whole history, identical to the uninterrupted run
    assert result.document["epoch_losses"] == whole["epoch_losses"] and len(whole["epoch_losses"]) == 2


def test_recipe_mistakes_are_usage_errors(tmp_path):
    typo = run_cli("pretrain", "--config", RECIPE, "--set", "trainer.max_epoch=3", "--set", f"output.dir={tmp_path}")
    assert typo.code == 2 and "max_epoch" in typo.stderr
    missing = run_cli("pretrain", "--config", tmp_path / "nowhere.yaml")
    assert missing.code == 2 and "does not exist" in missing.stderr
    bad_set = run_cli("pretrain", "--config", RECIPE, "--set", "trainer")
    assert bad_set.code == 2 and "key.sub=value" in bad_set.stderr
