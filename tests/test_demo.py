"""`ctfm demo` runs the main job end to end on the bundled sample CT and says which weights it used."""

from __future__ import annotations

import csv

import numpy as np
import SimpleITK as sitk
from conftest import SHARED, run_cli
from matplotlib.image import imread

from ctfm_engine.demo import sample_ct_path
from ctfm_engine.readers import read_volume

LIVER = 5
LIVER_DICE_FLOOR = 0.5


def test_bundled_sample_is_the_real_totalsegmentator_ct():
    """The sample reads as TotalSegmentator's example_ct_sm (shared/data) read by SimpleITK: same HU, same grid."""
    volume = read_volume(sample_ct_path())
    reference = sitk.ReadImage(str(SHARED / "totalsegmentator" / "example_ct_sm.nii.gz"))
    np.testing.assert_array_equal(volume.voxels, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(volume.spacing_xyz_mm, reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(volume.origin_lps_mm, reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(np.ravel(volume.direction), reference.GetDirection(), atol=1e-6)


def test_demo_uses_the_shipped_demonstration_models_by_default(tmp_path):
    result = run_cli("demo", "--out-dir", tmp_path / "demo", "--json")
    assert result.code == 0, result.stderr
    document = result.document
    assert document["weights"]["name"] == "ctfm-mini" and document["segmentation_weights"]["name"] == \
        "ctfm-mini-wholebody-seg"
    # The bundled models are demonstrations, and the demo says so: in the JSON, on stderr and in its summary.
    assert document["weights"]["demonstration"] is True and document["segmentation_weights"]["demonstration"] is True
    for name in ("ctfm-mini", "ctfm-mini-wholebody-seg"):
        assert result.stderr.count(f"demonstration model {name}, not CT-FM, not for clinical use") == 1
    assert sum("[demonstration model: not CT-FM, not for clinical use]" in line for line in document["summary"]) == 2
    names = ("scan_embedding.npz", "patch_embeddings.npz", "preprocessing.png", "segmentation.nii.gz",
             "structures.csv", "segmentation.png", "measurements.csv")
    paths = [tmp_path / "demo" / name for name in names]
    assert [str(p) for p in paths] == document["outputs"]
    npz, patch_npz, picture, labels_path, table, overlay, measurements = paths
    with np.load(npz) as saved:
        np.testing.assert_allclose(saved["embeddings"][0], document["results"][0]["embedding"], rtol=1e-6)
    with np.load(patch_npz) as saved:
        assert saved["patch_embeddings"].shape[0] == 60
    assert imread(picture).shape[0] > 300 and imread(overlay).shape[0] > 300  # real pictures, not empty files
    # The label map lies on the sample's own grid, and the shipped model finds the liver where TotalSegmentator did
    # (the sample is the scan it was fine-tuned on: this checks the pipeline and geometry, not generalisation).
    labels, sample = sitk.ReadImage(str(labels_path)), sitk.ReadImage(str(sample_ct_path()))
    assert labels.GetSize() == sample.GetSize() and labels.GetSpacing() == sample.GetSpacing()
    np.testing.assert_allclose(labels.GetOrigin(), sample.GetOrigin(), atol=1e-4)
    predicted = sitk.GetArrayFromImage(labels)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED / "totalsegmentator" / "example_seg.nii.gz")))
    liver = (predicted == LIVER), (reference == LIVER)
    assert 2 * np.sum(liver[0] & liver[1]) / (liver[0].sum() + liver[1].sum()) > LIVER_DICE_FLOOR
    with open(table, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert rows and {int(row["label"]) for row in rows} == set(np.unique(predicted)) - {0}
    for row in rows:
        assert int(row["voxels"]) == int(np.sum(predicted == int(row["label"])))
    # the organ measurements: the liver's HU statistics are those of the sample's voxels under the liver label
    with open(measurements, newline="") as stream:
        liver_row = next(row for row in csv.DictReader(stream) if int(row["value"]) == LIVER)
    hu = sitk.GetArrayFromImage(sample)[liver[0]].astype(np.float64)
    assert int(liver_row["voxels"]) == hu.size
    np.testing.assert_allclose([float(liver_row["hu_mean"]), float(liver_row["hu_median"])],
                               [hu.mean(), np.median(hu)], atol=1e-3)


def test_demo_without_any_weights_exits_4_naming_what_is_missing_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("ctfm_engine.models.registry.bundled_weights", lambda name: None)  # as if nothing shipped
    monkeypatch.delenv("CTFM_WEIGHTS", raising=False)
    result = run_cli("demo", "--out-dir", tmp_path / "demo", "--json")
    assert result.code == 4
    message = result.document["error"]["message"]
    assert "no encoder weights" in message and "CTFM_WEIGHTS" in message and "ct_fm_feature_extractor" in message
    assert not (tmp_path / "demo").exists()


def test_demo_uses_configured_weights(tmp_path, narrow_weights, monkeypatch):
    monkeypatch.setenv("CTFM_WEIGHTS", str(narrow_weights))
    result = run_cli("demo", "--out-dir", tmp_path, "--json")
    assert result.code == 0, result.stderr
    assert result.document["weights"]["name"] == "ctfm-narrow-test"
    assert result.document["weights"]["demonstration"] is False  # our own test checkpoint is not a bundled one
    assert "demonstration model ctfm-mini," not in result.stderr
