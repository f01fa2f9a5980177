"""The ``ctfm`` command as a face: one module per subcommand, each calling the task layer only, a light start, and
the weights line of the human output."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ctfm_engine.cli import SUBCOMMANDS, build_parser
from ctfm_engine.cli.common import weights_line

CLI = Path(__file__).resolve().parents[1] / "ctfm_engine" / "cli"
# What only the task layer (ctfm_engine.pipelines) may touch: models, checkpoints, preprocessing.
FORBIDDEN_MODULES = ("ctfm_engine.models", "ctfm_engine.preprocess")
FORBIDDEN_NAMES = {"read_checkpoint", "load_encoder", "open_segmentation_model", "load_triage_model"}


def imports_of(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every import in ``path``, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            found += [(node.lineno, module, alias.name) for alias in node.names]
    return found


def forbidden(module: str, name: str | None) -> bool:
    full = f"{module}.{name}" if name else module
    return (any(full == root or full.startswith(f"{root}.") for root in FORBIDDEN_MODULES)
            or name in FORBIDDEN_NAMES or module.rsplit(".", 1)[-1] in FORBIDDEN_NAMES)


def test_cli_modules_call_only_the_task_layer():
    modules = sorted(CLI.glob("*.py"))
    assert {path.stem for path in modules} >= {"common", "embed", "search", "segment", "triage", "pacs"}
    offences = [f"{path.name}:{line}: {module}{'' if name is None else ' -> ' + name}"
                for path in modules for line, module, name in imports_of(path) if forbidden(module, name)]
    assert offences == [], "a face reads checkpoints or preprocesses by itself:\n" + "\n".join(offences)


@pytest.mark.parametrize(("module", "name"), [
    ("ctfm_engine.models.registry", "resolve_weights"),
    ("ctfm_engine", "models"),
    ("ctfm_engine.preprocess", "preprocess"),
    ("ctfm_engine.tasks.segment", "open_segmentation_model"),
    ("ctfm_engine.tasks.embed", "load_encoder"),
])
def test_the_layer_check_recognises_what_it_forbids(module, name):
    assert forbidden(module, name)
    assert not forbidden("ctfm_engine.pipelines.segmentation", "run_segmentation")


def test_every_subcommand_is_a_module_with_parser_run_and_human_lines():
    parser_commands = next(action for action in build_parser()._actions if action.dest == "command").choices
    assert set(parser_commands) == set(SUBCOMMANDS)
    for name, module in SUBCOMMANDS.items():
        assert module.__name__.startswith("ctfm_engine.cli."), name
        assert all(callable(getattr(module, part, None)) for part in ("add_parser", "run", "human_lines")), name


def test_the_command_starts_without_loading_torch():
    """``ctfm --help``, ``ctfm dicom`` and ``ctfm pacs`` need no model: subcommands import the task layer when
    they run."""
    script = "import sys, ctfm_engine.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 0


def test_the_weights_line_tags_a_demonstration_model():
    record = {"name": "ctfm-mini", "sha256": "ab" * 32}
    assert weights_line({**record, "demonstration": False}) == f"weights: ctfm-mini (sha256 {'ab' * 32})"
    assert weights_line({**record, "demonstration": True}) == (
        f"weights: ctfm-mini (sha256 {'ab' * 32}) [demonstration model: not CT-FM, not for clinical use]")
