"""Recipes: a YAML file configures a training run; this module reads it into typed sections and a Lightning Trainer.

Each section of a recipe (``data``, ``model``, ``method``, ``augmentation``, ``optim``, ``trainer``, ``predict``,
``output``; which ones depends on the ``task``) is a frozen dataclass.  Reading one refuses a key it does not have
and a value of the wrong type with one sentence naming the file, the section and the key and listing the accepted
keys (UsageError, exit code 2).  ``--set a.b=value`` overrides (value parsed as YAML) are applied to the file's
mapping before it is read, so they pass the same checks.  Relative paths in a recipe (``data.manifest``,
``model.encoder_weights``) are resolved against the recipe's folder; ``output.dir`` and ``output.export`` against
the working directory.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import torch
import yaml

from ctfm_engine.errors import CTFMError, UsageError
from ctfm_engine.head_ct import HEAD_CT_PREPROCESSING
from ctfm_engine.io import atomic_output
from ctfm_engine.preprocess import Preprocessing
from ctfm_engine.training.augment import ViewAugmentation
from ctfm_engine.training.pretrain import METHODS
from ctfm_engine.training.triage import CACHES, TriageAugmentation

T = TypeVar("T")
# What ``output.weights_dtype`` may ask for, and the dtype the exported weights are stored in (None: as trained).
WEIGHT_DTYPES = {"float32": None, "float16": torch.float16}
# Trainer arguments the recipe runner sets itself; a recipe cannot set them.
RUNNER_TRAINER_ARGUMENTS = ("self", "logger", "callbacks", "default_root_dir", "use_distributed_sampler")


def choices(*allowed: str) -> dict[str, tuple[str, ...]]:
    """Field metadata: the values a text field accepts."""
    return {"choices": allowed}


# --- sections --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainingData:
    """``data`` of a pre-training recipe: the manifest of unlabelled CT and the intra-sample crops."""

    manifest: str
    spacing_zyx_mm: tuple[float, float, float] = (3.0, 1.0, 1.0)
    split: str | None = None
    cache: str = field(default="memory", metadata=choices("memory", "none"))
    patch_size_zyx: tuple[int, int, int] = (24, 128, 128)
    crops_per_scan: int = 20
    scans_per_batch: int = 4
    visits_per_epoch: int = 1
    num_workers: int = 0


@dataclass(frozen=True)
class SegmentationData:
    """``data`` of a segmentation fine-tuning recipe; ``train_volumes``/``subset_seed`` make it few-shot."""

    manifest: str
    spacing_zyx_mm: tuple[float, float, float] = (3.0, 1.0, 1.0)
    patch_size_zyx: tuple[int, int, int] = (96, 160, 160)
    roi_size_zyx: tuple[int, int, int] = (96, 160, 160)
    overlap: float = 0.625
    batch_size: int = 2
    visits_per_epoch: int = 1
    num_workers: int = 0
    train_volumes: int | None = None
    subset_seed: int | None = None


@dataclass(frozen=True)
class TriageData:
    """``data`` of a head-CT triage fine-tuning recipe: the head-CT grid, batching and the scan cache."""

    manifest: str
    spacing_zyx_mm: tuple[float, float, float] = HEAD_CT_PREPROCESSING.spacing_zyx_mm
    spatial_size_zyx: tuple[int, int, int] = HEAD_CT_PREPROCESSING.spatial_size_zyx
    batch_size: int = 16
    visits_per_epoch: int = 1
    num_workers: int = 0
    cache: str = field(default="memory", metadata=choices(*CACHES))
    cache_dir: str | None = None
    train_volumes: int | None = None
    subset_seed: int | None = None


@dataclass(frozen=True)
class PretrainingNetwork:
    """``model`` of a pre-training recipe: the width of the CT-FM encoder."""

    init_filters: int = 32


@dataclass(frozen=True)
class SegmentationNetwork:
    """``model`` of a segmentation recipe: SegResNetDS's shape and the encoder it starts from (None: random)."""

    out_channels: int = 118
    init_filters: int = 32
    dsdepth: int = 4
    encoder_weights: str | None = None


@dataclass(frozen=True)
class TriageNetwork:
    """``model`` of a triage recipe: encoder width and weights, and how many epochs the encoder stays frozen."""

    init_filters: int = 32
    encoder_weights: str | None = None
    freeze_encoder_epochs: int = 0


@dataclass(frozen=True)
class ContrastiveMethod:
    """``method`` of a pre-training recipe: the intra-sample self-supervised loss and its projection head."""

    name: str = field(default="simclr", metadata=choices(*METHODS))
    temperature: float = 0.1
    symmetric: bool = True
    bn_per_crop_call: bool = True
    head_hidden_dim: int = 256
    head_out_dim: int = 128
    predictor_hidden_dim: int = 512


@dataclass(frozen=True)
class PretrainingOptimiser:
    """``optim`` of a pre-training recipe (AdamW, linear warm-up then cosine over ``schedule_epochs``, default all)."""

    learning_rate: float = 1e-4
    weight_decay: float = 1e-6
    warmup_epochs: int = 10
    schedule_epochs: int | None = None


@dataclass(frozen=True)
class SegmentationOptimiser:
    """``optim`` of a segmentation recipe."""

    learning_rate: float = 2e-4
    weight_decay: float = 1e-5
    warmup_epochs: int = 3
    schedule_epochs: int | None = None


@dataclass(frozen=True)
class TriageOptimiser:
    """``optim`` of a triage recipe (warm-up from ``warmup_multiplier`` x the rate, cosine to ``end_learning_rate``)."""

    learning_rate: float = 1e-4
    weight_decay: float = 1e-5
    warmup_epochs: int = 0
    warmup_multiplier: float = 0.1
    end_learning_rate: float = 1e-6
    schedule_epochs: int | None = None


@dataclass(frozen=True)
class TrainerOptions:
    """``trainer``: the runner's checkpoint period and TensorBoard switch, and any other ``lightning.Trainer``
    argument (``lightning``), which Lightning itself checks when the Trainer is made."""

    checkpoint_every_n_epochs: int = 10
    tensorboard: bool = False
    lightning: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))


@dataclass(frozen=True)
class Prediction:
    """``predict`` of a triage recipe: the decision threshold and the manifest splits to predict (None: all)."""

    threshold: float = 0.5
    splits: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Output:
    """``output``: the run folder, where the model is exported (None: not exported), its name and weight dtype."""

    dir: str = "runs/ctfm"
    export: str | None = None
    name: str | None = None
    weights_dtype: str = field(default="float32", metadata=choices(*WEIGHT_DTYPES))


@dataclass(frozen=True)
class TriageOutput(Output):
    """``output`` of a triage recipe: also which checkpoint is exported and what the model card says it is for."""

    export_from: str = field(default="last", metadata=choices("last", "best"))
    purpose: str | None = None


# Which sections each task reads, and their types; ``model`` and ``data`` are required, the rest default.
TASK_SECTIONS: dict[str, dict[str, type]] = {
    "pretrain": {"data": PretrainingData, "model": PretrainingNetwork, "method": ContrastiveMethod,
                 "augmentation": ViewAugmentation, "optim": PretrainingOptimiser, "trainer": TrainerOptions,
                 "output": Output},
    "segmentation": {"data": SegmentationData, "model": SegmentationNetwork, "optim": SegmentationOptimiser,
                     "trainer": TrainerOptions, "output": Output},
    "triage": {"data": TriageData, "model": TriageNetwork, "augmentation": TriageAugmentation,
               "optim": TriageOptimiser, "trainer": TrainerOptions, "predict": Prediction, "output": TriageOutput},
}
TASKS = tuple(TASK_SECTIONS)
# Fields of a section's class that are not recipe keys (set by the run from other sections).
NOT_RECIPE_KEYS = {TriageAugmentation: ("windows",)}


@dataclass(frozen=True)
class Recipe:
    """A training recipe read and checked: its task, seed and typed sections (None where the task has none)."""

    source: Path
    task: str
    seed: int
    data: PretrainingData | SegmentationData | TriageData
    model: PretrainingNetwork | SegmentationNetwork | TriageNetwork
    optim: PretrainingOptimiser | SegmentationOptimiser | TriageOptimiser
    trainer: TrainerOptions
    output: Output
    method: ContrastiveMethod | None = None
    augmentation: ViewAugmentation | TriageAugmentation | None = None
    predict: Prediction | None = None
    given: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))  # as written, overrides in

    def path(self, value: str) -> Path:
        """A path from the recipe, relative to the recipe's folder."""
        return (self.source.parent / value).resolve()

    @property
    def manifest(self) -> Path:
        return self.path(self.data.manifest)


class _Refused(Exception):
    """A key or value a section does not accept; the reader words it with the file and the section."""


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe in ``path`` with ``key.sub=value`` overrides applied, every section checked; UsageError when the
    file is missing or not YAML, or a key or value is not one the recipe accepts."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: recipe file does not exist")
    try:
        given = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(given, dict) or given.get("task") not in TASKS:
        raise UsageError(f"--config {path}: a recipe is a mapping with 'task' one of {TASKS}")
    given = copy.deepcopy(given)
    overridden: dict[str, str] = {}
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key:
            raise UsageError(f"--set {override}: expected key.sub=value")
        target = given
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise UsageError(f"--set {override}: {parent} is not a section")
        target[leaf] = yaml.safe_load(value)
        overridden[key] = override
    return read_recipe(given, path, overridden)


def read_recipe(given: Mapping[str, Any], source: Path, overridden: Mapping[str, str] = types.MappingProxyType({})
                ) -> Recipe:
    """A :class:`Recipe` from the mapping read from ``source`` (``overridden``: dotted key -> the override that set
    it, so a refusal can name it)."""
    task = given.get("task")
    if task not in TASK_SECTIONS:
        raise UsageError(f"{source}: 'task' must be one of {TASKS}, got {task!r}")
    sections = TASK_SECTIONS[task]
    unknown = sorted(set(given) - {"task", "seed", *sections})
    if unknown:
        raise UsageError(f"{source}: a {task!r} recipe has no section {unknown[0]!r}{_origin(overridden, unknown[0])}; "
                         f"its sections are task, seed, {', '.join(sections)}")
    seed = given.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"{source}: 'seed' must be a whole number, got {seed!r}{_origin(overridden, 'seed')}")
    read = {name: read_section(kind, given.get(name), source, name, overridden) for name, kind in sections.items()}
    return Recipe(source=source.resolve(), task=task, seed=seed, given=types.MappingProxyType(dict(given)), **read)


def read_section(kind: type[T], given: Any, source: Path, name: str,
                 overridden: Mapping[str, str] = types.MappingProxyType({})) -> T:
    """Section ``name`` of the recipe in ``source`` as a ``kind``; UsageError naming the key and the accepted keys
    when a key is unknown, a required one is missing or a value has the wrong type."""
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise UsageError(f"{source}: recipe section {name!r} must be a mapping of keys to values, got {given!r}")
    if kind is TrainerOptions:
        return _trainer_options(given, source, overridden)  # type: ignore[return-value]
    hints = typing.get_type_hints(kind)
    keys = [item for item in dataclasses.fields(kind) if item.init and item.name not in NOT_RECIPE_KEYS.get(kind, ())]
    accepted = [item.name for item in keys]
    values = {}
    for key, value in given.items():
        where = f"{source}: recipe section {name!r}"
        origin = _origin(overridden, f"{name}.{key}")
        if key not in accepted:
            raise UsageError(f"{where} has no key {key!r}{origin}; accepted keys: {', '.join(accepted)}")
        item = next(item for item in keys if item.name == key)
        try:
            values[key] = _checked(value, hints[key], item.metadata.get("choices"))
        except _Refused as refusal:
            raise UsageError(f"{where}: {key!r} must be {refusal}, got {value!r}{origin}") from None
    missing = [item.name for item in keys if item.name not in values
               and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError(f"{source}: recipe section {name!r} needs {', '.join(repr(key) for key in missing)}")
    try:
        return kind(**values)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{source}: recipe section {name!r}: {error}") from None


def _trainer_options(given: Mapping[str, Any], source: Path, overridden: Mapping[str, str]) -> TrainerOptions:
    """The ``trainer`` section: our two keys typed, the rest only checked to be ``lightning.Trainer`` arguments."""
    import inspect

    import lightning as L

    ours = {"checkpoint_every_n_epochs": int, "tensorboard": bool}
    lightning_keys = [key for key in inspect.signature(L.Trainer.__init__).parameters
                      if key not in RUNNER_TRAINER_ARGUMENTS]
    values: dict[str, Any] = {}
    passed: dict[str, Any] = {}
    for key, value in given.items():
        origin = _origin(overridden, f"trainer.{key}")
        if key in ours:
            try:
                values[key] = _checked(value, ours[key], None)
            except _Refused as refusal:
                raise UsageError(f"{source}: recipe section 'trainer': {key!r} must be {refusal}, got {value!r}"
                                 f"{origin}") from None
        elif key in lightning_keys:
            passed[key] = value
        else:
            raise UsageError(f"{source}: recipe section 'trainer' has no key {key!r}{origin}; accepted keys: "
                             f"{', '.join(ours)} and the lightning.Trainer arguments {', '.join(lightning_keys)}")
    return TrainerOptions(**values, lightning=types.MappingProxyType(passed))


def _origin(overridden: Mapping[str, str], key: str) -> str:
    """Which override set ``key`` (or a key inside section ``key``), for a refusal to name; "" if the file did."""
    setting = [override for dotted, override in overridden.items() if dotted == key or dotted.startswith(key + ".")]
    return f" (from the override '{setting[0]}')" if setting else ""


def _checked(value: Any, hint: Any, allowed: Sequence[str] | None) -> Any:
    """``value`` as the type ``hint`` (lists become tuples, whole numbers may stand for floats); _Refused saying what
    was expected otherwise."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        [inner] = [argument for argument in arguments if argument is not type(None)]
        try:
            return _checked(value, inner, allowed)
        except _Refused as refusal:
            raise _Refused(f"{refusal} or null") from None
    if origin is tuple:
        repeated = len(arguments) == 2 and arguments[1] is Ellipsis
        wanted = (f"a list of {_kind(arguments[0], plural=True)}" if repeated
                  else f"a list of {len(arguments)} {_kind(arguments[0], plural=True)}")
        if not isinstance(value, (list, tuple)) or (not repeated and len(value) != len(arguments)):
            raise _Refused(wanted)
        try:
            return tuple(_checked(item, arguments[0] if repeated else argument, None)
                         for item, argument in zip(value, arguments * len(value) if repeated else arguments,
                                                   strict=False))
        except _Refused:
            raise _Refused(wanted) from None
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        if allowed is not None and value not in allowed:
            raise _Refused(f"one of {', '.join(allowed)}")
        return value
    raise _Refused(f"one of {', '.join(allowed)}" if allowed else _kind(hint))


def _kind(hint: Any, plural: bool = False) -> str:
    singular, several = {bool: ("true or false", "true/false values"), int: ("a whole number", "whole numbers"),
                         float: ("a number", "numbers"), str: ("text", "names")}.get(hint, (str(hint), str(hint)))
    return several if plural else singular


# --- running a recipe ------------------------------------------------------------------------------------------


def trainer_for(recipe: Recipe, accelerator: str | None, quiet: bool = False, callbacks: Sequence[Any] = ()) -> Any:
    """A Lightning Trainer from the recipe's ``trainer`` section, with checkpoints and a CSV metrics log.

    ``callbacks`` come after the periodic checkpoint (e.g. a best-metric ModelCheckpoint).
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    output = Path(recipe.output.dir)
    options = dict(recipe.trainer.lightning)
    if accelerator is not None:
        options["accelerator"] = accelerator
    if quiet:
        options.update(enable_progress_bar=False, enable_model_summary=False)
    loggers: list[Any] = [metrics_log(CSVLogger)(output, name="logs", version="")]
    if recipe.trainer.tensorboard:
        loggers.append(TensorBoardLogger(output, name="tensorboard", version=""))
    checkpoints = ModelCheckpoint(dirpath=output / "checkpoints", save_last=True, save_top_k=-1,
                                  every_n_epochs=recipe.trainer.checkpoint_every_n_epochs)
    try:
        # Our EpochSampler shards by rank itself, so Lightning must not swap in a DistributedSampler.
        return L.Trainer(default_root_dir=output, logger=loggers, callbacks=[checkpoints, *callbacks],
                         use_distributed_sampler=False, **options)
    except (TypeError, ValueError) as error:  # Lightning's answer to an invalid trainer option
        raise UsageError(f"{recipe.source}: recipe section 'trainer': {error}") from None


def start_run(recipe: Recipe) -> tuple[int, Path, Preprocessing]:
    """Seed every random generator; the recipe's seed, manifest path and preprocessing."""
    import lightning as L

    L.seed_everything(recipe.seed, workers=True, verbose=False)
    return recipe.seed, recipe.manifest, Preprocessing(spacing_zyx_mm=recipe.data.spacing_zyx_mm)


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


def select_training_volumes(entries: Sequence[T], data: SegmentationData | TriageData) -> list[T]:
    """The few-shot subset of the training scans: ``data.train_volumes`` (k) of them, chosen by ``data.subset_seed``.

    ``subset_seed: null`` keeps the first k rows in manifest order, as CT-FM's few-shot runs did (the first rows
    of TotalSegmentator's ``meta.csv``, unshuffled).  A whole-number seed takes the first k of a
    seeded permutation (kept in manifest order), so for one seed the 5 scans are among the 10 and those among the
    20.  Without ``train_volumes`` every scan is kept.  UsageError when k is not in 1..len(entries).
    """
    count, seed = data.train_volumes, data.subset_seed
    if count is None:
        return list(entries)
    if count < 1:
        raise UsageError(f"data.train_volumes must be a whole number of scans (1 or more), got {count!r}")
    if count > len(entries):
        raise UsageError(f"data.train_volumes {count}: the manifest has only {len(entries)} training scan(s)")
    if seed is None:
        return list(entries[:count])
    chosen = np.random.default_rng(seed).permutation(len(entries))[:count]
    return [entries[index] for index in sorted(chosen)]


def training_subset(data: SegmentationData | TriageData, entries: Sequence[Any]) -> dict[str, Any]:
    """What a result (and so the model card) records about the training subset."""
    if data.train_volumes is None:
        return {"train_volumes": len(entries), "train_subset": "all"}
    seed = data.subset_seed
    return {"train_volumes": len(entries), "subset_seed": seed,
            "train_subset": "first rows of the manifest" if seed is None else f"seeded sample (seed {seed})"}
