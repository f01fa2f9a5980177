"""`ctfm demo` runs the main job end to end on the bundled sample CT and says which weights it used."""

from __future__ import annotations

import numpy as np
from conftest import run_cli
from matplotlib.image import imread

from ctfm_engine.demo import sample_ct_path
from ctfm_engine.volume import read_volume


def test_bundled_sample_is_a_real_ct():
    volume = read_volume(sample_ct_path())
    assert volume.shape_zyx == (30, 101, 122) and volume.spacing_xyz_mm == (3.0, 3.0, 3.0)


def test_demo_without_weights_runs_and_says_the_encoder_is_untrained(tmp_path, caplog):
    result = run_cli("demo", "--out-dir", tmp_path / "demo", "--json")
    assert result.code == 0, result.stderr
    document = result.document
    assert document["untrained_weights"] is True and document["weights"]["name"] == "ctfm-untrained-demo"
    assert "UNTRAINED" in caplog.text
    npz, patch_npz, picture = (tmp_path / "demo" / name for name in
                               ("scan_embedding.npz", "patch_embeddings.npz", "preprocessing.png"))
    assert [str(p) for p in (npz, patch_npz, picture)] == document["outputs"]
    with np.load(npz) as saved:
        np.testing.assert_allclose(saved["embeddings"][0], document["results"][0]["embedding"], rtol=1e-6)
    with np.load(patch_npz) as saved:
        assert saved["patch_embeddings"].shape[0] == 60
    assert imread(picture).shape[0] > 300  # a real picture, not an empty file
    again = run_cli("demo", "--out-dir", tmp_path / "again", "--json")
    assert again.document["weights"] == document["weights"]  # the untrained encoder is made once, deterministically


def test_demo_uses_configured_weights(tmp_path, narrow_weights, monkeypatch):
    monkeypatch.setenv("CTFM_WEIGHTS", str(narrow_weights))
    result = run_cli("demo", "--out-dir", tmp_path, "--json")
    assert result.code == 0, result.stderr
    assert result.document["untrained_weights"] is False
    assert result.document["weights"]["name"] == "ctfm-narrow-test"
