"""Full-size checkpoints in the published layout, found by their hub repo ids through every face.

The published CT-FM checkpoints cannot be downloaded here, so lighter-zoo -- the authors' own wrapper -- writes
checkpoints of exactly the published architecture (random weights) with ``save_pretrained``, where ``ctfm weights
pull`` would leave them (``<CTFM_CACHE>/models/owner--name``).  Every face must then load them, by repo id or by the
weights policy, and none may fall back on the bundled demonstration models.  The inputs are small real CTs (one
sliding window each at the published 96x160x160 / 1.5 mm recipe) so the full-width network runs in seconds.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import (
    ENCODER_REPO,
    SAMPLE_CT,
    SEGMENTATION_REPO,
    SHARED,
    deploy_python,
    run_cli,
)

from ctfm_engine.readers import read_volume

SLICER_HEAD = SHARED / "dicom" / "slicer_head_64x64"
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def use_published(published_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CTFM_CACHE", str(published_cache))
    return published_cache


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60 x 150 x 180 mm crop of the real sample CT (abdomen): one window of the published recipe."""
    image = sitk.ReadImage(str(SAMPLE_CT))[30:90, 30:80, 5:25]
    path = tmp_path_factory.mktemp("small-ct") / "abdomen_crop.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def _published(weights: dict, repo: str) -> None:
    assert weights["name"] == repo and weights["demonstration"] is False, weights
    assert weights["published"]["repo"] == repo, weights  # the claim's check reaches every face's record


def test_ctfm_segment_loads_the_published_layout_by_repo_id(use_published, small_ct, tmp_path):
    result = run_cli("segment", small_ct, "--out", tmp_path / "labels.nii.gz", "--model", SEGMENTATION_REPO,
                     "--json", "-q")
    assert result.code == 0, result.stderr
    _published(result.document["weights"], SEGMENTATION_REPO)
    assert result.document["model"]["settings"] == "published whole_body_segmentation recipe"
    assert "demonstration model" not in result.stderr


def test_ctfm_embed_and_search_find_the_published_encoder_by_policy_and_by_repo_id(use_published, small_ct):
    by_policy = run_cli("embed", small_ct, "--json", "-q")
    by_repo = run_cli("embed", small_ct, "--weights", ENCODER_REPO, "--json", "-q")
    for result in (by_policy, by_repo):
        assert result.code == 0, result.stderr
        _published(result.document["weights"], ENCODER_REPO)
        assert len(result.document["results"][0]["embedding"]) == 512  # CT-FM's width, not the demo's 128
    centre = read_volume(small_ct).zyx_index_to_lps(np.array([10.0, 25.0, 30.0]))
    search = run_cli("search", "--source", small_ct, "--point", *map(str, centre), "--target", small_ct,
                     "--weights", ENCODER_REPO, "--json", "-q")
    assert search.code == 0, search.stderr
    _published(search.document["weights"], ENCODER_REPO)


def test_deploy_app_loads_the_published_layout_by_repo_id(published_cache, tmp_path):
    app = [deploy_python(), "-m", "deploy_app"]
    out = tmp_path / "out"
    run = subprocess.run([*app, "-i", SLICER_HEAD, "-o", out, "-m", SEGMENTATION_REPO],
                         capture_output=True, text=True, cwd=REPOSITORY, timeout=900,
                         env={**os.environ, "CTFM_CACHE": str(published_cache)})
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "ctfm-results.json").read_text())
    _published(summary["segmentation"]["weights"], SEGMENTATION_REPO)
    assert "demonstration model" not in run.stderr
    # the card's post-processing by default, at the trained spacing; both switches as the hospital sets them
    assert summary["segmentation"]["model"]["largest_component"] is True
    assert summary["segmentation"]["model"]["spacing"]["choice"] == "trained"
    import pydicom

    algorithm = pydicom.dcmread(out / "ctfm-seg.dcm").SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert {"spacing_zyx_mm=1.5x1.5x1.5", "largest_component=on"} <= set(algorithm.AlgorithmParameters.split(","))
    switched = subprocess.run([*app, "-i", SLICER_HEAD, "-o", tmp_path / "switched",
                               "-m", SEGMENTATION_REPO], capture_output=True, text=True, cwd=REPOSITORY, timeout=900,
                              env={**os.environ, "CTFM_CACHE": str(published_cache), "CTFM_NO_LARGEST_COMPONENT": "1",
                                   "CTFM_SPACING": "native"})
    assert switched.returncode == 0, switched.stderr[-3000:]
    model = json.loads((tmp_path / "switched" / "ctfm-results.json").read_text())["segmentation"]["model"]
    assert model["largest_component"] is False and model["spacing"]["spacing_zyx_mm"] == "native"
    algorithm = pydicom.dcmread(tmp_path / "switched" / "ctfm-seg.dcm").SegmentSequence[0] \
        .SegmentationAlgorithmIdentificationSequence[0]
    assert {"spacing_zyx_mm=native", "largest_component=off"} <= set(algorithm.AlgorithmParameters.split(","))
    bad = subprocess.run([*app, "-i", SLICER_HEAD, "-o", tmp_path / "bad",
                          "--spacing", "fine"], capture_output=True, text=True, cwd=REPOSITORY, timeout=300)
    assert bad.returncode == 2 and "spacing 'fine'" in bad.stderr
    assert not any((tmp_path / "bad").rglob("*"))  # refused before any series was read: nothing written


def test_slicer_worker_takes_the_published_checkpoint_from_the_policy(use_published, small_ct):
    jobs = importlib.import_module("CTFMLib.jobs")
    job = jobs.start_segmentation(read_volume(small_ct))  # no weights chosen: the policy finds the published one
    deadline = time.monotonic() + 600
    while not job.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.1)
    assert job.state == "done", (job.state, job.error, job.log[-5:])
    _published(job.result["weights"], SEGMENTATION_REPO)
    assert job.result["model"]["largest_component"] is True  # the card's post-processing, by default
    islands = jobs.start_segmentation(read_volume(small_ct), largest_component=False)  # the module's box unticked
    while not islands.finished and time.monotonic() < deadline + 600:
        islands.poll()
        time.sleep(0.1)
    assert islands.state == "done", (islands.state, islands.error, islands.log[-5:])
    assert islands.result["model"]["largest_component"] is False


def test_ctfm_demo_uses_the_published_checkpoints_when_the_cache_holds_them(use_published, small_ct, tmp_path,
                                                                             monkeypatch):
    # The demo's own sample costs minutes at CT-FM's full width on two cores; the crop checks the same resolution.
    monkeypatch.setattr("ctfm_engine.demo.sample_ct_path", lambda: small_ct)
    result = run_cli("demo", "--out-dir", tmp_path / "demo", "--json", "-q")
    assert result.code == 0, result.stderr
    _published(result.document["weights"], ENCODER_REPO)
    _published(result.document["segmentation_weights"], SEGMENTATION_REPO)
    assert "demonstration model" not in result.stderr
