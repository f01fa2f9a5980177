"""Segmentation core: strict SegResNetDS checkpoints, labels on the input's own grid whatever its storage order."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SAMPLE_CT, randomise_batchnorm, run_cli
from monai.networks.nets import SegResNetDS
from test_preprocess import stored_differently

from ctfm_engine.errors import ModelError
from ctfm_engine.models.checkpoint import save_checkpoint
from ctfm_engine.tasks.segment import load_segmentation_model, segment, totalsegmentator_names
from ctfm_engine.training.segmentation import segmentation_config
from ctfm_engine.volume import read_volume


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
