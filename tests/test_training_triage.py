"""Head-CT triage: the head preprocessing on real scans, the classifier's CPU mechanics run, exact resume, few-shot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_CT, SHARED, require_module, run_cli
from safetensors.torch import load_file

from ctfm_engine.errors import InputError, ModelError, UsageError
from ctfm_engine.head_ct import (
    HeadCTPreprocessing,
    head_ct_input,
    pad_and_centre_crop,
    window_stack,
)
from ctfm_engine.models.checkpoint import load_state_strict, read_checkpoint
from ctfm_engine.readers import read_volume

require_module("lightning", "the [train] extra (lightning) is not installed")
from ctfm_engine.training.recipe import SegmentationData, load_recipe, read_section, select_training_volumes  # noqa: E402
from ctfm_engine.training.triage import (  # noqa: E402
    HeadCTScans,
    TriageAugmentation,
    TriageClassifier,
    collate_labelled,
    read_triage_manifest,
)

TRAINING = Path(__file__).resolve().parents[1] / "training"
RECIPE = TRAINING / "finetune_triage_mechanics_cpu.yaml"
SLICER_HEAD = SHARED / "dicom" / "slicer_head_64x64"
# A few seconds of CPU per epoch: the recipe's data, labels and schedule on a coarse grid (same field of view).
SMALL = ["data.spacing_zyx_mm=[15,8,8]", "data.spatial_size_zyx=[16,32,32]", "data.visits_per_epoch=2"]


@pytest.fixture(scope="module")
def slicer_head():
    return head_ct_input(read_volume(SLICER_HEAD))


def test_head_preprocessing_of_a_real_head_series_gives_four_windows_along_z(slicer_head):
    image = slicer_head.image
    assert image.shape == (192, 128, 128) and image.dtype == np.float32
    blocks = np.split(image, 4)  # blood, subdural, stroke, bone
    # Each block windows the same HU: where the bone window (WL/WW 600/3000) is not clipped it gives the HU back, and
    # the paper's other windows of that HU (WL/WW 40/80, 25/300, 32/8, clipped to [0, 1]) are what the blocks hold.
    unclipped = (blocks[3] > 0.0) & (blocks[3] < 1.0)
    hu = blocks[3][unclipped].astype(np.float64) * 3000.0 - 900.0
    for block, (level, width) in zip(blocks[:3], [(40.0, 80.0), (25.0, 300.0), (32.0, 8.0)], strict=True):
        expected = np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)
        np.testing.assert_allclose(block[unclipped], expected, atol=1e-4)
    assert unclipped.mean() > 0.2  # the head (about 29% of the block), not only a few voxels
    assert all(not np.array_equal(blocks[i], blocks[j]) for i in range(4) for j in range(i + 1, 4))
    assert float(blocks[3].max()) > 0.4  # bone window: skull is bright there, saturated in the others
    assert slicer_head.grid.shape_zyx == (48, 128, 128) and slicer_head.grid.spacing_xyz_mm == (2.0, 2.0, 5.0)
    checks = slicer_head.checks
    assert checks.looks_like_head and not checks.reasons and checks.skull_extent_mm >= 10
    assert checks.coverage_mm[0] == pytest.approx(93 * 1.5, abs=1.0)  # 93 slices of 1.5 mm
    assert 100 < checks.cranial_width_mm < 200


def test_an_abdominal_ct_is_reported_not_refused():
    result = head_ct_input(read_volume(SAMPLE_CT))
    assert result.image.shape == (192, 128, 128)
    assert not result.checks.looks_like_head and "no cranium" in result.checks.reasons[0]
    assert result.checks.cropped_away_mm[2] > 0  # 354 mm wide: more than the 256 mm field of view


def test_windows_scale_hounsfield_units_as_the_paper():
    hu = np.full((1, 1, 1), 40.0, dtype=np.float32)
    blood, subdural, stroke, bone = window_stack(hu).ravel()
    assert blood == pytest.approx(0.5) and subdural == pytest.approx(165 / 300) and stroke == 1.0
    assert bone == pytest.approx(940 / 3000)


def test_pad_and_centre_crop_match_monai():
    from monai.transforms import CenterSpatialCrop, SpatialPad

    rng = np.random.default_rng(0)
    hu = rng.normal(size=(30, 140, 101)).astype(np.float32)
    size = (48, 128, 128)
    expected = CenterSpatialCrop(size)(SpatialPad(size, mode="minimum")(torch.from_numpy(hu)[None]))[0]
    ours, start = pad_and_centre_crop(hu, size)
    np.testing.assert_array_equal(ours, np.asarray(expected))
    assert start == (-9, 6, -13)  # padded 9 (of 18) before along z, cropped 6 along y, padded 13 (of 27) along x


def test_augmentation_is_seeded_and_keeps_the_stack():
    image = torch.from_numpy(np.linspace(0, 1, 96 * 32 * 32, dtype=np.float32).reshape(1, 96, 32, 32))
    always = TriageAugmentation(probability=1.0)
    first = always(image, np.random.default_rng([0, 1, 2]))
    assert first.shape == image.shape and first.dtype == torch.float32
    assert torch.equal(first, always(image, np.random.default_rng([0, 1, 2])))
    assert not torch.equal(first, always(image, np.random.default_rng([0, 1, 3])))
    assert torch.equal(TriageAugmentation(probability=0.0)(image, np.random.default_rng(0)), image)
    per_window = TriageAugmentation(probability=1.0, per_window=True)(image, np.random.default_rng([0, 1, 2]))
    assert per_window.shape == image.shape and not torch.equal(per_window, first)


def test_unreadable_scans_are_skipped_and_counted(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,split\n" + "".join(f"{path},{label},train\n" for path, label in [
        (SLICER_HEAD, 0),
        (SHARED / "negative-controls" / "example_mr_sm.nii.gz", 1),  # MR
        (SHARED / "dicom" / "ge_head_gantry_tilt", 1),  # both slice blocks together: uneven spacing
        (tmp_path / "missing.nii.gz", 0),
    ]))
    scans = HeadCTScans(read_triage_manifest(manifest), HeadCTPreprocessing(spatial_size_zyx=(24, 32, 32)))
    items = [scans[(index, 0)] for index in range(4)]
    assert items[0][0].shape == (1, 96, 32, 32) and float(items[0][1]) == 0.0
    assert items[1:] == [None, None, None] and scans.skipped == {1, 2, 3}
    images, labels, unreadable = collate_labelled(items)
    assert images.shape == (1, 1, 96, 32, 32) and labels.tolist() == [0.0] and unreadable == 3


def test_a_label_that_is_not_0_or_1_names_the_manifest(tmp_path):
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,label,split\n{SLICER_HEAD},abnormal,train\n")
    with pytest.raises(InputError, match="labels.csv: row 1 has label 'abnormal'"):
        read_triage_manifest(manifest)
    result = run_cli("finetune", "--config", RECIPE, "--set", f"data.manifest={manifest}", "--set",
                     f"output.dir={tmp_path / 'run'}")
    assert result.code == 3 and "labels.csv" in result.stderr


def triage(tmp_path: Path, name: str, *extra: str, resume: str | None = None) -> dict:
    overrides = [*SMALL, f"output.dir={tmp_path / name}", f"output.export={tmp_path / name / 'model'}", *extra]
    result = run_cli("finetune", "--config", RECIPE, "--json", "-q", *(["--resume", resume] if resume else []),
                     *[arg for override in overrides for arg in ("--set", override)])
    assert result.code == 0, result.stderr[-3000:]
    return result.document


def test_cpu_mechanics_run_learns_and_exports_a_checkpoint_with_a_mechanics_only_card(tmp_path):
    document = triage(tmp_path, "smoke", "trainer.max_epochs=3", "output.export_from=best")
    losses = document["epoch_losses"]
    assert document["task"] == "triage" and len(losses) == 3 and losses[-1] < losses[0]
    assert len(document["val_auroc"]) == 3 and document["model_selected"].startswith("best val/auroc")
    predictions = document["predictions"]
    assert [item["split"] for item in predictions] == ["train", "train", "val", "val"]
    assert document["unreadable_rows"] == []
    assert set(document["metrics_by_split"]) == {"train", "val"}

    export = Path(document["export"])
    card = (export / "README.md").read_text()
    assert "MECHANICS ONLY" in card and "not for clinical use" in card and document["weights"]["sha256"] in card
    assert "predictions" not in card and "slicer_head_64x64" in card  # training scans listed, no per-scan output
    checkpoint = read_checkpoint(export)
    assert checkpoint.config["spatial_size_zyx"] == [16, 32, 32] and checkpoint.config["hidden_features"] == 64
    network = TriageClassifier(**checkpoint.config).eval()
    load_state_strict(network, checkpoint.state_dict, str(export))
    preprocessing = network.preprocessing
    for item in predictions:  # every scan's probability is the exported network's, recomputed here
        image = torch.from_numpy(head_ct_input(read_volume(item["input"]), preprocessing).image)[None, None]
        with torch.no_grad():
            probability = float(torch.sigmoid(network(image)))
        assert probability == pytest.approx(item["probability"], abs=1e-5), item["input"]
    from ctfm_engine.models.registry import load_encoder

    with pytest.raises(ModelError, match="fine-tuned task model"):
        load_encoder(export)  # its encoder was fine-tuned: not CT-FM's embeddings unless asked for
    load_encoder(export, allow_segmentation_encoder=True)  # then it loads as a CT-FM encoder (encoder.* keys)


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    once = "data.visits_per_epoch=1"
    whole = triage(tmp_path, "whole", once, "trainer.max_epochs=2")
    first = triage(tmp_path, "first", once, "trainer.max_epochs=1", "optim.schedule_epochs=2")
    resumed = triage(tmp_path, "first", once, "trainer.max_epochs=2", f"output.export={tmp_path / 'resumed'}",
                     resume=first["checkpoint"])
    reference = load_file(str(Path(whole["export"]) / "model.safetensors"))
    weights = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[key], reference[key]) for key in reference)
    assert resumed["epoch_losses"][-1] == whole["epoch_losses"][-1]


def test_few_shot_subsets_are_the_first_rows_or_a_seeded_nested_sample():
    rows = list(range(20))

    def pick(k, seed="absent"):
        given = {"manifest": "rows.csv", "train_volumes": k} | ({} if seed == "absent" else {"subset_seed": seed})
        return select_training_volumes(rows, read_section(SegmentationData, given, RECIPE, "data"))

    assert select_training_volumes(rows, SegmentationData(manifest="rows.csv")) == rows
    assert pick(5) == pick(5, None) == [0, 1, 2, 3, 4]  # the paper: first rows, unshuffled
    five, ten = pick(5, 0), pick(10, 0)
    assert len(five) == 5 and five == sorted(five) and five == pick(5, 0) and set(five) < set(ten)
    assert pick(5, 1) != five
    for bad in (21, 0, "5", True):
        with pytest.raises(UsageError, match="train_volumes"):
            pick(bad)
    with pytest.raises(UsageError, match="subset_seed"):
        pick(5, "zero")


def test_more_few_shot_volumes_than_the_manifest_holds_is_a_usage_error(tmp_path):
    result = run_cli("finetune", "--config", TRAINING / "finetune_seg_mini_cpu.yaml", "--json",
                     "--set", "data.train_volumes=5", "--set", f"output.dir={tmp_path}")
    assert result.code == 2 and "only 1 training scan" in result.stderr
    assert result.document["error"]["exit_code"] == 2


def test_the_paper_recipe_is_consistent():
    recipe = load_recipe(TRAINING / "finetune_triage_sinoct_paper.yaml")
    assert recipe.task == "triage" and recipe.data.spatial_size_zyx == (48, 128, 128)
    trainer = recipe.trainer.lightning
    assert trainer["devices"] * recipe.data.batch_size == 64 and trainer["max_epochs"] == 40
    assert recipe.optim.learning_rate == 1e-4 and recipe.optim.end_learning_rate == 1e-6


def test_manifest_builder_reproduces_ct_fm_splits(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_head_ct_manifest", TRAINING / "build_head_ct_manifest.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    sinoct = tmp_path / "SinoCT"
    names = [f"patient{n:03d}" for n in range(50)]
    for name in names:
        (sinoct / name / "nrrd").mkdir(parents=True)
        (sinoct / name / "nrrd" / "scan.nrrd").touch()
    (sinoct / "labels.csv").write_text("patient_id,label\n" + "".join(
        f'{name},"{"0,1" if n % 3 == 0 else "1,0"}"\n' for n, name in enumerate(names)))
    cq500 = tmp_path / "CQ500"
    for n in (0, 1):
        (cq500 / f"CQ500CT{n} CQ500CT{n}" / "Unknown Study").mkdir(parents=True)
        (cq500 / f"CQ500CT{n} CQ500CT{n}" / "Unknown Study" / "scan.nrrd").touch()
    (cq500 / "reads.csv").write_text("name,Category,R1:ICH,R2:ICH\nCQ500-CT-0,B1,0,1\nCQ500-CT-1,B1,0,0\n")
    out = tmp_path / "manifest.csv"
    assert builder.main(["--sinoct", str(sinoct), "--cq500", str(cq500), "--out", str(out)]) == 0
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert [r[2] for r in rows].count("train") == 40 and [r[2] for r in rows].count("val") == 5
    import random

    expected = sorted(names)
    random.seed(0)
    random.shuffle(expected)
    assert [Path(r[0]).parts[-3] for r in rows[:50]] == expected  # CT-FM's shuffled order
    label_of = {name: "1" if n % 3 == 0 else "0" for n, name in enumerate(names)}
    assert all(r[1] == label_of[Path(r[0]).parts[-3]] for r in rows[:50])
    assert [(r[1], r[2]) for r in rows[50:]] == [("1", "cq500"), ("0", "cq500")]
