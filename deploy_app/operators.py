"""The operators of the CT-FM MONAI Deploy application, one concern each, all doing their work through ctfm_engine.

    SeriesSelectorOperator -> VolumeLoaderOperator -> SegmentationOperator -> DicomSegWriterOperator ─> ResultsOperator
                                      │                         │                           │ seg          ▲  ▲
                                      │                         └─> MeasurementsSrWriterOperator ──────────┘  │
                                      └─> TriageOperator ─> TriageSrWriterOperator ────────────────────────────┘

The measurement SR writer takes the segmentation and the SEG that the SEG writer wrote (it references its segments).

The model operators call the engine's task layer (``ctfm_engine.pipelines``): the weights policy, preprocessing and
runtime are the engine's, exactly as for the ``ctfm`` command and the Slicer module.  Every writer writes into the
run's staging folder; only :class:`ResultsOperator` moves the finished objects into the output folder (and hands
them to the PACS outbox when one is configured), so a run that fails anywhere leaves no half-written output behind.
Holoscan re-raises an operator's exception from ``Application.run()``, so the engine's errors (with their exit
codes) reach ``python -m deploy_app`` unchanged.

The SDK's own DICOM operators are not used: its loader reads every file with its pixel data and keeps only the
first series of the first study, its selector cannot express ORIGINAL/axial/slice-count/kernel preferences nor
say why a series was skipped, and its SEG writer writes neither laterality nor compressed encodings.  The engine's
reader and highdicom writer do those.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from ctfm_engine.io import atomic_output

log = logging.getLogger("deploy_app")


@dataclass
class RunRecord:
    """What one run did, shared by the operators: timings, the staged files and the summary document."""

    output: Path
    staging: Path
    seconds: dict[str, float] = field(default_factory=dict)
    staged: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    published: list[Path] = field(default_factory=list)

    def timed(self, stage: str, started: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - started, 3)

    def staged_result(self, key: str, path: Path, info: Any, **extra: Any) -> None:
        """Record an object written into the staging folder: published at the end, summarised under ``key``
        (without its staging path, which does not outlive the run)."""
        self.staged.append(path)
        self.summary[key] = {"file": path.name, **extra, **{k: v for k, v in _plain(info).items() if k != "path"}}


class SeriesSelectorOperator(Operator):
    """Input folder -> the CT series the rules choose (``series``), with the reason every other series was skipped."""

    def __init__(self, fragment: Fragment, *args: Any, input_folder: Path, rules: Any, record: RunRecord,
                 **kwargs: Any) -> None:
        self.input_folder = Path(input_folder)
        self.rules = rules
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("series")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from ctfm_engine.dicom.selection import select_series

        started = time.perf_counter()
        selection = select_series(self.input_folder, self.rules)
        chosen = selection.chosen
        log.info("selected series %s (%s, %d instances); %d other series skipped", chosen.series_id,
                 chosen.modality, chosen.instances, len(selection.skipped))
        self.record.summary["selection"] = selection.as_dict()
        self.record.timed("select", started)
        op_output.emit(chosen, "series")


class VolumeLoaderOperator(Operator):
    """The chosen series -> a CTVolume in HU with its DICOM references (``volume``), refused when it does not look
    like CT in Hounsfield units unless ``check_ct`` is False."""

    def __init__(self, fragment: Fragment, *args: Any, input_folder: Path, record: RunRecord, check_ct: bool = True,
                 **kwargs: Any) -> None:
        self.input_folder = Path(input_folder)
        self.record = record
        self.check_ct = check_ct
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("series")
        spec.output("volume")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from ctfm_engine.pipelines.inputs import ScanSource

        series = op_input.receive("series")
        started = time.perf_counter()
        volume = ScanSource(self.input_folder, series.series_id, check_ct=self.check_ct).read()
        self.record.summary["volume"] = {"size_xyz": list(volume.shape_zyx[::-1]),
                                         "spacing_xyz_mm": [round(v, 4) for v in volume.spacing_xyz_mm],
                                         "series_instance_uid": volume.dicom.series_instance_uid,
                                         "derived_uids": list(volume.dicom.derived_uids)}
        self.record.timed("read", started)
        op_output.emit(volume, "volume")


# The remedy of an engine error, worded as this app's settings.
ACCEPT_NOT_CT = ("if the series is a CT in Hounsfield units, set CTFM_SKIP_CT_CHECK=1 (or --skip-ct-check) to read it "
                 "anyway")
REMEDIES = {"accept_partial": "set CTFM_TRIAGE_ACCEPT_PARTIAL=1 (or --triage-accept-partial) to judge it anyway",
            "ct_check": ACCEPT_NOT_CT, "hu_offset": ACCEPT_NOT_CT,
            "spacing": "set CTFM_SPACING (or --spacing) to a coarser voxel size, e.g. 1.5"}


class _ModelOperator(Operator):
    """An operator that runs one task of the engine with one model spec (a checkpoint folder, a hub repo id, or
    None for the engine's weights policy) on one device, and records its stages in the run's record."""

    def __init__(self, fragment: Fragment, *args: Any, model: str | Path | None, device: str, record: RunRecord,
                 **kwargs: Any) -> None:
        self.model = model
        self.device = device
        self.record = record
        super().__init__(fragment, *args, **kwargs)


class SegmentationOperator(_ModelOperator):
    """CTVolume -> whole-body label map on the source grid (``segmentation``), with the CT-FM segmentation model.

    ``largest_component`` None runs the model's own post-processing (the published model keeps the largest
    component of each label, as its card); False keeps every island.  ``spacing`` None is the model's trained
    voxel size, "native" the series' own, or mm.
    """

    def __init__(self, fragment: Fragment, *args: Any, largest_component: bool | None = None,
                 spacing: str | None = None, **kwargs: Any) -> None:
        self.largest_component = largest_component
        self.spacing = spacing
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.output("segmentation")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from ctfm_engine.pipelines import SegmentationRequest, run_segmentation

        volume = op_input.receive("volume")
        started = time.perf_counter()
        outcome = run_segmentation(SegmentationRequest(volume, weights=self.model, device=self.device,
                                                       largest_component=self.largest_component, spacing=self.spacing,
                                                       progress=_progress_logger("segmenting", "windows")))
        self.record.seconds["load_model"] = round(time.perf_counter() - started - outcome.seconds, 3)
        self.record.seconds["segment"] = round(outcome.seconds, 3)
        structures = outcome.structures()
        log.info("segmentation: %d structures with %s (sha256 %s)", len(structures), outcome.weights["name"],
                 outcome.weights["sha256"][:12])
        self.record.summary["segmentation"] = {"weights": outcome.weights, "backend": outcome.backend,
                                               "model": outcome.describe_model(), "structures": structures}
        op_output.emit(outcome, "segmentation")


class DicomSegWriterOperator(Operator):
    """Label map -> DICOM-SEG in the staging folder (``seg``), coded with SNOMED CT and laterality, on highdicom."""

    def __init__(self, fragment: Fragment, *args: Any, encoding: str, record: RunRecord, **kwargs: Any) -> None:
        self.encoding = encoding
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("segmentation")
        spec.output("seg")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        outcome = op_input.receive("segmentation")
        if not outcome.labels.any():
            # A DICOM-SEG must hold at least one segment: nothing found means no SEG, said in the summary.
            log.warning("the model found no structure in this series; no DICOM-SEG is written")
            self.record.summary["seg"] = {"skipped": "the model found no structure in this series"}
            op_output.emit(None, "seg")
            return
        started = time.perf_counter()
        path = self.record.staging / "ctfm-seg.dcm"
        info = outcome.write_dicom_seg(path, self.encoding)
        self.record.staged_result("seg", path, info, encoding=self.encoding)
        self.record.timed("write_seg", started)
        op_output.emit(info, "seg")


class MeasurementsSrWriterOperator(Operator):
    """Segmentation + its DICOM-SEG -> a TID 1500 measurement SR in the staging folder (``measurements_sr``): each
    structure's volume and HU statistics on the source grid, referencing its SEG segment and the source series."""

    def __init__(self, fragment: Fragment, *args: Any, record: RunRecord, **kwargs: Any) -> None:
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("segmentation")
        spec.input("seg")
        spec.output("measurements_sr")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        outcome = op_input.receive("segmentation")
        seg = op_input.receive("seg")
        if seg is None:
            self.record.summary["measurements_sr"] = {"skipped": "no DICOM-SEG was written, so there is no segment "
                                                                  "to measure"}
            op_output.emit(None, "measurements_sr")
            return
        started = time.perf_counter()
        path = self.record.staging / "ctfm-measurements-sr.dcm"
        info = outcome.write_measurements_sr(path, seg)
        self.record.staged_result("measurements_sr", path, info)
        self.record.timed("write_measurements_sr", started)
        op_output.emit(info, "measurements_sr")


class TriageOperator(_ModelOperator):
    """CTVolume -> head-CT triage (``triage``): probability and decision, or why the scan could not be judged."""

    def __init__(self, fragment: Fragment, *args: Any, accept_partial: bool = False, **kwargs: Any) -> None:
        self.accept_partial = accept_partial
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.output("triage")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from ctfm_engine.errors import InputError, explain
        from ctfm_engine.pipelines import TriageRequest, run_triage

        volume = op_input.receive("volume")
        started = time.perf_counter()
        try:
            outcome = run_triage(TriageRequest(volume, weights=self.model, device=self.device,
                                               accept_partial=self.accept_partial))
        except InputError as error:
            # Not a head CT (or too little of one): the segmentation still goes out; the report says why no triage.
            reason = explain(error, REMEDIES)
            log.warning("triage skipped: %s", reason)
            self.record.summary["triage"] = {"skipped": reason}
            op_output.emit(None, "triage")
            return
        finally:
            self.record.timed("triage", started)
        result = outcome.result
        self.record.summary["triage"] = {"probability": result.probability, "decision": result.decision,
                                         "threshold": result.threshold, "threshold_source": outcome.threshold_source,
                                         "weights": outcome.weights}
        op_output.emit(outcome, "triage")


class TriageSrWriterOperator(Operator):
    """Triage -> a Comprehensive 3D SR (TID 1500) in the staging folder (``sr``) referencing the source series."""

    def __init__(self, fragment: Fragment, *args: Any, record: RunRecord, **kwargs: Any) -> None:
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("triage")
        spec.output("sr")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        outcome = op_input.receive("triage")
        if outcome is None:
            op_output.emit(None, "sr")
            return
        started = time.perf_counter()
        path = self.record.staging / "ctfm-triage-sr.dcm"
        info = outcome.write_sr(path)
        self.record.staged_result("sr", path, info)
        self.record.timed("write_sr", started)
        op_output.emit(info, "sr")


class ResultsOperator(Operator):
    """Publishes the staged objects into the output folder, writes ``ctfm-results.json`` and, with a PACS
    configured, records them in the output folder's outbox and sends them."""

    def __init__(self, fragment: Fragment, *args: Any, record: RunRecord, pacs_url: str | None, with_sr: bool,
                 with_measurements_sr: bool = False, **kwargs: Any) -> None:
        self.record = record
        self.pacs_url = pacs_url
        self.with_sr = with_sr
        self.with_measurements_sr = with_measurements_sr
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("seg")
        if self.with_sr:
            spec.input("sr")
        if self.with_measurements_sr:
            spec.input("measurements_sr")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        op_input.receive("seg")
        if self.with_sr:
            op_input.receive("sr")
        if self.with_measurements_sr:
            op_input.receive("measurements_sr")
        publish(self.record)
        if self.pacs_url:
            deliver(self.record, self.pacs_url)


def publish(record: RunRecord) -> None:
    """Move the staged objects into the output folder and write the summary (atomically, summary last)."""
    for staged in record.staged:
        target = record.output / staged.name
        shutil.move(str(staged), target)
        record.published.append(target)
    record.summary["outputs"] = [path.name for path in record.published]
    record.summary["seconds"] = record.seconds
    with atomic_output(record.output / "ctfm-results.json") as temporary:
        temporary.write_text(json.dumps(record.summary, indent=1, default=str) + "\n")


def deliver(record: RunRecord, pacs_url: str) -> None:
    """Record the published objects in the output folder's outbox and send them.

    Raises PacsError (exit code 1) when any is left undelivered: the objects stay in the output folder and pending
    (or refused, with the reason) in its ``outbox.json``, ready for ``ctfm pacs outbox OUT_DIR --send``.
    """
    from ctfm_engine.dicom.outbox import Outbox
    from ctfm_engine.dicom.pacs import PacsError, open_pacs, parse_address

    if not record.published:
        return
    started = time.perf_counter()
    address = parse_address(pacs_url)
    outbox = Outbox(record.output)
    outbox.add(record.published, address)
    delivery = outbox.send(open_pacs(address))
    record.timed("send", started)
    record.summary["pacs"] = {"destination": address.display, **_plain(delivery)}
    with atomic_output(record.output / "ctfm-results.json") as temporary:
        temporary.write_text(json.dumps(record.summary, indent=1, default=str) + "\n")
    if not delivery.report.complete:
        undelivered = delivery.report.not_delivered
        reasons = "; ".join(f"{Path(item.path).name}: {item.status.value} ({item.message})" for item in undelivered)
        raise PacsError(f"{address.display}: {len(undelivered)} of {len(record.published)} result(s) not stored "
                        f"({reasons}); they are kept in {record.output} and listed in its outbox.json: deliver them "
                        f"later with `ctfm pacs outbox {record.output} --send`")


def _progress_logger(stage: str, unit: str, step_percent: int = 10) -> Any:
    """A progress callback that logs every ``step_percent`` % (an orchestrator reads the log, not a bar)."""
    reported = [-step_percent]

    def progress(done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent >= reported[0] + step_percent or done == total:
            reported[0] = percent
            log.info("%s: %d/%d %s (%d %%)", stage, done, total, unit, percent)

    return progress


def _plain(value: Any) -> Any:
    """A dataclass/report as JSON-able data."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return value
