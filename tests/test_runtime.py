"""ONNX export and the onnxruntime backend: validated exports of trained models on real CT, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SAMPLE_CT, SAMPLE_LABELS, SHARED, SHIPPED_SEG, randomise_batchnorm, require_module, run_cli

from ctfm_engine.errors import ModelError, UsageError
from ctfm_engine.models.checkpoint import read_checkpoint, save_checkpoint
from ctfm_engine.models.registry import load_encoder
from ctfm_engine.preprocess import CTFM_PREPROCESSING
from ctfm_engine.readers import read_volume
from ctfm_engine.runtime import onnx_export
from ctfm_engine.runtime.backends import OnnxBackend, TorchBackend
from ctfm_engine.runtime.onnx_backend import (
    CPU,
    CUDA,
    TENSORRT,
    execution_providers,
    half_precision,
    read_export_metadata,
)
from ctfm_engine.runtime.onnx_export import export_onnx, onnx_for, validation_sample
from ctfm_engine.tasks.segment import open_segmentation_model, sliding_window_labels

require_module("onnxruntime", "the [onnx] extra (onnx, onnxruntime) is not installed")

SLICER_HEAD = SHARED / "dicom" / "slicer_head_64x64"
WINDOW = ("32", "64", "64")  # model voxels at 3x1x1 mm: small enough for 2 busy CPU cores


@pytest.fixture(scope="module")
def seg_model():
    return open_segmentation_model(SHIPPED_SEG)


@pytest.fixture(scope="module")
def sample_volume():
    return read_volume(SAMPLE_CT)


@pytest.fixture(scope="module")
def seg_export(tmp_path_factory) -> tuple[dict, Path]:
    """``ctfm export --json`` of the shipped whole-body model, validated on a 32x64x64 window of the bundled CT."""
    out = tmp_path_factory.mktemp("export") / "seg.onnx"
    result = run_cli("export", "--model", SHIPPED_SEG, "--out", out, "--roi", *WINDOW, "--json", "-q")
    assert result.code == 0, result.stderr
    return result.document, out


def logits(network: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return network.eval()(batch).numpy()


def test_the_shipped_segmentation_model_exports_validated_and_records_its_checkpoint(seg_export, seg_model):
    document, out = seg_export
    checkpoint = seg_model.checkpoint
    assert document["command"] == "export" and document["task"] == "segmentation"  # auto: decoder keys
    assert document["weights"] == checkpoint.identity and document["output"] == str(out) and out.is_file()
    assert document["tolerance"] == 1e-3 and document["max_abs_difference"] <= 1e-3
    assert document["label_agreement"] >= 0.999
    assert document["sample_shape"] == [1, 1, 32, 64, 64] and document["out_channels"] == 118
    assert Path(document["check_input"]).name == "sample_ct.nii.gz"  # the bundled real CT by default
    metadata = read_export_metadata(out)
    assert metadata["ctfm.task"] == "segmentation" and metadata["ctfm.checkpoint.sha256"] == checkpoint.sha256
    assert metadata["ctfm.checkpoint.name"] == "ctfm-mini-wholebody-seg"
    assert json.loads(metadata["ctfm.checkpoint.config"]) == checkpoint.config
    assert metadata["ctfm.out_channels"] == "118" and metadata["ctfm.version"]
    assert float(metadata["ctfm.tolerance"]) == 1e-3
    assert float(metadata["ctfm.max_abs_difference"]) == document["max_abs_difference"]


def test_other_window_sizes_and_batches_run_like_pytorch(seg_export, seg_model, sample_volume):
    backend = OnnxBackend.open(seg_export[1], seg_model.checkpoint, "segmentation")
    assert backend.name == "onnxruntime:CPUExecutionProvider" and backend.output_device == torch.device("cpu")
    # Exported at 32x64x64; this window differs along every axis.
    window = validation_sample(sample_volume, "segmentation", seg_model.preprocessing, (16, 96, 80))
    batch = torch.cat([window, window.flip(-1)])
    ours, reference = backend(batch).numpy(), logits(seg_model.network, batch)
    assert ours.shape == reference.shape == (2, 118, 16, 96, 80)
    assert np.max(np.abs(ours - reference)) <= 1e-3
    assert np.mean(ours.argmax(1) == reference.argmax(1)) >= 0.999


def test_the_sliding_window_labels_real_ct_alike_with_onnx_logits_or_trunk_and_pytorch(
    seg_export, seg_model, sample_volume, tmp_path
):
    from ctfm_engine.models.segmentation import inference_network
    from ctfm_engine.preprocess import preprocess

    image = preprocess(sample_volume, seg_model.preprocessing).image[:, 100:196, 120:216]  # 30x96x96, real CT
    roi = (32, 64, 64)
    trunk_module, head = inference_network(seg_model.network)  # what PyTorch runs: features, head after blending
    reference = sliding_window_labels(image, TorchBackend(trunk_module), roi, 0.25, batch_size=2, head=head)
    assert len(np.unique(reference)) >= 2
    onnx_logits = OnnxBackend.open(seg_export[1], seg_model.checkpoint, "segmentation")
    assert np.mean(sliding_window_labels(image, onnx_logits, roi, 0.25, batch_size=2) == reference) >= 0.999

    sample = validation_sample(sample_volume, "segmentation-trunk", seg_model.preprocessing, roi)
    report = export_onnx(seg_model.network, seg_model.checkpoint, "segmentation-trunk", tmp_path / "trunk.onnx",
                         sample)
    assert report.out_channels == 8 and report.max_abs_difference <= 1e-3 and report.label_agreement >= 0.999
    onnx_trunk = OnnxBackend.open(tmp_path / "trunk.onnx", seg_model.checkpoint, "segmentation-trunk")
    ours = sliding_window_labels(image, onnx_trunk, roi, 0.25, batch_size=2, head=head)
    assert np.mean(ours == reference) >= 0.999


def test_ctfm_segment_with_the_onnx_backend_exports_once_into_the_cache_and_finds_the_liver(
    tmp_path, isolated_cache, seg_model
):
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "labels.nii.gz", "--backend", "onnx",
                     "--overlap", "0.25", "--json", "-q")
    assert result.code == 0, result.stderr
    document = result.document
    assert document["backend"] == "onnxruntime:CPUExecutionProvider"
    assert document["weights"] == seg_model.checkpoint.identity
    # the sliding window runs the decoder trunk; the 1x1x1 head is applied after blending
    cached = isolated_cache / "onnx" / f"segmentation-trunk-{seg_model.checkpoint.sha256[:16]}.onnx"
    assert read_export_metadata(cached)["ctfm.validation_shape"] == "[1, 1, 32, 128, 128]"  # the model's window
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz")))
    silver = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LABELS)))
    liver, expected = labels == 5, silver == 5
    assert 2 * np.sum(liver & expected) / (np.sum(liver) + np.sum(expected)) > 0.5  # as the PyTorch run
    # Backend agreement on the whole label map, on the source grid: onnxruntime vs PyTorch eager.
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "torch.nii.gz", "--backend", "torch",
                     "--overlap", "0.25", "-q")
    assert result.code == 0, result.stderr
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "torch.nii.gz")))
    assert np.mean(labels == reference) >= 0.999 and len(np.unique(reference)) >= 2


@pytest.fixture(scope="module")
def triage_checkpoint(tmp_path_factory) -> Path:
    """A narrow head-CT triage classifier (init_filters 8) on a coarse grid: input 4x16 x 32 x 32."""
    require_module("lightning", "the [train] extra (lightning) is not installed")
    from ctfm_engine.head_ct import HeadCTPreprocessing
    from ctfm_engine.training.triage import TriageClassifier, triage_config

    torch.manual_seed(0)
    config = triage_config(8, HeadCTPreprocessing(spacing_zyx_mm=(15.0, 8.0, 8.0), spatial_size_zyx=(16, 32, 32)))
    network = TriageClassifier(**config)
    randomise_batchnorm(network)
    folder = tmp_path_factory.mktemp("triage") / "triage-narrow-test"
    save_checkpoint(network, folder, config)
    return folder


def test_a_triage_export_gives_the_pytorch_probability_on_a_real_head_ct(triage_checkpoint, tmp_path):
    from ctfm_engine.head_ct import head_ct_input
    from ctfm_engine.models.checkpoint import load_state_strict
    from ctfm_engine.training.triage import TriageClassifier

    out = tmp_path / "triage.onnx"
    result = run_cli("export", "--model", triage_checkpoint, "--check-input", SLICER_HEAD, "--out", out, "--json")
    assert result.code == 0, result.stderr
    document = result.document
    assert document["task"] == "triage" and document["label_agreement"] is None  # auto: head.* keys
    assert document["sample_shape"] == [1, 1, 64, 32, 32] and document["max_abs_difference"] <= 1e-3
    checkpoint = read_checkpoint(triage_checkpoint)
    network = TriageClassifier(**checkpoint.config)
    load_state_strict(network, checkpoint.state_dict, "test")
    image = torch.from_numpy(head_ct_input(read_volume(SLICER_HEAD), network.preprocessing).image)[None, None]
    batch = torch.cat([image, image.flip(-1)])
    backend = OnnxBackend.open(out, checkpoint, "triage")
    ours, reference = torch.sigmoid(backend(batch)), torch.sigmoid(torch.from_numpy(logits(network, batch)))
    assert ours.shape == reference.shape == (2,)
    assert torch.max(torch.abs(ours - reference)) <= 1e-3


def test_an_export_of_another_checkpoint_is_refused_naming_the_file(tmp_path, narrow_weights, seg_export, seg_model):
    foreign = tmp_path / "narrow.onnx"
    exported = run_cli("export", "--model", narrow_weights, "--out", foreign, "--roi", *WINDOW, "--json", "-q")
    assert exported.code == 0 and exported.document["task"] == "encoder", exported.stderr  # auto: no decoder, no head
    result = run_cli("segment", SAMPLE_CT, "--out", tmp_path / "labels.nii.gz", "--backend", "onnx",
                     "--onnx", foreign, "--json", "-q")
    message = result.document["error"]["message"]
    assert result.code == 4 and str(foreign) in message
    assert "ctfm-narrow-test" in message and "not from ctfm-mini-wholebody-seg" in message
    assert not (tmp_path / "labels.nii.gz").exists()
    with pytest.raises(ModelError, match="holds the segmentation network of ctfm-mini-wholebody-seg, not the encoder"):
        OnnxBackend.open(seg_export[1], seg_model.checkpoint, "encoder")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter announces itself
def test_corrupt_missing_and_unlabelled_onnx_files_are_refused(tmp_path, seg_export, seg_model):
    checkpoint = seg_model.checkpoint
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an ONNX model\n" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(seg_export[1].read_bytes()[:100_000])
    plain = tmp_path / "plain.onnx"  # a valid ONNX file another tool wrote: nothing says which weights it holds
    torch.onnx.export(torch.nn.Conv3d(1, 2, 3), (torch.zeros(1, 1, 8, 8, 8),), str(plain), dynamo=False,
                      input_names=["image"])
    for path, reason in ((garbage, "not a readable ONNX model"), (truncated, "not a readable ONNX model"),
                         (plain, "no CT-FM export metadata"), (tmp_path / "missing.onnx", "does not exist")):
        with pytest.raises(ModelError, match=reason) as error:
            OnnxBackend.open(path, checkpoint, "segmentation")
        assert str(path) in str(error.value)


def test_a_difference_above_the_tolerance_writes_nothing(tmp_path, narrow_weights, sample_volume):
    encoder, checkpoint = load_encoder(narrow_weights)
    sample = validation_sample(sample_volume, "encoder", CTFM_PREPROCESSING, (32, 64, 64))
    with pytest.raises(ModelError, match="more than the tolerance 1e-12"):
        export_onnx(encoder, checkpoint, "encoder", tmp_path / "encoder.onnx", sample, tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []  # no file, no partial file
    result = run_cli("export", "--model", narrow_weights, "--out", tmp_path / "cli.onnx", "--roi", *WINDOW,
                     "--tolerance", "1e-12", "--json")
    assert result.code == 4 and "tolerance" in result.document["error"]["message"]
    assert list(tmp_path.iterdir()) == []


def test_onnx_for_exports_once_and_replaces_an_unusable_cached_file(isolated_cache, narrow_weights, sample_volume,
                                                                    monkeypatch):
    encoder, checkpoint = load_encoder(narrow_weights)
    sample = validation_sample(sample_volume, "encoder", CTFM_PREPROCESSING, (32, 64, 64))
    path = onnx_for(checkpoint, "encoder", encoder, sample)
    assert path == isolated_cache / "onnx" / f"encoder-{checkpoint.sha256[:16]}.onnx" and path.is_file()
    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "export_onnx", lambda *args, **kwargs: pytest.fail("exported again"))
        assert onnx_for(checkpoint, "encoder", encoder, sample) == path
    path.write_bytes(b"broken")
    assert onnx_for(checkpoint, "encoder", encoder, sample) == path
    features = OnnxBackend.open(path, checkpoint, "encoder")(sample).numpy()
    assert features.shape == (1, 128, 2, 4, 4)  # the last, stride-16 feature map of the 8-filter encoder
    with torch.no_grad():
        reference = encoder.eval()(sample)[-1].numpy()
    assert np.max(np.abs(features - reference)) <= 1e-3


def test_half_precision_for_the_cuda_provider_keeps_the_labels(seg_export, seg_model, sample_volume):
    half = OnnxBackend(half_precision(seg_export[1].read_bytes()))  # fp16 graph, run here by the CPU provider
    sample = validation_sample(sample_volume, "segmentation", seg_model.preprocessing, (32, 64, 64))
    ours, reference = half(sample).numpy(), logits(seg_model.network, sample)
    assert ours.dtype == np.float32  # fp32 in and out, fp16 inside
    assert 0 < np.max(np.abs(ours - reference)) < 0.1
    assert np.mean(ours.argmax(1) == reference.argmax(1)) >= 0.99


def test_providers_prefer_tensorrt_then_cuda_then_cpu(tmp_path, seg_export):
    providers = execution_providers("cuda", [TENSORRT, CUDA, CPU], device_id=1, fp16=True, engine_cache=tmp_path,
                                    batch_shape=(2, 1, 32, 128, 128))
    assert [p if isinstance(p, str) else p[0] for p in providers] == [TENSORRT, CUDA, CPU]
    tensorrt, cuda = providers[0][1], providers[1][1]
    assert tensorrt["device_id"] == 1 and tensorrt["trt_fp16_enable"] is True
    assert tensorrt["trt_engine_cache_path"] == str(tmp_path) and tensorrt["trt_engine_cache_enable"] is True
    assert tensorrt["trt_profile_min_shapes"] == "image:1x1x32x128x128"
    assert tensorrt["trt_profile_max_shapes"] == tensorrt["trt_profile_opt_shapes"] == "image:2x1x32x128x128"
    assert cuda == {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}
    assert execution_providers("cuda", [CUDA, CPU])[0][0] == CUDA
    assert execution_providers("cpu", [TENSORRT, CUDA, CPU]) == [CPU]
    with pytest.raises(UsageError, match="onnxruntime-gpu"):
        execution_providers("cuda", ["AzureExecutionProvider", CPU])


def test_export_input_and_option_problems_come_before_the_model_is_loaded(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_cli("export", "--model", missing, "--check-input", tmp_path / "no-such-ct.nii.gz", "--json")
    assert result.code == 3 and "no-such-ct.nii.gz" in result.document["error"]["message"]
    for options in (["--out", tmp_path / "model.pt"], ["--tolerance", "0"], ["--roi", "30", "64", "64"],
                    ["--task", "triage", "--roi", *WINDOW]):
        assert run_cli("export", "--model", missing, *options, "--json").code == 2, options
    result = run_cli("export", "--model", missing, "--json")
    assert result.code == 4 and str(missing) in result.document["error"]["message"]
    assert list(tmp_path.iterdir()) == []
