"""CT-FM preprocessing on real CT: orientation independence, the 3x1x1 mm SPL grid, HU window, exact inverse."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_CT, SAMPLE_LABELS, SHARED

from ctfm_engine.preprocess import preprocess, resample, scale_hu, spl_grid
from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume

OBLIQUE_CT = SHARED / "ct-nifti" / "TotalSegmentator_0002_0000.nii.gz"


def stored_differently(volume: CTVolume, flips: list[bool], permutation: list[int] | None = None) -> CTVolume:
    """The same physical scan with its voxel array flipped/permuted and the geometry adjusted (ITK does both)."""
    image = sitk.Flip(volume.to_sitk(), flips)
    if permutation is not None:
        image = sitk.PermuteAxes(image, permutation)
    return CTVolume.from_sitk(image, source=f"{volume.source} (re-stored)")


@pytest.mark.parametrize("path", [SAMPLE_CT, OBLIQUE_CT], ids=["axial-3mm", "oblique-1.5mm"])
@pytest.mark.parametrize(
    "flips, permutation",
    [([True, True, False], None), ([False, False, True], None), ([True, False, True], [1, 0, 2])],
    ids=["RAS-vs-LPS", "axial-slices-reversed", "flipped-and-transposed"],
)
def test_storage_order_does_not_change_the_model_input(path, flips, permutation):
    volume = read_volume(path)
    other = stored_differently(volume, flips, permutation)
    assert not np.array_equal(other.voxels, volume.voxels)  # the arrays really differ
    original, restored = preprocess(volume), preprocess(other)
    assert original.grid.matches(restored.grid, tolerance_mm=1e-4)
    np.testing.assert_allclose(restored.image, original.image, atol=1e-6)


def test_model_grid_is_spl_at_3x1x1_mm():
    volume = read_volume(SAMPLE_CT)  # stored RAS-style: direction diag(-1, -1, 1)
    model_input = preprocess(volume)
    assert model_input.grid.spacing_xyz_mm == (1.0, 1.0, 3.0)
    np.testing.assert_allclose(model_input.grid.direction, np.eye(3), atol=1e-12)
    # axis 0 runs toward Superior, 1 toward Posterior, 2 toward Left: moving one index moves +S, +P, +L
    step = model_input.grid.zyx_index_to_lps(np.eye(3)) - model_input.grid.zyx_index_to_lps(np.zeros(3))
    np.testing.assert_allclose(step, [[0, 0, 3], [0, 1, 0], [1, 0, 0]], atol=1e-9)


def test_oblique_scan_keeps_its_rotation_like_monai_orientation():
    volume = read_volume(OBLIQUE_CT)
    grid = spl_grid(volume.grid, (3.0, 1.0, 1.0))
    assert np.all(np.diag(grid.direction) > 0.99)  # nearest to L, P, S
    assert np.abs(grid.direction - np.eye(3)).max() > 0.01  # but still the scan's own oblique axes
    np.testing.assert_allclose(grid.direction.T @ grid.direction, np.eye(3), atol=1e-9)


def test_hu_window_maps_minus_1024_to_0_and_2048_to_1_with_clipping():
    hu = np.array([-3000.0, -1024.0, 0.0, 1024.0, 2048.0, 4000.0], dtype=np.float32)
    np.testing.assert_allclose(scale_hu(hu, (-1024.0, 2048.0)), [0, 0, 1 / 3, 2 / 3, 1, 1], atol=1e-7)


def test_foreground_crop_on_raw_hu_is_tight_and_loses_nothing_above_0_hu():
    volume = read_volume(SAMPLE_CT)
    model_input = preprocess(volume)
    image = model_input.image
    uncropped = spl_grid(volume.grid, (3.0, 1.0, 1.0))
    full_hu = resample(volume.voxels, volume.grid, uncropped, fill=-1024)
    assert image.size < full_hu.size
    # the model input is the window [-1024, 2048] HU (clipped to [0, 1]) of the resampled scan inside the box
    corner = uncropped.lps_to_zyx_index(model_input.grid.zyx_index_to_lps(np.zeros(3)))
    np.testing.assert_allclose(corner, np.rint(corner), atol=1e-6)
    box = tuple(slice(int(c), int(c) + n) for c, n in zip(np.rint(corner), image.shape, strict=True))
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, np.clip((full_hu[box] + 1024.0) / 3072.0, 0.0, 1.0), atol=1e-6)
    # every voxel above 0 HU of the resampled scan falls inside the cropped grid ...
    index = model_input.grid.lps_to_zyx_index(uncropped.zyx_index_to_lps(np.argwhere(full_hu > 0)))
    assert index.min() > -1e-6 and np.all(index.max(axis=0) < np.array(image.shape) - 1 + 1e-6)
    # ... and each face of the box touches such a voxel (above 0 HU = above 1/3 after the window)
    foreground = image > 1 / 3
    for axis in range(3):
        along = foreground.any(axis=tuple(a for a in range(3) if a != axis))
        assert along[0] and along[-1]


def test_label_placed_in_model_space_lands_on_the_right_source_voxels():
    volume = read_volume(SAMPLE_CT)
    model_input = preprocess(volume)
    box = (slice(10, 17), slice(100, 140), slice(150, 230))
    label = np.zeros(model_input.image.shape, dtype=np.uint8)
    label[box] = 7
    on_source = model_input.to_source(label)
    assert on_source.shape == volume.shape_zyx
    # independently: a source voxel is labelled iff its centre lies in the box's physical extent
    centres = volume.zyx_index_to_lps(np.argwhere(np.ones(volume.shape_zyx, dtype=bool)))
    index = model_input.grid.lps_to_zyx_index(centres)
    low = np.array([s.start for s in box]) - 0.5
    high = np.array([s.stop for s in box]) - 0.5
    expected = np.all((index >= low) & (index < high), axis=1).reshape(volume.shape_zyx)
    assert expected.sum() > 100
    np.testing.assert_array_equal(on_source == 7, expected)


def test_source_labels_round_trip_exactly_through_model_space():
    volume = read_volume(SAMPLE_CT)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS)))
    model_input = preprocess(volume)
    in_model_space = resample(labels, volume.grid, model_input.grid, interpolation="nearest")
    back = model_input.to_source(in_model_space)
    assert len(np.unique(labels)) == 42
    np.testing.assert_array_equal(back, labels)


def test_inverse_follows_the_physical_scan_not_the_array_order():
    volume = read_volume(SAMPLE_CT)
    flipped = stored_differently(volume, [True, True, True])
    label = np.zeros(preprocess(volume).image.shape, dtype=np.uint8)
    label[12:20, 120:160, 40:90] = 3  # patient right side (low x = toward Right)
    back = preprocess(volume).to_source(label)
    back_flipped = preprocess(flipped).to_source(label)
    np.testing.assert_array_equal(back_flipped, back[::-1, ::-1, ::-1])
