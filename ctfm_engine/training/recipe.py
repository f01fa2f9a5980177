"""Recipes: a YAML file configures a training run; this module turns it into data, a Lightning module and a Trainer.

Relative paths in a recipe (manifest) are resolved against the recipe's folder; ``output.dir`` and
``output.export`` against the working directory.  ``--set a.b=value`` overrides any key (value parsed as YAML).
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import yaml

from ctfm_engine.errors import CTFMError, UsageError
from ctfm_engine.preprocess import Preprocessing

TASKS = ("pretrain", "segmentation")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe in ``path`` with ``key.sub=value`` overrides applied; UsageError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: recipe file does not exist")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(recipe, dict) or recipe.get("task") not in TASKS:
        raise UsageError(f"--config {path}: a recipe is a mapping with 'task' one of {TASKS}")
    recipe = copy.deepcopy(recipe)
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key:
            raise UsageError(f"--set {override}: expected key.sub=value")
        target = recipe
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise UsageError(f"--set {override}: {parent} is not a section")
        target[leaf] = yaml.safe_load(value)
    recipe["_folder"] = str(path.resolve().parent)
    return recipe


def section(recipe: dict[str, Any], name: str) -> dict[str, Any]:
    value = recipe.get(name) or {}
    if not isinstance(value, dict):
        raise UsageError(f"recipe section {name!r} must be a mapping")
    return value


def recipe_path(recipe: dict[str, Any], value: str) -> Path:
    """A path from the recipe, relative to the recipe's folder."""
    return (Path(recipe["_folder"]) / value).resolve()


def trainer_for(recipe: dict[str, Any], accelerator: str | None, quiet: bool = False) -> Any:
    """A Lightning Trainer from the recipe's ``trainer`` section, with checkpoints and a CSV metrics log."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    output = Path(section(recipe, "output").get("dir", "runs/ctfm"))
    options = dict(section(recipe, "trainer"))
    if accelerator is not None:
        options["accelerator"] = accelerator
    if quiet:
        options.update(enable_progress_bar=False, enable_model_summary=False)
    every = int(options.pop("checkpoint_every_n_epochs", 10))
    loggers: list[Any] = [CSVLogger(output, name="logs", version="")]
    if options.pop("tensorboard", False):
        loggers.append(TensorBoardLogger(output, name="tensorboard", version=""))
    checkpoints = ModelCheckpoint(dirpath=output / "checkpoints", save_last=True, save_top_k=-1,
                                  every_n_epochs=every)
    try:
        # Our EpochSampler shards by rank itself, so Lightning must not swap in a DistributedSampler.
        return L.Trainer(default_root_dir=output, logger=loggers, callbacks=[checkpoints],
                         use_distributed_sampler=False, **options)
    except (TypeError, ValueError) as error:  # Lightning's answer to an unknown or invalid trainer option
        raise UsageError(f"recipe section 'trainer': {error}") from None


def start_run(recipe: dict[str, Any]) -> tuple[int, Path, Preprocessing]:
    """Seed every random generator; the recipe's seed, manifest path and preprocessing."""
    import lightning as L

    seed = int(recipe.get("seed", 0))
    L.seed_everything(seed, workers=True, verbose=False)
    data = section(recipe, "data")
    spacing = tuple(float(s) for s in data.get("spacing_zyx_mm", (3.0, 1.0, 1.0)))
    return seed, recipe_path(recipe, data["manifest"]), Preprocessing(spacing_zyx_mm=spacing)


def fit(trainer: Any, module: Any, loader: Any, resume: str | None) -> None:
    """``trainer.fit``; an interrupted run (Ctrl-C, SIGTERM) raises instead of exporting a half-trained model."""
    trainer.fit(module, loader, ckpt_path=resume)
    if trainer.interrupted:
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        raise CTFMError(f"training was interrupted in epoch {trainer.current_epoch}; nothing was exported; "
                        f"continue with --resume {last} (the last completed checkpoint)")


def read_metrics(trainer: Any) -> list[dict[str, str]]:
    metrics = Path(trainer.loggers[0].log_dir) / "metrics.csv"
    if not metrics.is_file():
        return []
    with open(metrics, newline="") as stream:
        return list(csv.DictReader(stream))


COMMAND_TASKS = {"pretrain": ("pretrain",), "finetune": ("segmentation",)}


def run_recipe(command: str, path: str | Path, overrides: list[str] | tuple[str, ...] = (), resume: str | None = None,
               accelerator: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the recipe in ``path`` for ``ctfm pretrain`` or ``ctfm finetune`` (the recipe's task must fit)."""
    recipe = load_recipe(path, overrides)
    if recipe["task"] not in COMMAND_TASKS[command]:
        raise UsageError(
            f"--config {path}: a {recipe['task']!r} recipe; `ctfm {command}` runs {COMMAND_TASKS[command]}"
        )
    if recipe["task"] == "pretrain":
        from ctfm_engine.training.run_pretraining import run_pretraining as run
    else:
        from ctfm_engine.training.run_finetuning import run_finetuning as run
    return run(recipe, resume=resume, accelerator=accelerator, quiet=quiet)
