"""The CT-FM MONAI Deploy application: a CT DICOM series in, DICOM-SEG, its measurement SR (and a triage SR) out,
optionally sent to a PACS.

Run it here with ``python -m deploy_app -i DICOM_DIR -o OUT_DIR [-m MODEL_DIR]`` (see ``__main__.py`` and
README.md); packaged as a MONAI Application Package the same code runs with the ``HOLOSCAN_*`` folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from holoscan.conditions import CountCondition
from monai.deploy.core import Application

from ctfm_engine.errors import ModelError
from deploy_app.operators import (
    DicomSegWriterOperator,
    MeasurementsSrWriterOperator,
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


@dataclass(frozen=True)
class AppSettings:
    """Everything one run needs; built by ``__main__`` from the command line, ``CTFM_*`` and ``HOLOSCAN_*``.

    A model is a checkpoint folder or a hub repo id; None leaves the choice to the engine's weights policy (for
    segmentation: ``CTFM_SEG_WEIGHTS``, the published whole_body_segmentation in the cache, then the bundled
    demonstration model, which the results then say they used)."""

    input: Path
    output: Path
    segmentation_model: str | Path | None = None
    triage_model: str | Path | None = None
    encoding: str = "binary"
    pacs_url: str | None = None
    rules_file: Path = DEFAULT_RULES
    device: str = "cpu"
    triage_accept_partial: bool = False
    skip_ct_check: bool = False
    largest_component: bool | None = None  # None: the model's own post-processing
    spacing: str | None = None  # None: the model's trained voxel size
    measurements_sr: bool = True  # the SEG's volumes and HU statistics as a TID 1500 SR beside it


def model_folders(model: str | None) -> tuple[str | Path | None, Path | None]:
    """The segmentation (and triage) models a ``-m`` value names.

    A folder of named models (the MAP layout, ``models/<name>/``) gives ``segmentation`` and, when present,
    ``triage``; without a ``segmentation/``, its one checkpoint folder under any other name is the segmentation
    model (as the MAP ships ``models/ctfm-mini-wholebody-seg/`` and a site mounts, say, ``models/
    project-lighter--whole_body_segmentation/`` in its place: the folder's name is the checkpoint's name in the
    results).  Anything else (a checkpoint folder, a hub repo id) is the segmentation model, resolved by the
    engine's weights policy like every other face's; None lets the policy choose.
    """
    if not model:
        return None, None
    folder = Path(model)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return model, None
    segmentation, triage = folder / "segmentation", folder / "triage"
    triage_folder = triage if triage.is_dir() else None
    if segmentation.is_dir():
        return segmentation, triage_folder
    named = sorted(sub for sub in folder.iterdir() if sub != triage and (sub / "config.json").is_file())
    if len(named) > 1:
        raise ModelError(f"{folder}: holds {len(named)} checkpoints ({', '.join(sub.name for sub in named)}); "
                         "name the segmentation model's folder segmentation/ (and a triage model's triage/)")
    return (named[0] if named else model), triage_folder


class CTFMSegmentationApp(Application):
    """Selects the CT series, segments it with CT-FM, writes DICOM-SEG and its measurement SR (and a triage SR),
    publishes and sends."""

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
        load = VolumeLoaderOperator(self, input_folder=settings.input, record=record,
                                    check_ct=not settings.skip_ct_check, name="load_volume")
        segment = SegmentationOperator(self, model=settings.segmentation_model, device=settings.device,
                                       record=record, largest_component=settings.largest_component,
                                       spacing=settings.spacing, name="segment")
        write_seg = DicomSegWriterOperator(self, encoding=settings.encoding, record=record, name="write_seg")
        results = ResultsOperator(self, record=record, pacs_url=settings.pacs_url,
                                  with_sr=settings.triage_model is not None,
                                  with_measurements_sr=settings.measurements_sr, name="publish")
        self.add_flow(select, load, {("series", "series")})
        self.add_flow(load, segment, {("volume", "volume")})
        self.add_flow(segment, write_seg, {("segmentation", "segmentation")})
        self.add_flow(write_seg, results, {("seg", "seg")})
        if settings.measurements_sr:
            measure = MeasurementsSrWriterOperator(self, record=record, name="write_measurements_sr")
            self.add_flow(segment, measure, {("segmentation", "segmentation")})
            self.add_flow(write_seg, measure, {("seg", "seg")})
            self.add_flow(measure, results, {("measurements_sr", "measurements_sr")})
        if settings.triage_model is not None:
            triage = TriageOperator(self, model=settings.triage_model, device=settings.device, record=record,
                                    accept_partial=settings.triage_accept_partial, name="triage")
            write_sr = TriageSrWriterOperator(self, record=record, name="write_sr")
            self.add_flow(load, triage, {("volume", "volume")})
            self.add_flow(triage, write_sr, {("triage", "triage")})
            self.add_flow(write_sr, results, {("sr", "sr")})
