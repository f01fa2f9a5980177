"""First use of the CTFM module: where the engine comes from, the Python packages it needs, which weights are active.

The engine ships with the module.  The extension's CMake installs ``ctfm_engine`` (its code, data and the
demonstration checkpoints) beside ``CTFM.py``; in a source checkout loaded through *Additional module paths* it is
the repository's own ``ctfm_engine`` one folder up.  :func:`use_bundled_engine` puts that folder first on
``sys.path`` (the module and its worker processes both call it), so nothing is built by hand and no wheel is needed.
Developers may still install a wheel or source folder of the engine instead (*Advanced -> Engine wheel/folder*).

Slicer versions.  The engine needs Python >= 3.10: Slicer 5.10 and 5.12 (Python 3.12) are supported; Slicer 5.8 and
older (Python 3.9) are refused with one sentence saying so (:func:`unsupported_reason`) instead of a pip failure.

Packages.  ``Resources/requirements.txt`` lists the third-party packages first use installs (MONAI, safetensors,
huggingface-hub, onnxruntime, OpenVINO, ...), never ``ctfm-engine`` itself.  Slicer owns SimpleITK (its build
carries Slicer's in-memory ITK IO), numpy, requests, and the pydicom/highdicom its DICOM module uses; replacing them
breaks Slicer (Slicer/Slicer#6711), so they are never installed.  PyTorch comes from the PyTorch extension's
``PyTorchUtils`` (it picks the CUDA build that matches the driver).  Slicer >= 5.12 installs the rest with
``slicer.packaging.pip_ensure(..., skip_packages=...)``; 5.10 with ``slicer.util.pip_install``.

Weights.  A task's checkpoint comes from the engine's weights policy (``auto``: the published CT-FM checkpoint when
the cache holds it, else the bundled demonstration model, which then says so), a local folder (``config.json`` +
``model.safetensors``), or the Hugging Face hub (downloaded only when asked and online).  Each choice is identified
as the engine identifies results: checkpoint name, sha256 of ``model.safetensors`` and whether it is a
demonstration model.

Everything here runs without Slicer except :func:`ensure_dependencies`, whose Slicer calls are imported inside it.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
ENGINE_PACKAGE = "ctfm-engine"
ENGINE_MODULE = "ctfm_engine"
# Oldest Slicer the module runs in, and why: the engine needs Python >= 3.10; Slicer 5.10 moved from Python 3.9 to
# 3.12 (5.8 and older ship 3.9).
MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 10)
# Packages Slicer ships and relies on: never installed or upgraded by this module.
SLICER_OWNED_PACKAGES = ("SimpleITK", "numpy", "requests", "pydicom", "highdicom", "torch", "torchvision",
                         "torchaudio")
MINIMUM_TORCH = ">=2.3"
PACKAGING_SLICER_VERSION = (5, 12)  # slicer.packaging (pip_ensure with skip_packages) first shipped here

# The module's tasks and the engine's model kind each one needs.
MODEL_KINDS = {"segmentation": "segmentation", "search": "encoder", "triage": "triage"}
TASKS = tuple(MODEL_KINDS)
SOURCES = ("auto", "folder", "hub")


def bundled_engine_folder(module_dir: Path = MODULE_DIR) -> Path | None:
    """The folder that holds the engine shipped with the module: the module's own folder (the extension's install
    tree) or, in a source checkout, the repository root one level up; None when neither has ``ctfm_engine``."""
    for folder in (module_dir, module_dir.parent):
        if (folder / ENGINE_MODULE / "__init__.py").is_file():
            return folder
    return None


def use_bundled_engine(module_dir: Path = MODULE_DIR) -> Path | None:
    """Make ``import ctfm_engine`` find the engine shipped with the module (first on ``sys.path``); the folder, or
    None when the module carries none (then an engine installed into Slicer's Python is used, if any)."""
    folder = bundled_engine_folder(module_dir)
    if folder is not None and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder


def unsupported_reason(slicer: tuple[int, int] | None, python: tuple[int, int] = sys.version_info[:2]) -> str | None:
    """One sentence saying why this Slicer cannot run the module, or None when it can (``slicer`` None: not in
    Slicer, only the Python version counts)."""
    need = f"Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or newer (Python {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]}+)"
    if slicer is not None and tuple(slicer) < MINIMUM_SLICER:
        return (f"CT-FM needs {need}; this is Slicer {slicer[0]}.{slicer[1]} with Python {python[0]}.{python[1]}. "
                "Install a current Slicer from download.slicer.org.")
    if tuple(python) < MINIMUM_PYTHON:
        return f"CT-FM needs {need}; this Python is {python[0]}.{python[1]}."
    return None


def normalise(name: str) -> str:
    """A distribution name in PEP 503 form (``Huggingface_Hub`` -> ``huggingface-hub``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement line (``monai[itk]>=1.4`` -> ``monai``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return normalise(match.group(1))


def read_requirements(path: str | Path = REQUIREMENTS_FILE) -> list[str]:
    """The requirement lines of ``path`` (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line]


def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements this Python does not satisfy (absent, or a version outside the specifier); no pip run."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # without packaging, presence is all that can be judged
        Requirement = None  # noqa: N806
    missing = []
    for line in requirements:
        try:
            installed = metadata.version(requirement_name(line))
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if Requirement is not None and not Requirement(line).specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def engine_requirement(source: str | Path) -> str:
    """How to install a developer's engine wheel file or source folder (``pyproject.toml``): the PEP 508 direct
    reference ``ctfm-engine @ file:///...`` (what ``slicer.packaging.load_requirements`` and pip both accept; a bare
    path is not a requirement)."""
    path = Path(source).expanduser().resolve()
    if path.is_file() and path.suffix == ".whl" and normalise(path.name.split("-")[0]) == ENGINE_PACKAGE:
        return f"{ENGINE_PACKAGE} @ {path.as_uri()}"
    if path.is_dir() and (path / "pyproject.toml").is_file():
        return f"{ENGINE_PACKAGE} @ {path.as_uri()}"
    raise ValueError(f"{source}: not a ctfm_engine wheel (ctfm_engine-*.whl) or source folder (with pyproject.toml)")


def slicer_version() -> tuple[int, int] | None:
    """(major, minor) of the running Slicer, or None outside Slicer."""
    try:
        import slicer
    except ImportError:
        return None
    app = getattr(slicer, "app", None)
    return None if app is None else (int(app.majorVersion), int(app.minorVersion))


def ensure_dependencies(
    engine_source: str | Path | None = None,
    confirm: Callable[[str], bool] | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Install what is missing into Slicer's Python; the requirements that were missing (empty: nothing to do).

    The engine itself ships with the module and is never installed, unless a developer gives ``engine_source`` (a
    wheel or source folder), installed without its dependencies.  ``confirm(message)`` is asked once before anything
    is installed (the widget shows a dialog; None installs without asking, for tests and scripts); it returning
    False raises RuntimeError.  A Slicer too old for the engine raises RuntimeError before pip runs.  Torch comes
    from PyTorchUtils (PyTorch extension); Slicer's own packages are never touched.
    """
    import slicer

    reason = unsupported_reason(slicer_version())
    if reason:
        raise RuntimeError(reason)
    requirements = read_requirements()
    engine = None if engine_source is None else engine_requirement(engine_source)
    if engine is None and use_bundled_engine() is None and not _installed(ENGINE_PACKAGE):
        raise RuntimeError(f"the module folder {MODULE_DIR} has no ctfm_engine: reinstall the CT-FM extension, or "
                           "choose an engine wheel/folder under Advanced")
    missing = ([engine] if engine else []) + missing_requirements(requirements)
    torch_missing = not _installed("torch")
    if not missing and not torch_missing:
        return []
    wanted = (["torch (through the PyTorch extension)"] if torch_missing else []) + missing
    if confirm is not None and not confirm("CT-FM needs these Python packages in Slicer: " + ", ".join(wanted)
                                           + ". Installing them may take several minutes. Install now?"):
        raise RuntimeError("the CT-FM dependencies were not installed; the module cannot run without them")
    if torch_missing:
        _install_torch(log)
    if engine is not None:
        log(f"installing {engine} (without its dependencies: Slicer owns SimpleITK, numpy and requests)")
        slicer.util.pip_install(["--no-deps", engine])  # a list: each item is one argument (the reference has spaces)
    if (slicer_version() or (0, 0)) >= PACKAGING_SLICER_VERSION:
        _pip_ensure(requirements, log)
    else:
        log("installing " + ", ".join(requirements))
        slicer.util.pip_install(list(requirements))
    return wanted


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


def _install_torch(log: Callable[[str], None]) -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError("CT-FM needs PyTorch from the PyTorch extension: install the PyTorch extension from the "
                           "Extensions Manager, restart Slicer and try again") from None
    log("installing PyTorch through the PyTorch extension")
    PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=MINIMUM_TORCH)
    if not _installed("torch"):
        raise RuntimeError("PyTorch could not be installed; see the Python console for the reason")


def _pip_ensure(requirements: Sequence[str], log: Callable[[str], None]) -> None:
    import slicer.packaging

    with tempfile.TemporaryDirectory(prefix="ctfm-requirements-") as folder:
        path = Path(folder) / "requirements.txt"
        path.write_text("\n".join(requirements) + "\n")
        log("installing " + ", ".join(requirements) + " (skipping " + ", ".join(SLICER_OWNED_PACKAGES) + ")")
        slicer.packaging.pip_ensure(slicer.packaging.load_requirements(str(path)),
                                    skip_packages=list(SLICER_OWNED_PACKAGES), prompt_install=False,
                                    requester="CTFM")


# --- weights ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsChoice:
    """The checkpoint a task uses: its folder, readable name, sha256 of ``model.safetensors``, whether it is a
    demonstration model, and its origin."""

    task: str
    source: str
    folder: Path
    name: str
    sha256: str
    demonstration: bool = False

    def short(self) -> str:
        """``name (sha256 0123456789ab)`` for the module panel, marked when it is a demonstration model."""
        return f"{self.name} (sha256 {self.sha256[:12]})" + (", a demonstration model" if self.demonstration else "")


def choose_weights(
    task: str,
    source: str = "auto",
    *,
    folder: str | Path | None = None,
    repo_id: str | None = None,
    allow_download: bool = False,
) -> WeightsChoice:
    """The checkpoint ``task`` (segmentation, search, triage) uses from ``source``: ``auto`` (the engine's weights
    policy), ``folder`` (``folder``), or ``hub`` (``repo_id``, default the published CT-FM repo; taken from the
    local caches, downloaded only with ``allow_download``).  ModelError saying what to do otherwise.
    """
    from ctfm_engine.errors import ModelError
    from ctfm_engine.pipelines.weights import locate_weights, published_repo, pull_checkpoint

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    kind = MODEL_KINDS[task]
    spec: str | Path | None = None
    if source == "folder":
        if folder is None:
            raise ModelError("choose the checkpoint folder (config.json + model.safetensors)")
        spec = Path(folder).expanduser().resolve()
        if not spec.is_dir():
            raise ModelError(f"{spec}: no such folder; choose a folder holding config.json and model.safetensors")
    elif source == "hub":
        spec = repo_id or published_repo(kind)
        if spec is None:
            raise ModelError(f"no published CT-FM {task} model: give the hub repo id of one")
        if allow_download:
            spec = pull_checkpoint(spec).folder
    location = locate_weights(spec, kind)
    return WeightsChoice(task, source, location.folder, location.name, location.sha256, location.demonstration)
