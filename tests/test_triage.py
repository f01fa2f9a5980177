"""ctfm triage: a tiny checkpoint trained here by the real training stack, judged on real head and non-head CT."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_CT, SHARED, require_module, run_cli
from safetensors.torch import load_file

from ctfm_engine.errors import InputError, ModelError
from ctfm_engine.head_ct import HeadCTPreprocessing, head_ct_input
from ctfm_engine.models.registry import bundled_weights
from ctfm_engine.models.triage import TriageClassifier
from ctfm_engine.progress import Cancelled
from ctfm_engine.readers import read_volume
from ctfm_engine.runtime.backends import TorchBackend
from ctfm_engine.tasks.triage import load_triage_model, require_head_ct, triage
from ctfm_engine.volume import CTVolume

REPOSITORY = Path(__file__).resolve().parents[1]
SLICER_HEAD = SHARED / "dicom" / "slicer_head_64x64"  # 93 slices of 1.5 mm: 140 mm along S
PARTIAL_HEAD = REPOSITORY / "training" / "manifests" / "head_ct_mechanics" / "ge_head_4mm_block"  # 56 mm along S
MR = SHARED / "negative-controls" / "example_mr_sm.nii.gz"
NECK = SHARED / "ct-nifti" / "TotalSegmentator_0003_0000.nii.gz"


@pytest.fixture(autouse=True)
def no_triage_model_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTFM_TRIAGE_WEIGHTS", raising=False)


def independent_probability(model: Path, scan: Path) -> float:
    """sigmoid(logit) computed without ctfm_engine.tasks: plain torch loading and the head-CT preprocessing."""
    config = json.loads((model / "config.json").read_text())
    network = TriageClassifier(**config).eval()
    network.load_state_dict(load_file(str(model / "model.safetensors")), strict=True)
    grid = HeadCTPreprocessing(spacing_zyx_mm=config["spacing_zyx_mm"], spatial_size_zyx=config["spatial_size_zyx"])
    image = torch.from_numpy(head_ct_input(read_volume(scan), grid).image)[None, None]
    assert image.shape == (1, 1, 64, 32, 32)  # four 16-slice windows stacked along z
    with torch.no_grad():
        return float(torch.sigmoid(network(image).double()))


def triage_json(*args: object) -> dict:
    result = run_cli("triage", *args, "--json", "-q")
    assert result.code == 0, result.stderr[-3000:]
    return result.document


def test_a_real_head_ct_gets_the_sigmoid_of_the_networks_logit(triage_model):
    document = triage_json(SLICER_HEAD, "--model", triage_model)
    assert {"command", "input", "probability", "decision", "threshold", "checks", "weights", "backend",
            "device"} <= set(document)
    assert document["command"] == "triage" and document["input"] == str(SLICER_HEAD)
    probability = document["probability"]
    assert probability == pytest.approx(independent_probability(triage_model, SLICER_HEAD), abs=1e-6)
    assert probability == pytest.approx(1 / (1 + np.exp(-document["logit"])), abs=1e-12)
    assert document["threshold"] == 0.5 and document["threshold_source"] == "default"
    assert document["decision"] == ("abnormal" if probability >= 0.5 else "normal")
    weights_sha256 = hashlib.sha256((triage_model / "model.safetensors").read_bytes()).hexdigest()
    assert document["weights"] == {"name": "model", "sha256": weights_sha256, "demonstration": False}
    assert document["backend"] == "torch:cpu" and document["device"] == "cpu"
    checks = document["checks"]
    assert checks["looks_like_head"] and checks["reasons"] == [] and checks["modality"] == "CT"
    assert checks["coverage_mm"][0] == pytest.approx(139.5) and checks["skull_extent_mm"] >= 10
    assert document["preprocessing"]["spatial_size_zyx"] == [16, 32, 32]


def test_thresholds_either_side_of_the_probability_flip_the_decision(triage_model):
    probability = triage_json(SLICER_HEAD, "--model", triage_model)["probability"]
    below = triage_json(SLICER_HEAD, "--model", triage_model, "--threshold", probability - 1e-3)
    above = triage_json(SLICER_HEAD, "--model", triage_model, "--threshold", probability + 1e-3)
    assert below["decision"] == "abnormal" and above["decision"] == "normal"
    assert below["probability"] == above["probability"] == probability
    assert above["threshold"] == pytest.approx(probability + 1e-3) and above["threshold_source"] == "requested"
    assert triage_json(SLICER_HEAD, "--model", triage_model, "--threshold", probability)["decision"] == "abnormal"


def test_the_threshold_a_checkpoint_records_is_used(triage_model, tmp_path):
    probability = triage_json(SLICER_HEAD, "--model", triage_model)["probability"]
    recorded = tmp_path / "triage-with-threshold"
    shutil.copytree(triage_model, recorded)
    config = json.loads((recorded / "config.json").read_text())
    (recorded / "config.json").write_text(json.dumps({**config, "threshold": probability + 1e-3}))
    document = triage_json(SLICER_HEAD, "--model", recorded)
    assert document["decision"] == "normal" and document["threshold_source"] == "checkpoint"
    assert triage_json(SLICER_HEAD, "--model", recorded, "--threshold", 0)["decision"] == "abnormal"
    (recorded / "config.json").write_text(json.dumps({**config, "threshold": 1.5}))
    result = run_cli("triage", SLICER_HEAD, "--model", recorded)
    assert result.code == 4 and "threshold" in result.stderr and str(recorded) in result.stderr


@pytest.mark.parametrize(("scan", "reason"), [
    (SAMPLE_CT, "not a head CT: no cranium found"),
    (NECK, "not a head CT: no cranium found"),
    (MR, "does not look like a CT"),
])
def test_non_head_scans_are_refused_before_any_model_is_looked_for(scan, reason):
    result = run_cli("triage", scan, "--json")  # no --model, no CTFM_TRIAGE_WEIGHTS, empty cache: 4 if it got there
    assert result.code == 3, result.stderr
    assert str(scan) in result.stderr and reason in result.stderr
    assert result.document["error"]["exit_code"] == 3 and "probability" not in result.document


def test_a_head_ct_without_a_model_says_how_to_train_one(isolated_cache):
    result = run_cli("triage", SLICER_HEAD)
    assert result.code == 4
    message = result.stderr
    assert "ctfm finetune --config training/finetune_triage_sinoct_paper.yaml" in message
    assert "CTFM_TRIAGE_WEIGHTS" in message and str(isolated_cache / "models" / "triage") in message
    assert (REPOSITORY / "training" / "finetune_triage_sinoct_paper.yaml").is_file()


def test_the_model_is_found_in_the_environment_and_in_the_cache(triage_model, isolated_cache, monkeypatch):
    expected = triage_json(SLICER_HEAD, "--model", triage_model)["weights"]
    monkeypatch.setenv("CTFM_TRIAGE_WEIGHTS", str(triage_model))
    assert triage_json(SLICER_HEAD)["weights"] == expected
    monkeypatch.delenv("CTFM_TRIAGE_WEIGHTS")
    shutil.copytree(triage_model, isolated_cache / "models" / "triage")
    assert triage_json(SLICER_HEAD)["weights"]["sha256"] == expected["sha256"]
    missing = run_cli("triage", SLICER_HEAD, "--model", isolated_cache / "nowhere")
    assert missing.code == 4 and "nowhere" in missing.stderr


@pytest.mark.parametrize(("name", "kind"), [("ctfm-mini", "an encoder without a classifier head"),
                                            ("ctfm-mini-wholebody-seg", "a segmentation checkpoint")])
def test_encoder_and_segmentation_checkpoints_are_not_triage_models(name, kind):
    folder = bundled_weights(name)
    assert folder is not None, f"the shipped {name} checkpoint is missing"
    result = run_cli("triage", SLICER_HEAD, "--model", folder, "--json")
    assert result.code == 4 and str(folder) in result.stderr and kind in result.stderr
    assert "not a head-CT triage classifier" in result.document["error"]["message"]


def test_weights_of_another_shape_are_refused(triage_model, tmp_path):
    wider = tmp_path / "wider-head"
    shutil.copytree(triage_model, wider)
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "hidden_features": 32}))
    result = run_cli("triage", SLICER_HEAD, "--model", wider)
    assert result.code == 4 and "mis-shaped" in result.stderr and str(wider) in result.stderr
    (wider / "config.json").write_text(json.dumps({**config, "dropout": 0.2}))
    with pytest.raises(ModelError, match="not a triage classifier configuration"):
        load_triage_model(wider)


def test_a_partial_head_is_refused_unless_accepted(triage_model):
    refused = run_cli("triage", PARTIAL_HEAD, "--model", triage_model)
    assert refused.code == 3 and "covers only 56 mm along S" in refused.stderr and "--accept-partial" in refused.stderr
    accepted = triage_json(PARTIAL_HEAD, "--model", triage_model, "--accept-partial")
    assert accepted["probability"] == pytest.approx(independent_probability(triage_model, PARTIAL_HEAD), abs=1e-6)
    assert any("covers 56 mm along S" in note for note in accepted["checks"]["notes"])


def test_triage_partial_head_refusal_names_the_cli_flag():
    """The engine says what is wrong (a partial head); the command line adds its own remedy: the flag to pass.  The
    scan is judged before any model is looked for, so no triage model is needed here."""
    result = run_cli("triage", PARTIAL_HEAD, "--json")
    assert result.code == 3, result.stderr
    message = result.document["error"]["message"]
    assert message.startswith(f"{PARTIAL_HEAD}: covers only 56 mm along S")
    assert message.endswith("give the full head series; pass --accept-partial to judge it anyway")
    assert result.stderr.splitlines()[-1] == f"ctfm: error: {message}"


def test_a_cranium_outside_the_models_field_of_view_is_refused():
    head, abdomen = read_volume(SLICER_HEAD), read_volume(SAMPLE_CT)
    # A whole-body-like scan: 540 mm of real abdominal CT (64 x 64 from its centre, 3 mm slices doubled to the
    # head's 1.5 mm) below the head; the 240 mm the model sees are centred on the abdomen.
    _, rows, columns = abdomen.voxels.shape
    body = abdomen.voxels[:, rows // 2 - 32:rows // 2 + 32, columns // 2 - 32:columns // 2 + 32].repeat(2, axis=0)
    assert head.direction[2, 2] > 0  # slice index runs towards the head
    voxels = np.concatenate([np.tile(body, (6, 1, 1)), head.voxels]).astype(np.float32)
    whole_body = CTVolume(voxels, head.spacing_xyz_mm, head.origin_lps_mm, head.direction, "head-and-body")
    with pytest.raises(InputError, match="head-and-body: the cranium lies outside the 240 x 256 x 256 mm"):
        require_head_ct(whole_body)
    require_head_ct(head)


def test_triage_reports_its_stages_refuses_non_heads_and_cancels(triage_model):
    network, checkpoint = load_triage_model(triage_model)
    backend = TorchBackend(network)
    head = read_volume(SLICER_HEAD)
    stages = []
    result = triage(head, backend, network.preprocessing, 0.5, progress=lambda done, total: stages.append((done,
                                                                                                          total)))
    assert stages == [(1, 2), (2, 2)] and result.input == str(SLICER_HEAD)
    assert result.probability == pytest.approx(independent_probability(triage_model, SLICER_HEAD), abs=1e-6)
    with pytest.raises(InputError, match="no cranium found"):
        triage(read_volume(SAMPLE_CT), backend, network.preprocessing)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        triage(head, backend, network.preprocessing, cancel=cancel)
    with pytest.raises(ValueError, match="between 0 and 1"):
        triage(head, backend, network.preprocessing, threshold=1.2)


def test_usage_errors(triage_model):
    assert run_cli("triage", SLICER_HEAD, "--model", triage_model, "--threshold", "1.5").code == 2
    assert run_cli("triage", SLICER_HEAD, "--model", triage_model, "--onnx", "x.onnx").code == 2


def test_human_output_names_probability_decision_threshold_and_checks(triage_model):
    result = run_cli("triage", SLICER_HEAD, "--model", triage_model, "--threshold", "0.25")
    assert result.code == 0, result.stderr
    assert "ABNORMAL, probability of an abnormal finding 0.5" in result.stdout
    assert "threshold 0.25, requested" in result.stdout and "head check: cranium over 15 mm" in result.stdout


def test_the_onnx_backend_gives_the_same_probability(triage_model):
    require_module("onnxruntime", "the [onnx] extra (onnxruntime) is not installed")
    torch_document = triage_json(SLICER_HEAD, "--model", triage_model)
    onnx_document = triage_json(SLICER_HEAD, "--model", triage_model, "--backend", "onnx")
    assert onnx_document["backend"].startswith("onnxruntime:")
    assert onnx_document["probability"] == pytest.approx(torch_document["probability"], abs=1e-5)
    assert onnx_document["weights"] == torch_document["weights"]


def test_inference_runs_without_the_training_extra(triage_model, tmp_path):
    """The [train] extra (lightning) is not needed to triage: lightning is made unimportable in a fresh process."""
    script = (
        "import sys\n"
        "class NoLightning:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):\n"
        "            raise ImportError(f'{name} blocked by the test')\n"
        "sys.meta_path.insert(0, NoLightning())\n"
        "from ctfm_engine.cli import main\n"
        f"sys.exit(main(['triage', {str(SLICER_HEAD)!r}, '--model', {str(triage_model)!r}, '--json', '-q']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"CTFM_CACHE": str(tmp_path), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
                                 "HF_HUB_OFFLINE": "1", "CTFM_BACKEND": "torch"})  # compared with PyTorch to 1e-6
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["probability"] == pytest.approx(
        independent_probability(triage_model, SLICER_HEAD), abs=1e-6)
