"""The CT-FM MONAI Deploy application: a CT DICOM series in, DICOM-SEG (and a triage SR) out, optionally sent to a PACS.

Run it here with ``python -m deploy_app -i DICOM_DIR -o OUT_DIR [-m MODEL_DIR]`` (see ``__main__.py`` and
README.md); packaged as a MONAI Application Package the same code runs with the ``HOLOSCAN_*`` folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from holoscan.conditions import CountCondition
from monai.deploy.core import Application

from deploy_app.operators import (
    DicomSegWriterOperator,
    ResultsOperator,
    RunRecord,
    SegmentationOperator,
    SeriesSelectorOperator,
    TriageOperator,
    TriageSrWriterOperator,
    VolumeLoaderOperator,
)

APP_NAME = "ctfm-ct-segmentation"
APP_DIR = Path(__file__).resolve().parent
DEFAULT_RULES = APP_DIR / "selection_rules.json"
ENCODINGS = ("binary", "binary-j2k", "labelmap", "labelmap-rle", "labelmap-jpegls")


@dataclass(frozen=True)
class AppSettings:
    """Everything one run needs; built by ``__main__`` from the command line, ``CTFM_*`` and ``HOLOSCAN_*``."""

    input: Path
    output: Path
    segmentation_model: Path
    triage_model: Path | None = None
    encoding: str = "binary"
    pacs_url: str | None = None
    rules_file: Path = DEFAULT_RULES
    device: str = "cpu"


def model_folders(model_path: Path | None) -> tuple[Path, Path | None]:
    """The segmentation (and triage) checkpoint folders a model path names.

    A checkpoint folder (``config.json`` + ``model.safetensors``) is the segmentation model; a folder of named
    models (the MAP layout, ``models/<name>/``) gives ``segmentation`` and, when present, ``triage``.  Without a
    path the shipped demonstration model ``ctfm-mini-wholebody-seg`` is used (not for clinical use).
    """
    from ctfm_engine.errors import ModelError
    from ctfm_engine.models.registry import bundled_weights

    if model_path is None:
        shipped = bundled_weights("ctfm-mini-wholebody-seg")
        if shipped is None:
            raise ModelError("no segmentation model: pass -m MODEL_DIR (a CT-FM segmentation checkpoint folder)")
        return shipped, None
    model_path = Path(model_path)
    if (model_path / "config.json").is_file():
        return model_path, None
    segmentation, triage = model_path / "segmentation", model_path / "triage"
    if (segmentation / "config.json").is_file():
        return segmentation, triage if (triage / "config.json").is_file() else None
    raise ModelError(f"{model_path}: is neither a checkpoint folder (config.json + model.safetensors) nor a models "
                     f"folder with a 'segmentation' checkpoint in it")


class CTFMSegmentationApp(Application):
    """Selects the CT series, segments it with CT-FM, writes DICOM-SEG (and a triage SR), publishes and sends."""

    def __init__(self, settings: AppSettings, record: RunRecord, *args: Any, **kwargs: Any) -> None:
        self.settings = settings
        self.record = record
        super().__init__(*args, **kwargs)
        self.name = APP_NAME

    def compose(self) -> None:
        from ctfm_engine.dicom.selection import SelectionRules

        settings, record = self.settings, self.record
        rules = SelectionRules.from_file(settings.rules_file)
        select = SeriesSelectorOperator(self, CountCondition(self, 1), input_folder=settings.input, rules=rules,
                                        record=record, name="select_series")
        load = VolumeLoaderOperator(self, input_folder=settings.input, record=record, name="load_volume")
        segment = SegmentationOperator(self, model_path=settings.segmentation_model, device=settings.device,
                                       record=record, name="segment")
        write_seg = DicomSegWriterOperator(self, encoding=settings.encoding, record=record, name="write_seg")
        results = ResultsOperator(self, record=record, pacs_url=settings.pacs_url,
                                  with_sr=settings.triage_model is not None, name="publish")
        self.add_flow(select, load, {("series", "series")})
        self.add_flow(load, segment, {("volume", "volume")})
        self.add_flow(segment, write_seg, {("segmentation", "segmentation")})
        self.add_flow(write_seg, results, {("seg", "seg")})
        if settings.triage_model is not None:
            triage = TriageOperator(self, model_path=settings.triage_model, device=settings.device, record=record,
                                    name="triage")
            write_sr = TriageSrWriterOperator(self, record=record, name="write_sr")
            self.add_flow(load, triage, {("volume", "volume")})
            self.add_flow(triage, write_sr, {("triage", "triage")})
            self.add_flow(write_sr, results, {("sr", "sr")})


def environment_default(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None
