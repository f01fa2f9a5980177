"""Every face -- the `ctfm` command, the Slicer module's library, the MONAI Deploy app, `ctfm demo` -- calls the task
layer (ctfm_engine.pipelines) and nothing below it that would let it assemble a task itself: no checkpoint readers,
no model modules, no preprocessing, no default model picked by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
FACES = {
    "ctfm command": sorted((REPOSITORY / "ctfm_engine" / "cli").glob("*.py")),
    "Slicer module": sorted((REPOSITORY / "SlicerCTFM" / "CTFMLib").glob("*.py")) + [REPOSITORY / "SlicerCTFM" /
                                                                                        "CTFM.py"],
    "deploy app": sorted((REPOSITORY / "deploy_app").glob("*.py")),
    "demo": [REPOSITORY / "ctfm_engine" / "demo.py"],
}
FORBIDDEN_MODULES = ("ctfm_engine.models", "ctfm_engine.preprocess")
FORBIDDEN_NAMES = {"read_checkpoint", "load_encoder", "open_segmentation_model", "load_triage_model",
                   "bundled_weights", "resolve_weights", "preprocess", "Embedder", "SemanticSearch", "segment",
                   "triage"}
# Where a forbidden name may come from: the task layer, and a face's own modules (e.g. `ctfm_engine.cli.segment`).
ALLOWED_SOURCES = ("ctfm_engine.pipelines", "ctfm_engine.cli", "CTFMLib", "deploy_app")


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every import in the file, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
    return found


def violations(path: Path) -> list[str]:
    problems = []
    for module, name, line in imports(path):
        if module.startswith(FORBIDDEN_MODULES) or (name and f"{module}.{name}".startswith(FORBIDDEN_MODULES)):
            problems.append(f"{path.relative_to(REPOSITORY)}:{line} imports {module}{'.' + name if name else ''}")
        elif name in FORBIDDEN_NAMES and module.startswith("ctfm_engine") and not module.startswith(
                ALLOWED_SOURCES):
            problems.append(f"{path.relative_to(REPOSITORY)}:{line} imports {name} from {module}")
    return problems


@pytest.mark.parametrize("face", sorted(FACES))
def test_each_face_calls_the_task_layer_and_nothing_that_assembles_a_task(face):
    files = FACES[face]
    assert files, f"{face}: no modules found"
    problems = [problem for path in files for problem in violations(path)]
    assert problems == [], "\n".join(problems)
    uses_pipelines = any(module.startswith("ctfm_engine.pipelines") for path in files for module, _, _ in
                         imports(path))
    assert uses_pipelines, f"{face} does not call ctfm_engine.pipelines"


def test_the_checker_catches_a_face_that_reads_a_checkpoint(tmp_path):
    bad = REPOSITORY / "tests" / "_face_that_assembles.py"  # inside the repository, as violations() reports
    bad.write_text("def run(folder):\n    from ctfm_engine.models.checkpoint import read_checkpoint\n"
                   "    from ctfm_engine.tasks.segment import open_segmentation_model\n"
                   "    return read_checkpoint(folder)\n")
    try:
        problems = violations(bad)
    finally:
        bad.unlink()
    assert len(problems) == 2 and "models.checkpoint" in problems[0] and "open_segmentation_model" in problems[1]


def test_no_face_names_a_bundled_model_itself():
    """The default model is the policy's: a face that spells the demonstration model's name picks it itself."""
    for face, files in FACES.items():
        for path in files:
            text = path.read_text()
            assert "ctfm-mini-wholebody-seg\"" not in text and "\"ctfm-mini\"" not in text, f"{face}: {path}"
