"""The recipe runner behind ``ctfm pretrain`` and ``ctfm finetune``: reads a recipe and hands it to the run for its
task (the run modules import the recipe reader; this module sits above both, so neither imports the other)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctfm_engine.errors import UsageError
from ctfm_engine.training.recipe import load_recipe

COMMAND_TASKS = {"pretrain": ("pretrain",), "finetune": ("segmentation", "triage")}


def run_recipe(command: str, path: str | Path, overrides: list[str] | tuple[str, ...] = (), resume: str | None = None,
               accelerator: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the recipe in ``path`` for ``ctfm pretrain`` or ``ctfm finetune`` (the recipe's task must fit)."""
    recipe = load_recipe(path, overrides)
    if recipe.task not in COMMAND_TASKS[command]:
        raise UsageError(f"--config {path}: a {recipe.task!r} recipe; `ctfm {command}` runs {COMMAND_TASKS[command]}")
    if recipe.task == "pretrain":
        from ctfm_engine.training.run_pretraining import run_pretraining as run
    elif recipe.task == "triage":
        from ctfm_engine.training.run_triage import run_triage as run
    else:
        from ctfm_engine.training.run_finetuning import run_finetuning as run
    return run(recipe, resume=resume, accelerator=accelerator, quiet=quiet)
