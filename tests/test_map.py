"""The MONAI Application Package (MAP) as hospitals run it: the OCI image `make map` builds (podman/buildah on a
debootstrap Debian base, deploy_app/map/), started by deploy_app/scripts/run_map.sh the way MAP runners start it
(input read-only at /var/holoscan/input, output at /var/holoscan/output, no network), on real CT.

The container's DICOM-SEG and measurement SR must be those of `python -m deploy_app` run outside it on the same
series with the same model: every UID, every pixel, every attribute but the clock's.  Runs take 10-60 s each on this
CPU, so they are shared through module-scoped fixtures.  The image is built once by `make test` (build/map/.built)
and kept; these tests only run containers (`--rm`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from conftest import SEGMENTATION_REPO, SHARED, SHIPPED_SEG, TS_DICOM, deploy_python, missing_real_part, require

REPOSITORY = Path(__file__).resolve().parents[1]
RUN_MAP = REPOSITORY / "deploy_app" / "scripts" / "run_map.sh"
APP_YAML = yaml.safe_load((REPOSITORY / "deploy_app" / "app.yaml").read_text())
SLICER_HEAD = SHARED / "dicom" / "slicer_head_64x64"
NEGATIVE_CONTROLS = SHARED / "negative-controls"  # MR volumes (NRRD, NIfTI): not a CT DICOM series
# What this machine's podman needs (cgroups v1 hybrid: crun refuses; defaults above the hard rlimits).
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
IMAGE_USER = (1000, 1000)  # holoscan, the image's own user
# The MAP specification's environment variables and their default values.
SPECIFIED_ENVIRONMENT = {
    "HOLOSCAN_INPUT_PATH": "/var/holoscan/input", "HOLOSCAN_OUTPUT_PATH": "/var/holoscan/output",
    "HOLOSCAN_WORKDIR": "/var/holoscan", "HOLOSCAN_MODEL_PATH": "/opt/holoscan/models",
    "HOLOSCAN_CONFIG_PATH": "/var/holoscan/app.yaml", "HOLOSCAN_APP_MANIFEST_PATH": "/etc/holoscan/app.json",
    "HOLOSCAN_PKG_MANIFEST_PATH": "/etc/holoscan/pkg.json", "HOLOSCAN_DOCS_PATH": "/opt/holoscan/docs",
    "HOLOSCAN_LOGS_PATH": "/var/holoscan/logs",
}
# Every UID is derived from the series, the model and the labels (ctfm_engine.dicom.seg replaces the
# DimensionOrganizationUID highdicom draws at random), so nothing but the clock differs between two runs.
RANDOM_PER_RUN: set[str] = set()


def image_tag() -> str:
    require(shutil.which("podman"), "podman is not installed (Debian podman, buildah, runc, debootstrap: make apt)")
    tag = f"localhost/ctfm-seg-map:{APP_YAML['application']['version']}"
    inspected = subprocess.run([*PODMAN, "image", "inspect", tag], capture_output=True, text=True)
    if inspected.returncode != 0:
        missing_real_part(f"the MAP image {tag} is not built (make map; make test builds it)")
    digest = subprocess.run([sys.executable, REPOSITORY / "deploy_app" / "map" / "stage.py", "--digest"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if json.loads(inspected.stdout)[0]["Labels"].get("org.ctfm.source-digest") != digest:
        missing_real_part(f"the MAP image {tag} was built from other sources than this tree (make map rebuilds it)")
    return tag


IMAGE = image_tag()


def run_map(input_folder: Path, output: Path, *args: object, timeout: int = 900) -> subprocess.CompletedProcess:
    """run_map.sh IMAGE IN OUT [MODELS] [-- APP_OPTIONS]; the session's CTFM_BACKEND=torch (conftest) goes in."""
    return subprocess.run([RUN_MAP, IMAGE, input_folder, output, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CTFM_BACKEND": "torch"})


def in_image(*command: str, mounts: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The image's entrypoint with ``command``, as its own user, no network."""
    volumes = [option for mount in mounts for option in ("-v", mount)]
    return subprocess.run([*PODMAN, "run", "--rm", "--network", "none", *LIMITS, *volumes, IMAGE, *command],
                          capture_output=True, text=True, timeout=300)


def error_lines(completed: subprocess.CompletedProcess) -> list[str]:
    return [line for line in completed.stderr.splitlines() if line.startswith("deploy_app: error:")]


def attributes(dataset: pydicom.Dataset, path: str = "") -> dict[str, tuple[str, object]]:
    """Every attribute of ``dataset`` as ``path: (VR, value)``, nested sequences flattened into paths, except the
    clock's (DA, TM, DT) and the UIDs drawn at random per run."""
    values: dict[str, tuple[str, object]] = {}
    for element in dataset:
        name = f"{path}{element.keyword or element.tag}"
        if element.VR in ("DA", "TM", "DT") or element.keyword in RANDOM_PER_RUN:
            continue
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                values |= attributes(item, f"{name}[{index}].")
        else:
            values[name] = (element.VR, element.value)
    return values


def differing(ours: dict, theirs: dict) -> list[str]:
    return sorted(name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name))


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The real 20-slice JPEG 2000 abdominal CT through the MAP (its bundled demonstration model) and through
    `python -m deploy_app` with the same checkpoint, both on PyTorch."""
    runs = {}
    out = tmp_path_factory.mktemp("map-out")
    runs["map"] = run_map(TS_DICOM, out), out
    out = tmp_path_factory.mktemp("direct-out")
    runs["direct"] = subprocess.run(
        [deploy_python(), "-m", "deploy_app", "-i", TS_DICOM, "-o", out, "-m", SHIPPED_SEG], capture_output=True,
        text=True, cwd=REPOSITORY, timeout=900, env={**os.environ, "CTFM_BACKEND": "torch"}), out
    return runs


def test_the_map_writes_the_seg_and_sr_the_app_writes_outside_it_uid_for_uid_and_pixel_for_pixel(abdomen):
    (in_map, map_out), (direct, direct_out) = abdomen["map"], abdomen["direct"]
    assert in_map.returncode == 0, in_map.stderr[-3000:]
    assert direct.returncode == 0, direct.stderr[-3000:]
    written = sorted(path.name for path in map_out.iterdir())
    assert written == sorted(path.name for path in direct_out.iterdir())
    assert {"ctfm-seg.dcm", "ctfm-measurements-sr.dcm", "ctfm-results.json"} <= set(written)
    for name in ("ctfm-seg.dcm", "ctfm-measurements-sr.dcm"):
        ours, theirs = (attributes(pydicom.dcmread(out / name)) for out in (map_out, direct_out))
        uids = [path for path, (vr, _) in ours.items() if vr == "UI"]  # SOP, series, study, every reference
        assert len(uids) > 20 and not set(uids) & set(differing(ours, theirs)), f"{name}: {differing(ours, theirs)}"
        assert ours == theirs, f"{name}: {differing(ours, theirs)}"  # the pixels (PixelData) and the rest
    seg, direct_seg = pydicom.dcmread(map_out / "ctfm-seg.dcm"), pydicom.dcmread(direct_out / "ctfm-seg.dcm")
    assert seg.pixel_array.any() and (seg.pixel_array == direct_seg.pixel_array).all()
    # The bundled model is the demonstration model, and says so.
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == SHIPPED_SEG.name and "demonstration=true" in algorithm.AlgorithmParameters
    summaries = [json.loads((out / "ctfm-results.json").read_text())["segmentation"] for out in (map_out, direct_out)]
    assert summaries[0]["weights"] == summaries[1]["weights"] and summaries[0]["weights"]["demonstration"] is True
    for key in ("structures", "backend", "model"):
        assert summaries[0][key] == summaries[1][key], key


@pytest.mark.parametrize("bad_input", ["mr-volumes", "empty", "mr-series"])
def test_bad_input_exits_3_from_the_container_with_one_sentence_and_no_output(bad_input, tmp_path):
    if bad_input == "mr-volumes":
        folder, reason = NEGATIVE_CONTROLS, "no DICOM images"
    elif bad_input == "empty":
        folder, reason = tmp_path / "empty", "empty"
        folder.mkdir()
    else:  # the real head CT re-labelled MR
        folder, reason = tmp_path / "mr", "MR"
        folder.mkdir()
        for path in sorted(SLICER_HEAD.glob("*.dcm"))[:20]:
            dataset = pydicom.dcmread(path)
            dataset.Modality = "MR"
            dataset.save_as(folder / path.name)
    out = tmp_path / "out"
    completed = run_map(folder, out)
    assert completed.returncode == 3, completed.stderr[-3000:]
    [message] = error_lines(completed)
    assert reason.lower() in message.lower(), message
    assert list(out.iterdir()) == []


def test_app_options_after_the_double_dash_reach_the_app_and_its_usage_exit_code_comes_back(tmp_path):
    completed = run_map(SLICER_HEAD, tmp_path / "out", "--", "--spacing", "fine")
    assert completed.returncode == 2 and "spacing 'fine'" in completed.stderr, completed.stderr[-3000:]
    assert list((tmp_path / "out").iterdir()) == []


def test_the_image_is_laid_out_and_described_as_the_map_specification_says(tmp_path):
    shown = in_image("show", "app", "pkg")
    assert shown.returncode == 0, shown.stderr
    export = tmp_path / "export"
    export.mkdir()
    os.chown(export, *IMAGE_USER)
    extracted = in_image("extract", mounts=(f"{export}:/var/run/holoscan/export",))
    assert extracted.returncode == 0, extracted.stderr
    app, pkg = (json.loads((export / "config" / name).read_text()) for name in ("app.json", "pkg.json"))
    assert shown.stdout.startswith("/etc/holoscan/app.json:\n") and "\n/etc/holoscan/pkg.json:\n" in shown.stdout
    assert json.dumps(app, indent=2) in shown.stdout and json.dumps(pkg, indent=2) in shown.stdout

    # app.json: the fields of the specification's application manifest table
    application = APP_YAML["application"]
    assert app["apiVersion"] == "1.0.0" and app["type"] == "application" and app["version"] == application["version"]
    assert json.loads(app["command"]) == ["python3", "/opt/holoscan/app"]
    assert app["environment"].items() >= SPECIFIED_ENVIRONMENT.items()
    assert app["environment"]["HOLOSCAN_APPLICATION"] == "/opt/holoscan/app"
    assert app["input"] == {"path": "input/", "formats": application["input-formats"]}
    assert app["output"] == {"path": "output/", "formats": application["output-formats"]}
    assert app["workingDirectory"] == "/var/holoscan" and app["timeout"] == 0
    pins = dict(line.split("==") for line in (REPOSITORY / "deploy_app" / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert (app["sdk"], app["sdkVersion"]) == ("monai-deploy", pins["monai-deploy-app-sdk"])
    # pkg.json: where the application and the models are, the resources from app.yaml
    assert pkg["apiVersion"] == "1.0.0" and pkg["version"] == application["version"]
    assert (pkg["applicationRoot"], pkg["modelRoot"]) == ("/opt/holoscan/app", "/opt/holoscan/models")
    assert pkg["models"] == {SHIPPED_SEG.name: f"/opt/holoscan/models/{SHIPPED_SEG.name}"}
    assert pkg["resources"] == APP_YAML["resources"]
    assert yaml.safe_load((export / "config" / "app.yaml").read_text()) == APP_YAML

    # the application, the models (the bundled demonstration checkpoint, byte for byte) and the docs
    assert (export / "app" / "__main__.py").is_file() and (export / "app" / "deploy_app" / "app.py").is_file()
    shipped = export / "models" / SHIPPED_SEG.name / "model.safetensors"
    assert sha256(shipped) == sha256(SHIPPED_SEG / "model.safetensors")
    assert "not for clinical use" in (export / "models" / SHIPPED_SEG.name / "README.md").read_text()
    assert (export / "docs" / "python-packages" / "wheelhouse.lock").is_file()

    # the image: the same environment as app.json, OCI title and version, a non-root user, the entrypoint
    [inspected] = json.loads(subprocess.run([*PODMAN, "image", "inspect", IMAGE], capture_output=True, text=True,
                                            check=True).stdout)
    environment = dict(variable.split("=", 1) for variable in inspected["Config"]["Env"])
    assert environment.items() >= app["environment"].items()
    labels = inspected["Labels"]
    assert labels["org.opencontainers.image.title"] == application["title"]
    assert labels["org.opencontainers.image.version"] == application["version"]
    assert inspected["Config"]["User"] == "holoscan" and inspected["Config"]["Entrypoint"] == ["/var/holoscan/tools"]
    assert {(path.stat().st_uid, path.stat().st_gid) for path in export.rglob("*")} == {IMAGE_USER}  # who ran it


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_published_weights_mounted_in_place_of_the_bundled_models_are_used_and_named(published_cache, tmp_path):
    """A site brings the published whole_body_segmentation (here: full size, random weights, written by the authors'
    lighter-zoo) and mounts its models folder over /opt/holoscan/models; the container runs as the image's user."""
    published = published_cache / "models" / SEGMENTATION_REPO.replace("/", "--")
    models = tmp_path / "models"
    shutil.copytree(published, models / published.name)
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the container's user
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, *IMAGE_USER)
    completed = run_map(SLICER_HEAD, out, models)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "demonstration model" not in completed.stderr
    assert {(path.stat().st_uid, path.stat().st_gid) for path in out.iterdir()} == {IMAGE_USER}
    seg = pydicom.dcmread(out / "ctfm-seg.dcm")
    weights = sha256(published / "model.safetensors")
    for segment in seg.SegmentSequence:
        [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == SEGMENTATION_REPO
        parameters = algorithm.AlgorithmParameters.split(",")
        assert f"weights_sha256={weights}" in parameters and not any("demonstration" in p for p in parameters)
    recorded = json.loads((out / "ctfm-results.json").read_text())["segmentation"]["weights"]
    assert (recorded["name"], recorded["sha256"], recorded["demonstration"]) == (SEGMENTATION_REPO, weights, False)


def test_a_mounted_models_folder_with_two_unnamed_checkpoints_is_a_model_error_naming_them(tmp_path):
    models = tmp_path / "models"
    for name in ("site-model-a", "site-model-b"):
        shutil.copytree(SHIPPED_SEG, models / name)
    completed = run_map(SLICER_HEAD, tmp_path / "out", models)
    assert completed.returncode == 4, completed.stderr[-3000:]
    [message] = error_lines(completed)
    assert "site-model-a, site-model-b" in message and "segmentation/" in message, message
    assert list((tmp_path / "out").iterdir()) == []
