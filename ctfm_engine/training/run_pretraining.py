"""Run a pre-training recipe: manifest -> intra-sample crops -> Lightning fit -> encoder in the published layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from ctfm_engine.models.encoder import encoder_config
from ctfm_engine.training.data import (
    EpochSampler,
    IntraSampleCrops,
    PreprocessedScans,
    collate_skipping_unreadable,
    read_manifest,
)
from ctfm_engine.training.model_card import export_model
from ctfm_engine.training.pretrain import IntraSamplePretraining
from ctfm_engine.training.recipe import Recipe, fit, read_metrics, start_run, trainer_for


def run_pretraining(
    recipe: Recipe, resume: str | None = None, accelerator: str | None = None, quiet: bool = False
) -> dict:
    seed, manifest, preprocessing = start_run(recipe)
    data, method, optim, model = recipe.data, recipe.method, recipe.optim, recipe.model
    entries = read_manifest(manifest, split=data.split)
    scans = PreprocessedScans(entries, preprocessing, keep=data.cache == "memory")
    dataset = IntraSampleCrops(scans, data.patch_size_zyx, data.crops_per_scan, recipe.augmentation, seed,
                               visits_per_epoch=data.visits_per_epoch)
    loader = DataLoader(
        dataset,
        batch_size=data.scans_per_batch,
        sampler=EpochSampler(len(dataset), seed=seed),
        collate_fn=collate_skipping_unreadable,
        num_workers=data.num_workers,
    )
    trainer = trainer_for(recipe, accelerator, quiet)
    config = encoder_config(model.init_filters)
    module = IntraSamplePretraining(
        encoder_config=config,
        method=method.name,
        temperature=method.temperature,
        symmetric=method.symmetric,
        bn_per_crop_call=method.bn_per_crop_call,
        head_hidden_dim=method.head_hidden_dim,
        head_out_dim=method.head_out_dim,
        predictor_hidden_dim=method.predictor_hidden_dim,
        learning_rate=optim.learning_rate,
        weight_decay=optim.weight_decay,
        warmup_epochs=optim.warmup_epochs,
        schedule_epochs=optim.schedule_epochs or trainer.max_epochs,
    )
    fit(trainer, module, loader, resume)
    metrics = read_metrics(trainer)
    losses = [float(row["train/loss_epoch"]) for row in metrics if row.get("train/loss_epoch")]
    document: dict[str, Any] = {
        "command": "pretrain",
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "epoch_losses": losses,
        "unreadable_scans": sorted(str(entries[i].path) for i in scans.skipped),
        "checkpoint": str(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"),
        "metrics": str(Path(trainer.loggers[0].log_dir) / "metrics.csv"),
    }
    if recipe.output.export and trainer.is_global_zero:
        document.update(export_model(module.encoder, config, recipe, entries, document, kind="encoder"))
    return document
