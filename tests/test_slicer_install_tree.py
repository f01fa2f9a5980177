"""The Slicer extension carries the engine: its install tree (built from the extension CMake's file lists) runs a
segmentation job in an environment that has only what Slicer ships plus the module's third-party requirements --
no ``ctfm_engine`` installed (the Makefile's ``.venv-slicer``) -- and too old a Slicer is refused in one sentence.

The Slicer application itself is not installable here, and the PyPI ``slicer-core-sdk`` is the C++ MRML-core SDK
(no ``slicerMacroBuildScriptedModule``, no ``Slicer_USE_FILE``), so the extension's CMake cannot be configured with
it; the tree is laid out from the same lists CMake installs (``SlicerCTFM/Testing/install_tree.py``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import install_tree  # SlicerCTFM/Testing (pytest pythonpath)
from conftest import missing_real_part
from CTFMLib import install

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SlicerCTFM"
SLICER_PYTHON = ROOT / ".venv-slicer" / "bin" / "python"

# Run in the Slicer-like environment from the install tree: what the module's logic does for a segmentation, from the
# job to the segmentation node on real MRML (Slicer ships its MRML; here it is the PyPI slicer-core).
CLIENT = r"""
import importlib.util, json, sys, time
from pathlib import Path

tree, out = Path(sys.argv[1]), Path(sys.argv[2])
found_before = importlib.util.find_spec("ctfm_engine")
sys.path.insert(0, str(tree))  # Slicer puts the scripted-module folder on sys.path
from CTFMLib import install, jobs, session  # noqa: E402

engine_folder = install.use_bundled_engine()
import ctfm_engine  # noqa: E402
from ctfm_engine.readers import read_volume  # noqa: E402

volume = read_volume(tree / "ctfm_engine" / "data" / "sample_ct.nii.gz")
job = jobs.start_segmentation(volume, None, "cpu", work_dir=out / "jobs")
deadline = time.monotonic() + 900
while not job.finished and time.monotonic() < deadline:
    job.poll()
    time.sleep(0.05)

import slicer  # noqa: E402
from CTFMLib import mrml_adapters  # noqa: E402

factory = slicer.vtkSegmentationConverterFactory.GetInstance()
if not factory.GetConverterRules():
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
scene = slicer.vtkMRMLScene()
segments = []
if job.state == "done":
    node = session.import_segmentation(job.result, mrml_adapters.ctvolume_to_volume_node(volume, scene, "CT"), scene)
    segmentation = node.GetSegmentation()
    segments = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
json.dump({"found_before": found_before is not None, "engine_file": ctfm_engine.__file__,
           "engine_folder": str(engine_folder), "state": job.state,
           "error": None if job.error is None else job.error.message,
           "weights": None if job.result is None else job.result["weights"],
           "labels": None if job.result is None else sorted(int(v) for v in set(job.result["labels"].ravel())),
           "segments": segments, "status": "" if job.result is None else session.describe_segmentation(job.result),
           "packages": sorted({m.split(".")[0] for m in sys.modules})}, open(out / "client.json", "w"))
"""


def test_the_engine_file_list_of_the_extension_cmake_is_the_whole_engine_package():
    """CMake installs exactly what it lists: every tracked engine file (code, data, demonstration checkpoints) must be
    in CTFMEngineFiles.cmake, and the module's CMake must install that list beside CTFM.py."""
    unlisted, absent = install_tree.differences()
    assert not unlisted, f"not listed, would not ship (SlicerCTFM/Testing/install_tree.py --write-cmake): {unlisted}"
    assert not absent, f"listed but missing: {absent}"
    files = install_tree.engine_files()
    assert {"ctfm_engine/__init__.py", "ctfm_engine/pipelines/segmentation.py",
            "ctfm_engine/weights/ctfm-mini-wholebody-seg/model.safetensors",
            "ctfm_engine/weights/ctfm-mini/model.safetensors", "ctfm_engine/data/sample_ct.nii.gz"} <= set(files)
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "include(${CMAKE_CURRENT_SOURCE_DIR}/CTFMEngineFiles.cmake)" in text
    macro = text[text.index("ctkMacroCompilePythonScript("):]
    macro = macro[:macro.index(")\n")]
    for argument in ('SCRIPTS "${CTFM_ENGINE_PYTHON_SCRIPTS}"', 'RESOURCES "${CTFM_ENGINE_PYTHON_RESOURCES}"',
                     "SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/..",
                     "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}", "NO_INSTALL_SUBDIR"):
        assert argument in macro, f"the engine's install step lacks {argument}"
    requirements = {install.requirement_name(line) for line in install.read_requirements()}
    assert "ctfm-engine" not in requirements  # first use installs third-party packages only


def test_the_module_finds_the_engine_it_carries_in_both_layouts(tmp_path):
    tree = install_tree.build(tmp_path / "qt-scripted-modules")
    assert install.bundled_engine_folder(tree) == tree  # installed extension: beside CTFM.py
    assert install.bundled_engine_folder(MODULE) == ROOT  # source checkout (Additional module paths): one level up
    assert install.bundled_engine_folder(tmp_path / "elsewhere") is None


def test_a_slicer_too_old_for_the_engine_is_refused_in_one_sentence():
    reason = install.unsupported_reason((5, 8), (3, 9))
    assert reason.count(". ") == 1 and "Slicer 5.10 or newer" in reason
    assert "this is Slicer 5.8 with Python 3.9" in reason
    assert install.unsupported_reason((5, 6), (3, 9)) and install.unsupported_reason(None, (3, 9))
    for supported in ((5, 10), (5, 12), (5, 13)):
        assert install.unsupported_reason(supported, (3, 12)) is None


def test_a_segmentation_job_runs_from_the_install_tree_without_an_installed_engine(tmp_path):
    if not SLICER_PYTHON.is_file():
        missing_real_part(f"{SLICER_PYTHON} is missing: `make .venv-slicer/.installed` makes the Slicer-like "
                          "environment (Slicer's own packages + the module's requirements, no ctfm_engine)")
    tree = install_tree.build(tmp_path / "lib" / "Slicer-5.12" / "qt-scripted-modules")
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run([str(SLICER_PYTHON), "-c", CLIENT, str(tree), str(out)], cwd=out, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "client.json").read_text())
    assert not report["found_before"], "the Slicer-like environment must not have ctfm_engine installed"
    assert Path(report["engine_file"]).is_relative_to(tree) and report["engine_folder"] == str(tree)
    assert report["state"] == "done", report["error"]
    # the bundled demonstration model, named as one, found through the engine's policy inside the tree
    assert report["weights"]["demonstration"] and report["weights"]["name"] == "ctfm-mini-wholebody-seg"
    assert "not CT-FM, not for clinical use" in report["status"]
    assert report["labels"][0] == 0 and len(report["labels"]) > 1
    assert "liver" in report["segments"] and len(report["segments"]) == len(report["labels"]) - 1
    # nothing the Slicer-like environment lacks was needed: the packages come from what it has
    shipped = {"numpy", "SimpleITK", "pydicom", "highdicom", "requests", "packaging", "slicer", "vtk", "vtkmodules",
               "torch"}
    assert not {"lightning", "ray", "faiss", "monai_deploy", "holoscan"} & set(report["packages"])
    assert shipped & set(report["packages"]) >= {"numpy", "slicer"}
