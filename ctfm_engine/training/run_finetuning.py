"""Run a segmentation fine-tuning recipe: labelled manifest -> class-balanced patches -> fit -> held-out Dice.

Few-shot runs set ``data.train_volumes`` (k) and ``data.subset_seed`` (see
:func:`~ctfm_engine.training.recipe.select_training_volumes`); the result and the model card record both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from ctfm_engine.errors import InputError
from ctfm_engine.preprocess import Preprocessing
from ctfm_engine.tasks.segment import write_inference_settings
from ctfm_engine.training.data import EpochSampler, read_manifest
from ctfm_engine.training.model_card import export_model
from ctfm_engine.training.recipe import (
    Recipe,
    fit,
    read_metrics,
    select_training_volumes,
    start_run,
    trainer_for,
    training_subset,
)
from ctfm_engine.training.segmentation import (
    LabelledPatches,
    SegmentationFinetuning,
    dice_per_class,
    labelled_model_space,
    segmentation_config,
)

LABEL_NAMES_FILE = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator_v2_total.json"


def run_finetuning(
    recipe: Recipe, resume: str | None = None, accelerator: str | None = None, quiet: bool = False
) -> dict:
    seed, manifest, preprocessing = start_run(recipe)
    data, model, optim = recipe.data, recipe.model, recipe.optim
    # Few-shot: only data.train_volumes of the training scans (data.subset_seed says which).
    train_entries = select_training_volumes(read_manifest(manifest, split="train"), data)
    dataset = LabelledPatches(train_entries, preprocessing, data.patch_size_zyx, seed,
                              visits_per_epoch=data.visits_per_epoch)
    loader = DataLoader(dataset, batch_size=data.batch_size, sampler=EpochSampler(len(dataset), seed),
                        num_workers=data.num_workers)
    trainer = trainer_for(recipe, accelerator, quiet)
    config = segmentation_config(model.out_channels, model.init_filters, model.dsdepth)
    module = SegmentationFinetuning(
        config,
        encoder_weights=None if not model.encoder_weights else str(recipe.path(model.encoder_weights)),
        learning_rate=optim.learning_rate,
        weight_decay=optim.weight_decay,
        warmup_epochs=optim.warmup_epochs,
        schedule_epochs=optim.schedule_epochs or trainer.max_epochs,
        roi_size_zyx=data.roi_size_zyx,
        overlap=data.overlap,
    )
    fit(trainer, module, loader, resume)
    losses = [float(row["train/loss_epoch"]) for row in read_metrics(trainer) if row.get("train/loss_epoch")]
    document: dict[str, Any] = {
        "command": "finetune",
        "task": "segmentation",
        "encoder_sha256": module.hparams.encoder_sha256,
        **training_subset(data, train_entries),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "epoch_losses": losses,
        "held_out_dice": held_out_dice(module, manifest, preprocessing),
        "checkpoint": str(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"),
    }
    if recipe.output.export and trainer.is_global_zero:
        document.update(export_model(module.network, config, recipe, train_entries, document, kind="segmentation"))
        # ctfm_inference.json says how the model sees CT, so ctfm segment uses it as it was trained.
        inference = {**preprocessing.describe(), "roi_size_zyx": list(module.hparams.roi_size_zyx),
                     "overlap": module.hparams.overlap, "labels": "totalsegmentator_v2"
                     if config["out_channels"] == 118 else None}
        inference.pop("orientation")
        write_inference_settings(Path(document["export"]), inference)
    return document


def held_out_dice(module: SegmentationFinetuning, manifest: Path, preprocessing: Preprocessing) -> list[dict]:
    """Per-structure Dice on every ``test`` scan of the manifest (model space), with the macro average."""
    try:
        entries = read_manifest(manifest, split="test")
    except InputError:  # a manifest without test scans: nothing to report
        return []
    names = json.loads(LABEL_NAMES_FILE.read_text()) if LABEL_NAMES_FILE.is_file() else {}
    reports = []
    for entry in entries:
        image, labels = labelled_model_space(entry, preprocessing)
        scores = dice_per_class(module.predict_labels(image), labels)
        reports.append({
            "input": entry.path.name,
            "macro_dice": float(np.mean(list(scores.values()))) if scores else None,
            "dice": {names.get(str(label), str(label)): round(score, 4) for label, score in scores.items()},
        })
    return reports
