"""Training recipes are read into typed sections: every recipe in training/ loads, and a misspelt or mistyped key,
in the file or in an override, is refused with one sentence naming the file, the section and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ctfm_engine.errors import UsageError

pytest.importorskip("lightning", reason="the [train] extra (lightning) is not installed")
from ctfm_engine.training.recipe import (  # noqa: E402
    TASK_SECTIONS,
    SegmentationData,
    load_recipe,
    read_section,
)

TRAINING = Path(__file__).resolve().parents[1] / "training"
RECIPES = sorted(TRAINING.glob("*.yaml"))
SEGMENTATION = TRAINING / "finetune_seg_mini_cpu.yaml"


def recipe_with(tmp_path: Path, section: str, key: str, value: object) -> Path:
    """A copy of the CPU segmentation recipe with one key of one section set."""
    given = yaml.safe_load(SEGMENTATION.read_text())
    given.setdefault(section, {})[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(given))
    return path


def test_there_are_recipes_to_check():
    assert {path.name for path in RECIPES} >= {"pretrain_ctfm_mini_cpu.yaml", "finetune_seg_mini_cpu.yaml",
                                                "finetune_triage_mechanics_cpu.yaml", "pretrain_ctfm_paper.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=[path.name for path in RECIPES])
def test_every_recipe_in_training_loads_into_its_tasks_sections(path):
    recipe = load_recipe(path)
    for name, kind in TASK_SECTIONS[recipe.task].items():
        assert isinstance(getattr(recipe, name), kind), name
    assert recipe.manifest.parent == TRAINING / "manifests"  # relative to the recipe's folder
    given = yaml.safe_load(path.read_text())
    assert recipe.trainer.lightning["max_epochs"] == given["trainer"]["max_epochs"]
    assert recipe.data.spacing_zyx_mm == tuple(given["data"]["spacing_zyx_mm"])


def test_a_misspelt_key_is_refused_naming_the_file_the_section_the_key_and_the_accepted_keys(tmp_path):
    path = recipe_with(tmp_path, "data", "patch_size_zxy", [32, 96, 96])
    with pytest.raises(UsageError) as refusal:
        load_recipe(path)
    message = str(refusal.value)
    assert str(path) in message and "section 'data'" in message and "'patch_size_zxy'" in message
    assert "accepted keys: manifest, spacing_zyx_mm, patch_size_zyx," in message
    assert refusal.value.exit_code == 2


def test_an_override_goes_through_the_same_checks_and_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"section 'model' has no key 'init_filter' \(from the override "
                                         r"'model.init_filter=8'\); accepted keys: out_channels, init_filters"):
        load_recipe(SEGMENTATION, ["model.init_filter=8"])
    with pytest.raises(UsageError, match="'batch_size' must be a whole number, got 'two'"):
        load_recipe(SEGMENTATION, ["data.batch_size=two"])
    recipe = load_recipe(SEGMENTATION, ["data.batch_size=3", "optim.learning_rate=1", "trainer.max_epochs=2"])
    assert (recipe.data.batch_size, recipe.optim.learning_rate, recipe.trainer.lightning["max_epochs"]) == (3, 1.0, 2)


def test_mistyped_values_are_refused(tmp_path):
    cases = [("data", "patch_size_zyx", [32, 96], "a list of 3 whole numbers"),
             ("data", "overlap", "half", "a number"),
             ("trainer", "tensorboard", "yes", "true or false"),
             ("output", "weights_dtype", "int8", "one of float32, float16"),
             ("data", "train_volumes", True, "a whole number or null")]
    for section, key, value, expected in cases:
        with pytest.raises(UsageError, match=f"section '{section}': '{key}' must be {expected}"):
            load_recipe(recipe_with(tmp_path, section, key, value))


def test_a_section_the_task_does_not_read_is_refused(tmp_path):
    with pytest.raises(UsageError, match="a 'segmentation' recipe has no section 'predict'"):
        load_recipe(recipe_with(tmp_path, "predict", "threshold", 0.3))


def test_trainer_takes_lightning_arguments_and_refuses_the_runners_own(tmp_path):
    assert load_recipe(SEGMENTATION, ["trainer.gradient_clip_val=1.0"]).trainer.lightning["gradient_clip_val"] == 1.0
    for key in ("max_epoch", "callbacks"):
        with pytest.raises(UsageError, match=f"section 'trainer' has no key '{key}'.*lightning.Trainer arguments"):
            load_recipe(SEGMENTATION, [f"trainer.{key}=1"])


def test_a_required_key_is_asked_for():
    with pytest.raises(UsageError, match="section 'data' needs 'manifest'"):
        read_section(SegmentationData, {"batch_size": 2}, SEGMENTATION, "data")
