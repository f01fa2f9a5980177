"""`ctfm embed` on real CT: the JSON document, the npz file, patch aggregation, DICOM vs NIfTI, batches."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_CT, SHARED, SHIPPED_ENCODER, TS_DICOM, require, run_cli

from ctfm_engine.cli import embed as embed_command
from ctfm_engine.readers import read_volume

HEART_CT = SHARED / "ct-nifti" / "s0335.nii.gz"


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embed_prints_the_documented_json_and_writes_npz_with_provenance(tmp_path, narrow_weights):
    out = tmp_path / "embeddings.npz"
    result = run_cli("embed", SAMPLE_CT, "--weights", narrow_weights, "--out", out, "--json")
    assert result.code == 0, result.stderr
    document = result.document
    sha = document["weights"]["sha256"]
    assert document["weights"] == {"name": "ctfm-narrow-test", "sha256": sha, "demonstration": False}
    assert len(sha) == 64
    [item] = document["results"]
    assert item["input"] == str(SAMPLE_CT) and len(item["embedding"]) == 128  # 16 x init_filters 8
    with np.load(out) as saved:
        metadata = json.loads(str(saved["metadata"]))
        np.testing.assert_allclose(saved["embeddings"][0], item["embedding"], rtol=1e-6)
        assert list(saved["inputs"]) == [str(SAMPLE_CT)]
    assert metadata["weights"]["sha256"] == sha
    assert metadata["preprocessing"]["orientation"] == "SPL"
    assert metadata["preprocessing"]["spacing_zyx_mm"] == [3.0, 1.0, 1.0]
    assert metadata["preprocessing"]["hu_window"] == [-1024.0, 2048.0]


@pytest.mark.parametrize("aggregation, reduce", [("min", np.min), ("mean", np.mean), ("max", np.max)])
def test_patch_level_aggregates_sliding_window_patch_embeddings(tmp_path, narrow_weights, aggregation, reduce):
    out = tmp_path / "patches.npz"
    result = run_cli("embed", SAMPLE_CT, "--weights", narrow_weights, "--level", "patch", "--aggregation",
                     aggregation, "--out", out, "--json", "-q")
    assert result.code == 0, result.stderr
    with np.load(out) as saved:
        patches, centres = saved["patch_embeddings"], saved["patch_centres_lps"]
        np.testing.assert_allclose(saved["embeddings"][0], reduce(patches, axis=0), rtol=1e-6)
    # model space 30x284x353: 24x128x128 windows with steps 9x48x48 -> 2 x 5 x 6 windows
    assert patches.shape == (60, 128) and result.document["results"][0]["patches"] == 60
    volume = read_volume(SAMPLE_CT)
    index = volume.lps_to_zyx_index(centres)
    assert np.all(index > -2) and np.all(index < np.array(volume.shape_zyx) + 1)  # centres lie on the scan


def _nifti_with_sitk(folder, out_dir):
    path = out_dir / "scan.nii.gz"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    sitk.WriteImage(reader.Execute(), str(path))
    return path


def _nifti_with_dcm2niix(folder, out_dir):
    require(shutil.which("dcm2niix"), "dcm2niix (Debian package dcm2niix, installed by `make test` as root) is not "
            "available")
    subprocess.run(["dcm2niix", "-z", "y", "-b", "n", "-f", "scan", "-o", str(out_dir), str(folder)],
                   check=True, capture_output=True)
    return out_dir / "scan.nii.gz"


@pytest.mark.parametrize("converter", [_nifti_with_sitk, _nifti_with_dcm2niix], ids=["simpleitk", "dcm2niix"])
def test_dicom_series_and_its_nifti_give_the_same_geometry_and_embedding(tmp_path, narrow_weights, converter):
    nifti = converter(TS_DICOM, tmp_path)
    from_dicom, from_nifti = read_volume(TS_DICOM), read_volume(nifti)
    assert from_dicom.grid.matches(from_nifti.grid, tolerance_mm=1e-3) or _same_points(from_dicom, from_nifti)
    result = run_cli("embed", TS_DICOM, nifti, "--weights", narrow_weights, "--json")
    assert result.code == 0, result.stderr
    dicom_vector, nifti_vector = (item["embedding"] for item in result.document["results"])
    assert cosine(dicom_vector, nifti_vector) >= 0.999


def _same_points(a, b) -> bool:
    """Same physical grid stored in another axis order (dcm2niix flips rows): every corner maps onto one of b's."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in a.shape_zyx], indexing="ij")).reshape(3, -1).T
    other = np.array(np.meshgrid(*[[0, n - 1] for n in b.shape_zyx], indexing="ij")).reshape(3, -1).T
    pa, pb = a.zyx_index_to_lps(corners), b.zyx_index_to_lps(other)
    distance = np.linalg.norm(pa[:, None] - pb[None], axis=-1).min(axis=1)
    return sorted(a.shape_zyx) == sorted(b.shape_zyx) and bool(distance.max() <= 1e-3)


def test_same_scan_saved_lps_and_ras_embeds_the_same(tmp_path, narrow_weights):
    image = sitk.ReadImage(str(HEART_CT))
    lps = tmp_path / "lps.nrrd"
    sitk.WriteImage(sitk.DICOMOrient(image, "LPS"), str(lps))
    reversed_slices = tmp_path / "reversed.mha"
    sitk.WriteImage(sitk.Flip(image, [False, False, True]), str(reversed_slices))
    result = run_cli("embed", HEART_CT, lps, reversed_slices, "--weights", narrow_weights, "--json")
    assert result.code == 0, result.stderr
    vectors = [item["embedding"] for item in result.document["results"]]
    assert min(cosine(vectors[0], other) for other in vectors[1:]) >= 0.999


def test_head_ct_stored_as_hu_plus_1024_is_embedded_in_hu(narrow_weights, caplog):
    head = SHARED / "dicom" / "slicer_head_64x64"
    auto = run_cli("embed", head, "--weights", narrow_weights, "--json")
    explicit = run_cli("embed", head, "--weights", narrow_weights, "--json", "--hu-offset", "-1024")
    assert auto.code == 0 and explicit.code == 0, auto.stderr + explicit.stderr
    assert auto.document["results"][0]["embedding"] == explicit.document["results"][0]["embedding"]
    assert "HU+1024" in caplog.text  # the shift is announced
    # keeping the stored values is refused: they are not HU
    raw = run_cli("embed", head, "--weights", narrow_weights, "--hu-offset", "0")
    assert raw.code == 3 and "Hounsfield" in raw.stderr


def test_bad_input_among_many_is_refused_before_weights_load_and_leaves_no_output(tmp_path):
    out = tmp_path / "out.npz"
    mr = SHARED / "negative-controls" / "example_mr_sm.nii.gz"
    result = run_cli("embed", SAMPLE_CT, mr, "--weights", tmp_path / "no-such-weights", "--out", out)
    assert result.code == 3
    assert str(mr) in result.stderr and "Hounsfield" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_out_must_be_npz(tmp_path, narrow_weights):
    result = run_cli("embed", SAMPLE_CT, "--weights", narrow_weights, "--out", tmp_path / "x.csv")
    assert result.code == 2 and ".npz" in result.stderr


def test_cuda_request_without_a_gpu_is_a_clear_usage_error(narrow_weights):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = run_cli("embed", SAMPLE_CT, "--weights", narrow_weights, "--device", "cuda")
    assert result.code == 2 and "no CUDA GPU" in result.stderr


def test_embed_without_weights_uses_the_demonstration_model_and_says_so():
    """No --weights, no CTFM_WEIGHTS, an empty cache: the bundled ctfm-mini runs, flagged and announced even with -q."""
    result = run_cli("embed", SAMPLE_CT, "--json", "-q")
    assert result.code == 0, result.stderr
    weights = result.document["weights"]
    shipped = hashlib.sha256((SHIPPED_ENCODER / "model.safetensors").read_bytes()).hexdigest()
    assert weights == {"name": "ctfm-mini", "sha256": shipped, "demonstration": True}
    assert len(result.document["results"][0]["embedding"]) == 128
    assert result.stderr.splitlines() == ["ctfm: demonstration model ctfm-mini, not CT-FM, not for clinical use"]
    assert embed_command.human_lines(result.document)[0] == (
        f"weights: ctfm-mini (sha256 {shipped}) [demonstration model: not CT-FM, not for clinical use]")
