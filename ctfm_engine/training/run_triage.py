"""Run a head-CT triage recipe: manifest (path,label,split) -> head-CT inputs -> fit -> per-scan probabilities.

Rows of split ``train`` are fitted (``data.train_volumes``/``subset_seed`` pick a few-shot subset), ``val`` rows
give ``val/auroc`` each epoch, and every row of a split in ``predict.splits`` (default: all) gets a probability
of "abnormal" from the final model (or the best-AUROC one with ``output.export_from: best``); any other split name
(e.g. ``cq500``) works as an external test set.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_f1_score

from ctfm_engine.errors import InputError, UsageError
from ctfm_engine.head_ct import HeadCTPreprocessing
from ctfm_engine.training.data import EpochSampler
from ctfm_engine.training.model_card import export_model
from ctfm_engine.training.recipe import (
    Recipe,
    TriageData,
    fit,
    read_metrics,
    select_training_volumes,
    start_run,
    trainer_for,
    training_subset,
)
from ctfm_engine.training.triage import (
    HeadCTScans,
    TriageFinetuning,
    TriageRow,
    collate_labelled,
    read_triage_manifest,
    triage_config,
)


def run_triage(
    recipe: Recipe, resume: str | None = None, accelerator: str | None = None, quiet: bool = False
) -> dict:
    seed, manifest, _ = start_run(recipe)
    data, model, optim, output, predict = recipe.data, recipe.model, recipe.optim, recipe.output, recipe.predict
    preprocessing = head_ct_preprocessing(data)
    augmentation = replace(recipe.augmentation, windows=len(preprocessing.windows))
    rows = read_triage_manifest(manifest)
    train_rows = select_training_volumes(labelled_rows(rows, "train", manifest, required=True), data)
    val_rows = labelled_rows(rows, "val", manifest, required=False)

    cache = data.cache
    cache_dir = Path(data.cache_dir or Path(output.dir) / "head_ct_cache")
    batch_size, workers = data.batch_size, data.num_workers

    def scans(selected: list[TriageRow], augment: bool, visits: int = 1) -> HeadCTScans:
        try:
            return HeadCTScans(selected, preprocessing, augmentation if augment else None, seed, cache, cache_dir,
                               visits_per_epoch=visits)
        except ValueError as error:
            raise UsageError(f"recipe section 'data': {error}") from None

    train_set = scans(train_rows, augment=True, visits=data.visits_per_epoch)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=EpochSampler(len(train_set), seed),
                        collate_fn=collate_labelled, num_workers=workers)
    validation, callbacks = None, []
    if val_rows:
        val_set = scans(val_rows, augment=False)
        validation = DataLoader(val_set, batch_size=batch_size, sampler=EpochSampler(len(val_set), seed, shuffle=False),
                                collate_fn=collate_labelled, num_workers=workers)
        if {row.label for row in val_rows} == {0.0, 1.0}:
            from lightning.pytorch.callbacks import ModelCheckpoint

            callbacks.append(ModelCheckpoint(dirpath=Path(output.dir) / "checkpoints",
                                             filename="best-auroc", monitor="val/auroc", mode="max", save_top_k=1,
                                             auto_insert_metric_name=False))
    trainer = trainer_for(recipe, accelerator, quiet, callbacks)
    config = triage_config(model.init_filters, preprocessing)
    module = TriageFinetuning(
        config,
        encoder_weights=None if not model.encoder_weights else str(recipe.path(model.encoder_weights)),
        learning_rate=optim.learning_rate,
        weight_decay=optim.weight_decay,
        warmup_epochs=optim.warmup_epochs,
        warmup_multiplier=optim.warmup_multiplier,
        end_learning_rate=optim.end_learning_rate,
        schedule_epochs=optim.schedule_epochs or trainer.max_epochs,
        freeze_encoder_epochs=model.freeze_encoder_epochs,
    )
    fit(trainer, module, loader, resume, validation)
    metrics = read_metrics(trainer)
    selected = "last"
    if output.export_from == "best" and callbacks and callbacks[0].best_model_path:
        state = torch.load(callbacks[0].best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        selected = f"best val/auroc ({float(callbacks[0].best_model_score):.4f})"
    document: dict[str, Any] = {
        "command": "finetune",
        "task": "triage",
        "encoder_sha256": module.hparams.encoder_sha256,
        **training_subset(data, train_rows),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "epoch_losses": [float(row["train/loss_epoch"]) for row in metrics if row.get("train/loss_epoch")],
        "val_auroc": [float(row["val/auroc"]) for row in metrics if row.get("val/auroc")],
        "model_selected": selected,
        "preprocessing": preprocessing.describe(),
        "checkpoint": str(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"),
    }
    if output.purpose:
        document["purpose"] = output.purpose
    if not trainer.is_global_zero:
        return document
    threshold, splits = predict.threshold, predict.splits
    chosen = [row for row in rows if splits is None or row.split in splits]
    module.to(trainer.strategy.root_device)
    predictions = predict_rows(module, scans(chosen, augment=False), threshold, batch_size)
    document.update(threshold=threshold, metrics_by_split=split_metrics(predictions, threshold),
                    unreadable_rows=[item["row"] for item in predictions if item["probability"] is None])
    if output.export:
        # The card gets the summary, not the per-scan list: file names can identify patients.
        document.update(export_model(module.network, config, recipe, [row.entry for row in train_rows], document,
                                     kind="triage"))
    document["predictions"] = predictions
    return document


def head_ct_preprocessing(data: TriageData) -> HeadCTPreprocessing:
    """The recipe's head-CT grid (``data.spacing_zyx_mm``, ``data.spatial_size_zyx``); UsageError when invalid."""
    try:
        return HeadCTPreprocessing(spacing_zyx_mm=data.spacing_zyx_mm, spatial_size_zyx=data.spatial_size_zyx)
    except (TypeError, ValueError) as error:
        raise UsageError(f"recipe section 'data': {error}") from None


def labelled_rows(rows: list[TriageRow], split: str, manifest: Path, required: bool) -> list[TriageRow]:
    """The rows of ``split``, each with a label; InputError naming the manifest when one has none."""
    selected = [row for row in rows if row.split == split]
    if required and not selected:
        raise InputError(f"{manifest}: holds no scans of split {split!r} (columns: path,label,split)")
    for row in selected:
        if row.label is None:
            raise InputError(f"{manifest}: row {row.number} (split {split!r}) has no label; give 0 (normal) or "
                             f"1 (abnormal)")
    return selected


def predict_rows(module: TriageFinetuning, dataset: HeadCTScans, threshold: float, batch_size: int) -> list[dict]:
    """Probability and decision of every row of ``dataset`` (None for unreadable scans), in manifest order."""
    results = []
    for first in range(0, len(dataset.rows), max(1, batch_size)):
        indices = range(first, min(first + batch_size, len(dataset.rows)))
        images = {index: dataset.image(index) for index in indices}
        readable = [index for index in indices if images[index] is not None]
        probabilities = {}
        if readable:
            batch = torch.stack([images[index] for index in readable])  # type: ignore[misc]
            probabilities = dict(zip(readable, module.probabilities(batch).tolist(), strict=True))
        for index in indices:
            row = dataset.rows[index]
            probability = probabilities.get(index)
            results.append({
                "row": row.number,
                "input": str(row.entry.path),
                "split": row.split,
                "label": None if row.label is None else int(row.label),
                "probability": probability,
                "decision": None if probability is None else ("abnormal" if probability >= threshold else "normal"),
            })
    return results


def split_metrics(predictions: list[dict], threshold: float) -> dict[str, dict]:
    """Per split: scans, abnormal count, AUROC (both classes present), F1 and accuracy at ``threshold``."""
    report: dict[str, dict] = {}
    for split in dict.fromkeys(item["split"] for item in predictions):
        scored = [item for item in predictions if item["split"] == split and item["probability"] is not None
                  and item["label"] is not None]
        if not scored:
            continue
        probabilities = torch.tensor([item["probability"] for item in scored])
        labels = torch.tensor([item["label"] for item in scored])
        both = bool(labels.min() == 0 and labels.max() == 1)
        report[str(split)] = {
            "scans": len(scored),
            "abnormal": int(labels.sum()),
            "auroc": float(binary_auroc(probabilities, labels)) if both else None,
            "f1": float(binary_f1_score(probabilities, labels, threshold=threshold)),
            "accuracy": float(binary_accuracy(probabilities, labels, threshold=threshold)),
        }
    return report
