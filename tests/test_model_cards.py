"""The published checkpoints run as their model cards run them, where a documented choice says so.

The model cards' usage snippets are re-implemented here from scratch with MONAI transforms and lighter-zoo (the
authors' wrapper), and compared with what the engine gives for the same real CT and the same full-size
published-layout checkpoints (random weights, written by lighter-zoo: equality, never quality):

- ct_fm_feature_extractor card: LoadImage -> EnsureType -> Orientation SPL -> ScaleIntensityRange [-1024, 2048] to
  [0, 1] clipped -> CropForeground (x > 0) -> encoder -> last map -> global average pool.  ``preprocessing="card"``
  gives the same 512 numbers to 1e-5.
- whole_body_segmentation card: the same preprocessing, SlidingWindowInferer, softmax, arg-max,
  KeepLargestConnectedComponent, Invert.  ``spacing="native"`` with the default post-processing gives its labels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ENCODER_REPO, SAMPLE_CT, SEGMENTATION_REPO, SHARED, require_module, run_cli

from ctfm_engine.pipelines.embedding import EmbeddingRequest, run_embedding
from ctfm_engine.pipelines.segmentation import SegmentationRequest, run_segmentation

OBLIQUE_CT = SHARED / "ct-nifti" / "TotalSegmentator_0002_0000.nii.gz"  # not axis-aligned: orientation matters


def card_preprocessing():
    from monai.transforms import Compose, CropForeground, EnsureType, LoadImage, Orientation, ScaleIntensityRange

    return Compose([LoadImage(ensure_channel_first=True), EnsureType(), Orientation(axcodes="SPL"),
                    ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True), CropForeground()])


@pytest.fixture
def use_published(published_cache, monkeypatch):
    monkeypatch.setenv("CTFM_CACHE", str(published_cache))
    return published_cache


@pytest.mark.parametrize("scan", [SAMPLE_CT, OBLIQUE_CT], ids=["sample-ct", "oblique-ct"])
def test_card_preprocessing_gives_the_feature_extractor_cards_embedding(use_published, scan):
    lighter_zoo = require_module("lighter_zoo", "the card's model class comes from lighter-zoo (installed by make)")
    folder = use_published / "models" / ENCODER_REPO.replace("/", "--")
    model = lighter_zoo.SegResEncoder.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        image = card_preprocessing()(str(scan))
        card = torch.nn.functional.adaptive_avg_pool3d(model(image.unsqueeze(0))[-1], 1).flatten().numpy()
    ours = run_embedding(EmbeddingRequest([scan], weights=ENCODER_REPO, preprocessing="card"))
    vector = ours.embeddings[0].vector
    assert vector.shape == card.shape == (512,)
    assert ours.embeddings[0].model_shape_zyx == tuple(image.shape[1:])  # the card's cropped grid, voxel for voxel
    np.testing.assert_allclose(vector, card, rtol=0, atol=1e-5)
    # the default (CT-FM's pre-training preprocessing) is deliberately another input, hence another vector
    pretraining = run_embedding(EmbeddingRequest([scan], weights=ENCODER_REPO)).embeddings[0].vector
    assert np.abs(pretraining - card).max() > 1e-3


def test_native_spacing_gives_the_whole_body_cards_labels(use_published, tmp_path):
    require_module("skimage", "MONAI's KeepLargestConnectedComponent (the card's) needs scikit-image")
    lighter_zoo = require_module("lighter_zoo", "the card's model class comes from lighter-zoo (installed by make)")
    import SimpleITK as sitk
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import Activations, AsDiscrete, Invert, KeepLargestConnectedComponent

    # a 20 x 50 x 60 voxel crop of the real sample CT: one 96x160x160 window at native spacing
    crop = tmp_path / "abdomen_crop.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE_CT))[30:90, 30:80, 5:25], str(crop))
    folder = use_published / "models" / SEGMENTATION_REPO.replace("/", "--")
    model = lighter_zoo.SegResNet.from_pretrained(str(folder)).eval()
    preprocessing = card_preprocessing()
    inferer = SlidingWindowInferer(roi_size=(96, 160, 160), sw_batch_size=1, overlap=0.625, mode="gaussian")
    with torch.no_grad():
        image = preprocessing(str(crop))
        logits = inferer(image.unsqueeze(0), model)[0]
    labels = KeepLargestConnectedComponent()(AsDiscrete(argmax=True)(Activations(softmax=True)(logits)))
    card = np.asarray(Invert(transform=preprocessing)(labels))[0].transpose(2, 1, 0)  # ITK (x, y, z) -> (z, y, x)

    ours = run_segmentation(SegmentationRequest(crop, weights=SEGMENTATION_REPO, spacing="native"))
    assert ours.largest_component and ours.describe_model()["spacing"]["choice"] == "native"
    assert ours.labels.shape == card.shape
    # the same labels up to float rounding in the blend (features, then the 1x1x1 head, vs logits)
    disagree = float(np.mean(ours.labels != card))
    assert disagree < 1e-3, f"{disagree:.2%} of voxels differ from the card's labels"


def test_published_segmentation_cleans_up_islands_by_default_and_records_its_choices(use_published, tmp_path):
    import SimpleITK as sitk
    from scipy import ndimage

    crop = tmp_path / "abdomen_crop.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE_CT))[30:90, 30:80, 5:25], str(crop))
    runs = {}
    for name, extra in (("default", ()), ("islands", ("--no-largest-component",))):
        out = tmp_path / f"{name}.nii.gz"
        result = run_cli("segment", crop, "--out", out, "--model", SEGMENTATION_REPO, "--json", "-q", *extra)
        assert result.code == 0, result.stderr
        runs[name] = (result.document, sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
    default, islands = runs["default"][0]["model"], runs["islands"][0]["model"]
    assert default["largest_component"] is True and islands["largest_component"] is False
    assert default["spacing"] == {"choice": "trained", "spacing_zyx_mm": [1.5, 1.5, 1.5],
                                  "meaning": "the voxel size the model was trained at (default)"}
    assert default["preprocessing"]["foreground_above_hu"] == -1024.0
    cleaned, raw = runs["default"][1], runs["islands"][1]
    # random weights give many islands: the clean-up removed some, and what it removed is counted per label
    removed = sum(row["removed_voxels"] for row in runs["default"][0]["labels"])
    assert removed > 0 and all(row["removed_voxels"] == 0 for row in runs["islands"][0]["labels"])
    assert np.all((cleaned == raw) | (cleaned == 0))  # it only ever removes voxels
    assert int(np.sum(cleaned != raw)) >= removed
    pieces = [ndimage.label(raw == value)[1] for value in np.unique(raw)[1:]]
    assert max(pieces) > 1  # the raw map had islands to clean


def test_a_segmentation_checkpoints_encoder_is_refused_for_embeddings_unless_asked(use_published):
    refused = run_cli("embed", SAMPLE_CT, "--weights", SEGMENTATION_REPO, "--json", "-q")
    assert refused.code == 4, refused.stderr
    message = refused.document["error"]["message"]
    assert "segmentation model" in message and "not CT-FM's" in message and "--allow-segmentation-encoder" in message
    allowed = run_cli("embed", SAMPLE_CT, "--weights", SEGMENTATION_REPO, "--allow-segmentation-encoder", "--json",
                      "-q")
    assert allowed.code == 0, allowed.stderr
    assert len(allowed.document["results"][0]["embedding"]) == 512
    search = run_cli("search", "--source", SAMPLE_CT, "--point", "0", "-200", "100", "--target", SAMPLE_CT,
                     "--weights", SEGMENTATION_REPO, "--json", "-q")
    assert search.code == 4 and "segmentation model" in search.document["error"]["message"]
