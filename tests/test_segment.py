"""Segmentation core: strict SegResNetDS checkpoints, labels on the input's own grid whatever its storage order."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SAMPLE_CT, SAMPLE_LABELS, SHARED, SHIPPED_SEG, randomise_batchnorm, require_module, run_cli
from monai.networks.nets import SegResNetDS
from test_preprocess import stored_differently

from ctfm_engine.errors import ModelError
from ctfm_engine.models.checkpoint import save_checkpoint
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks.segment import load_segmentation_model, segment, totalsegmentator_names
from ctfm_engine.training.segmentation import segmentation_config


@pytest.fixture(scope="module")
def narrow_segmenter(tmp_path_factory) -> tuple:
    torch.manual_seed(0)
    config = segmentation_config(out_channels=6, init_filters=4)
    network = SegResNetDS(**config)
    randomise_batchnorm(network)
    folder = tmp_path_factory.mktemp("seg") / "narrow-seg"
    save_checkpoint(network, folder, config)
    return folder, config


def test_labels_come_back_on_the_source_grid_for_any_storage_order(narrow_segmenter, tmp_path):
    network, _ = load_segmentation_model(narrow_segmenter[0])
    volume = read_volume(SAMPLE_CT)
    result = segment(volume, network, roi_size_zyx=(16, 64, 64))
    assert result.labels.shape == volume.shape_zyx and result.labels.dtype == np.uint8
    assert len(np.unique(result.labels)) >= 2  # a randomised network still draws more than one class
    written = sitk.ReadImage(str(result.write(tmp_path / "labels.nii.gz")))
    reference = volume.to_sitk()
    assert written.GetSize() == reference.GetSize() and written.GetSpacing() == reference.GetSpacing()
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), result.labels)
    # The same scan stored with x and y reversed: the same labels at the same physical voxels.
    flipped = stored_differently(volume, [True, True, False])
    again = segment(flipped, network, roi_size_zyx=(16, 64, 64))
    np.testing.assert_array_equal(again.labels[:, ::-1, ::-1], result.labels)


def test_structure_volumes_are_voxel_counts_times_voxel_size(narrow_segmenter):
    network, _ = load_segmentation_model(narrow_segmenter[0])
    volume = read_volume(SAMPLE_CT)
    result = segment(volume, network, roi_size_zyx=(16, 64, 64))
    rows = result.structures(totalsegmentator_names())
    assert rows and all(row["label"] != 0 for row in rows)
    for row in rows:
        assert row["voxels"] == int(np.sum(result.labels == row["label"]))
        assert row["volume_ml"] == pytest.approx(row["voxels"] * 27.0 / 1000.0, abs=0.01)  # 3 mm voxels
    assert rows[0]["name"] == totalsegmentator_names()[rows[0]["label"]]


def test_an_encoder_checkpoint_is_refused_as_a_segmentation_model(narrow_weights, tmp_path):
    with pytest.raises(ModelError, match="not a segmentation checkpoint"):
        load_segmentation_model(narrow_weights)
    result = run_cli("demo", "--out-dir", tmp_path / "demo", "--seg-weights", narrow_weights, "--json")
    assert result.code == 4 and "not a segmentation checkpoint" in result.document["error"]["message"]
    assert not (tmp_path / "demo").exists()  # nothing written


def test_names_follow_the_totalsegmentator_v2_channel_order():
    names = totalsegmentator_names()
    assert len(names) == 117 and names[1] == "spleen" and names[5] == "liver" and names[117] == "costal_cartilages"


# ---- ctfm segment with the shipped, trained whole-body model (ctfm-mini-wholebody-seg, 118 classes) ----

FAST = ["--overlap", "0.25"]  # 12 windows of 32x128x128 on the sample instead of 20


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory):
    """``ctfm segment`` of the sample CT with the shipped model: its JSON document and the label map as read back."""
    folder = tmp_path_factory.mktemp("segment")
    result = run_cli("segment", SAMPLE_CT, "--out", folder / "labels.nii.gz", "--volumes", folder / "volumes.csv",
                     "--json", "-q", *FAST)
    assert result.code == 0, result.stderr
    return result.document, sitk.ReadImage(str(folder / "labels.nii.gz")), folder


def test_segment_writes_labels_on_the_source_grid_and_finds_the_liver(shipped_run):
    document, written, _ = shipped_run
    reference = sitk.ReadImage(str(SAMPLE_CT))
    assert written.GetSize() == reference.GetSize() and written.GetSpacing() == reference.GetSpacing()
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(written)
    silver = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS)))
    liver, expected = labels == 5, silver == 5
    dice = 2 * np.sum(liver & expected) / (np.sum(liver) + np.sum(expected))
    assert dice > 0.5  # a weak demonstration model, but it has learnt where the liver is (on the source grid)
    assert document["weights"]["sha256"].startswith("39087ead") and document["weights"]["demonstration"] is True
    assert document["model"]["settings"] == "checkpoint" and document["model"]["roi_size_zyx"] == [32, 128, 128]
    rows = {row["value"]: row for row in document["labels"]}
    assert rows[5]["name"] == "liver" and rows[5]["voxels"] == int(liver.sum())
    assert rows[5]["volume_ml"] == pytest.approx(liver.sum() * 27 / 1000, abs=0.01)
    assert rows[5]["snomed"]["type"] == {"scheme": "SCT", "value": "10200004", "meaning": "Liver"}


def test_segment_resolves_a_hub_repo_id_through_the_cache(shipped_run, isolated_cache, tmp_path):
    repo = "project-lighter/whole_body_segmentation"
    missing = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "none.nii.gz", "--model", repo, "--json", "-q")
    assert missing.code == 4 and f"ctfm weights pull {repo}" in missing.document["error"]["message"]
    shutil.copytree(SHIPPED_SEG, isolated_cache / "models" / "project-lighter--whole_body_segmentation")  # as pulled
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "labels.nii.gz", "--model", repo, "--json", "-q",
                     *FAST)
    assert result.code == 0, result.stderr
    document, written, _ = shipped_run
    # a copy of the demonstration model is still one: recognised by its sha256, and announced
    weights = result.document["weights"]
    assert {key: weights[key] for key in ("name", "sha256", "demonstration")} == {
        "name": repo, "sha256": document["weights"]["sha256"], "demonstration": True}
    # and its name claims the published repo, which its fingerprint contradicts
    assert weights["published"]["status"] == "differs" and "differs" in weights["published"]["statement"]
    assert result.stderr.splitlines() == [f"ctfm: demonstration model {repo}, not CT-FM, not for clinical use"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz"))),
                                  sitk.GetArrayFromImage(written))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labels.nii.gz"]


def test_volume_table_lists_every_structure_with_codes_and_colour(shipped_run):
    document, written, folder = shipped_run
    import csv

    with (folder / "volumes.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["value"]) for row in rows] == [row["value"] for row in document["labels"]]
    counts = np.bincount(sitk.GetArrayFromImage(written).ravel())
    for row in rows:
        assert int(row["voxels"]) == counts[int(row["value"])]
        assert len(row["color_rgb"].split()) == 3 and row["snomed_type_code"].isdigit()


def test_a_reoriented_copy_segments_to_the_same_physical_voxels(shipped_run, tmp_path):
    _, written, _ = shipped_run
    original = sitk.GetArrayFromImage(written)
    # The same scan stored RAS-vs-LPS flipped and with x/y transposed in the array: another file, same anatomy.
    copy = sitk.PermuteAxes(sitk.Flip(sitk.ReadImage(str(SAMPLE_CT)), [True, False, True]), [1, 0, 2])
    sitk.WriteImage(copy, str(tmp_path / "restored.nii.gz"))
    result = run_cli("segment", tmp_path / "restored.nii.gz", "--out", tmp_path / "labels.nrrd", "-q", *FAST)
    assert result.code == 0, result.stderr
    again = sitk.ReadImage(str(tmp_path / "labels.nrrd"))
    assert again.GetSize() == copy.GetSize() and again.GetDirection() == pytest.approx(copy.GetDirection())
    back = sitk.GetArrayFromImage(again).transpose(0, 2, 1)[::-1, :, ::-1]  # undo: (z, x, y) -> (z, y, x), flips
    assert back.shape == original.shape
    assert np.mean(back == original) >= 0.999
    assert np.sum((back == 5) & (original == 5)) >= 0.999 * np.sum(original == 5)


def test_streamed_windows_equal_monai_sliding_window_inference():
    from monai.inferers import sliding_window_inference

    from ctfm_engine.preprocess import preprocess
    from ctfm_engine.runtime.backends import TorchBackend
    from ctfm_engine.tasks.segment import sliding_window_labels

    network, _ = load_segmentation_model(SHIPPED_SEG)
    image = preprocess(read_volume(SAMPLE_CT)).image[:, 60:200, 80:260]  # 30x140x180 model voxels, real CT
    roi, overlap = (32, 64, 96), 0.5  # z padded (30 < 32), several windows in y and x
    with torch.no_grad():
        reference = sliding_window_inference(torch.from_numpy(image)[None, None], roi, 2, network,
                                             overlap=overlap, mode="gaussian").argmax(1)[0].numpy()
    ours = sliding_window_labels(image, TorchBackend(network), roi, overlap, batch_size=3)
    assert ours.shape == image.shape and len(np.unique(ours)) >= 2
    assert np.mean(ours == reference) >= 0.9999


def test_progress_is_reported_and_cancel_stops_the_run_without_output(tmp_path):
    import threading

    from ctfm_engine.progress import Cancelled
    from ctfm_engine.tasks.segment import open_segmentation_model

    model = open_segmentation_model(SHIPPED_SEG)
    volume = read_volume(SAMPLE_CT)
    cancel, seen = threading.Event(), []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if done >= 2:
            cancel.set()

    with pytest.raises(Cancelled):
        segment(volume, model.network, model.preprocessing, model.roi_size_zyx, 0.25, progress=progress, cancel=cancel)
    assert seen == [(1, 12), (2, 12)]  # stopped at the next window, 10 windows early


def test_largest_component_keeps_one_piece_per_structure():
    from monai.transforms import KeepLargestConnectedComponent
    from scipy import ndimage

    from ctfm_engine.tasks.segment import keep_largest_components

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS))).copy()
    labels[0:2, 0:2, 0:2] = 5  # a stray liver island far from the liver
    original = labels.copy()
    before = np.bincount(labels.ravel(), minlength=118)
    removed = keep_largest_components(labels)
    removed_counts = np.bincount(removed.ravel(), minlength=118)
    assert removed_counts[5] >= 8 and np.array_equal(removed[labels != original], original[labels != original])
    for value in np.unique(labels)[1:]:
        assert ndimage.label(labels == value, structure=np.ones((3, 3, 3)))[1] == 1
        assert before[value] - np.sum(labels == value) == removed_counts[value]
    # The card's post-processing is MONAI's KeepLargestConnectedComponent on the arg-max map: the same voxels.
    card = KeepLargestConnectedComponent()(original[None].astype(np.int64))[0]
    assert np.array_equal(np.asarray(card), labels)


def test_wrong_class_count_and_non_ct_inputs_are_refused(narrow_segmenter, tmp_path):
    # config.json says 118 classes, the weights hold 6: refused naming the folder, nothing written.
    folder, config = narrow_segmenter
    liar = tmp_path / "liar"
    liar.mkdir()
    (liar / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (liar / "config.json").write_text(json.dumps({**config, "out_channels": 118}))
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "a.nii.gz", "--model", liar, "--json")
    assert result.code == 4 and "liar" in result.document["error"]["message"]
    assert "mis-shaped" in result.document["error"]["message"] and not (tmp_path / "a.nii.gz").exists()
    # An MR scan is refused as input (exit 3) before any model is read -- even a missing one.
    mr = SHARED / "negative-controls" / "example_mr_sm.nii.gz"
    result = run_cli("segment", mr, "--out", tmp_path / "b.nii.gz", "--model", tmp_path / "nowhere", "--json")
    assert result.code == 3 and "example_mr_sm" in result.document["error"]["message"]
    assert not (tmp_path / "b.nii.gz").exists()
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "c.png")
    assert result.code == 2 and "--out" in result.stderr
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "d.nii.gz", "--roi", "30", "128", "128")
    assert result.code == 2 and "multiple of 16" in result.stderr


def test_the_published_whole_body_layout_gets_its_training_recipe(tmp_path):
    lighter_zoo = require_module("lighter_zoo", "lighter-zoo (test-only dependency) is not installed")
    from ctfm_engine.tasks.segment import open_segmentation_model

    # project-lighter/whole_body_segmentation as lighter-zoo writes it: SegResNetDS arguments only in config.json.
    network = lighter_zoo.SegResNet(spatial_dims=3, in_channels=1, out_channels=118, init_filters=32,
                                    blocks_down=[1, 2, 2, 4, 4], dsdepth=4)
    network.save_pretrained(tmp_path / "whole_body_segmentation")
    model = open_segmentation_model(tmp_path / "whole_body_segmentation", expect_channels=118)
    assert model.settings_source.startswith("published")
    assert model.preprocessing.spacing_zyx_mm == (1.5, 1.5, 1.5) and model.preprocessing.foreground_above_hu == -1024
    assert model.roi_size_zyx == (96, 160, 160) and model.overlap == 0.625
    assert model.names[90] == "brain" and model.labels()[9].laterality == "left"
    with pytest.raises(ModelError, match="118 output classes, not the 6"):
        open_segmentation_model(tmp_path / "whole_body_segmentation", expect_channels=6)


def test_a_config_without_its_optional_decoder_fields_loads_them_from_the_weights_and_stays_strict(tmp_path):
    """lighter-zoo loads a config.json without ``dsdepth``/``out_channels`` (non-strictly); here they are read from the
    keys and shapes of the weights, and every key and shape is still checked."""
    from ctfm_engine.tasks.segment import open_segmentation_model

    reference = open_segmentation_model(SHIPPED_SEG)
    folder = tmp_path / "no-optional-fields"
    shutil.copytree(SHIPPED_SEG, folder)
    config = json.loads((folder / "config.json").read_text())
    assert {"dsdepth", "out_channels"} <= set(config)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                    if k not in ("dsdepth", "out_channels")}))
    loaded = open_segmentation_model(folder)
    assert (loaded.out_channels, loaded.network.dsdepth) == (config["out_channels"], config["dsdepth"])
    for key, value in reference.network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value), key
    (folder / "config.json").write_text(json.dumps({**config, "dsdepth": config["dsdepth"] - 1}))
    with pytest.raises(ModelError, match="unexpected key"):  # a given field that contradicts the weights: refused
        open_segmentation_model(folder)


def test_a_model_grid_beyond_the_machine_is_refused_before_allocation_and_a_long_ct_is_not(tmp_path):
    from ctfm_engine.preprocess import Preprocessing
    from ctfm_engine.tasks.segment import available_memory_bytes, estimate_memory
    from ctfm_engine.volume import Grid

    # 0.1 mm voxels turn the 366 x 303 x 90 mm sample into a 900 x 3030 x 3660 grid: refused with the sizes, exit 3
    out = tmp_path / "labels.nii.gz"
    result = run_cli("segment", SAMPLE_CT, "--out", out, "--spacing", "0.1", "--json", "-q")
    assert result.code == 3, result.stderr
    message = result.document["error"]["message"]
    assert "900 x 3030 x 3660 model grid" in message and "GiB" in message and "--spacing" in message, message
    assert not out.exists()
    assert run_cli("segment", SAMPLE_CT, "--out", out, "--spacing", "fine").code == 2
    # a long clinical CT (512 x 512 x 1500 at 0.7 mm: 1.05 m of patient) at the published recipe needs a bounded
    # few GiB -- the source grid dominates, not the model -- and fits the machines this runs on
    long_ct = Grid((1500, 512, 512), (0.7, 0.7, 0.7), (0.0, 0.0, 0.0), np.eye(3))
    estimate = estimate_memory(long_ct, Preprocessing((1.5, 1.5, 1.5), (-1024.0, 2048.0), -1024.0), 32,
                               (96, 160, 160))
    assert estimate.model_shape_zyx == (700, 239, 239)
    assert 1.0 < estimate.bytes_needed / 2**30 < 6.0, estimate.describe()
    available = available_memory_bytes()
    assert available is None or estimate.bytes_needed < available
