"""First-use setup of the CTFM module: the engine's Python packages inside Slicer, and which weights are active.

Packages.  ``Resources/requirements.txt`` lists what the module installs (ctfm-engine, MONAI, safetensors,
huggingface-hub, ...).  Slicer owns SimpleITK (its build carries Slicer's in-memory ITK IO), numpy, requests, and
the pydicom/highdicom its DICOM module uses; replacing them breaks Slicer (Slicer/Slicer#6711), so they are never
installed and are skipped when ctfm-engine's metadata asks for them.  PyTorch comes from the PyTorch extension's
``PyTorchUtils`` (it picks the CUDA build that matches the driver).  Slicer >= 5.12 installs the rest with
``slicer.packaging.pip_ensure(..., skip_packages=...)``; older releases with ``slicer.util.pip_install``:
ctfm-engine with ``--no-deps``, then the listed requirements, which already leave Slicer's packages out.

Weights.  A task's checkpoint comes from the engine's weights policy (``auto``: the published CT-FM checkpoint when
the cache holds it, else the bundled demonstration model, which then says so), a local folder (``config.json`` +
``model.safetensors``), or the Hugging Face hub (downloaded only when asked and online).  Each choice is identified
as the engine identifies results: checkpoint name, sha256 of ``model.safetensors`` and whether it is a
demonstration model.

Everything here runs without Slicer except :func:`ensure_dependencies`, whose Slicer calls are imported inside it.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
ENGINE_PACKAGE = "ctfm-engine"
# Packages Slicer ships and relies on: never installed or upgraded by this module.
SLICER_OWNED_PACKAGES = ("SimpleITK", "numpy", "requests", "pydicom", "highdicom", "torch", "torchvision",
                         "torchaudio")
MINIMUM_TORCH = ">=2.3"
PACKAGING_SLICER_VERSION = (5, 12)  # slicer.packaging (pip_ensure with skip_packages) first shipped here

# The module's tasks and the engine's model kind each one needs.
MODEL_KINDS = {"segmentation": "segmentation", "search": "encoder", "triage": "triage"}
TASKS = tuple(MODEL_KINDS)
SOURCES = ("auto", "folder", "hub")


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


def engine_requirement(source: str | Path | None = None) -> str:
    """How to install the engine, as one requirement: the ``ctfm-engine`` line of the requirements (from the
    package index), or for a wheel file or source folder (``pyproject.toml``) given as ``source`` the PEP 508 direct
    reference ``ctfm-engine @ file:///...`` (what ``slicer.packaging.load_requirements`` and pip both accept; a bare
    path is not a requirement)."""
    if source is None:
        return next(line for line in read_requirements() if requirement_name(line) == normalise(ENGINE_PACKAGE))
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

    ``confirm(message)`` is asked once before anything is installed (the widget shows a dialog; None installs
    without asking, for tests and scripts); it returning False raises RuntimeError.  Torch comes from PyTorchUtils
    (PyTorch extension); Slicer's own packages are never touched.
    """
    import slicer

    requirements = [line for line in read_requirements() if requirement_name(line) != normalise(ENGINE_PACKAGE)]
    engine = engine_requirement(engine_source)
    missing = missing_requirements([engine] if engine_source is None else [ENGINE_PACKAGE]) + missing_requirements(
        requirements)
    torch_missing = not _torch_installed()
    if not missing and not torch_missing:
        return []
    wanted = (["torch (through the PyTorch extension)"] if torch_missing else []) + missing
    if confirm is not None and not confirm("CT-FM needs these Python packages in Slicer: " + ", ".join(wanted)
                                           + ". Installing them may take several minutes. Install now?"):
        raise RuntimeError("the CT-FM dependencies were not installed; the module cannot run without them")
    if torch_missing:
        _install_torch(log)
    if (slicer_version() or (0, 0)) >= PACKAGING_SLICER_VERSION:
        _pip_ensure([engine, *requirements], log)
    else:
        log(f"installing {engine} (without its dependencies: Slicer owns SimpleITK, numpy and requests)")
        slicer.util.pip_install(["--no-deps", engine])  # a list: each item is one argument (the reference has spaces)
        log("installing " + ", ".join(requirements))
        slicer.util.pip_install(list(requirements))
    return wanted


def _torch_installed() -> bool:
    try:
        metadata.version("torch")
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
    if not _torch_installed():
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
