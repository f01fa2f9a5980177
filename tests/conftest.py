"""Shared fixtures: the real data folder, an isolated weights cache, narrow checkpoints, an in-process CLI, and the
one way a test says that a real part it needs is missing."""

from __future__ import annotations

import importlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest
import torch

from ctfm_engine.cli import main
from ctfm_engine.models.checkpoint import save_checkpoint
from ctfm_engine.models.encoder import build_encoder, encoder_config

SHARED = Path(os.environ.get("CTFM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
if not (SHARED / "README.md").is_file():
    raise RuntimeError(f"the real test data is missing: expected ../shared/data beside the repository ({SHARED})")

# CI sets this (.ci/run): there a missing real part (a tool, package or service `make test` installs) fails the run,
# so a green run means every real part was exercised.  Elsewhere such a test is skipped with the reason.
REQUIRE_REAL_PARTS = os.environ.get("CTFM_REQUIRE_REAL_PARTS") == "1"

# Segmentation's default runtime is chosen by measurement (--backend auto): OpenVINO or onnxruntime where they are
# faster and agree with PyTorch fp32 to the threshold.  Tests that compare label maps voxel for voxel with
# PyTorch's pin PyTorch for the whole session (processes they start inherit it); tests/test_runtime_selection.py
# exercises auto itself with the variable removed.
os.environ["CTFM_BACKEND"] = "torch"

SAMPLE_CT = SHARED / "totalsegmentator" / "example_ct_sm.nii.gz"
SAMPLE_LABELS = SHARED / "totalsegmentator" / "example_seg.nii.gz"
TS_DICOM = SHARED / "dicom" / "ts_abdomen_20slices_j2k"
# The shipped, trained demonstration checkpoints.
WEIGHTS = Path(__file__).resolve().parents[1] / "ctfm_engine" / "weights"
SHIPPED_ENCODER = WEIGHTS / "ctfm-mini"
SHIPPED_SEG = WEIGHTS / "ctfm-mini-wholebody-seg"
# The MONAI Deploy app runs in an environment of its own (the Makefile's .venv-deploy, the [deploy] extra): with the
# SDK installed, `import monai` loads Holoscan, so it is kept out of the environment the tests run in.
DEPLOY_PYTHON = Path(__file__).resolve().parents[1] / ".venv-deploy" / "bin" / "python"


def missing_real_part(reason: str) -> NoReturn:
    """Stop a test that cannot run because a real part it needs is missing: a skip normally, a failure under CI.

    Only for what the project ships or installs for its tests (Orthanc, dciodvfy, dcm2niix, lighter-zoo, slicer-core,
    onnxruntime, FAISS, Ray, MONAI Deploy, the training extra, ...); an absent GPU or Slicer application is a plain
    ``pytest.skip``.  Usable at module level, like ``pytest.importorskip``.
    """
    if REQUIRE_REAL_PARTS:
        pytest.fail(f"{reason} (CTFM_REQUIRE_REAL_PARTS=1: a missing real part fails the run)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(condition: object, reason: str) -> None:
    """:func:`missing_real_part` with ``reason`` unless ``condition`` holds."""
    if not condition:
        missing_real_part(reason)


def require_module(name: str, reason: str) -> ModuleType:
    """The imported module ``name``, or :func:`missing_real_part` with ``reason`` and the import error."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing_real_part(f"{reason} ({error})")


def deploy_python() -> Path:
    """The Python that runs the deploy app (``DEPLOY_PYTHON -m deploy_app``), or :func:`missing_real_part`."""
    require(DEPLOY_PYTHON.is_file(), f"the MONAI Deploy app runs in its own environment, {DEPLOY_PYTHON} is missing "
            "(make .venv-deploy/.installed: the [deploy] extra, monai-deploy-app-sdk 4.0 and holoscan-cu13 4.2)")
    return DEPLOY_PYTHON


@dataclass
class CLIResult:
    code: int
    stdout: str
    stderr: str

    @property
    def document(self) -> dict:
        return json.loads(self.stdout)


def run_cli(*args: str) -> CLIResult:
    """Run ``ctfm`` in-process and capture its exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return CLIResult(code, out.getvalue(), err.getvalue())


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm non-trivial running statistics, as a trained model has, so eval mode is not identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the user's weights or reaches the hub."""
    cache = tmp_path_factory.mktemp("ctfm-cache")
    monkeypatch.setenv("CTFM_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CTFM_WEIGHTS", raising=False)
    return cache


# The published checkpoints' hub repos and config.json fields (the model cards' constructors; lighter-zoo serialises
# exactly these).
SEGMENTATION_REPO = "project-lighter/whole_body_segmentation"
ENCODER_REPO = "project-lighter/ct_fm_feature_extractor"
ENCODER_CONFIG = {"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1, "init_filters": 32, "spatial_dims": 3}
SEGMENTATION_CONFIG = {**ENCODER_CONFIG, "out_channels": 118, "dsdepth": 4}


@pytest.fixture(scope="session")
def published_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ctfm cache holding both published checkpoints as `ctfm weights pull` lays them out: full size, random
    weights, written by lighter-zoo (the authors' wrapper) with ``save_pretrained``.  Read-only for tests."""
    lighter_zoo = require_module("lighter_zoo", "the published layout is written by lighter-zoo (installed by make)")
    cache = tmp_path_factory.mktemp("published-cache")
    torch.manual_seed(0)
    lighter_zoo.SegResNet(**SEGMENTATION_CONFIG).save_pretrained(
        cache / "models" / SEGMENTATION_REPO.replace("/", "--"))
    lighter_zoo.SegResEncoder(**ENCODER_CONFIG).save_pretrained(cache / "models" / ENCODER_REPO.replace("/", "--"))
    for repo, config in ((SEGMENTATION_REPO, SEGMENTATION_CONFIG), (ENCODER_REPO, ENCODER_CONFIG)):
        written = json.loads((cache / "models" / repo.replace("/", "--") / "config.json").read_text())
        assert written == config, f"lighter-zoo wrote {written} for {repo}"
    return cache


@pytest.fixture(scope="session")
def narrow_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A narrow (init_filters 8) CT-FM-architecture encoder checkpoint in the published layout."""
    torch.manual_seed(0)
    config = encoder_config(init_filters=8)
    encoder = build_encoder(config)
    randomise_batchnorm(encoder)
    folder = tmp_path_factory.mktemp("weights") / "ctfm-narrow-test"
    save_checkpoint(encoder, folder, config)
    return folder


# The triage mechanics recipe on a coarse grid (same 240 x 256 x 256 mm field of view), one epoch: about 15 s of CPU.
TRIAGE_RECIPE = Path(__file__).resolve().parents[1] / "training" / "finetune_triage_mechanics_cpu.yaml"
TRIAGE_SMALL = ["data.spacing_zyx_mm=[15,8,8]", "data.spatial_size_zyx=[16,32,32]", "data.visits_per_epoch=1",
                "trainer.max_epochs=1"]


@pytest.fixture(scope="session")
def triage_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny triage checkpoint (init_filters 8, 16x32x32 per window) fitted for one epoch by `ctfm finetune`."""
    require_module("lightning", "training the test checkpoint needs the [train] extra (lightning)")
    run = tmp_path_factory.mktemp("triage-run")
    overrides = [*TRIAGE_SMALL, f"output.dir={run}", f"output.export={run / 'model'}"]
    result = run_cli("finetune", "--config", TRIAGE_RECIPE, "--json", "-q",
                     *[arg for override in overrides for arg in ("--set", override)])
    assert result.code == 0, result.stderr[-3000:]
    return Path(result.document["export"])


@pytest.fixture
def nodes() -> Iterator[list]:
    """Every DICOM node a test starts (``test_node.NodeProcess``, appended by the test), stopped at its end whatever
    happened (tests/test_node.py, test_node_faults.py)."""
    started: list = []
    yield started
    for node in started:
        node.stop()
