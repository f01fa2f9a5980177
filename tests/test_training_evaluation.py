"""The organ semantic-search check: labels land on the CT grid, centroids are in LPS, hits are mask lookups."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from conftest import SHARED, TS_DICOM

from ctfm_engine.models.registry import load_encoder
from ctfm_engine.tasks.embed import Embedder
from ctfm_engine.training.evaluation import LabelledScan, organ_search, shared_organs

DICOM_LABELS = SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz"
LIVER = 5


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


def test_organ_search_reports_a_mask_lookup_and_a_distance(narrow_weights):
    scan = LabelledScan.read(TS_DICOM, DICOM_LABELS)
    organs = shared_organs(scan, scan)
    assert {LIVER, 1, 52} <= set(organs)  # liver, spleen, aorta
    encoder, _ = load_encoder(narrow_weights)
    results = organ_search(Embedder(encoder), scan, scan, [LIVER])
    [result] = results
    assert result.organ == LIVER and -1.0 <= result.similarity <= 1.0 and result.distance_mm >= 0
    assert isinstance(result.hit, bool)
