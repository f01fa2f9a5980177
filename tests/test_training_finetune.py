"""Segmentation fine-tuning on real labelled CT: class-balanced patches, Dice, a CPU smoke run, the exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SAMPLE_CT, SAMPLE_LABELS, SHARED, require_module, run_cli

from ctfm_engine.preprocess import CTFM_PREPROCESSING
from ctfm_engine.training.data import ManifestEntry

require_module("lightning", "the [train] extra (lightning) is not installed")
from ctfm_engine.training.segmentation import LabelledPatches, dice_per_class  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "training" / "finetune_seg_mini_cpu.yaml"


def test_patches_are_centred_on_labelled_structures():
    dataset = LabelledPatches([ManifestEntry(SAMPLE_CT, labels=SAMPLE_LABELS)], CTFM_PREPROCESSING, (16, 64, 64),
                              visits_per_epoch=20)
    seen = set()
    for index in range(len(dataset)):
        image, labels = dataset[(index, 0)]
        assert image.shape == (1, 16, 64, 64) and labels.shape == (1, 16, 64, 64) and labels.dtype == torch.float32
        present = {int(value) for value in torch.unique(labels).tolist()} - {0}
        assert present  # never a background-only patch
        seen |= present
    assert len(seen) > 15  # classes are sampled evenly, so small structures show up too
    assert torch.equal(dataset[(3, 1)][1], dataset[(3, 1)][1]) and not torch.equal(dataset[(3, 1)][1],
                                                                                    dataset[(3, 2)][1])


def test_dice_per_class_ignores_classes_absent_from_the_reference():
    reference = np.array([0, 1, 1, 1, 2, 2, 0, 0])
    prediction = np.array([0, 1, 1, 0, 2, 0, 3, 0])
    scores = dice_per_class(prediction, reference)
    assert scores.keys() == {1, 2}
    assert scores[1] == pytest.approx(2 * 2 / (2 + 3)) and scores[2] == pytest.approx(2 * 1 / (1 + 2))


def test_cpu_fine_tuning_from_an_encoder_checkpoint_exports_a_published_layout_model(tmp_path, narrow_weights):
    overrides = [f"model.encoder_weights={narrow_weights}", "trainer.max_epochs=3", "data.visits_per_epoch=2",
                 "data.patch_size_zyx=[16,64,64]", "data.roi_size_zyx=[16,64,64]", "data.batch_size=2",
                 f"output.dir={tmp_path / 'run'}", f"output.export={tmp_path / 'model'}"]
    result = run_cli("finetune", "--config", RECIPE, "--json", "-q", *[a for o in overrides for a in ("--set", o)])
    assert result.code == 0, result.stderr[-3000:]
    document = result.document
    assert len(document["epoch_losses"]) == 3 and document["epoch_losses"][-1] < document["epoch_losses"][0]
    [report] = document["held_out_dice"]
    assert report["input"] == "ts_abdomen_20slices_j2k" and "liver" in report["dice"]
    # one Dice per structure of the held-out scan's label map, and their mean (each reported to 4 decimals)
    held_out = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz")))
    names = json.loads((SHARED / "labels" / "label_map_totalsegmentator_v2.json").read_text())["total"]
    assert set(report["dice"]) <= {names[str(value)] for value in np.unique(held_out) if value}
    assert report["macro_dice"] == pytest.approx(np.mean(list(report["dice"].values())), abs=1e-4)
    from ctfm_engine.models.registry import load_encoder

    _, narrow = load_encoder(narrow_weights)
    assert document["encoder_sha256"] == narrow.sha256
    lighter_zoo = require_module("lighter_zoo", "lighter-zoo (test-only dependency) is not installed")
    network = lighter_zoo.SegResNet.from_pretrained(str(tmp_path / "model")).eval()
    assert network.up_layers[-1].head.out_channels == 118
    # ...and ctfm segment reads how it was trained to see CT from the file beside config.json.
    from ctfm_engine.tasks.segment import open_segmentation_model

    model = open_segmentation_model(tmp_path / "model")
    assert model.settings_source == "checkpoint" and model.names[5] == "liver" and model.roi_size_zyx == (16, 64, 64)
    assert model.preprocessing.spacing_zyx_mm == (3.0, 1.0, 1.0)  # the recipe's data.spacing_zyx_mm
    card = (tmp_path / "model" / "README.md").read_text()
    assert "not for clinical use" in card and document["weights"]["sha256"] in card


def test_a_pretraining_recipe_is_refused_by_finetune():
    result = run_cli("finetune", "--config", RECIPE.parent / "pretrain_ctfm_mini_cpu.yaml")
    assert result.code == 2 and "ctfm finetune" in result.stderr
