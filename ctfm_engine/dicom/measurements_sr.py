"""Organ measurements as a DICOM Structured Report that sits in the PACS beside the DICOM-SEG it measures.

The report is a Comprehensive 3D SR (SOP class ``1.2.840.10008.5.1.4.1.1.88.34``) with TID 1500 "Measurement
Report" content: title DCM 126000 "Imaging Measurement Report", the model as observer device (TID 1004; the weights
sha256 is its serial number), procedure reported LN 25045-6 "CT unspecified body region" (CID 100), and one TID 1411
"Volumetric ROI Measurements and Qualitative Evaluations" group per structure, which holds

- the Tracking Identifier and Tracking UID of the structure's segment in the SEG (``"<name> [label <value>]"``, and
  the UID :func:`~ctfm_engine.dicom.seg.segment_tracking_uid` derives): the SR and the SEG name the structure alike;
- the Referenced Segment: the SEG's SOP Class and Instance UID and the segment's number, with "Source series for
  segmentation" = the CT series;
- Finding Category and Finding Type: the segment's SNOMED CT category and type; a Finding Site with the type (the
  anatomic region for a lesion such as a kidney cyst) and the laterality (SCT 7771000 Left / 24028007 Right) as its
  modifier;
- the Algorithm Identification (TID 4019) of the model that drew the region;
- the measurements (TID 1419), computed on the source grid (:mod:`ctfm_engine.tasks.measure`):

  ======================  =====================================  ========================  =======================
  statistic               concept name                           unit (UCUM)               Derivation (DCM 121401)
  ======================  =====================================  ========================  =======================
  volume                  SCT 118565006 "Volume"                 ``ml`` "milliliter"       --
  mean                    DCM 112031 "Attenuation Coefficient"   ``[hnsf'U]`` "Hounsfield  SCT 373098007 "Mean"
                                                                 unit"
  standard deviation      DCM 112031                             ``[hnsf'U]``              SCT 386136009 "Standard
  (sample, n - 1)                                                                          Deviation"
  median                  DCM 112031                             ``[hnsf'U]``              SCT 373099004 "Median"
  minimum / maximum       DCM 112031                             ``[hnsf'U]``              SCT 255605001 "Minimum"
                                                                                           / 56851009 "Maximum"
  5th / 95th percentile   DCM 112031                             ``[hnsf'U]``              SCT 371888009 "Fifth
                                                                                           percentile" / 371889001
                                                                                           "Ninety-fifth percentile"
  25th / 75th percentile  DCM 112031                             ``[hnsf'U]``              (none: see below)
  ======================  =====================================  ========================  =======================

  Mean, standard deviation, median, minimum and maximum are the CID 7464 "General Region of Interest Measurement
  Modifier" codes (those dcmqi and Slicer's QuantitativeReporting write).

Percentiles.  CID 7464 has no percentile, and DICOM PS3.16 defines no code for the 25th or the 75th percentile at
all: SNOMED CT's 5th, 10th, 90th and 95th percentile qualifier values are the only percentile codes it uses (in
CID 226, for reference populations), the quartiles appear only as an interquartile range of a population.  CID 7464
is extensible, so the 5th and 95th percentiles take those SNOMED CT qualifier values as their Derivation; the 25th
and 75th have none.  Every percentile, these four alike, therefore says which it is in two standard, private-free
ways that TID 1419 provides for a measurement: a Derivation Parameter (Row 13, INFERRED FROM NUM) DCM 121415
"Percentile Ranking of measurement" = the percentile in UCUM ``%`` (the value's percentile rank among the structure's
voxels), and an Equivalent Meaning of Concept Name (Row 18, DCM 121050) such as "25th percentile of the attenuation
coefficient" for a human reader.  :func:`read_measurements_sr` identifies percentiles by that parameter.

Series and SOP Instance UIDs derive from the source series, the weights, the SEG instance and the numbers, so
writing the same result again (a PACS re-send, a re-run) yields the same instance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ctfm_engine.dicom.seg import (
    GENERIC_CATEGORY,
    GENERIC_TYPE,
    TRACKING_ID,
    Algorithm,
    SegInfo,
    coded_concept,
    segment_tracking_id,
    segment_tracking_uid,
    source_headers,
)
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
from ctfm_engine.labels import Label
from ctfm_engine.tasks.measure import StructureStatistics
from ctfm_engine.volume import CTVolume

log = logging.getLogger(__name__)

DEFAULT_SERIES_NUMBER = 903
PROCEDURE = codes.cid100.CTUnspecifiedBodyRegion
VOLUME = codes.SCT.Volume
MILLILITER = Code("ml", "UCUM", "milliliter")
ATTENUATION = codes.DCM.AttenuationCoefficient
HOUNSFIELD = codes.UCUM.HounsfieldUnit
PERCENT = codes.UCUM.Percent
PERCENTILE_RANK = codes.DCM.PercentileRankingOfMeasurement
EQUIVALENT_MEANING = codes.DCM.EquivalentMeaningOfConceptName
# The statistics of the attenuation coefficient (StructureStatistics fields) and their Derivation codes.
DERIVATIONS: dict[str, Code | None] = {
    "hu_mean": codes.SCT.Mean,
    "hu_sd": codes.SCT.StandardDeviation,
    "hu_median": codes.SCT.Median,
    "hu_min": codes.SCT.Minimum,
    "hu_max": codes.SCT.Maximum,
    "hu_p5": Code("371888009", "SCT", "Fifth percentile"),
    "hu_p25": None,
    "hu_p75": None,
    "hu_p95": Code("371889001", "SCT", "Ninety-fifth percentile"),
}
PERCENTILES = {"hu_p5": 5, "hu_p25": 25, "hu_p75": 75, "hu_p95": 95}
ORDINALS = {5: "5th", 25: "25th", 75: "75th", 95: "95th"}
LATERALITIES = {("SCT", "7771000"): "left", ("SCT", "24028007"): "right"}


@dataclass(frozen=True)
class MeasurementsSrInfo:
    """What :func:`write_measurements_sr` wrote: one measurement group per structure."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    structures: int
    bytes: int
    seconds: float


def write_measurements_sr(
    statistics: Sequence[StructureStatistics],
    volume: CTVolume,
    seg: SegInfo,
    label_table: dict[int, Label],
    path: str | Path,
    *,
    algorithm: Algorithm,
    series_number: int = DEFAULT_SERIES_NUMBER,
    series_description: str | None = None,
) -> MeasurementsSrInfo:
    """Write ``statistics`` as a TID 1500 Comprehensive 3D SR referencing ``seg``'s segments, atomically.

    Parameters
    ----------
    statistics
        Per-structure statistics of the label map ``seg`` was written from, on ``volume``'s grid.
    volume
        The CT as :func:`~ctfm_engine.dicom.series.read_dicom_series` returned it: its series is the source series
        of every segment, its slices the report's evidence (the SR joins their study).
    seg
        What :func:`~ctfm_engine.dicom.seg.write_dicom_seg` returned for that label map: its file (read for the
        evidence), SOP Instance UID and segment numbers per label value.
    label_table
        The label table the SEG was written with (codes, names).
    path
        Where the SR file goes; nothing is left there when writing fails.
    algorithm
        The model that made the label map (observer device, algorithm identification).
    series_number, series_description
        Of the new SR series; the description defaults to ``"<algorithm name> measurements"``.

    Raises
    ------
    InputError
        When ``volume`` was not read from DICOM, or ``seg``'s file cannot be read as a DICOM-SEG.
    ValueError
        When no structure of ``statistics`` is a segment of ``seg`` (a structure the SEG omits, e.g. one that
        lies on no source slice of a resampled series, is left out of the report, with a warning).
    """
    started = time.perf_counter()
    sources = source_headers(volume, needed_by="a measurement SR")
    seg_dataset = seg_header(seg.path, "its segments cannot be referenced by a measurement SR")
    series_uid = str(sources[0].SeriesInstanceUID)
    numbers = {value: number for number, value, _name in seg.segments}
    measured = [row for row in statistics if row.value in numbers]
    if len(measured) < len(statistics):
        log.warning("%d structure(s) measured on the grid have no segment in the DICOM-SEG (none of their voxels "
                    "lies on a source slice); they are left out of the measurement SR", len(statistics) - len(measured))
    if not measured:
        raise ValueError(f"none of the {len(statistics)} measured structures is a segment of {seg.path.name}; a "
                         f"measurement SR references SEG segments, so write it with the SEG of the same label map")
    groups = [
        _group(row, label_table.get(row.value) or Label(row.value, row.name, (128, 128, 128)), numbers[row.value],
               seg_dataset, series_uid, algorithm)
        for row in measured
    ]
    entropy = ["ctfm-measurements-sr", series_uid, algorithm.weights_sha256, seg.sop_instance_uid,
               hashlib.sha256(json.dumps([row.as_dict() for row in measured]).encode()).hexdigest()]
    path = Path(path)
    report = write_report(path, evidence=[*sources, seg_dataset],
                          content=hd.sr.MeasurementReport(observation_context=device_observer(algorithm),
                                                          procedure_reported=PROCEDURE, imaging_measurements=groups),
                          entropy=entropy, algorithm=algorithm, series_number=series_number,
                          series_description=series_description or algorithm.describe("measurements"))
    info = MeasurementsSrInfo(path=path, sop_instance_uid=str(report.SOPInstanceUID),
                              series_instance_uid=str(report.SeriesInstanceUID), structures=len(groups),
                              bytes=path.stat().st_size, seconds=time.perf_counter() - started)
    log.info("measurement SR %s: %d structures, series %s", path.name, info.structures, info.series_instance_uid)
    return info


def read_measurements_sr(path: str | Path) -> list[dict[str, Any]]:
    """The measurements a :func:`write_measurements_sr` report holds, one row per measurement group.

    Returns
    -------
    list of dict
        In report order: ``value`` (the label value from the Tracking ID, else the segment number), ``name``,
        ``laterality`` ("left", "right" or None), ``tracking_uid``, ``segment_number``,
        ``seg_sop_instance_uid``, ``source_series_uid``, ``finding_type`` ({"scheme", "value", "meaning"}),
        ``volume_ml`` and the ``hu_*`` statistics of :class:`~ctfm_engine.tasks.measure.StructureStatistics`
        (a statistic the group lacks is absent).

    Raises
    ------
    InputError
        When the file is not a Comprehensive 3D SR holding volumetric measurement groups.
    """
    path = Path(path)
    try:
        groups = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path)).content \
            .get_volumetric_roi_measurement_groups()
    except Exception as error:  # pydicom/highdicom signal files that are not such reports with many exception types
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise InputError(f"{path}: is not a readable TID 1500 measurement report ({reason}); give a CT-FM "
                         f"measurement SR") from None
    if not groups:
        raise InputError(f"{path}: holds no volumetric measurement group; give a CT-FM measurement SR")
    return [_row(group) for group in groups]


def _group(row: StructureStatistics, label: Label, segment_number: int, seg: Dataset, series_uid: str,
           algorithm: Algorithm) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = [hd.sr.Measurement(name=VOLUME, value=float(row.volume_ml), unit=MILLILITER)]
    measurements += [_attenuation(key, float(getattr(row, key))) for key in DERIVATIONS]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=segment_tracking_uid(label, series_uid),
                                                     identifier=segment_tracking_id(label)),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=segment_number, source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
        finding_category=coded_concept(label.category or GENERIC_CATEGORY),
        finding_type=coded_concept(label.type or GENERIC_TYPE),
        finding_sites=_finding_sites(label),
        algorithm_id=algorithm_identification(algorithm),
        measurements=measurements,
    )


def _attenuation(key: str, value: float) -> hd.sr.Measurement:
    measurement = hd.sr.Measurement(name=ATTENUATION, value=value, unit=HOUNSFIELD, derivation=DERIVATIONS[key])
    percentile = PERCENTILES.get(key)
    if percentile is not None:
        item = measurement[0]
        if "ContentSequence" not in item:
            item.ContentSequence = []
        item.ContentSequence.append(hd.sr.TextContentItem(
            name=EQUIVALENT_MEANING, value=f"{ORDINALS[percentile]} percentile of the attenuation coefficient",
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD))
        item.ContentSequence.append(hd.sr.NumContentItem(
            name=PERCENTILE_RANK, value=percentile, unit=PERCENT,
            relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM))
    return measurement


def _finding_sites(label: Label) -> list[hd.sr.FindingSite] | None:
    """The structure's site (its type, or for a lesion its anatomic region) with its laterality, if any."""
    site, side = (label.region, label.region_modifier) if label.region is not None else (label.type,
                                                                                          label.type_modifier)
    if site is None:
        return None
    laterality = side if side is not None and (side.scheme, side.value) in LATERALITIES else None
    return [hd.sr.FindingSite(anatomic_location=coded_concept(site),
                              laterality=None if laterality is None else coded_concept(laterality))]


def _row(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> dict[str, Any]:
    segment = group.referenced_segment
    identifier = str(group.tracking_identifier or "")
    match = TRACKING_ID.search(identifier)
    number = int(segment.referenced_segment_numbers[0]) if segment is not None else None
    sides = [LATERALITIES.get(code_key(site.laterality)) for site in group.finding_sites if site.laterality]
    finding_type = group.finding_type
    row: dict[str, Any] = {
        "value": int(match.group(1)) if match else number,
        "name": TRACKING_ID.sub("", identifier).strip() if match else identifier,
        "laterality": next((side for side in sides if side), None),
        "tracking_uid": None if group.tracking_uid is None else str(group.tracking_uid),
        "segment_number": number,
        "seg_sop_instance_uid": None if segment is None else str(segment.referenced_sop_instance_uid),
        "source_series_uid": None if segment is None or segment.source_series_for_segmentation is None
        else str(segment.source_series_for_segmentation.value),
        "finding_type": None if finding_type is None else {
            "scheme": finding_type.scheme_designator, "value": finding_type.value, "meaning": finding_type.meaning},
    }
    for measurement in group.get_measurements():
        value = numeric_value(measurement[0].MeasuredValueSequence[0])
        if code_key(measurement.name) == code_key(VOLUME):
            row["volume_ml"] = value
        elif code_key(measurement.name) == code_key(ATTENUATION):
            key = _statistic(measurement[0])
            if key is not None:
                row[key] = value
    return row


def _statistic(item: Dataset) -> str | None:
    """Which statistic an attenuation NUM holds: by its percentile rank parameter, else by its Derivation."""
    for rank in content_items(item, "NUM"):
        if code_key(rank.ConceptNameCodeSequence[0]) == code_key(PERCENTILE_RANK):
            percentile = numeric_value(rank.MeasuredValueSequence[0])
            return next((key for key, value in PERCENTILES.items() if value == percentile), None)
    derivation = next((code_key(modifier.ConceptCodeSequence[0]) for modifier in content_items(item, "CODE")
                       if code_key(modifier.ConceptNameCodeSequence[0]) == code_key(codes.DCM.Derivation)), None)
    return next((key for key, code in DERIVATIONS.items() if code is not None and code_key(code) == derivation), None)
