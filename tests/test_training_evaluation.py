"""The checks of what an encoder learned: labels land on the CT grid, centroids are in LPS, hits are mask lookups,
structure transfer and held-out view matching count what they claim to."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
import torch
from conftest import SAMPLE_CT, SHARED, TS_DICOM

from ctfm_engine.models.registry import load_encoder
from ctfm_engine.preprocess import preprocess
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks.embed import Embedder, PatchWindows
from ctfm_engine.tasks.ocd import organ_centroid_distances
from ctfm_engine.tasks.search import SearchSettings, SemanticSearch
from ctfm_engine.training.augment import ViewAugmentation
from ctfm_engine.training.evaluation import (
    LabelledScan,
    patch_label_transfer,
    structure_group,
    view_matching,
)

DICOM_LABELS = SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz"
LIVER = 5
NAMES = json.loads((SHARED / "labels" / "label_map_totalsegmentator_v2.json").read_text())["total"]


def test_labels_of_a_y_flipped_nifti_land_on_the_dicom_grid():
    scan = LabelledScan.read(TS_DICOM, DICOM_LABELS)
    label_image = sitk.ReadImage(str(DICOM_LABELS))
    array = sitk.GetArrayFromImage(label_image)
    assert scan.labels.shape == scan.volume.shape_zyx
    np.testing.assert_array_equal(scan.labels, array[:, ::-1, :])  # the same grid stored with y flipped
    # centroid computed independently in the label file's own geometry
    index = np.argwhere(array == LIVER).mean(axis=0)[::-1]
    expected = label_image.TransformContinuousIndexToPhysicalPoint(index.tolist())
    np.testing.assert_allclose(scan.centroid_lps(LIVER), expected, atol=1e-6)
    assert scan.label_at(np.array(expected)) == LIVER
    assert scan.label_at(np.array([1e4, 1e4, 1e4])) == 0  # outside the scan


def test_organ_search_on_labelled_scans_reports_a_mask_lookup_and_a_distance(narrow_weights):
    scan = LabelledScan.read(TS_DICOM, DICOM_LABELS)
    encoder, checkpoint = load_encoder(narrow_weights)
    searcher = SemanticSearch(encoder, checkpoint.sha256, settings=SearchSettings(overlap=0.0))
    [result] = organ_centroid_distances(searcher, scan.volume, scan.labels, scan.volume, scan.labels,
                                        names={LIVER: "liver"}, organs=[LIVER], method="exact")
    assert result.label == LIVER and -1.0 <= result.similarity <= 1.0
    match = np.array(result.match_lps)
    assert np.isclose(result.distance_mm, np.linalg.norm(match - scan.centroid_lps(LIVER)))
    assert result.hit == (scan.label_at(match) == LIVER)


def test_structure_groups_ignore_side_level_and_lobe_only():
    groups = {name: structure_group(name) for name in NAMES.values()}
    assert groups["rib_left_7"] == groups["rib_right_12"] == "rib"
    assert groups["vertebrae_L1"] == groups["vertebrae_T12"] == groups["vertebrae_C1"] == "vertebrae"
    assert groups["lung_upper_lobe_left"] == groups["lung_middle_lobe_right"] == "lung"
    assert groups["kidney_left"] == groups["kidney_right"] == "kidney"
    assert groups["iliac_artery_left"] == "iliac_artery" != groups["iliac_vena_left"]
    assert groups["liver"] == "liver" and groups["sacrum"] == "sacrum" and groups["spinal_cord"] == "spinal_cord"
    assert len(set(groups.values())) == 48  # of the 117 labels


def test_structure_transfer_of_a_scan_onto_itself_finds_every_window(narrow_weights):
    # Every window's nearest neighbour among the same windows is itself: all hits, and chance well below 1.
    scan = LabelledScan.read(TS_DICOM, DICOM_LABELS)
    encoder, _ = load_encoder(narrow_weights)
    result = patch_label_transfer(Embedder(encoder), scan, scan, NAMES, windows=PatchWindows((16, 64, 64), 0.0))
    assert result.queries > 10 and result.hits == result.queries
    assert 0.0 < result.chance < 0.5


def test_view_matching_is_perfect_without_augmentation_and_counts_queries(narrow_weights):
    encoder, _ = load_encoder(narrow_weights)
    image = preprocess(read_volume(SAMPLE_CT)).image
    identity = ViewAugmentation(crop_scale=(1.0, 1.0), flip_probability=0.0, histogram_shift_probability=0.0,
                                smooth_probability=0.0)
    torch.manual_seed(0)
    exact = view_matching(encoder, image, crops=6, rounds=2, augmentation=identity)
    assert (exact.hits, exact.queries, exact.chance) == (12, 12, 1 / 6)
    augmented = view_matching(encoder, image, crops=6, rounds=2)
    assert augmented.queries == 12 and 0 <= augmented.hits <= 12
