"""The CTFM Slicer module without Slicer: its asynchronous worker API (CTFMLib.jobs) on real CT, its install logic,
and the extension layout Slicer and the ExtensionsIndex expect (CMake lists, resources, .ui, catalog entry)."""

from __future__ import annotations

import ast
import inspect
import json
import py_compile
import re
import statistics
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import install_tree  # SlicerCTFM/Testing (pytest pythonpath)
import numpy as np
import pytest
from conftest import SAMPLE_CT, SHARED, SHIPPED_ENCODER, SHIPPED_SEG, require_module
from CTFMLib import install, jobs

from ctfm_engine.errors import InputError
from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume, check_hounsfield

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SlicerCTFM"

BUNDLED_SAMPLE_CT = ROOT / "ctfm_engine" / "data" / "sample_ct.nii.gz"
MR = SHARED / "negative-controls" / "example_mr_sm.nii.gz"
# What one poll() (and cancel()) may cost the UI thread.  Measured as the thread's own CPU time for every call and as
# wall time for the median call: while a worker saturates the CPUs the test process may wait its turn mid-call, which
# the wall time of a single call would count against poll().  That poll() never waits for the worker is checked
# directly: polls return empty while the worker is busy.
POLL_BUDGET_S = 0.1


@dataclass
class PollTimes:
    """Wall and own-thread CPU seconds of each poll() call, and how many returned no event."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    empty: int = 0

    def poll(self, poll) -> list:
        wall, cpu = time.perf_counter(), time.thread_time()
        events = poll()
        self.cpu_s.append(time.thread_time() - cpu)
        self.wall_s.append(time.perf_counter() - wall)
        self.empty += not events
        return events

    def assert_never_blocked(self) -> None:
        assert max(self.cpu_s) < POLL_BUDGET_S, f"a poll used {max(self.cpu_s):.3f} s of the UI thread's CPU"
        assert statistics.median(self.wall_s) < POLL_BUDGET_S, f"median poll {statistics.median(self.wall_s):.3f} s"
        # A poll() that waited for the worker's next event would never come back empty while the worker runs.
        assert self.empty >= 3, f"only {self.empty} of {len(self.wall_s)} polls came back without waiting for an event"


def cropped(volume: CTVolume, box: tuple[slice, slice, slice]) -> CTVolume:
    """A real sub-volume (z, y, x slices) with its origin moved to the first kept voxel."""
    start = [s.start or 0 for s in box]
    origin = volume.zyx_index_to_lps(np.array(start, dtype=float))
    return CTVolume(np.ascontiguousarray(volume.voxels[box]), volume.spacing_xyz_mm, tuple(origin), volume.direction,
                    volume.source)


def poll_until_finished(job: jobs.Job, timeout: float) -> tuple[list[dict], PollTimes]:
    """Every event and the timing of every poll() until the job ends."""
    events, times = [], PollTimes()
    deadline = time.monotonic() + timeout
    while not job.finished and time.monotonic() < deadline:
        events.extend(times.poll(job.poll))
        time.sleep(0.02)
    assert job.finished, f"job still {job.state} after {timeout} s"
    return events, times


def gone(pids: list[int], timeout: float = 1.0) -> bool:
    psutil = require_module("psutil", "psutil checks that the worker's process tree is gone")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.05)
    return False


# --- segmentation, cancel, failures ----------------------------------------------------------------------------


def test_segmentation_job_reports_progress_and_gives_the_in_process_labels(tmp_path):
    from ctfm_engine.tasks.segment import open_segmentation_model, segment

    volume = cropped(read_volume(SAMPLE_CT), (slice(None), slice(20, 80), slice(25, 100)))  # 4 windows, not 20
    job = jobs.start_segmentation(volume, SHIPPED_SEG, "cpu", work_dir=tmp_path)
    assert job.state == "queued" and job.folder.parent == tmp_path
    events, polls = poll_until_finished(job, timeout=240)
    assert job.state == "done", job.error
    polls.assert_never_blocked()
    windows = [(e["done"], e["total"]) for e in events if e["event"] == "progress" and e["stage"] == "segmenting"]
    assert windows and all(b[0] > a[0] for a, b in zip(windows, windows[1:], strict=False))
    assert windows[-1][0] == windows[-1][1] >= 2 and len({total for _, total in windows}) == 1

    model = open_segmentation_model(SHIPPED_SEG)
    expected = segment(volume, model.network, model.preprocessing, model.roi_size_zyx, model.overlap).labels
    labels = job.result["labels"]
    assert labels.shape == volume.shape_zyx and labels.dtype == expected.dtype
    np.testing.assert_array_equal(labels, expected)
    assert expected.any()
    assert job.result["weights"] == model.checkpoint.identity
    counts = {row["label"]: row["voxels"] for row in job.result["structures"]}
    assert counts == {int(v): int(c) for v, c in zip(*np.unique(expected, return_counts=True), strict=True) if v}
    assert job.result["names"]["5"] == "liver"
    assert not job.folder.exists() and not any(tmp_path.iterdir())  # nothing left behind


def test_cancel_kills_the_worker_tree_within_two_seconds_and_leaves_nothing(tmp_path):
    job = jobs.start_segmentation(read_volume(SAMPLE_CT), SHIPPED_SEG, "cpu", work_dir=tmp_path)
    deadline = time.monotonic() + 120
    while not (job.progress and job.progress.stage == "segmenting") and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    assert job.state == "running" and job.progress.done < job.progress.total
    pids = job.process_ids()
    assert job.pid in pids
    started, cpu = time.perf_counter(), time.thread_time()
    job.cancel()
    # cancel() returns at once: it neither waits for the worker to stop nor for the grace period before the kill
    assert time.thread_time() - cpu < POLL_BUDGET_S and time.perf_counter() - started < jobs.CANCEL_GRACE_S
    assert job.state == "cancelling"
    events, polls = poll_until_finished(job, timeout=5)
    elapsed = time.perf_counter() - started
    assert job.state == "cancelled" and elapsed < 2.0, f"{job.state} after {elapsed:.2f} s"
    assert {"event": "cancelled"} in events and job.result is None
    polls.assert_never_blocked()
    assert gone(pids), "a worker process survived the cancel"
    assert not any(tmp_path.iterdir())


def test_bad_input_and_missing_weights_fail_with_the_engine_message_and_exit_code(tmp_path):
    mr = read_volume(MR, check_hu=False)
    with pytest.raises(InputError) as refused:
        check_hounsfield(mr.voxels, mr.source)
    # Input first: an MR with no weights at all is refused as input (3), not as a model problem (4).
    bad_input = jobs.start_segmentation(mr, tmp_path / "no-such-weights", work_dir=tmp_path)
    no_weights = jobs.start_segmentation(read_volume(SAMPLE_CT), tmp_path / "no-such-weights", work_dir=tmp_path)
    for job in (bad_input, no_weights):
        poll_until_finished(job, timeout=120)
    assert bad_input.state == "failed" and bad_input.result is None
    assert bad_input.error.exit_code == 3 and bad_input.error.message.startswith(f"{refused.value}; if it is a CT")
    assert no_weights.state == "failed" and no_weights.error.exit_code == 4
    assert "no-such-weights" in no_weights.error.message
    assert not any(tmp_path.iterdir())


# --- the persistent search worker ------------------------------------------------------------------------------


def wait_for(worker: jobs.SearchWorker, condition, timeout: float, polls: PollTimes) -> float:
    started = time.perf_counter()
    while not condition() and time.perf_counter() - started < timeout:
        polls.poll(worker.poll)
        time.sleep(0.005)
    assert condition(), f"no answer within {timeout} s: {worker.log[-5:]} {worker.error}"
    return time.perf_counter() - started


def test_search_worker_answers_a_repeated_query_within_a_second(tmp_path, capsys):
    source, target = read_volume(BUNDLED_SAMPLE_CT), read_volume(SAMPLE_CT)
    shifted = cropped(target, (slice(None), slice(10, None), slice(None)))
    point = source.zyx_index_to_lps(np.array([15.0, 50.0, 61.0]))  # mid-abdomen
    worker = jobs.SearchWorker(SHIPPED_ENCODER, "cpu", cache_dir=tmp_path / "features", top_k=3,
                               work_dir=tmp_path / "work")
    polls = PollTimes()
    try:
        keys = [worker.add_volume(source, "source"), worker.add_volume(shifted, "target")]
        loading = wait_for(worker, lambda: set(keys) <= set(worker.loaded), 120, polls)
        assert worker.state == "running" and worker.weights["name"] == "ctfm-mini"
        seconds = []
        for _ in range(3):
            request = worker.query("source", point, ["source", "target"])
            seconds.append(wait_for(worker, lambda r=request: r in worker.results or r in worker.errors, 30, polls))
            assert request in worker.results, worker.errors.get(request)
        result = worker.results[request]
        assert seconds[1] < 1.0 and seconds[2] < 1.0, seconds
        itself, other = result["targets"]
        assert itself["key"] == "source" and other["key"] == "target"
        # the worker's answer is the engine's: the same search in-process on the same volumes and weights
        from ctfm_engine.models.registry import load_encoder
        from ctfm_engine.tasks.search import SearchSettings, SemanticSearch

        encoder, checkpoint = load_encoder(SHIPPED_ENCODER)
        expected = SemanticSearch(encoder, checkpoint.sha256, settings=SearchSettings(top_k=3)).search(
            source, point, [source, shifted])
        for answered, engine in zip(result["targets"], expected.targets, strict=True):
            assert len(answered["matches"]) == len(engine.matches) == 3
            for match, reference in zip(answered["matches"], engine.matches, strict=True):
                np.testing.assert_allclose(match["point_lps"], reference.point_lps, atol=1e-6)
                assert match["similarity"] == pytest.approx(reference.similarity, abs=1e-6)
        for index, target in enumerate((source, shifted)):
            heatmap = result[f"heatmap_{index}"]
            assert heatmap.shape == target.shape_zyx and heatmap.dtype == np.float32
            # sent as 8-bit codes: within half a step (1/510) of the engine's, and the step is exactly 1/255
            np.testing.assert_allclose(heatmap, expected.targets[index].heatmap, atol=0.5 / 255 + 1e-6)
            np.testing.assert_allclose(heatmap * 255, np.rint(heatmap * 255), atol=1e-3)
        assert 0.0 <= result["heatmap_1"].min() and 0.5 < result["heatmap_1"].max() <= 1.0
        assert list((tmp_path / "features").glob("*.npz"))  # the persistent on-disk cache was filled

        outside = worker.query("source", [1e4, 1e4, 1e4], ["target"])
        wait_for(worker, lambda: outside in worker.errors, 10, polls)
        assert worker.errors[outside].exit_code == 3 and "outside this scan" in worker.errors[outside].message
        again = worker.query("source", point, ["target"], heatmaps=False)
        wait_for(worker, lambda: again in worker.results, 10, polls)  # an error does not end the worker
        polls.assert_never_blocked()
        with capsys.disabled():
            print(f"\nsearch worker: loading 2 volumes {loading:.2f} s, queries "
                  f"{', '.join(f'{s:.3f}' for s in seconds)} s (first, repeated, repeated)")
    finally:
        pid = worker.pid
        worker.close()
    assert gone([pid]), "the search worker survived close()"
    assert not any((tmp_path / "work").iterdir())  # its folder (volumes, heatmaps) is gone


# --- install logic ---------------------------------------------------------------------------------------------


def test_requirements_leave_slicers_own_packages_alone_and_are_checked_against_what_is_installed():
    requirements = install.read_requirements()
    names = {install.requirement_name(line) for line in requirements}
    # third-party packages only: the engine ships inside the extension (tests/test_slicer_install_tree.py)
    assert {"monai", "safetensors", "huggingface-hub", "onnxruntime", "openvino"} <= names
    assert "ctfm-engine" not in names
    owned = {install.normalise(name) for name in install.SLICER_OWNED_PACKAGES}
    # Slicer's own SimpleITK, numpy, requests and its DICOM module's pydicom/highdicom are never replaced.
    assert {"simpleitk", "numpy", "requests", "pydicom", "highdicom", "torch"} <= owned and not names & owned
    assert install.missing_requirements(requirements) == []  # all present in this environment
    assert install.missing_requirements(["monai>=999", "no-such-package-ctfm"]) == ["monai>=999",
                                                                                   "no-such-package-ctfm"]


def test_engine_wheel_carries_the_demo_models_and_installs_as_the_module_asks(tmp_path):
    """The developers' route (the extension carries the engine for everyone else): a wheel built from this tree
    holds the bundled models and sample CT, and the requirement the module hands to pip (and to
    slicer.packaging.load_requirements, which parses every line as a PEP 508 requirement) is accepted by both."""
    import shutil
    import subprocess
    import zipfile

    from packaging.requirements import Requirement

    source = tmp_path / "source"  # setuptools builds inside the project: keep build/ out of the checkout
    shutil.copytree(ROOT / "ctfm_engine", source / "ctfm_engine", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("ctfm_engine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("ctfm-mini", "ctfm-mini-wholebody-seg"):  # the demonstration models the policy falls back on
        assert {f"ctfm_engine/weights/{model}/config.json", f"ctfm_engine/weights/{model}/model.safetensors"} <= names
    assert "ctfm_engine/data/sample_ct.nii.gz" in names
    for given in (wheel, source):
        requirement = Requirement(install.engine_requirement(given))
        assert (requirement.name, requirement.url) == ("ctfm-engine", given.resolve().as_uri())
    (tmp_path / "requirements.txt").write_text(install.engine_requirement(wheel) + "\n")
    dry_run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                              "--ignore-installed", "-r", str(tmp_path / "requirements.txt")],
                             capture_output=True, text=True, timeout=300)
    assert dry_run.returncode == 0 and "Would install ctfm-engine-" in dry_run.stdout, dry_run.stderr
    with pytest.raises(ValueError, match="not a ctfm_engine wheel"):
        install.engine_requirement(tmp_path / "requirements.txt")


def test_weights_choices_report_the_checkpoint_name_and_sha256(tmp_path):
    from ctfm_engine.errors import ModelError
    from ctfm_engine.models.checkpoint import read_checkpoint

    automatic = install.choose_weights("segmentation", "auto")  # the cache is empty: the demonstration model
    assert (automatic.name, automatic.sha256) == (SHIPPED_SEG.name, read_checkpoint(SHIPPED_SEG).sha256)
    assert automatic.folder == SHIPPED_SEG.resolve() and automatic.demonstration
    assert automatic.short() == f"ctfm-mini-wholebody-seg (sha256 {automatic.sha256[:12]}), a demonstration model"
    local = install.choose_weights("search", "folder", folder=SHIPPED_ENCODER)
    assert local.sha256 == read_checkpoint(SHIPPED_ENCODER).sha256 and local.demonstration  # a copy is one too
    with pytest.raises(ModelError, match="config.json"):
        install.choose_weights("search", "folder", folder=tmp_path)
    with pytest.raises(ModelError, match="offline|no local copy"):  # HF_HUB_OFFLINE=1 in the tests
        install.choose_weights("search", "hub", allow_download=False)


# --- the extension layout --------------------------------------------------------------------------------------


def test_every_ctfmlib_file_and_resource_is_listed_in_the_module_cmake_and_exists():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert re.search(r"set\(MODULE_NAME CTFM\)", text) and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    scripts = install_tree.cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = install_tree.cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk = {str(path.relative_to(MODULE)) for path in (MODULE / "CTFMLib").glob("*.py")}
    assert on_disk <= set(scripts) and "CTFM.py" in scripts
    assert {"CTFMLib/__init__.py", "CTFMLib/jobs.py", "CTFMLib/install.py", "CTFMLib/mrml_adapters.py"} <= set(scripts)
    missing = [item for item in scripts + resources if not (MODULE / item).is_file()]
    assert not missing, f"listed in SlicerCTFM/CMakeLists.txt but absent: {missing}"
    assert {"Resources/UI/CTFM.ui", "Resources/Icons/CTFM.png", "Resources/requirements.txt"} <= set(resources)
    assert all((MODULE / "Testing" / sub / "CMakeLists.txt").is_file() for sub in ("", "Python"))
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "CTFM.png") as icon:
        assert icon.size == (128, 128)


def test_the_ui_parses_and_holds_every_widget_ctfm_py_uses():
    tree = ElementTree.parse(MODULE / "Resources" / "UI" / "CTFM.ui")
    root = tree.getroot().find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "CTFM"
    names = {widget.get("name") for widget in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "CTFM.py").read_text()))
    assert used and used <= names, f"CTFM.py uses widgets the .ui lacks: {sorted(used - names)}"
    classes = {widget.get("class") for widget in tree.iter("widget")}
    assert {"ctkCollapsibleButton", "qMRMLNodeComboBox", "QProgressBar", "QPlainTextEdit"} <= classes
    titles = {w.findtext("property[@name='text']/string") for w in tree.iter("widget")
              if w.get("class") == "ctkCollapsibleButton"}
    assert {"Segmentation", "Triage", "Semantic search", "Model", "Advanced"} <= titles


def test_catalog_entry_matches_the_top_level_cmake():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    project = re.search(r"^project\((\w+)\)", cmake, re.M).group(1)
    assert project == "CTFM" and not project.lower().startswith("slicer")
    assert (ROOT / f"{project}.json").is_file()
    entry = json.loads((ROOT / f"{project}.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert {"category", "scm_url", "build_dependencies", "dicom_support_rule"} <= set(entry)
    assert entry["category"] == "Segmentation" and "Modality == 'CT'" in entry["dicom_support_rule"]
    depends = re.search(r'set\(EXTENSION_DEPENDS "?([^")]*)"?\)', cmake).group(1).split()
    assert entry["build_dependencies"] == depends == ["PyTorch"]
    assert "add_subdirectory(SlicerCTFM)" in cmake.split("## NEXT_MODULE")[0]
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf"set\({key} \"https://", cmake), key
    raw = "https://raw.githubusercontent.com/SlicerCTFM/SlicerCTFM/main/"
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):  # once published, each URL is a file of this tree
        for url in re.search(rf'set\({key} "([^"]*)"\)', cmake).group(1).split():
            assert url.startswith(raw) and (ROOT / url[len(raw):]).is_file(), url
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]


def _signature_of(source: Path, name: str) -> inspect.Signature:
    """The signature of function ``name`` in ``source`` (``Class`` for its constructor, ``Class.method`` for a
    method, both without ``self``), read without importing the file (it needs Slicer)."""
    body = ast.parse(source.read_text()).body
    class_name, _, method = name.partition(".")
    for node in body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            wanted = method or "__init__"
            for member in node.body:
                if isinstance(member, ast.FunctionDef) and member.name == wanted:
                    bound = ast.FunctionDef(name=wanted, args=member.args, body=[], decorator_list=[])
                    bound.args = ast.arguments(posonlyargs=[], args=member.args.args[1:], vararg=member.args.vararg,
                                               kwonlyargs=member.args.kwonlyargs,
                                               kw_defaults=[d and ast.Constant(None) for d in member.args.kw_defaults],
                                               kwarg=member.args.kwarg,
                                               defaults=[ast.Constant(None) for _ in member.args.defaults])
                    body, name = [bound], wanted
                    break
            else:
                raise AssertionError(f"{source.name}: class {class_name} has no method {wanted}")
            break
    for node in body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            stub = ast.FunctionDef(name=name, args=node.args, body=[ast.Pass()], decorator_list=[], returns=None,
                                   type_params=[])
            module = ast.Module(body=[ast.ImportFrom("__future__", [ast.alias("annotations")], 0), stub],
                                type_ignores=[])
            namespace: dict = {}
            exec(compile(ast.fix_missing_locations(module), str(source), "exec"), namespace)
            return inspect.signature(namespace[name])
    raise AssertionError(f"{source.name} has no function {name}")


def test_ctfm_py_compiles_imports_nothing_heavy_and_calls_the_libraries_as_they_are_defined(tmp_path):
    path = MODULE / "CTFM.py"
    py_compile.compile(str(path), cfile=str(tmp_path / "CTFM.pyc"), doraise=True)
    tree = ast.parse(path.read_text())
    top_imports = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
                   for alias in node.names}
    top_imports |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not top_imports & {"torch", "monai", "ctfm_engine", "SimpleITK"}, top_imports
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"CTFM", "CTFMWidget", "CTFMLogic", "CTFMTest"} <= classes
    libraries = {"jobs": jobs, "install": install, "mrml_adapters": MODULE / "CTFMLib" / "mrml_adapters.py",
                 "session": MODULE / "CTFMLib" / "session.py"}
    checked = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in libraries):
            continue
        library, name = libraries[node.func.value.id], node.func.attr
        if isinstance(library, Path):
            signature = _signature_of(library, name)
        else:
            member = getattr(library, name)
            signature = inspect.signature(member)
        if any(isinstance(arg, ast.Starred) for arg in node.args) or any(k.arg is None for k in node.keywords):
            continue
        signature.bind(*range(len(node.args)), **{k.arg: None for k in node.keywords})  # TypeError on a mismatch
        checked.add(f"{node.func.value.id}.{name}")
    for node in ast.walk(tree):  # self.search.<method>(...): the logic's SearchSession
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "search"
                and isinstance(node.func.value.value, ast.Name) and node.func.value.value.id == "self"):
            signature = _signature_of(MODULE / "CTFMLib" / "session.py", f"SearchSession.{node.func.attr}")
            signature.bind(*range(len(node.args)), **{k.arg: None for k in node.keywords})
            checked.add(f"SearchSession.{node.func.attr}")
    assert {"jobs.start_segmentation", "jobs.start_triage", "mrml_adapters.volume_node_to_ctvolume",
            "session.import_segmentation", "session.describe_segmentation", "session.describe_triage",
            "session.describe_weights", "mrml_adapters.place_in_study", "session.SearchSession",
            "SearchSession.set_volumes", "SearchSession.query", "SearchSession.show_result",
            "SearchSession.matches", "SearchSession.close",
            "install.ensure_dependencies", "install.choose_weights"} <= checked
