"""Semantic search on real CT with the shipped ctfm-mini encoder: heatmaps on each target's own grid, matches in LPS,
the exact method equal to the reference splitter, the cache, and clear refusals."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import SAMPLE_CT, SAMPLE_LABELS, SHARED, SHIPPED_ENCODER, TS_DICOM, run_cli
from monai.inferers import SlidingWindowSplitter

from ctfm_engine.errors import InputError, UsageError
from ctfm_engine.models.checkpoint import read_checkpoint
from ctfm_engine.models.registry import load_encoder
from ctfm_engine.preprocess import preprocess, resample
from ctfm_engine.progress import Cancelled
from ctfm_engine.readers import read_volume
from ctfm_engine.tasks.search import (
    FeatureCache,
    SearchSettings,
    SemanticSearch,
    SimilarityField,
    volume_key,
)
from ctfm_engine.training.evaluation import LabelledScan

OBLIQUE = SHARED / "ct-nifti" / "TotalSegmentator_0002_0000.nii.gz"
HEART = SHARED / "ct-nifti" / "s0335.nii.gz"
MR = SHARED / "negative-controls" / "example_mr_sm.nii.gz"
LIVER = 5


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(SHIPPED_ENCODER)


@pytest.fixture(scope="module")
def sample():
    return LabelledScan.read(SAMPLE_CT, SAMPLE_LABELS)


def same_grid(one, other) -> bool:
    return (one.shape_zyx == other.shape_zyx and np.allclose(one.spacing_xyz_mm, other.spacing_xyz_mm)
            and np.allclose(one.origin_lps_mm, other.origin_lps_mm) and np.allclose(one.direction, other.direction))


def searcher(encoder, **settings) -> SemanticSearch:
    network, checkpoint = encoder
    return SemanticSearch(network, checkpoint.sha256, settings=SearchSettings(**settings))


def test_fast_search_gives_a_heatmap_on_each_targets_own_grid(encoder, sample):
    """Targets with another orientation (oblique 0002), spacing (1.5 mm, 0.98 x 2 mm DICOM) and field of view."""
    targets = [read_volume(OBLIQUE), read_volume(TS_DICOM)]
    result = searcher(encoder, top_k=3).search(sample.volume, sample.centroid_lps(LIVER), targets)
    assert result.method == "fast" and len(result.targets) == 2
    for target, volume in zip(result.targets, targets, strict=True):
        assert target.heatmap.shape == volume.shape_zyx and same_grid(target.source_grid, volume.grid)
        assert target.heatmap.dtype == np.float32 and 0.0 <= target.heatmap.min() and target.heatmap.max() <= 1.0
        assert not target.flat and target.heatmap.max() > 0.9
        similarities = [match.similarity for match in target.matches]
        assert len(similarities) == 3 and similarities == sorted(similarities, reverse=True)
        for match in target.matches:  # every match lies inside its target
            index = volume.lps_to_zyx_index(np.array(match.point_lps))
            assert np.all(index > -1) and np.all(index < np.array(volume.shape_zyx)), (match, volume.shape_zyx)
        # the heatmap is brightest near the best match
        peak = np.array(np.unravel_index(np.argmax(target.heatmap), target.heatmap.shape))
        peak_lps = volume.zyx_index_to_lps(peak)
        assert np.linalg.norm(peak_lps - np.array(target.matches[0].point_lps)) < 40.0


def test_model_grid_heatmaps_are_the_target_heatmaps_before_resampling(encoder, sample):
    """heatmap_grid='model' (what Slicer gets, resliced by Slicer) is the same field on the model grid."""
    target = read_volume(HEART)
    search = searcher(encoder, top_k=2)
    point = sample.centroid_lps(LIVER)
    on_model = search.search(sample.volume, point, [target], heatmap_grid="model").targets[0]
    on_target = search.search(sample.volume, point, [target]).targets[0]
    assert same_grid(on_model.heatmap_grid, preprocess(target, search.settings.preprocessing).grid)
    assert same_grid(on_target.heatmap_grid, target.grid)
    assert on_model.heatmap.dtype == np.float32 and on_model.heatmap.flags.c_contiguous
    assert on_model.heatmap.shape == on_model.heatmap_grid.shape_zyx != target.shape_zyx
    np.testing.assert_allclose(resample(on_model.heatmap, on_model.heatmap_grid, target.grid, interpolation="linear",
                                        fill=0.0), on_target.heatmap, atol=1e-6)
    assert on_model.matches == on_target.matches
    with pytest.raises(UsageError, match="heatmap_grid"):
        search.search(sample.volume, point, [target], heatmap_grid="target")


def test_matches_do_not_depend_on_how_the_target_is_stored(encoder, sample, tmp_path):
    """The same anatomy stored flipped and axis-permuted (another direction matrix) gives the same match in LPS."""
    image = sitk.ReadImage(str(HEART))
    reoriented = sitk.PermuteAxes(sitk.Flip(image, [True, False, True]), [1, 0, 2])
    path = tmp_path / "s0335_reoriented.nrrd"
    sitk.WriteImage(reoriented, str(path))
    first, second = read_volume(HEART), read_volume(path)
    assert not np.allclose(first.grid.direction, second.grid.direction)
    search = searcher(encoder, top_k=1)
    point = sample.centroid_lps(LIVER)
    result = search.search(sample.volume, point, [first, second], heatmaps=False)
    one, other = (np.array(t.matches[0].point_lps) for t in result.targets)
    assert np.linalg.norm(one - other) < 1.0, (one, other)
    assert result.targets[0].matches[0].similarity == pytest.approx(result.targets[1].matches[0].similarity, abs=1e-4)


# The reference semantic-search app's target splitter (MONAI SlidingWindowSplitter as the app sets it up),
# re-implemented here: 16x64x64 (z, y, x) windows of the 3x1x1 mm model grid with overlap 0.625.
APP_WINDOW_ZYX = (16, 64, 64)
APP_OVERLAP = 0.625


def app_splitter(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The app's windows of ``image``: corners (N, 3) in (z, y, x) row-major order and windows (N, 16, 64, 64).

    Steps are int(size * (1 - overlap)) = (6, 24, 24) voxels; corners start at 0 and go on until a window reaches
    the end of the axis; what the last window holds past the end is zero (end padding with 0).
    """
    steps = [int(size * (1.0 - APP_OVERLAP)) for size in APP_WINDOW_ZYX]
    per_axis = []
    for length, size, step in zip(image.shape, APP_WINDOW_ZYX, steps, strict=True):
        corners = [0]
        while corners[-1] + size < length:
            corners.append(corners[-1] + step)
        per_axis.append(corners)
    corners = np.array(list(itertools.product(*per_axis)))
    padded = np.zeros([axis[-1] + size for axis, size in zip(per_axis, APP_WINDOW_ZYX, strict=True)], np.float32)
    padded[: image.shape[0], : image.shape[1], : image.shape[2]] = image
    windows = np.stack([padded[z : z + APP_WINDOW_ZYX[0], y : y + APP_WINDOW_ZYX[1], x : x + APP_WINDOW_ZYX[2]]
                        for z, y, x in corners])
    return corners, windows


def app_embeddings(network: torch.nn.Module, windows: np.ndarray) -> np.ndarray:
    """Unit embeddings of the windows as the app computes them: the encoder's last feature map, average-pooled."""
    vectors = []
    with torch.inference_mode():
        for first in range(0, len(windows), 4):
            batch = torch.from_numpy(windows[first : first + 4])[:, None]
            vectors.append(F.adaptive_avg_pool3d(network(batch)[-1], 1).flatten(1).double().numpy())
    vectors = np.concatenate(vectors)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_exact_method_equals_the_reference_splitter(encoder):
    """Every exact window embedding and window centre is that of the app's splitter window (re-implemented above)."""
    network, _ = encoder
    search = searcher(encoder)
    assert (search.settings.patch_voxels_zyx, search.settings.overlap) == (APP_WINDOW_ZYX, APP_OVERLAP)
    target = preprocess(read_volume(HEART), search.settings.preprocessing)
    corners, windows = app_splitter(target.image)
    # the re-implementation is the splitter the app uses
    monai_windows = list(SlidingWindowSplitter(APP_WINDOW_ZYX, overlap=APP_OVERLAP, pad_mode="constant",
                                               pad_value=0)(torch.from_numpy(target.image)[None, None]))
    np.testing.assert_array_equal(corners, [location for _, location in monai_windows])
    np.testing.assert_array_equal(windows, np.stack([patch[0, 0].numpy() for patch, _ in monai_windows]))
    assert len(corners) > 10 and (corners[:, 0].max() + 16 > target.image.shape[0])  # the last z windows are padded

    exact = search.exact_windows(target)
    lattice_shape = tuple(len(np.unique(corners[:, axis])) for axis in range(3))
    assert exact.vectors.shape[:3] == lattice_shape
    np.testing.assert_allclose(exact.vectors.reshape(len(corners), -1), app_embeddings(network, windows), atol=1e-5)
    # a window's centre is the middle of its voxels, corner + (size - 1) / 2, in model voxel indices (the app itself
    # reports corner + size // 2, half a voxel further)
    lattice = np.array(np.unravel_index(np.arange(len(corners)), lattice_shape)).T
    np.testing.assert_allclose(exact.first_zyx + lattice * exact.step_zyx,
                               corners + (np.array(APP_WINDOW_ZYX) - 1) / 2.0, atol=1e-9)


def test_exact_search_through_the_api_reports_window_matches(encoder, sample):
    """Each match is an app window centre with that window's cosine similarity to the app's query patch (the patch
    centred on the point, zero-padded), recomputed here; the first is the most similar window."""
    network, _ = encoder
    search = searcher(encoder, top_k=2)
    point = sample.centroid_lps(LIVER)
    result = search.search(sample.volume, point, [read_volume(HEART)], method="exact")
    target = result.targets[0]
    assert result.method == "exact" and not target.cached

    source = preprocess(sample.volume, search.settings.preprocessing)
    size = np.array(APP_WINDOW_ZYX)
    corner = np.rint(source.grid.lps_to_zyx_index(np.array(point))).astype(int) - size // 2
    inside = [slice(max(c, 0), min(c + n, length)) for c, n, length in zip(corner, size, source.image.shape,
                                                                            strict=True)]
    query = np.zeros(APP_WINDOW_ZYX, dtype=np.float32)
    query[tuple(slice(piece.start - c, piece.stop - c) for piece, c in zip(inside, corner, strict=True))] = \
        source.image[tuple(inside)]
    heart = preprocess(read_volume(HEART), search.settings.preprocessing)
    corners, windows = app_splitter(heart.image)
    similarity = app_embeddings(network, windows) @ app_embeddings(network, query[None])[0]
    centres_lps = heart.grid.zyx_index_to_lps(corners + (size - 1) / 2.0)
    assert target.windows == len(corners)
    np.testing.assert_allclose(target.matches[0].point_lps, centres_lps[np.argmax(similarity)], atol=1e-4)
    for match in target.matches:
        window = int(np.argmin(np.linalg.norm(centres_lps - np.array(match.point_lps), axis=1)))
        np.testing.assert_allclose(match.point_lps, centres_lps[window], atol=1e-4)
        assert match.similarity == pytest.approx(similarity[window], abs=1e-5)


def test_a_repeated_query_is_answered_from_the_cache(encoder, sample, tmp_path):
    network, checkpoint = encoder
    target = read_volume(OBLIQUE)
    search = SemanticSearch(network, checkpoint.sha256, cache=FeatureCache(tmp_path / "features"))
    first = search.search(sample.volume, sample.centroid_lps(LIVER), [target], heatmaps=False)
    started = time.perf_counter()
    second = search.search(sample.volume, sample.centroid_lps(2), [target], heatmaps=False)
    repeated = time.perf_counter() - started
    assert not first.targets[0].cached and second.targets[0].cached
    assert repeated < first.targets[0].seconds
    # a new process (a new cache object on the same folder) finds the features on disk, bit for bit
    key = volume_key(target, search.settings.preprocessing, checkpoint.sha256)
    reopened = FeatureCache(tmp_path / "features").get(key)
    assert reopened is not None
    np.testing.assert_array_equal(reopened.features, search.cache.get(key).features)
    # other weights never see these features
    assert FeatureCache(tmp_path / "features").get(volume_key(target, search.settings.preprocessing, "0" * 64)) \
        is None


def test_a_cache_key_passed_in_is_used_and_nothing_is_hashed(encoder, monkeypatch):
    """A caller that keeps scans across queries (the Slicer search worker) keys each scan once and passes the key:
    its queries hash nothing (hashing a 512x512x300 scan takes ~0.2 s), whatever numpy's flags on the voxels say.
    Without keys, a query hashes each scan once."""
    import ctfm_engine.tasks.search as search_module

    hashed = []
    original = search_module.volume_key
    monkeypatch.setattr(search_module, "volume_key", lambda *args: hashed.append(1) or original(*args))
    search = searcher(encoder)
    volume = read_volume(HEART)
    assert volume.voxels.flags.writeable
    key = search.key(volume)
    assert key == original(volume, search.settings.preprocessing, search.weights_sha256) and len(hashed) == 1
    features = search.features(volume, key="kept by the caller")
    assert search.cache.get("kept by the caller") is features and len(hashed) == 1  # stored under the given key
    point = volume.zyx_index_to_lps((np.array(volume.shape_zyx) - 1) / 2.0)
    for _ in range(2):
        result = search.search(volume, point, [volume, volume], heatmaps=False, source_key="kept by the caller",
                               target_keys=["kept by the caller"] * 2)
        assert [target.cached for target in result.targets] == [True, True]
    assert len(hashed) == 1, "a query with keys hashed a scan"
    search.search(volume, point, [volume], heatmaps=False)
    assert len(hashed) == 3  # source and target, once each
    with pytest.raises(ValueError, match="1 target keys for 2 targets"):
        search.search(volume, point, [volume, volume], target_keys=[key])


def test_a_flat_similarity_map_has_an_empty_heatmap_and_first_window_ties(sample):
    grid = preprocess(sample.volume).grid
    values = np.full((2, 3, 4), 0.5, dtype=np.float32)
    field = SimilarityField(values, np.array([8.0, 8.0, 8.0]), np.array([16.0, 16.0, 16.0]), grid)
    assert field.flat
    assert not field.heatmap(sample.volume.grid, 5.0).any()
    best = field.matches(1, (16, 16, 16), refine=False)[0]
    np.testing.assert_allclose(best.point_lps, grid.zyx_index_to_lps(np.array([8.0, 8.0, 8.0])))
    values[1, 2, 3] = 0.9  # one clear winner, and the windows around it are not listed again
    field = SimilarityField(values, np.array([8.0, 8.0, 8.0]), np.array([16.0, 16.0, 16.0]), grid)
    matches = field.matches(5, (48, 48, 48), refine=False)
    assert matches[0].similarity == pytest.approx(0.9) and not field.flat
    centres = [grid.lps_to_zyx_index(np.array(m.point_lps)) for m in matches]
    for index, centre in enumerate(centres):
        for other in centres[:index]:
            assert np.any(np.abs(centre - other) >= 24.0)


def test_refusals(encoder, sample):
    search = searcher(encoder)
    with pytest.raises(UsageError, match="no target"):
        search.search(sample.volume, sample.centroid_lps(LIVER), [])
    with pytest.raises(InputError, match="outside this scan"):
        search.search(sample.volume, [0.0, 0.0, 5000.0], [sample.volume])
    with pytest.raises(UsageError, match="method"):
        search.search(sample.volume, sample.centroid_lps(LIVER), [sample.volume], method="approximate")
    with pytest.raises(UsageError):
        SearchSettings(overlap=1.0)
    with pytest.raises(Cancelled):
        search.search(sample.volume, sample.centroid_lps(LIVER), [read_volume(HEART)], cancel=lambda: True)


def test_cli_search_writes_heatmaps_and_prints_the_design_document(sample, tmp_path):
    point = [f"{v:.2f}" for v in sample.centroid_lps(LIVER)]
    out = tmp_path / "heatmaps"
    result = run_cli("search", "--source", SAMPLE_CT, "--point", *point, "--target", OBLIQUE, TS_DICOM,
                     "--weights", SHIPPED_ENCODER, "--heatmap-dir", out, "--top-k", "2", "--json", "--quiet")
    assert result.code == 0, result.stderr
    document = result.document
    assert document["command"] == "search" and document["method"] == "fast"
    assert document["query"]["point_lps"] == pytest.approx([float(v) for v in point])
    assert [t["input"] for t in document["targets"]] == [str(OBLIQUE), str(TS_DICOM)]
    for target, reference in zip(document["targets"], (OBLIQUE, TS_DICOM), strict=True):
        assert len(target["matches"]) == 2
        assert target["matches"][0]["similarity"] >= target["matches"][1]["similarity"]
        assert len(target["matches"][0]["point_lps"]) == 3
        heatmap = sitk.ReadImage(target["heatmap"])
        source = read_volume(reference)
        assert heatmap.GetSize() == source.shape_zyx[::-1]
        np.testing.assert_allclose(heatmap.GetOrigin(), source.grid.origin_lps_mm, atol=1e-3)
        np.testing.assert_allclose(heatmap.GetDirection(), np.ravel(source.grid.direction), atol=1e-6)
        assert target["figure"].endswith(".png") and (out / target["figure"].split("/")[-1]).stat().st_size > 10_000
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["01_TotalSegmentator_0002_0000_similarity.nii.gz", "01_TotalSegmentator_0002_0000_search.png",
         "02_ts_abdomen_20slices_j2k_similarity.nii.gz", "02_ts_abdomen_20slices_j2k_search.png"])


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["--point", "0", "0", "5000", "--target", str(HEART)], 3, "outside this scan"),
        (["--point", "LIVER", "--target", str(MR)], 3, "example_mr_sm.nii.gz"),
        (["--point", "LIVER"], 2, "--target"),
        (["--point", "LIVER", "--target", str(HEART), "--overlap", "1.5"], 2, "overlap"),
    ],
)
def test_cli_refuses_bad_queries_before_loading_a_model(sample, tmp_path, arguments, code, message):
    if "LIVER" in arguments:
        at = arguments.index("LIVER")
        arguments = arguments[:at] + [f"{v:.2f}" for v in sample.centroid_lps(LIVER)] + arguments[at + 1:]
    result = run_cli("search", "--source", SAMPLE_CT, *arguments, "--weights", tmp_path / "no-such-weights",
                     "--heatmap-dir", tmp_path / "out")
    assert result.code == code, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_organ_centroid_distance_scores_each_structure_by_its_labels(encoder, sample, tmp_path):
    """OCD of the sample CT searched in itself: distances and hits recomputed here from the label map."""
    result = run_cli("ocd", "--source", SAMPLE_CT, "--source-labels", SAMPLE_LABELS, "--target", SAMPLE_CT,
                     "--target-labels", SAMPLE_LABELS, "--weights", SHIPPED_ENCODER, "--figure", tmp_path / "ocd.png",
                     "--json", "--quiet")
    assert result.code == 0, result.stderr
    document = result.document
    counts = dict(zip(*np.unique(sample.labels, return_counts=True), strict=True))
    assert [row["label"] for row in document["structures"]] == sorted(
        int(label) for label, count in counts.items() if label and count >= 50)
    for row in document["structures"]:
        match = np.array(row["match_lps"])
        assert row["distance_mm"] == pytest.approx(np.linalg.norm(match - sample.centroid_lps(row["label"])), abs=0.01)
        assert row["hit"] == (sample.label_at(match) == row["label"])
    summary = document["summary"]
    assert summary["pairs"] == len(document["structures"])
    assert summary["inside_organ_count"] == sum(row["hit"] for row in document["structures"])
    # the shipped encoder finds most structures of a scan near their own place in that scan (measured median 18 mm)
    assert summary["distance_median_mm"] < 40.0
    assert (tmp_path / "ocd.png").stat().st_size > 10_000


def test_ocd_refuses_a_ct_image_given_as_labels(tmp_path):
    result = run_cli("ocd", "--source", SAMPLE_CT, "--source-labels", SAMPLE_CT, "--target", SAMPLE_CT,
                     "--target-labels", SAMPLE_LABELS, "--weights", tmp_path / "no-such-weights",
                     "--figure", tmp_path / "ocd.png")
    assert result.code == 3 and "not a label map" in result.stderr and str(SAMPLE_CT) in result.stderr
    assert not (tmp_path / "ocd.png").exists()


def test_search_without_weights_uses_the_demonstration_model_and_says_so(sample):
    """No --weights, no CTFM_WEIGHTS, an empty cache: the bundled ctfm-mini searches, flagged and announced even
    with -q."""
    point = [f"{v:.2f}" for v in sample.centroid_lps(LIVER)]
    result = run_cli("search", "--source", SAMPLE_CT, "--point", *point, "--target", SAMPLE_CT, "--top-k", "1",
                     "--json", "-q")
    assert result.code == 0, result.stderr
    shipped = read_checkpoint(SHIPPED_ENCODER).sha256
    assert result.document["weights"] == {"name": "ctfm-mini", "sha256": shipped, "demonstration": True}
    [target] = result.document["targets"]
    assert sample.label_at(np.array(target["matches"][0]["point_lps"])) == LIVER  # searched in itself: the liver
    assert result.stderr.splitlines() == ["ctfm: demonstration model ctfm-mini, not CT-FM, not for clinical use"]
