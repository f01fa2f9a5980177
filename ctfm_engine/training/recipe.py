"""Recipes: a YAML file configures a training run; this module turns it into data, a Lightning module and a Trainer.

Relative paths in a recipe (manifest) are resolved against the recipe's folder; ``output.dir`` and
``output.export`` against the working directory.  ``--set a.b=value`` overrides any key (value parsed as YAML).
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from ctfm_engine.errors import CTFMError, UsageError
from ctfm_engine.io import atomic_output
from ctfm_engine.preprocess import Preprocessing

TASKS = ("pretrain", "segmentation", "triage")
T = TypeVar("T")


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


def trainer_for(recipe: dict[str, Any], accelerator: str | None, quiet: bool = False,
                callbacks: Sequence[Any] = ()) -> Any:
    """A Lightning Trainer from the recipe's ``trainer`` section, with checkpoints and a CSV metrics log.

    ``callbacks`` come after the periodic checkpoint (e.g. a best-metric ModelCheckpoint).
    """
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
    loggers: list[Any] = [metrics_log(CSVLogger)(output, name="logs", version="")]
    if options.pop("tensorboard", False):
        loggers.append(TensorBoardLogger(output, name="tensorboard", version=""))
    checkpoints = ModelCheckpoint(dirpath=output / "checkpoints", save_last=True, save_top_k=-1,
                                  every_n_epochs=every)
    try:
        # Our EpochSampler shards by rank itself, so Lightning must not swap in a DistributedSampler.
        return L.Trainer(default_root_dir=output, logger=loggers, callbacks=[checkpoints, *callbacks],
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


def metrics_log(csv_logger: type) -> type:
    """Lightning's CSVLogger, except that it never deletes an existing ``metrics.csv``: :func:`fit` decides what
    to keep (Lightning deletes it whenever the folder exists, so a resumed run would lose its own history)."""
    from lightning.fabric.loggers.csv_logs import _ExperimentWriter
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class KeepingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            path = Path(self.metrics_file_path)
            if path.is_file():  # append under the same columns
                with open(path, newline="") as stream:
                    self.metrics_keys = sorted(next(csv.reader(stream), []))

    class MetricsLog(csv_logger):
        @property
        @rank_zero_experiment
        def experiment(self) -> _ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = KeepingWriter(log_dir=self.log_dir)
            return self._experiment

    return MetricsLog


def prepare_metrics_log(trainer: Any, resume: str | None) -> None:
    """A fresh run starts an empty ``metrics.csv``; a resumed one keeps the rows logged before its checkpoint."""
    import torch

    path = Path(trainer.loggers[0].log_dir) / "metrics.csv"
    if not trainer.is_global_zero or not path.is_file():
        return
    if resume is None:
        path.unlink()
        return
    step = int(torch.load(resume, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        fields, rows = reader.fieldnames or [], [row for row in reader if int(row["step"]) < step]
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def fit(trainer: Any, module: Any, loader: Any, resume: str | None, validation: Any = None) -> None:
    """``trainer.fit``; an interrupted run (Ctrl-C, SIGTERM) raises instead of exporting a half-trained model."""
    prepare_metrics_log(trainer, resume)
    trainer.fit(module, loader, validation, ckpt_path=resume)
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


def select_training_volumes(entries: Sequence[T], recipe: dict[str, Any]) -> list[T]:
    """The few-shot subset of the training scans: ``data.train_volumes`` (k) of them, chosen by ``data.subset_seed``.

    ``subset_seed: null`` keeps the first k rows in manifest order, as CT-FM's few-shot runs did (the first rows
    of TotalSegmentator's ``meta.csv``, unshuffled; facts §4.2).  A whole-number seed takes the first k of a
    seeded permutation (kept in manifest order), so for one seed the 5 scans are among the 10 and those among the
    20.  Without ``train_volumes`` every scan is kept.  UsageError when k is not a whole number in 1..len(entries).
    """
    data = section(recipe, "data")
    count, seed = data.get("train_volumes"), data.get("subset_seed")
    if count is None:
        return list(entries)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UsageError(f"data.train_volumes must be a whole number of scans (1 or more), got {count!r}")
    if count > len(entries):
        raise UsageError(f"data.train_volumes {count}: the manifest has only {len(entries)} training scan(s)")
    if seed is None:
        return list(entries[:count])
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"data.subset_seed must be a whole number or null, got {seed!r}")
    chosen = np.random.default_rng(seed).permutation(len(entries))[:count]
    return [entries[index] for index in sorted(chosen)]


def training_subset(recipe: dict[str, Any], entries: Sequence[Any]) -> dict[str, Any]:
    """What a result (and so the model card) records about the training subset."""
    data = section(recipe, "data")
    if data.get("train_volumes") is None:
        return {"train_volumes": len(entries), "train_subset": "all"}
    seed = data.get("subset_seed")
    return {"train_volumes": len(entries), "subset_seed": seed,
            "train_subset": "first rows of the manifest" if seed is None else f"seeded sample (seed {seed})"}
