"""What every TID 1500 "Measurement Report" the engine writes shares: the model as observer device and algorithm,
a DICOM-SEG header to cite as evidence, and walking a written report's content items back to values.

The observer is a device (TID 1004): the model's name, manufacturer SlicerCTFM, "<name> <version>" as model name
and the sha256 of its weights as serial number, with a Device Observer UID derived from that digest (the same
model is the same device in every report).  The Algorithm Identification (TID 4019) names the model, its version,
family DCM 123110 "Artificial Intelligence" (CID 7162) and its ``key=value`` parameters (``weights_sha256=<hex>``
first).
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ctfm_engine import __version__
from ctfm_engine.dicom.seg import LO_LENGTH, MANUFACTURER, Algorithm, quiet_identifying_warnings
from ctfm_engine.errors import InputError
from ctfm_engine.io import atomic_output

AI_FAMILY = codes.cid7162.ArtificialIntelligence
SEG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}


def device_observer(algorithm: Algorithm) -> hd.sr.ObservationContext:
    """The observation context of a report the model made: the model as observer device (TID 1004)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["ctfm-device", algorithm.weights_sha256]),
        name=algorithm.name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{algorithm.name} {algorithm.version}"[:64],
        serial_number=algorithm.weights_sha256,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device)
    )


def algorithm_identification(algorithm: Algorithm) -> hd.sr.AlgorithmIdentification:
    """The model as Algorithm Identification (TID 4019) of a measurement group."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"{key}={value}" for key, value in algorithm.parameters.items()],
        family=AI_FAMILY,
        manufacturer=MANUFACTURER,
    )


def seg_header(path: Path, refusal: str) -> Dataset:
    """The header (no pixel data) of the DICOM-SEG at ``path``; InputError when it is unreadable or not a SEG, the
    latter ending ``"is not a DICOM-SEG, so " + refusal``."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as error:
        raise InputError(f"{path}: the DICOM-SEG to list as evidence cannot be read ({error})") from None
    if str(header.get("SOPClassUID", "")) not in SEG_SOP_CLASSES:
        raise InputError(f"{path}: is not a DICOM-SEG, so {refusal}")
    return header


def content_items(report: Dataset, value_type: str) -> list[Dataset]:
    """Every content item of ``value_type`` in the content tree below ``report``."""
    found: list[Dataset] = []
    pending = list(report.get("ContentSequence") or [])
    while pending:
        item = pending.pop()
        if item.get("ValueType") == value_type:
            found.append(item)
        pending.extend(item.get("ContentSequence") or [])
    return found


def numeric_value(value: Dataset) -> float:
    """A NUM item's value: the exact FloatingPointValue when present, else the (16-character) NumericValue."""
    if "FloatingPointValue" in value:
        return float(value.FloatingPointValue)
    return float(value.NumericValue)


def code_key(code: Dataset | Code) -> tuple[str, str]:
    """(scheme, value) of a code or coded item: what identifies a concept, whatever its meaning's spelling."""
    if isinstance(code, Code):
        return code.scheme_designator, code.value
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def write_report(
    path: str | Path,
    *,
    evidence: list[Dataset],
    content: hd.sr.MeasurementReport,
    entropy: list[str],
    algorithm: Algorithm,
    series_number: int,
    series_description: str,
) -> hd.sr.Comprehensive3DSR:
    """A complete Comprehensive 3D SR of ``content`` made by ``algorithm`` (manufacturer, model name, version and the
    weights' sha256 as device serial number), its UIDs derived from ``entropy`` (a re-run writes the same instance),
    saved atomically at ``path``; returns the report."""
    with quiet_identifying_warnings():
        report = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=content,
            series_instance_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
            series_number=series_number,
            sop_instance_uid=generate_uid(entropy_srcs=[*entropy, "instance"]),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            manufacturer_model_name=algorithm.name,
            software_versions=__version__,
            device_serial_number=algorithm.weights_sha256,
            series_description=series_description[:LO_LENGTH],
        )
    with atomic_output(Path(path)) as temporary:
        report.save_as(temporary, enforce_file_format=True)
    return report
