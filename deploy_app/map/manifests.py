"""The two manifests of a MONAI Application Package (MAP): ``/etc/holoscan/app.json`` and ``/etc/holoscan/pkg.json``.

Fields, paths and defaults follow the MAP specification (Project-MONAI/monai-deploy, guidelines/
monai-application-package.md: the tables of application and package manifest fields, the table of environment
variables) in the shape holoscan-cli 4.2 -- the last packager with MAP support -- writes them, so that its runner
(``monai-deploy run``) and other MAP hosts read ours as theirs: ``command`` is a JSON array encoded as a string,
``input``/``output`` carry ``path`` (relative to ``workingDirectory``) and ``formats`` (from app.yaml's kebab-case
``input-formats``/``output-formats``), ``models`` maps each model's name to its folder under ``modelRoot``, and
``resources`` is app.yaml's ``resources`` unchanged.  Added beyond what holoscan-cli writes: ``type`` (the
specification asks for it: ``application``, a one-shot run, not a ``service``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

API_VERSION = "1.0.0"  # the MAP specification version whose camelCase keys these manifests use
SDK = "monai-deploy"

APP_ROOT = PurePosixPath("/opt/holoscan/app")
MODEL_ROOT = PurePosixPath("/opt/holoscan/models")
DOCS_ROOT = PurePosixPath("/opt/holoscan/docs")
WORKING_DIRECTORY = PurePosixPath("/var/holoscan")
INPUT_PATH = "input/"  # relative to WORKING_DIRECTORY, as the specification's default
OUTPUT_PATH = "output/"
APP_MANIFEST = PurePosixPath("/etc/holoscan/app.json")
PKG_MANIFEST = PurePosixPath("/etc/holoscan/pkg.json")
CONFIG_PATH = WORKING_DIRECTORY / "app.yaml"
LOGS_PATH = WORKING_DIRECTORY / "logs"

# The environment every MAP provides (the specification's table of environment variables), at its default paths.
ENVIRONMENT: dict[str, str] = {
    "HOLOSCAN_APPLICATION": str(APP_ROOT),
    "HOLOSCAN_INPUT_PATH": str(WORKING_DIRECTORY / INPUT_PATH),
    "HOLOSCAN_OUTPUT_PATH": str(WORKING_DIRECTORY / OUTPUT_PATH),
    "HOLOSCAN_WORKDIR": str(WORKING_DIRECTORY),
    "HOLOSCAN_MODEL_PATH": str(MODEL_ROOT),
    "HOLOSCAN_CONFIG_PATH": str(CONFIG_PATH),
    "HOLOSCAN_APP_MANIFEST_PATH": str(APP_MANIFEST),
    "HOLOSCAN_PKG_MANIFEST_PATH": str(PKG_MANIFEST),
    "HOLOSCAN_DOCS_PATH": str(DOCS_ROOT),
    "HOLOSCAN_LOGS_PATH": str(LOGS_PATH),
}


@dataclass(frozen=True)
class AppConfig:
    """What the manifests take from ``deploy_app/app.yaml`` (the file holoscan-cli's ``--config`` reads)."""

    title: str
    version: str
    input_formats: list[str]
    output_formats: list[str]
    resources: dict[str, Any]

    @classmethod
    def from_yaml_text(cls, text: str) -> AppConfig:
        import yaml

        config = yaml.safe_load(text)
        application, resources = config.get("application"), config.get("resources")
        if not isinstance(application, dict) or not application.get("title") or not application.get("version"):
            raise ValueError("app.yaml: application.title and application.version are required")
        if not isinstance(resources, dict):
            raise ValueError("app.yaml: a resources section is required (cpu, gpu, memory)")
        return cls(title=str(application["title"]), version=str(application["version"]),
                   input_formats=list(application.get("input-formats") or []),
                   output_formats=list(application.get("output-formats") or []), resources=dict(resources))


def application_manifest(config: AppConfig, sdk_version: str, command: list[str]) -> dict[str, Any]:
    """``app.json``: how a MAP host runs the application (``command``, ``environment``, input and output)."""
    return {
        "apiVersion": API_VERSION,
        "type": "application",
        "command": json.dumps(command),
        "environment": dict(ENVIRONMENT),
        "input": {"path": INPUT_PATH, "formats": config.input_formats},
        "output": {"path": OUTPUT_PATH, "formats": config.output_formats},
        "readiness": None,
        "liveness": None,
        "sdk": SDK,
        "sdkVersion": sdk_version,
        "timeout": 0,
        "version": config.version,
        "workingDirectory": str(WORKING_DIRECTORY),
    }


def package_manifest(config: AppConfig, model_names: list[str]) -> dict[str, Any]:
    """``pkg.json``: where the application and its models are, and the resources it needs."""
    for name in model_names:
        if not name or len(name.encode()) > 128 or any(char.isspace() or not char.isprintable() for char in name):
            raise ValueError(f"model name {name!r}: at most 128 bytes, no whitespace or control characters")
    return {
        "apiVersion": API_VERSION,
        "applicationRoot": str(APP_ROOT),
        "modelRoot": str(MODEL_ROOT),
        "models": {name: str(MODEL_ROOT / name) for name in sorted(model_names)},
        "resources": config.resources,
        "version": config.version,
    }


def write_json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"
