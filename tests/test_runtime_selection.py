"""The default runtime is chosen by measurement on this machine, among those that give PyTorch fp32's labels.

`ctfm segment` with no --backend measures every runtime this machine has (PyTorch fp32/bf16, onnxruntime,
OpenVINO fp32/bf16) on one real CT window with the shipped trained model, keeps those whose labels agree with
PyTorch fp32 on at least 0.999 of the foreground voxels, and runs the fastest; the choice is cached.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_CT, SHIPPED_SEG, require_module, run_cli

from ctfm_engine.runtime.selection import AGREEMENT, Runtime, Trial, best_trial


def labels(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_auto_runs_the_fastest_runtime_that_agrees_with_pytorch_and_caches_the_choice(isolated_cache, monkeypatch,
                                                                                       tmp_path):
    require_module("onnxruntime", "onnxruntime is one of the measured runtimes (the [onnx] extra)")
    require_module("openvino", "OpenVINO is one of the measured runtimes (the [openvino] extra)")
    monkeypatch.delenv("CTFM_BACKEND")
    first = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "auto.nii.gz", "--model", SHIPPED_SEG, "--json")
    assert first.code == 0, first.stderr
    runtime = first.document["model"]["runtime"]
    assert runtime["chosen"] == "measured" and runtime["agreement_threshold"] == AGREEMENT
    assert "choosing the fastest runtime" in first.stderr
    trials = {(t["backend"], t["precision"]): t for t in runtime["trials"]}
    assert {("torch", "fp32"), ("onnx", "fp32"), ("openvino", "fp32")} <= set(trials)
    chosen = trials[(runtime["backend"], runtime["precision"])]
    assert chosen["qualifies"] and chosen["foreground_agreement"] >= AGREEMENT
    for trial in trials.values():  # anything faster was not good enough
        if trial["seconds"] is not None and trial["seconds"] < chosen["seconds"]:
            assert not trial["qualifies"] and trial["foreground_agreement"] < AGREEMENT, trial
    assert first.document["backend"].startswith({"torch": "torch", "onnx": "onnxruntime",
                                                 "openvino": "openvino"}[runtime["backend"]])
    # its labels on the whole real CT agree with PyTorch fp32's to the threshold, over every structure's voxels
    torch_run = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "torch.nii.gz", "--model", SHIPPED_SEG,
                        "--backend", "torch", "--json", "-q")
    assert torch_run.code == 0 and torch_run.document["model"]["runtime"]["chosen"] == "requested"
    auto, reference = labels(tmp_path / "auto.nii.gz"), labels(tmp_path / "torch.nii.gz")
    foreground = (auto != 0) | (reference != 0)
    assert np.mean(auto[foreground] == reference[foreground]) >= AGREEMENT
    # measured once: the next run takes the cached choice at once
    again = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "again.nii.gz", "--model", SHIPPED_SEG, "--json")
    assert again.code == 0, again.stderr
    assert again.document["model"]["runtime"]["chosen"] == "cached"
    assert again.document["model"]["runtime"]["backend"] == runtime["backend"]
    assert "choosing the fastest runtime" not in again.stderr


def test_a_forced_runtime_and_precision_run_and_are_named(isolated_cache, tmp_path):
    require_module("openvino", "the openvino backend needs OpenVINO (the [openvino] extra)")
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "ov.nii.gz", "--model", SHIPPED_SEG,
                     "--backend", "openvino", "--precision", "fp32", "--json", "-q")
    assert result.code == 0, result.stderr
    assert result.document["backend"] == "openvino:CPU:fp32"
    assert result.document["model"]["runtime"] == {**result.document["model"]["runtime"], "backend": "openvino",
                                                   "precision": "fp32", "chosen": "requested"}
    reference = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "torch.nii.gz", "--model", SHIPPED_SEG,
                        "--backend", "torch", "--json", "-q")
    assert reference.code == 0
    ov, torch_labels = labels(tmp_path / "ov.nii.gz"), labels(tmp_path / "torch.nii.gz")
    foreground = (ov != 0) | (torch_labels != 0)
    assert np.mean(ov[foreground] == torch_labels[foreground]) >= AGREEMENT
    wrong = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "x.nii.gz", "--precision", "fp8")
    assert wrong.code == 2


def _trial(backend: str, precision: str, seconds: float, agreement: float) -> Trial:
    return Trial(Runtime(backend, precision), seconds, agreement, agreement)


def test_the_choice_never_falls_below_the_agreement_threshold():
    reference = _trial("torch", "fp32", 10.0, 1.0)
    trials = [reference, _trial("openvino", "bf16", 1.0, 0.989), _trial("torch", "bf16", 2.0, 0.991),
              _trial("openvino", "fp32", 4.0, 1.0), _trial("onnx", "fp32", 8.0, 1.0)]
    assert best_trial(trials).runtime == Runtime("openvino", "fp32")  # not the 2.5x faster bf16 that disagrees
    assert best_trial(trials, precision="bf16").runtime == Runtime("openvino", "bf16")  # asked for: its choice
    failed = Trial(Runtime("onnx", "fp32"), None, None, None, "RuntimeError: no provider")
    assert best_trial([reference, failed]) is reference
    assert best_trial([reference, _trial("openvino", "fp32", 5.0, AGREEMENT - 1e-6)]) is reference


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_the_onnx_file_goes_with_runtimes_that_read_it(backend, tmp_path):
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "x.nii.gz", "--onnx", tmp_path / "missing.onnx")
    assert result.code == 2 and "--onnx" in result.stderr
    missing = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "x.nii.gz", "--backend", backend, "--onnx",
                      tmp_path / "missing.onnx", "--model", SHIPPED_SEG)
    assert missing.code != 0 and not (tmp_path / "x.nii.gz").exists()


def test_triage_auto_keeps_the_probability_within_a_thousandth_of_pytorch(isolated_cache, monkeypatch,
                                                                          triage_model):
    require_module("openvino", "OpenVINO is one of the measured runtimes (the [openvino] extra)")
    from conftest import SHARED

    head = SHARED / "dicom" / "slicer_head_64x64"
    monkeypatch.delenv("CTFM_BACKEND")
    auto = run_cli("triage", head, "--model", triage_model, "--json", "-q")
    assert auto.code == 0, auto.stderr
    runtime = auto.document["runtime"]
    assert runtime["chosen"] == "measured" and len(runtime["trials"]) >= 3
    chosen = next(t for t in runtime["trials"] if (t["backend"], t["precision"]) == (runtime["backend"],
                                                                                     runtime["precision"]))
    assert chosen["qualifies"] and chosen["foreground_agreement"] >= AGREEMENT
    reference = run_cli("triage", head, "--model", triage_model, "--backend", "torch", "--json", "-q")
    assert reference.code == 0
    assert abs(auto.document["probability"] - reference.document["probability"]) <= 1 - AGREEMENT
    assert auto.document["decision"] == reference.document["decision"]


def test_search_runs_its_dense_pass_in_the_fastest_precision_that_keeps_the_features(isolated_cache, monkeypatch):
    from conftest import SHARED

    target = SHARED / "ct-nifti" / "s0335.nii.gz"
    query = ("--source", SAMPLE_CT, "--point", "0", "-150", "100", "--target", target, "--json", "-q")
    monkeypatch.delenv("CTFM_BACKEND")
    auto = run_cli("search", *query)
    assert auto.code == 0, auto.stderr
    runtime = auto.document["runtime"]
    assert runtime["chosen"] == "measured" and runtime["backend"] == "torch"
    chosen = next(t for t in runtime["trials"] if t["precision"] == runtime["precision"])
    assert chosen["qualifies"] and chosen["foreground_agreement"] >= AGREEMENT  # every cell's cosine >= 0.999
    for trial in runtime["trials"]:
        if trial["seconds"] is not None and trial["seconds"] < chosen["seconds"]:
            assert not trial["qualifies"], trial
    fp32 = run_cli("search", *query, "--precision", "fp32")
    assert fp32.code == 0 and fp32.document["runtime"]["chosen"] == "requested"
    best, reference = auto.document["targets"][0]["matches"][0], fp32.document["targets"][0]["matches"][0]
    assert np.linalg.norm(np.subtract(best["point_lps"], reference["point_lps"])) < 3.0  # mm
    assert abs(best["similarity"] - reference["similarity"]) < 0.01
