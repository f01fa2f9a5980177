"""The check that an input is CT in Hounsfield units (ctfm_engine.volume.check_hounsfield) refuses what cannot be CT
and nothing else: organ crops of a real CT are read, MR, a skull-stripped template, CT stored as HU+1024 and
probability maps are refused in one sentence, and a true CT that fails it (a crop inside one organ) is read when the
user says so -- in the engine, the ``ctfm`` command and ``ctfm index build``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_CT, SAMPLE_LABELS, SHARED, TS_DICOM, run_cli

from ctfm_engine.errors import InputError
from ctfm_engine.pipelines.inputs import ScanSource
from ctfm_engine.readers import read_volume

SLICER_HEAD = SHARED / "dicom" / "slicer_head_64x64"
LIVER = 5
STRUCTURES = 41  # labelled in the sample CT


def centroid_index(labels: np.ndarray, label: int) -> np.ndarray:
    """The structure's centroid as a continuous (x, y, z) voxel index of its label map."""
    return np.argwhere(labels == label).mean(axis=0)[::-1]


def crop(ct: sitk.Image, centre_xyz: np.ndarray, size_mm: float, spacing_mm: float = 1.5) -> sitk.Image:
    """A cube of ``size_mm`` at ``spacing_mm`` isotropic, centred on ``centre_xyz`` (a continuous voxel index of
    ``ct``), linearly resampled from ``ct`` and clipped to the scan: a sub-volume, never padded (every new voxel
    centre lies within the scan's first and last voxel centres; a voxel outside would read NaN)."""
    ct_spacing = np.array(ct.GetSpacing())
    half_span = (size_mm - spacing_mm) / 2 / ct_spacing  # centre to the outermost voxel centre, in ct voxels
    last = np.array(ct.GetSize()) - 1.0
    low, high = np.clip(centre_xyz - half_span, 0, last), np.clip(centre_xyz + half_span, 0, last)
    size = np.floor((high - low) * ct_spacing / spacing_mm + 1e-6).astype(int) + 1
    origin = ct.TransformContinuousIndexToPhysicalPoint(low.tolist())
    return sitk.Resample(ct, [int(n) for n in size], sitk.Transform(), sitk.sitkLinear, origin, (spacing_mm,) * 3,
                         ct.GetDirection(), float("nan"), sitk.sitkFloat32)


def organ_crops(folder: Path, size_mm: float = 96.0) -> dict[int, Path]:
    """A ``size_mm`` crop of the sample CT centred on each labelled structure, written as NIfTI."""
    ct = sitk.ReadImage(str(SAMPLE_CT))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS)))
    crops = {}
    for label in np.unique(labels[labels > 0]).tolist():
        image = crop(ct, centroid_index(labels, label), size_mm)
        assert not np.isnan(sitk.GetArrayViewFromImage(image)).any()  # real CT values only, no padding
        crops[label] = folder / f"crop-{label}.nii.gz"
        sitk.WriteImage(image, str(crops[label]))
    return crops


def liver_interior_crop(folder: Path, size_mm: float = 30.0) -> Path:
    """A ``size_mm`` cube all of whose voxels interpolate liver voxels only: pure soft tissue of a real CT."""
    ct = sitk.ReadImage(str(SAMPLE_CT))
    liver = sitk.ReadImage(str(SAMPLE_LABELS)) == LIVER
    reach = [int(np.ceil(size_mm / 2 / spacing)) for spacing in ct.GetSpacing()]
    inside = sitk.GetArrayFromImage(sitk.BinaryErode(liver, reach, sitk.sitkBox))  # whole box of liver around
    candidates = np.argwhere(inside > 0)
    centre = candidates[np.argmin(np.linalg.norm(candidates - candidates.mean(axis=0), axis=1))][::-1]
    path = folder / "liver-interior.nii.gz"
    sitk.WriteImage(crop(ct, centre.astype(float), size_mm), str(path))
    return path


def test_a_96_mm_crop_centred_on_every_structure_of_a_real_ct_is_read_as_ct(tmp_path):
    crops = organ_crops(tmp_path)
    assert len(crops) == STRUCTURES
    airless = []
    for label, path in crops.items():
        volume = read_volume(path)  # refused would raise InputError
        assert volume.spacing_xyz_mm == (1.5, 1.5, 1.5) and max(volume.shape_zyx) == 64
        if np.percentile(volume.voxels, 0.5) > -200:  # the former rule's line: no air, fat the darkest
            airless.append(label)
    assert {30, 88, 89} <= set(airless), airless  # vertebra L2 and both iliopsoas: the crops of the issue


def test_real_whole_scans_stay_ct():
    for path in sorted((SHARED / "ct-nifti").glob("*.nii.gz")):
        read_volume(path)
    read_volume(SAMPLE_CT)
    read_volume(TS_DICOM)
    assert read_volume(SLICER_HEAD).dicom.hu_offset_applied == -1024.0  # HU+1024 storage detected and undone


def ct_plus_1024(folder: Path) -> Path:
    image = sitk.ReadImage(str(SHARED / "ct-nifti" / "TotalSegmentator_0003_0000.nii.gz"))
    path = folder / "ct-plus-1024.nii.gz"
    sitk.WriteImage(image + 1024, str(path))
    return path


def probability_map(folder: Path) -> Path:
    """A float map in [0, 1] derived from the real label map: the smoothed liver mask."""
    liver = sitk.Cast(sitk.ReadImage(str(SAMPLE_LABELS)) == LIVER, sitk.sitkFloat32)
    path = folder / "liver-probability.nii.gz"
    sitk.WriteImage(sitk.Clamp(sitk.SmoothingRecursiveGaussian(liver, 3.0), sitk.sitkFloat32, 0.0, 1.0), str(path))
    return path


NOT_CT = {
    "mr_nifti": (lambda folder: SHARED / "negative-controls" / "example_mr_sm.nii.gz", {}, "MR", "ct_check"),
    "mr_nrrd": (lambda folder: SHARED / "negative-controls" / "brain1_image.nrrd", {}, "MR", "ct_check"),
    "brain_template": (lambda folder: SHARED / "totalsegmentator" / "ct_brain_atlas_1mm.nii.gz", {},
                       "% are exactly 0, as in a masked or skull-stripped image", "ct_check"),
    "dicom_hu_plus_1024": (lambda folder: SLICER_HEAD, {"hu_offset": 0}, "CT stored as HU+1024", "hu_offset"),
    "nifti_hu_plus_1024": (ct_plus_1024, {}, "CT stored as HU+1024", "hu_offset"),
    "probability_map": (probability_map, {}, "probability map", "ct_check"),
}


@pytest.mark.parametrize("name", NOT_CT)
def test_what_cannot_be_ct_is_refused_in_one_sentence_saying_what_looks_wrong(tmp_path, name):
    make, options, looks_wrong, remedy = NOT_CT[name]
    path = make(tmp_path)
    with pytest.raises(InputError) as refused:
        read_volume(path, **options)
    message = str(refused.value)
    assert refused.value.exit_code == 3 and refused.value.remedy == remedy
    assert message.startswith(f"{path}: does not look like a CT in Hounsfield units: "), message
    assert looks_wrong in message and "\n" not in message and ". " not in message, message


def test_a_crop_inside_the_liver_is_refused_naming_the_override_which_reads_it(tmp_path):
    path = liver_interior_crop(tmp_path)
    voxels = read_volume(path, check_hu=False).voxels
    assert voxels.shape == (20, 20, 20) and -50 < voxels.min() and voxels.max() < 200  # liver only
    with pytest.raises(InputError, match="a crop inside one organ") as refused:
        ScanSource(path).read()
    assert refused.value.remedy == "ct_check"
    np.testing.assert_array_equal(ScanSource(path, check_ct=False).read().voxels, voxels)


def test_the_cli_refuses_with_exit_3_naming_skip_ct_check_and_reads_the_crop_with_it(tmp_path):
    path = liver_interior_crop(tmp_path)
    refused = run_cli("embed", path, "--out", tmp_path / "refused.npz")
    assert refused.code == 3
    [line] = refused.stderr.strip().splitlines()
    assert str(path) in line and "a crop inside one organ" in line and "pass --skip-ct-check" in line, line
    assert not (tmp_path / "refused.npz").exists()
    read = run_cli("embed", path, "--skip-ct-check", "--json", "-q")
    assert read.code == 0, read.stderr
    assert len(read.document["results"][0]["embedding"]) > 0


def test_the_cli_words_the_missing_rescale_as_its_hu_offset_option():
    refused = run_cli("embed", SLICER_HEAD, "--hu-offset", "0", "--json")
    assert refused.code == 3
    assert refused.document["error"]["message"].endswith("pass --hu-offset -1024 to add the missing rescale, or "
                                                          "--skip-ct-check if it is in Hounsfield units already")


def test_index_build_skips_a_refused_scan_unless_told_to_read_it(tmp_path):
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"{liver_interior_crop(tmp_path)}\n")
    refused = run_cli("index", "build", tmp_path / "refused", "--manifest", manifest, "--json", "-q")
    assert refused.code == 3 and "a crop inside one organ" in refused.stderr, refused.stderr
    read = run_cli("index", "build", tmp_path / "read", "--manifest", manifest, "--skip-ct-check", "--json", "-q")
    assert read.code == 0, read.stderr
    assert read.document["added"] == 1 and read.document["skipped"] == []
