"""Lay out the build context of the CT-FM MAP: the application, the engine's source, the models, the manifests.

``python deploy_app/map/stage.py --out build/map/stage [--models DIR] [--constraints FILE] [--torch SPEC]
[--swap OLD=NEW ...]`` writes, under ``--out``:

    app/                  -> /opt/holoscan/app: ``__main__.py`` (runs deploy_app) and the deploy_app package
    engine-src/           the engine's source, made into a wheel by build_map.sh
    models/<name>/        -> /opt/holoscan/models/<name>; default: the bundled demonstration segmentation model
    etc/app.json, pkg.json  -> /etc/holoscan/ (deploy_app/map/manifests.py)
    app.yaml              -> /var/holoscan/app.yaml (HOLOSCAN_CONFIG_PATH)
    docs/                 -> /opt/holoscan/docs: the app's README and the licence
    deps/                 -> /opt/holoscan/docs/python-packages: requirements.txt (the app's, the engine's, torch) and
                          constraints.txt, what the wheelhouse is made from
    tools                 -> /var/holoscan/tools, the entrypoint
    build-args.txt        NAME=VALUE per line for the Containerfile's labels; version: the application version

The image's source digest (:func:`source_digest`) is recorded as a label so that a test can tell a stale image.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from manifests import (  # noqa: E402  (a build tool run as a script, beside its sibling module)
    AppConfig,
    application_manifest,
    package_manifest,
    write_json,
)

REPOSITORY = Path(__file__).resolve().parents[2]
MAP_DIR = Path(__file__).resolve().parent
DEMONSTRATION_SEGMENTATION = REPOSITORY / "ctfm_engine" / "weights" / "ctfm-mini-wholebody-seg"
COMMAND = ["python3", "/opt/holoscan/app"]  # the venv's python3 comes first on the image's PATH
# deploy_app's own files that are not the application: the scripts and this folder build it, the README is in docs/.
NOT_THE_APP = ("scripts", "map", "README.md")
ENTRY = '''"""The MAP's entry point: ``python3 /opt/holoscan/app`` runs the CT-FM MONAI Deploy application."""

import sys

from deploy_app.__main__ import main

sys.exit(main())
'''


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            yield path


def app_files(repo: Path = REPOSITORY) -> list[Path]:
    """The deploy_app package as it goes into /opt/holoscan/app (sub-packages included)."""
    package = repo / "deploy_app"
    return [path for path in _files(package) if path.relative_to(package).parts[0] not in NOT_THE_APP]


def engine_files(repo: Path = REPOSITORY) -> list[Path]:
    """What the engine's wheel is built from: the package (with its bundled weights) and the project metadata."""
    return [*_files(repo / "ctfm_engine"), repo / "pyproject.toml", repo / "README.md"]


def image_inputs(repo: Path = REPOSITORY) -> list[Path]:
    """Every file of the repository that shapes the image (the app, the engine, requirements, manifests, recipe)."""
    recipe = [*_files(repo / "deploy_app" / "map"), repo / "deploy_app" / "README.md"]
    return sorted({*app_files(repo), *engine_files(repo), *recipe})


def source_digest(repo: Path = REPOSITORY) -> str:
    """sha256 over the paths and contents of :func:`image_inputs`: equal digests, equal sources."""
    digest = hashlib.sha256()
    for path in image_inputs(repo):
        digest.update(str(path.relative_to(repo)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _pins(requirements: str) -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in requirements.splitlines())
    return dict(line.split("==", 1) for line in lines if "==" in line)


def requirements(repo: Path, torch: str | None, swaps: dict[str, str]) -> str:
    """The app's requirements.txt, the image's own (map/requirements.txt), the engine's dependencies and torch, with
    packages swapped by name (the GPU build: onnxruntime -> onnxruntime-gpu)."""
    files = (repo / "deploy_app" / "requirements.txt", MAP_DIR / "requirements.txt")
    lines = [line.strip() for path in files for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    engine = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    named = [*lines, *engine]
    if torch:
        named = [line for line in named if not line.startswith("torch")] + [torch]
    swapped = []
    for line in named:
        name = re.split(r"[\s<>=!~\[;]", line, maxsplit=1)[0]
        if name in swaps:  # a name keeps the requirement's version; a full requirement replaces it
            swapped.append(swaps[name] if re.search(r"[<>=!~]", swaps[name]) else swaps[name] + line[len(name):])
        else:
            swapped.append(line)
    return "\n".join(swapped) + "\n"


def stage(out: Path, models: Path | None, constraints: Path | None, torch: str | None,
          swaps: dict[str, str], gpus: int | None = None, repo: Path = REPOSITORY) -> None:
    if out.exists():
        shutil.rmtree(out)
    app = out / "app"
    for path in app_files(repo):
        target = app / "deploy_app" / path.relative_to(repo / "deploy_app")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (app / "__main__.py").write_text(ENTRY)
    for path in engine_files(repo):
        target = out / "engine-src" / path.relative_to(repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)

    model_names = []
    if models is None:
        shutil.copytree(DEMONSTRATION_SEGMENTATION, out / "models" / DEMONSTRATION_SEGMENTATION.name)
        model_names.append(DEMONSTRATION_SEGMENTATION.name)
    else:
        for folder in sorted(path for path in models.iterdir() if path.is_dir()):
            shutil.copytree(folder, out / "models" / folder.name)
            model_names.append(folder.name)
        if not model_names:
            raise SystemExit(f"stage: {models} holds no model folder (models/<name>/config.json ...)")

    app_yaml = (repo / "deploy_app" / "app.yaml").read_text()
    config = AppConfig.from_yaml_text(app_yaml)
    if gpus is not None:
        config = replace(config, resources={**config.resources, "gpu": gpus})
    pins = _pins((repo / "deploy_app" / "requirements.txt").read_text())
    (out / "etc").mkdir(parents=True)
    (out / "etc" / "app.json").write_text(write_json(application_manifest(config, pins["monai-deploy-app-sdk"],
                                                                          COMMAND)))
    (out / "etc" / "pkg.json").write_text(write_json(package_manifest(config, model_names)))
    (out / "app.yaml").write_text(app_yaml)

    deps = out / "deps"
    deps.mkdir()
    (deps / "requirements.txt").write_text(requirements(repo, torch, swaps))
    (deps / "constraints.txt").write_text(constraints.read_text() if constraints else "")
    docs = out / "docs"
    docs.mkdir()
    shutil.copy2(repo / "deploy_app" / "README.md", docs / "README.md")
    shutil.copy2(repo / "LICENSE", docs / "LICENSE")
    shutil.copy2(MAP_DIR / "tools", out / "tools")
    (out / "tools").chmod(0o755)

    build_args = {"MAP_TITLE": config.title, "MAP_VERSION": config.version,
                  "MAP_SDK_VERSION": pins["monai-deploy-app-sdk"], "MAP_HOLOSCAN_VERSION": pins["holoscan-cu13"],
                  "MAP_SOURCE_DIGEST": source_digest(repo)}
    (out / "build-args.txt").write_text("".join(f"{name}={value}\n" for name, value in build_args.items()))
    (out / "version").write_text(config.version + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stage.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--models", type=Path, help="a folder of named model folders (default: the demonstration "
                        "segmentation model)")
    parser.add_argument("--constraints", type=Path, help="pins for every package (pip freeze of the tested "
                        "environment)")
    parser.add_argument("--torch", help="the torch requirement (default: requirements.txt's)")
    parser.add_argument("--swap", action="append", default=[], metavar="OLD=NEW",
                        help="install NEW in place of the requirement OLD: a name (same version) or a requirement "
                        "(e.g. onnxruntime=onnxruntime-gpu==1.31.1)")
    parser.add_argument("--gpus", type=int, help="GPUs the package asks for (pkg.json resources.gpu; default: "
                        "app.yaml's)")
    parser.add_argument("--digest", action="store_true", help="print the source digest and stop")
    options = parser.parse_args(argv)
    if options.digest:
        print(source_digest())
        return 0
    if options.out is None:
        parser.error("--out is required")
    swaps = dict(swap.split("=", 1) for swap in options.swap)
    stage(options.out, options.models, options.constraints, options.torch, swaps, options.gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
