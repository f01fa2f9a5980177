"""Embedding insight on real CT with the shipped ctfm-mini encoder: occlusion saliency (OFD), the PCA concept map,
their files on the source grid, and the ``ctfm saliency`` / ``ctfm concept-map`` commands."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SAMPLE_CT, SHARED, WEIGHTS, run_cli
from monai.visualize import OcclusionSensitivity
from PIL import Image

from ctfm_engine.cli.common import write_together
from ctfm_engine.errors import InputError
from ctfm_engine.models.registry import load_encoder
from ctfm_engine.preprocess import preprocess
from ctfm_engine.progress import Cancelled
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks import concept_map, saliency
from ctfm_engine.volume import Grid

CTFM_MINI = WEIGHTS / "ctfm-mini"
HEART = SHARED / "ct-nifti" / "s0335.nii.gz"
OBLIQUE = SHARED / "ct-nifti" / "TotalSegmentator_0002_0000.nii.gz"
HEAD_SERIES = SHARED / "dicom" / "slicer_head_64x64"
MR = SHARED / "negative-controls" / "example_mr_sm.nii.gz"


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return load_encoder(CTFM_MINI)[0]


@pytest.fixture(scope="module")
def head_saliency(encoder) -> saliency.Saliency:
    # A head CT with air around it; 16-voxel (48 mm) masks without overlap keep it to 48 occluded volumes.
    return saliency.saliency(read_volume(HEAD_SERIES), encoder, mask_size=16, overlap=0.0)


@pytest.fixture(scope="module")
def heart_crop() -> np.ndarray:
    """A 12x16x16 block (36x48x48 mm) of real CT in the saliency recipe's model space: small enough for MONAI."""
    image = preprocess(read_volume(HEART), saliency.SALIENCY_PREPROCESSING).image
    return image[16:28, 14:30, 14:30]


def assert_same_grid(image: sitk.Image, grid: Grid) -> None:
    written = Grid.of_image(image)
    assert written.shape_zyx == grid.shape_zyx
    np.testing.assert_allclose(written.spacing_xyz_mm, grid.spacing_xyz_mm, atol=1e-5)
    np.testing.assert_allclose(written.origin_lps_mm, grid.origin_lps_mm, atol=1e-4)
    np.testing.assert_allclose(written.direction, grid.direction, atol=1e-6)


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


# --- saliency -----------------------------------------------------------------------------------------------------


def test_saliency_volume_is_written_on_the_source_grid_voxel_for_voxel(head_saliency, tmp_path):
    volume = head_saliency.volume
    path = head_saliency.write(tmp_path / "head_saliency.nii.gz")
    image = sitk.ReadImage(str(path))
    assert_same_grid(image, volume.grid)
    values = sitk.GetArrayFromImage(image)
    assert values.dtype == np.float32 and np.all(np.isfinite(values))
    np.testing.assert_array_equal(values, head_saliency.values)  # the file holds the map, voxel for voxel
    assert values.max() > 0.0
    assert head_saliency.occlusions == 48 and head_saliency.mask_size_zyx == (16, 16, 16)


def test_the_most_salient_region_is_inside_the_head_not_in_the_air_around_it(head_saliency):
    hu = head_saliency.volume.voxels
    assert hu[head_saliency.most_salient_index_zyx] > -500
    # Occluding air (model value ~0) barely changes the input, so the air around the head must score lower.
    body, air = hu > -500, hu < -900
    assert head_saliency.values[body].mean() > 2.0 * head_saliency.values[air].mean()


def test_saliency_picture_is_a_png_of_the_documented_size(head_saliency, tmp_path):
    path = head_saliency.draw(tmp_path / "head_saliency.png", "ctfm-mini")
    assert png_size(path) == saliency.PICTURE_SIZE_PX
    assert not list(tmp_path.glob(".*partial"))


def test_occluding_nothing_gives_zero_saliency(encoder, heart_crop):
    result = saliency.occlusion_saliency(encoder, heart_crop, mask_size=8, occlusion=lambda region: region)
    assert result.occlusions == 2 * 3 * 3  # 8-voxel masks every 6 voxels
    assert np.abs(result.values).max() < 1e-9  # float noise is ~1e-15; occluding saliency here is > 1e-6


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # inside MONAI, with torch >= 2.9
@pytest.mark.parametrize("mode", ["gaussian", 0.0])
def test_saliency_equals_monai_occlusion_sensitivity(encoder, heart_crop, mode):
    class PooledEncoder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return encoder(x)[-1].mean(dim=(2, 3, 4))

    image = torch.from_numpy(heart_crop)[None, None]
    reference = OcclusionSensitivity(PooledEncoder(), mask_size=8, n_batch=12, verbose=False, mode=mode,
                                     overlap=0.25, activate=False)
    with torch.inference_mode():
        occlusion_map, _ = reference(image)
        base = PooledEncoder()(image)[0]
    cosine = torch.nn.functional.cosine_similarity(occlusion_map[0].double(), base.double()[:, None, None, None], dim=0)
    expected = 1.0 - cosine.numpy()
    ours = saliency.occlusion_saliency(encoder, heart_crop, mask_size=8, overlap=0.25, occlusion=mode).values
    assert expected.max() > 1e-6  # the occlusions do move the embedding
    np.testing.assert_allclose(ours, expected, atol=2e-3 * expected.max())


def test_saliency_of_an_oblique_scan_maps_back_onto_its_own_grid(encoder, tmp_path):
    volume = read_volume(OBLIQUE)
    assert not np.allclose(volume.direction, np.diag(np.diag(volume.direction)))
    # one mask over the whole volume: the map is one value inside the foreground crop and 0 outside
    result = saliency.saliency(volume, encoder, mask_size=128)
    assert result.occlusions == 1
    assert_same_grid(sitk.ReadImage(str(result.write(tmp_path / "oblique.nii.gz"))), volume.grid)
    # the crop box holds every voxel above 0 HU, so a misplaced (flipped, shifted) mapping would leave tissue at 0
    tissue = volume.voxels > 0
    assert (result.values[tissue] > 0).mean() > 0.99
    assert (result.values == 0).mean() > 0.02  # and the box is smaller than the scan


def test_a_cancelled_saliency_run_stops_between_batches(encoder, heart_crop):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        saliency.occlusion_saliency(encoder, heart_crop, mask_size=8, cancel=cancel)


# --- concept map --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heart_and_abdomen(encoder) -> tuple[list[concept_map.ConceptMap], concept_map.ConceptFit]:
    return concept_map.concept_maps([read_volume(HEART), read_volume(SAMPLE_CT)], encoder)


def test_concept_maps_are_rgb_volumes_on_each_source_grid(heart_and_abdomen, tmp_path):
    maps, fit = heart_and_abdomen
    assert fit.components.shape == (3, 128)  # 3 components of ctfm-mini's 128 channels
    for index, concept in enumerate(maps):
        path = concept.write(tmp_path / f"scan{index}.nrrd")
        assert b"kinds: RGB-color domain domain domain" in path.read_bytes()[:600]
        image = sitk.ReadImage(str(path))
        assert image.GetNumberOfComponentsPerPixel() == 3
        assert_same_grid(image, concept.volume.grid)
        rgb = sitk.GetArrayFromImage(image)
        assert rgb.dtype == np.uint8 and rgb.shape == (*concept.volume.shape_zyx, 3)
        np.testing.assert_array_equal(rgb, concept.rgb)


def test_concept_map_background_is_black_and_the_body_is_coloured(heart_and_abdomen):
    for concept in heart_and_abdomen[0]:
        hu = concept.volume.voxels
        assert not concept.rgb[hu < concept_map.BODY_ABOVE_HU].any()
        coloured = concept.rgb[hu > 0].any(axis=-1)
        assert coloured.mean() > 0.99
        assert len(np.unique(concept.rgb[hu > 0].reshape(-1, 3), axis=0)) > 100  # a map, not one colour


def test_concept_map_pictures_are_pngs_of_the_documented_size(heart_and_abdomen, tmp_path):
    for index, concept in enumerate(heart_and_abdomen[0]):
        path = concept.draw(tmp_path / f"scan{index}.png", "ctfm-mini")
        assert png_size(path) == concept_map.PICTURE_SIZE_PX


def notebook_flattening(features: list[np.ndarray]) -> np.ndarray:
    """The meta-concept notebook's ``torch.stack(maps).view(C, -1).T``, which mixes the scans, for contrast only."""
    channels = features[0].shape[0]
    return np.stack(features).reshape(channels, -1).T


def test_pca_samples_are_voxels_of_one_scan_and_project_back_to_that_scan():
    # Scan A: left half one feature vector, right half another; scan B: a third vector everywhere.  Each scan's
    # map must show its own pattern: A's halves differ, B is uniform.
    generator = np.random.default_rng(0)
    channels, shape = 16, (2, 4, 6)
    left, right, other = (generator.normal(size=channels) * 3 for _ in range(3))
    scan_a = np.empty((channels, *shape))
    scan_a[..., :3], scan_a[..., 3:] = left[:, None, None, None], right[:, None, None, None]
    scan_b = np.broadcast_to(other[:, None, None, None], (channels, *shape)).copy()
    scan_a += generator.normal(scale=0.01, size=scan_a.shape)
    scan_b += generator.normal(scale=0.01, size=scan_b.shape)
    everywhere = np.ones(shape, dtype=bool)

    np.testing.assert_array_equal(concept_map.cell_samples(scan_a)[7], scan_a[:, 0, 1, 1])  # row = cell (0, 1, 1)
    fit = concept_map.fit_concepts([scan_a, scan_b], [everywhere, everywhere])
    assert fit.samples == 2 * np.prod(shape)
    # the explained variance of the z-scored samples, from their singular values
    samples = np.concatenate([scan.reshape(channels, -1).T for scan in (scan_a, scan_b)])
    z_scored = (samples - samples.mean(0)) / samples.std(0)
    singular = np.linalg.svd(z_scored - z_scored.mean(0), compute_uv=False)
    np.testing.assert_allclose(fit.explained_variance_ratio, singular[:3] ** 2 / np.sum(singular ** 2), rtol=1e-6)
    assert fit.explained_variance_ratio[:2].sum() > 0.99  # three clusters: two components, the third is noise
    # Three clusters span two components (the third is noise): compare spreads there, relative to the whole.
    maps = [fit.project(scan)[:2] for scan in (scan_a, scan_b)]
    whole = fit.high[:2] - fit.low[:2]
    assert np.all(np.ptp(maps[1], axis=(1, 2, 3)) < 0.05 * whole)  # B is one colour
    def colour_of(vector: np.ndarray) -> np.ndarray:
        return fit.project(vector.reshape(-1, 1, 1, 1))[:2, 0, 0, 0]

    # A shows its halves, each where it lies; B the colour of its own vector
    np.testing.assert_allclose(maps[0][..., :3].mean(axis=(1, 2, 3)), colour_of(left), atol=0.02 * whole.max())
    np.testing.assert_allclose(maps[0][..., 3:].mean(axis=(1, 2, 3)), colour_of(right), atol=0.02 * whole.max())
    np.testing.assert_allclose(maps[1].mean(axis=(1, 2, 3)), colour_of(other), atol=0.02 * whole.max())
    assert np.abs(colour_of(left) - colour_of(right)).max() > 0.5 * whole.max()

    # The notebook's flattening puts half of every sample in the other scan: B's "map" inherits A's halves.
    from sklearn.decomposition import PCA

    mixed = notebook_flattening([scan_a, scan_b])
    projected = PCA(n_components=2, random_state=0).fit_transform((mixed - mixed.mean(0)) / mixed.std(0))
    labelled_b = projected[np.prod(shape):]
    assert np.ptp(labelled_b, axis=0).max() > 0.5 * np.ptp(projected, axis=0).max()


def test_lab_to_srgb_reproduces_reference_colours():
    lab = np.array([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
                    [32.2970, 79.1875, -107.8602], [50.0, 0.0, 0.0]])
    expected = [[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.4663, 0.4663, 0.4663]]
    np.testing.assert_allclose(concept_map.lab_to_srgb(lab), expected, atol=2e-3)


def test_too_few_body_cells_are_refused_with_a_clear_error():
    features = np.zeros((8, 1, 1, 2))
    with pytest.raises(InputError, match="feature cells inside the body"):
        concept_map.fit_concepts([features], [np.ones((1, 1, 2), dtype=bool)])


# --- command line -------------------------------------------------------------------------------------------------


def test_saliency_command_writes_a_volume_and_a_picture(tmp_path):
    result = run_cli("saliency", HEART, "--out-dir", tmp_path, "--weights", CTFM_MINI, "--mask-size", 22,
                     "--overlap", 0, "--json", "-q")
    assert result.code == 0, result.stderr
    document = result.document
    assert document["weights"]["name"] == "ctfm-mini" and len(document["weights"]["sha256"]) == 64
    assert document["input"] == str(HEART) and document["occlusions"] == 8
    assert document["volume"] == str(tmp_path / "s0335_saliency.nii.gz")
    assert_same_grid(sitk.ReadImage(document["volume"]), read_volume(HEART).grid)
    assert png_size(document["png"]) == saliency.PICTURE_SIZE_PX
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0335_saliency.nii.gz", "s0335_saliency.png"]
    assert str(HEART.parent) not in result.stderr  # logs name the file, not its full path


def test_concept_map_command_on_an_oblique_scan(tmp_path):
    result = run_cli("concept-map", OBLIQUE, "--out-dir", tmp_path, "--weights", CTFM_MINI, "--json", "-q")
    assert result.code == 0, result.stderr
    document = result.document
    assert document["weights"]["name"] == "ctfm-mini"
    (item,) = document["results"]
    assert item["input"] == str(OBLIQUE)
    assert item["volume"] == str(tmp_path / "TotalSegmentator_0002_0000_concept_map.nrrd")
    image = sitk.ReadImage(item["volume"])
    assert_same_grid(image, read_volume(OBLIQUE).grid)
    assert png_size(item["png"]) == concept_map.PICTURE_SIZE_PX


@pytest.mark.parametrize("command", ["saliency", "concept-map"])
def test_mr_is_refused_before_any_weights_are_looked_for(command, tmp_path):
    result = run_cli(command, MR, "--out-dir", tmp_path / "out", "--weights", tmp_path / "no-weights", "--json")
    assert result.code == 3
    assert "Hounsfield" in result.document["error"]["message"]
    assert not (tmp_path / "out").exists()


def test_bad_saliency_settings_are_usage_errors(tmp_path):
    result = run_cli("saliency", HEART, "--out-dir", tmp_path, "--overlap", 1.0)
    assert result.code == 2 and "overlap" in result.stderr


def test_a_failed_second_output_removes_the_first(tmp_path):
    def interrupted(path):
        raise KeyboardInterrupt

    def write_text(path):
        path.write_text("volume")
        return path

    with pytest.raises(KeyboardInterrupt):
        write_together([(write_text, tmp_path / "a.nii.gz"), (interrupted, tmp_path / "a.png")])
    assert list(tmp_path.iterdir()) == []
