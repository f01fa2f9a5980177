"""Run a pre-training recipe: manifest -> intra-sample crops -> Lightning fit -> encoder in the published layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from ctfm_engine.models.encoder import encoder_config
from ctfm_engine.training.augment import ViewAugmentation
from ctfm_engine.training.data import (
    EpochSampler,
    IntraSampleCrops,
    PreprocessedScans,
    collate_skipping_unreadable,
    read_manifest,
)
from ctfm_engine.training.model_card import export_model
from ctfm_engine.training.pretrain import IntraSamplePretraining
from ctfm_engine.training.recipe import fit, read_metrics, section, start_run, trainer_for


def run_pretraining(
    recipe: dict[str, Any], resume: str | None = None, accelerator: str | None = None, quiet: bool = False
) -> dict:
    seed, manifest, preprocessing = start_run(recipe)
    data, method, optim = section(recipe, "data"), section(recipe, "method"), section(recipe, "optim")
    entries = read_manifest(manifest, split=data.get("split"))
    scans = PreprocessedScans(entries, preprocessing, keep=data.get("cache", "memory") == "memory")
    augmentation = ViewAugmentation(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in section(recipe, "augmentation").items()})
    dataset = IntraSampleCrops(scans, data.get("patch_size_zyx", (24, 128, 128)), int(data.get("crops_per_scan", 20)),
                               augmentation, seed, visits_per_epoch=int(data.get("visits_per_epoch", 1)))
    loader = DataLoader(
        dataset,
        batch_size=int(data.get("scans_per_batch", 4)),
        sampler=EpochSampler(len(dataset), seed=seed),
        collate_fn=collate_skipping_unreadable,
        num_workers=int(data.get("num_workers", 0)),
    )
    trainer = trainer_for(recipe, accelerator, quiet)
    config = encoder_config(int(section(recipe, "model").get("init_filters", 32)))
    module = IntraSamplePretraining(
        encoder_config=config,
        method=method.get("name", "simclr"),
        temperature=float(method.get("temperature", 0.1)),
        symmetric=bool(method.get("symmetric", True)),
        bn_per_crop_call=bool(method.get("bn_per_crop_call", True)),
        head_hidden_dim=int(method.get("head_hidden_dim", 256)),
        head_out_dim=int(method.get("head_out_dim", 128)),
        predictor_hidden_dim=int(method.get("predictor_hidden_dim", 512)),
        learning_rate=float(optim.get("learning_rate", 1e-4)),
        weight_decay=float(optim.get("weight_decay", 1e-6)),
        warmup_epochs=int(optim.get("warmup_epochs", 10)),
        schedule_epochs=int(optim.get("schedule_epochs") or trainer.max_epochs),
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
    if section(recipe, "output").get("export") and trainer.is_global_zero:
        document.update(export_model(module.encoder, config, recipe, entries, document, kind="encoder"))
    return document
