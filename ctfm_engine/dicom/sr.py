"""The head-CT triage result as a DICOM Structured Report a PACS stores and a worklist can read by machine.

The report is a Comprehensive 3D SR (SOP class ``1.2.840.10008.5.1.4.1.1.88.34``) whose content follows TID 1500
"Measurement Report" (the template IHE AI Results uses for AI findings): title DCM 126000 "Imaging Measurement
Report", the device observer (TID 1004: the model, manufacturer SlicerCTFM, the weights sha256 as serial number),
procedure reported SCT 303653007 "Computed tomography of head", and one TID 1501 measurement group that
references every source slice (Source images) and holds

- a Tracking Identifier (human-readable ``CT-FM head CT triage`` + a UID derived from the series and the model),
- the Algorithm Identification (TID 4019: name, version, ``weights_sha256=<hex>`` parameter, family
  DCM 123110 "Artificial Intelligence" from CID 7162),
- the qualitative evaluation DCM 121402 "Normality" = SCT 17621005 "Normal" or SCT 263654008 "Abnormal" (CID 222,
  the Normality codes of TID 310),
- the measurements DCM 122157 "Probability" (the network's probability of an abnormal scan) and DCM 122411
  "Threshold Value" (the operating point the decision used), both in UCUM ``1`` (no units).

TID 1501 (measurements without an ROI) is used rather than a volumetric ROI group because the classifier looks at
the whole scan: there is no region to reference.  A SEG written for the same series can be listed as evidence.
The SR's Series and SOP Instance UIDs derive from the source series, the weights and the result, so a re-run
writes the same instance.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ctfm_engine.dicom.seg import Algorithm, SegInfo, source_headers
from ctfm_engine.dicom.tid1500 import (
    algorithm_identification,
    code_key,
    content_items,
    device_observer,
    numeric_value,
    seg_header,
    write_report,
)
from ctfm_engine.errors import InputError
from ctfm_engine.volume import CTVolume

if TYPE_CHECKING:
    from ctfm_engine.tasks.triage import TriageResult

log = logging.getLogger(__name__)

DEFAULT_SERIES_NUMBER = 902
TRACKING_ID = "CT-FM head CT triage"
PROCEDURE = codes.SCT.ComputedTomographyOfHead
NORMALITY = codes.DCM.Normality
DECISION_CODES = {"normal": codes.SCT.Normal, "abnormal": codes.SCT.Abnormal}
PROBABILITY = codes.DCM.Probability
THRESHOLD = codes.DCM.ThresholdValue
NO_UNITS = codes.UCUM.NoUnits


@dataclass(frozen=True)
class SrInfo:
    """What :func:`write_triage_sr` wrote."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    bytes: int
    seconds: float


def write_triage_sr(
    result: TriageResult,
    volume: CTVolume,
    path: str | Path,
    *,
    algorithm: Algorithm,
    seg: SegInfo | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    series_description: str | None = None,
) -> SrInfo:
    """Write ``result`` as a TID 1500 Comprehensive 3D SR referencing ``volume``'s series, atomically.

    Parameters
    ----------
    result
        The triage of ``volume``: probability, threshold and the decision they give.
    volume
        The CT as :func:`~ctfm_engine.dicom.series.read_dicom_series` returned it (its slices become the
        measurement group's source images and the SR's evidence; the SR joins their study).
    path
        Where the SR file goes; nothing is left there when writing fails.
    algorithm
        The triage model (observer device, algorithm identification).
    seg
        A DICOM-SEG written for the same study, listed in the evidence when given.
    series_number, series_description
        Of the new SR series; the description defaults to ``"<algorithm name> triage"``.

    Returns
    -------
    SrInfo
        Path, UIDs, file size and the time taken.

    Raises
    ------
    InputError
        When ``volume`` was not read from DICOM (or its files lack a UID the reader did not resolve), or ``seg``
        cannot be read.
    ValueError
        When the result's probability or threshold is outside [0, 1].
    """
    started = time.perf_counter()
    for name, value in (("probability", result.probability), ("threshold", result.threshold)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"the triage {name} must lie in [0, 1], got {value}")
    sources = source_headers(volume, needed_by="a triage SR")
    series_uid = str(sources[0].SeriesInstanceUID)
    evidence = [*sources, *([seg_header(seg.path, "it cannot be listed as the triage's segmentation")]
                            if seg is not None else [])]
    entropy = [
        "ctfm-triage-sr",
        series_uid,
        algorithm.weights_sha256,
        repr(float(result.probability)),
        repr(float(result.threshold)),
    ]
    path = Path(path)
    report = write_report(path, evidence=evidence, content=_measurement_report(result, algorithm, sources, series_uid),
                          entropy=entropy, algorithm=algorithm, series_number=series_number,
                          series_description=series_description or algorithm.describe("triage"))
    info = SrInfo(
        path=path,
        sop_instance_uid=str(report.SOPInstanceUID),
        series_instance_uid=str(report.SeriesInstanceUID),
        bytes=path.stat().st_size,
        seconds=time.perf_counter() - started,
    )
    log.info("triage SR %s: %s, series %s", path.name, result.decision, info.series_instance_uid)
    return info


def read_triage_sr(path: str | Path) -> dict[str, Any]:
    """The triage a :func:`write_triage_sr` report holds.

    Returns
    -------
    dict
        ``probability`` and ``threshold`` (floats), ``decision`` ("normal" or "abnormal"), and
        ``referenced_series_uid``: the series of the source images the measurement group references.

    Raises
    ------
    InputError
        When the file is not such a report.
    """
    path = Path(path)
    try:
        dataset = pydicom.dcmread(path)
        report = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    except Exception as error:  # pydicom/highdicom signal non-SR files with many exception types
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise InputError(f"{path}: is not a readable Comprehensive 3D SR ({reason}); give a CT-FM triage SR") from None
    numbers = {code_key(item.ConceptNameCodeSequence[0]): numeric_value(item.MeasuredValueSequence[0])
               for item in content_items(report, "NUM") if "MeasuredValueSequence" in item}
    normality = [item for item in content_items(report, "CODE")
                 if code_key(item.ConceptNameCodeSequence[0]) == code_key(NORMALITY)]
    decision = next((name for item in normality for name, code in DECISION_CODES.items()
                     if code_key(item.ConceptCodeSequence[0]) == code_key(code)), None)
    if code_key(PROBABILITY) not in numbers or code_key(THRESHOLD) not in numbers or decision is None:
        raise InputError(
            f"{path}: holds no triage (probability, threshold and normality); give an SR written by CT-FM triage"
        )
    referenced = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for item in content_items(report, "IMAGE")}
    series = [
        str(entry.SeriesInstanceUID)
        for study in report.get("CurrentRequestedProcedureEvidenceSequence") or []
        for entry in study.get("ReferencedSeriesSequence") or []
        if any(str(instance.ReferencedSOPInstanceUID) in referenced for instance in entry.ReferencedSOPSequence)
    ]
    return {
        "probability": numbers[code_key(PROBABILITY)],
        "threshold": numbers[code_key(THRESHOLD)],
        "decision": decision,
        "referenced_series_uid": series[0] if series else None,
    }


def _measurement_report(
    result: TriageResult, algorithm: Algorithm, sources: list[Dataset], series_uid: str
) -> hd.sr.MeasurementReport:
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=["ctfm-triage-tracking", series_uid, algorithm.weights_sha256]),
            identifier=TRACKING_ID,
        ),
        algorithm_id=algorithm_identification(algorithm),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(NORMALITY, DECISION_CODES[result.decision])],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=float(result.probability), unit=NO_UNITS),
            hd.sr.Measurement(name=THRESHOLD, value=float(result.threshold), unit=NO_UNITS),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header) for header in sources],
    )
    return hd.sr.MeasurementReport(
        observation_context=device_observer(algorithm),
        procedure_reported=PROCEDURE,
        imaging_measurements=[group],
    )
