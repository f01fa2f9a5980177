"""Pick the CT series to process from a folder of mixed studies, by explicit rules, saying why others were skipped.

An archive export or a PACS retrieve rarely holds just the series a model should see: a CT study carries
localizers (scouts, ImageType ``…\\LOCALIZER``), thin and thick reconstructions with different convolution
kernels, derived reformats (ImageType value 1 ``DERIVED``, e.g. coronal MPRs or MIPs), dose reports and other
modalities.  :class:`SelectionRules` states what is acceptable; :func:`select_series` applies them to every
series of a folder (all studies, any depth) and returns the chosen one with a reason for each one skipped.

Candidates are the readable units of :mod:`ctfm_engine.dicom.series`: a series, or one thickness block
(``{series_id}#{thickness}mm``) of a series that mixes slice thicknesses; the ``series_id`` of a candidate is what
:func:`~ctfm_engine.dicom.series.read_dicom_series` accepts as ``series_uid``.  Objects that are not images (SEG,
SR, RTSTRUCT, ...) are never candidates.  Only headers are read.

Rules, in the order their reasons are reported:

- ``modalities``: Modality must be one of these (``"modality MR"``);
- ``exclude_localizers``: no image of the series may have LOCALIZER in its ImageType (``"localizer"``);
- ``require_original``: ImageType value 1, when present, must be ORIGINAL (``"ImageType DERIVED"``).  A series
  without ImageType (older scanners, some anonymisers: the Slicer head CT) cannot be judged and is not skipped for
  it; its ``image_type`` is empty.  Multi-frame Enhanced CT is not readable yet and always skipped;
- ``orientation``: the plane the slice normal is closest to (from ImageOrientationPatient) must be this one, at most
  ``max_obliquity_deg`` off it (``"coronal"``, ``"oblique (44 degrees from axial)"``).  40 degrees admits any
  clinical gantry tilt (at most 30 degrees), whether the scanner records it in the orientation (tilted
  ImageOrientationPatient) or as a shear of the positions, and refuses reformats near a diagonal;
- ``min_slices``: at least this many images (``"3 slices < 10"``);
- ``max_thickness_mm``: SliceThickness at most this (``"thickness 7 mm > 5 mm"``).

Among the eligible series the best is, in this order: the one whose ConvolutionKernel matches the earliest of
``preferred_kernels`` (case-insensitive regular expressions searched in the kernel name), the one whose
SliceThickness is closest to ``preferred_thickness_mm``, the one with most slices, the lowest SeriesNumber, and
finally the smallest series id, so the choice never depends on file order.  The others are skipped as
``"ranked below {id}: …"``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ctfm_engine.dicom.series import (
    ENHANCED_CT_CLASSES,
    DicomFile,
    group_series,
    scan_folder,
    slice_thickness_mm,
    sop_class_uid,
    thickness_blocks,
)
from ctfm_engine.dicom.uids import header_text, header_values, resolve_uids
from ctfm_engine.errors import InputError, UsageError

log = logging.getLogger(__name__)

PLANES = ("sagittal", "coronal", "axial")  # the plane whose normal is LPS axis 0, 1, 2
YAML_SUFFIXES = {".yaml", ".yml"}


@dataclass(frozen=True)
class SelectionRules:
    """What a series must be to be processed, and which one wins among several (see the module docstring).

    Attributes
    ----------
    modalities:
        Acceptable Modality values.
    orientation:
        ``"axial"``, ``"coronal"``, ``"sagittal"``, or None to accept any.
    max_obliquity_deg:
        How far (degrees) the slice normal may be from the axis of ``orientation``.
    require_original:
        Skip series whose ImageType value 1 is not ORIGINAL (a series without ImageType is not skipped).
    exclude_localizers:
        Skip series holding localizer (scout) images.
    min_slices:
        Fewest images a series may have (at least 2: a volume needs two slices).
    preferred_kernels:
        Case-insensitive regular expressions for the ConvolutionKernel, best first.
    preferred_thickness_mm:
        The SliceThickness to prefer (closest wins); None for no preference.
    max_thickness_mm:
        Thickest acceptable SliceThickness; None for no limit.

    Raises
    ------
    UsageError
        A rule of the wrong type or out of range, naming the rule.
    """

    modalities: tuple[str, ...] = ("CT",)
    orientation: str | None = "axial"
    max_obliquity_deg: float = 40.0
    require_original: bool = True
    exclude_localizers: bool = True
    min_slices: int = 10
    preferred_kernels: tuple[str, ...] = ()
    preferred_thickness_mm: float | None = None
    max_thickness_mm: float | None = None

    def __post_init__(self) -> None:
        modalities = _strings("modalities", self.modalities)
        if not modalities:
            raise UsageError('selection rule modalities must name at least one modality, e.g. ["CT"]')
        object.__setattr__(self, "modalities", tuple(modality.upper() for modality in modalities))
        if self.orientation is not None and self.orientation not in PLANES:
            raise UsageError(
                f"selection rule orientation must be 'axial', 'coronal', 'sagittal' or null, not {self.orientation!r}"
            )
        object.__setattr__(self, "max_obliquity_deg", _number("max_obliquity_deg", self.max_obliquity_deg, 0, 90))
        for name in ("require_original", "exclude_localizers"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"selection rule {name} must be true or false, not {getattr(self, name)!r}")
        if isinstance(self.min_slices, bool) or not isinstance(self.min_slices, int) or self.min_slices < 2:
            raise UsageError(f"selection rule min_slices must be a whole number of at least 2, not {self.min_slices!r}")
        kernels = _strings("preferred_kernels", self.preferred_kernels)
        for pattern in kernels:
            try:
                re.compile(pattern)
            except re.error as error:
                raise UsageError(
                    f"selection rule preferred_kernels holds {pattern!r}, which is not a regular expression ({error})"
                ) from None
        object.__setattr__(self, "preferred_kernels", kernels)
        for name in ("preferred_thickness_mm", "max_thickness_mm"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _number(name, getattr(self, name), 0, math.inf, open_low=True))

    @classmethod
    def from_file(cls, path: str | Path) -> SelectionRules:
        """Rules from a JSON file (YAML for ``.yaml``/``.yml`` when PyYAML is installed) holding a mapping of the
        attribute names to values; absent keys keep their defaults, unknown keys raise UsageError naming them."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"{path}: no such selection rules file; give a JSON file of selection rules")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path}: is not a UTF-8 text file; give a JSON file of selection rules") from None
        if path.suffix.lower() in YAML_SUFFIXES:
            try:
                import yaml
            except ImportError:
                raise UsageError(f"{path}: is YAML but PyYAML is not installed; install pyyaml or use JSON") from None
            try:
                document = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise UsageError(f"{path}: is not valid YAML ({_first_line(error)}); fix the rules file") from None
        else:
            try:
                document = json.loads(text)
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}: is not valid JSON ({error}); fix the rules file") from None
        if not isinstance(document, dict):
            raise UsageError(
                f"{path}: must hold a mapping of selection rules, not a {type(document).__name__}; write an object "
                f'such as {{"min_slices": 10}}'
            )
        known = [field.name for field in fields(cls)]
        unknown = [key for key in document if key not in known]
        if unknown:
            raise UsageError(
                f"{path}: unknown selection rule {unknown[0]!r}; remove it or use one of {', '.join(known)}"
            )
        try:
            return cls(**document)
        except UsageError as error:
            raise UsageError(f"{path}: {error}; fix the rules file") from None

    def as_dict(self) -> dict[str, Any]:
        """The rules as JSON-ready values (tuples as lists), the same keys :meth:`from_file` reads."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class SeriesCandidate:
    """One readable series (or thickness block) of a folder, described from its headers; no patient data.

    Attributes
    ----------
    series_id:
        What :func:`~ctfm_engine.dicom.series.read_dicom_series` accepts as ``series_uid``.
    study_instance_uid, series_instance_uid:
        Resolved UIDs (derived when blank in the files, see :mod:`ctfm_engine.dicom.uids`).
    modality, series_number, description:
        Modality, SeriesNumber (None when absent) and SeriesDescription.
    instances:
        Number of image files.
    image_type:
        ImageType values of the first file.
    kernel:
        ConvolutionKernel values joined by ``\\``; empty when absent.
    thickness_mm:
        SliceThickness in mm; None when absent.
    plane, obliquity_deg:
        ``"axial"``, ``"coronal"`` or ``"sagittal"``: the plane the slice normal is closest to, and the angle
        (degrees) between the normal and that plane's axis; ``"unknown"`` and None without a usable
        ImageOrientationPatient.
    tilt_deg:
        Angle (degrees) between the slice normal and the line through the first and last slice positions: the
        gantry tilt of a sheared stack, 0 for a straight one; None when it cannot be measured.
    localizer:
        Whether any image has LOCALIZER in its ImageType.
    sop_class_uid:
        SOP Class UID of the first file.
    transfer_syntax:
        Name(s) of the transfer syntax(es) the files are stored in, joined by `` + ``.
    derived_uids:
        Keywords of the UIDs that are derived because the files leave them blank.
    files:
        The image files.
    """

    series_id: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    description: str
    instances: int
    image_type: tuple[str, ...]
    kernel: str
    thickness_mm: float | None
    plane: str
    obliquity_deg: float | None
    tilt_deg: float | None
    localizer: bool
    sop_class_uid: str
    transfer_syntax: str
    derived_uids: tuple[str, ...]
    files: tuple[Path, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (file paths as strings)."""
        document = {field.name: getattr(self, field.name) for field in fields(self)}
        document["image_type"] = list(self.image_type)
        document["derived_uids"] = list(self.derived_uids)
        document["files"] = [str(path) for path in self.files]
        return document

    @property
    def label(self) -> str:
        """A short description for logs and messages: id, series number, modality, count and description."""
        number = "no series number" if self.series_number is None else f"series {self.series_number}"
        modality = self.modality or "unknown modality"
        description = self.description or "no description"
        return f"{self.series_id} ({number}, {modality}, {self.instances} images, '{description}')"


@dataclass(frozen=True)
class SeriesSelection:
    """The outcome of :func:`select_series`: the chosen candidate and every other with the reason it was skipped."""

    chosen: SeriesCandidate
    skipped: list[tuple[SeriesCandidate, str]]
    rules: SelectionRules

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record: the rules, the chosen series and the skipped ones with their reasons."""
        return {
            "rules": self.rules.as_dict(),
            "chosen": self.chosen.as_dict(),
            "skipped": [{**candidate.as_dict(), "reason": reason} for candidate, reason in self.skipped],
        }


def list_series(folder: str | Path) -> list[SeriesCandidate]:
    """Every readable series (or thickness block) of the image files under ``folder``, from headers only.

    Raises InputError for an empty folder, one without DICOM images, or a damaged DICOM file.
    """
    candidates = []
    for key, files in group_series(scan_folder(Path(folder))).items():
        uids = resolve_uids(key, [(file.path, file.header) for file in files], "derive")
        for series_id, block in thickness_blocks(key, files).items():
            first = block[0].header
            plane, obliquity = _plane(first)
            number = header_text(first, "SeriesNumber")
            candidates.append(
                SeriesCandidate(
                    series_id=series_id,
                    study_instance_uid=uids.study_instance_uid,
                    series_instance_uid=uids.series_instance_uid,
                    modality=header_text(first, "Modality"),
                    series_number=int(float(number)) if _is_number(number) else None,
                    description=header_text(first, "SeriesDescription"),
                    instances=len(block),
                    image_type=tuple(header_values(first, "ImageType")),
                    kernel="\\".join(header_values(first, "ConvolutionKernel")),
                    thickness_mm=slice_thickness_mm(first),
                    plane=plane,
                    obliquity_deg=obliquity,
                    tilt_deg=_tilt_deg(block),
                    localizer=any("LOCALIZER" in _upper_values(file.header, "ImageType") for file in block),
                    sop_class_uid=sop_class_uid(first),
                    transfer_syntax=_transfer_syntaxes(block),
                    derived_uids=uids.derived,
                    files=tuple(file.path for file in block),
                )
            )
    return candidates


def select_series(folder: str | Path, rules: SelectionRules | None = None) -> SeriesSelection:
    """The series of ``folder`` (all studies, any depth) to process under ``rules`` (default rules when None).

    Logs one INFO line per skipped series with its reason.  Raises InputError, listing every series with the
    reason it was skipped, when none is eligible.
    """
    return select_candidates(list_series(folder), rules or SelectionRules(), source=str(folder))


def select_candidates(candidates: Sequence[SeriesCandidate], rules: SelectionRules, *, source: str) -> SeriesSelection:
    """Apply ``rules`` to ``candidates`` (e.g. from :func:`list_series`); ``source`` names where they came from."""
    if not candidates:
        raise InputError(f"{source}: holds no image series; give a folder that holds a CT series")
    eligible: list[SeriesCandidate] = []
    skipped: list[tuple[SeriesCandidate, str]] = []
    for candidate in candidates:
        reasons = reasons_against(candidate, rules)
        if reasons:
            skipped.append((candidate, ", ".join(reasons)))
        else:
            eligible.append(candidate)
    if not eligible:
        listing = "; ".join(f"{candidate.label}: {reason}" for candidate, reason in skipped)
        raise InputError(
            f"{source}: holds no series that meets the selection rules ({listing}); give a folder with a series "
            f"that meets them or relax the rules"
        )
    ranked = sorted(eligible, key=lambda candidate: _rank(candidate, rules))
    chosen = ranked[0]
    skipped += [(candidate, _ranked_below(candidate, chosen, rules)) for candidate in ranked[1:]]
    for candidate, reason in skipped:
        log.info("%s: skipped %s: %s", source, candidate.label, reason)
    log.info("%s: selected %s", source, chosen.label)
    return SeriesSelection(chosen=chosen, skipped=skipped, rules=rules)


def reasons_against(candidate: SeriesCandidate, rules: SelectionRules) -> list[str]:
    """Why ``rules`` exclude ``candidate``, in words; empty when it is eligible."""
    reasons = []
    if candidate.modality.upper() not in rules.modalities:
        reasons.append(f"modality {candidate.modality or 'unknown'}")
    if rules.exclude_localizers and candidate.localizer:
        reasons.append("localizer")
    if rules.require_original and candidate.image_type and candidate.image_type[0].upper() != "ORIGINAL":
        reasons.append(f"ImageType {candidate.image_type[0]}")
    if candidate.sop_class_uid in ENHANCED_CT_CLASSES:
        reasons.append(f"multi-frame {ENHANCED_CT_CLASSES[candidate.sop_class_uid]} (not supported yet)")
    if rules.orientation is not None:
        if candidate.plane != rules.orientation:
            reasons.append(candidate.plane if candidate.plane in PLANES else "unknown orientation")
        elif candidate.obliquity_deg is not None and candidate.obliquity_deg > rules.max_obliquity_deg:
            reasons.append(f"oblique ({candidate.obliquity_deg:.0f} degrees from {candidate.plane})")
    if candidate.instances < rules.min_slices:
        noun = "slice" if candidate.instances == 1 else "slices"
        reasons.append(f"{candidate.instances} {noun} < {rules.min_slices}")
    if rules.max_thickness_mm is not None:
        if candidate.thickness_mm is None:
            reasons.append("thickness unknown")
        elif candidate.thickness_mm > rules.max_thickness_mm:
            reasons.append(f"thickness {candidate.thickness_mm:g} mm > {rules.max_thickness_mm:g} mm")
    return reasons


def _rank(candidate: SeriesCandidate, rules: SelectionRules) -> tuple[int, float, int, float, str]:
    """Sort key, smaller is better: kernel preference, thickness gap, slice count, series number, id."""
    kernel_rank = next(
        (k for k, pattern in enumerate(rules.preferred_kernels) if re.search(pattern, candidate.kernel, re.IGNORECASE)),
        len(rules.preferred_kernels),
    )
    if rules.preferred_thickness_mm is None:
        thickness_gap = 0.0
    elif candidate.thickness_mm is None:
        thickness_gap = math.inf
    else:
        thickness_gap = abs(candidate.thickness_mm - rules.preferred_thickness_mm)
    number = math.inf if candidate.series_number is None else float(candidate.series_number)
    return kernel_rank, thickness_gap, -candidate.instances, number, candidate.series_id


def _ranked_below(candidate: SeriesCandidate, chosen: SeriesCandidate, rules: SelectionRules) -> str:
    mine, best = _rank(candidate, rules), _rank(chosen, rules)
    if mine[0] != best[0]:
        detail = f"kernel {candidate.kernel or 'unknown'} matches the preferred kernels less well than {chosen.kernel}"
    elif mine[1] != best[1]:
        detail = (
            f"thickness {_mm(candidate.thickness_mm)} is further from the preferred {rules.preferred_thickness_mm:g} "
            f"mm than {_mm(chosen.thickness_mm)}"
        )
    elif mine[2] != best[2]:
        detail = f"fewer slices ({candidate.instances} < {chosen.instances})"
    elif mine[3] != best[3]:
        detail = f"later series number ({candidate.series_number} after {chosen.series_number})"
    else:
        detail = "equal rank, later series id"
    return f"ranked below {chosen.series_id}: {detail}"


def _plane(header: Dataset) -> tuple[str, float | None]:
    try:
        cosines = np.array([float(v) for v in header_values(header, "ImageOrientationPatient")])
    except ValueError:
        return "unknown", None
    if cosines.shape != (6,):
        return "unknown", None
    normal = np.cross(cosines[:3], cosines[3:])
    length = float(np.linalg.norm(normal))
    if length < 0.5:
        return "unknown", None
    normal = np.abs(normal / length)
    axis = int(np.argmax(normal))
    return PLANES[axis], math.degrees(math.acos(min(1.0, float(normal[axis]))))


def _tilt_deg(block: list[DicomFile]) -> float | None:
    plane, _ = _plane(block[0].header)
    if plane == "unknown":
        return None
    try:
        positions = np.array([[float(v) for v in header_values(file.header, "ImagePositionPatient")] for file in block])
    except ValueError:
        return None
    if positions.ndim != 2 or positions.shape[1] != 3:
        return None
    if len(block) < 2:
        return 0.0
    cosines = np.array([float(v) for v in header_values(block[0].header, "ImageOrientationPatient")])
    normal = np.cross(cosines[:3], cosines[3:])
    normal /= np.linalg.norm(normal)
    heights = positions @ normal
    span = positions[int(np.argmax(heights))] - positions[int(np.argmin(heights))]
    along = float(span @ normal)
    if along <= 0:
        return None
    return math.degrees(math.atan2(float(np.linalg.norm(span - along * normal)), along))


def _transfer_syntaxes(block: list[DicomFile]) -> str:
    names = []
    for file in block:
        uid = header_text(getattr(file.header, "file_meta", None) or Dataset(), "TransferSyntaxUID")
        name = UID(uid).name if uid else "unknown"
        if name not in names:
            names.append(name)
    return " + ".join(names)


def _upper_values(header: Dataset, keyword: str) -> list[str]:
    return [value.upper() for value in header_values(header, keyword)]


def _strings(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"selection rule {name} must be a list of strings, not {value!r}")
    return tuple(value)


def _number(name: str, value: object, low: float, high: float, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"selection rule {name} must be a number, not {value!r}")
    if (value <= low if open_low else value < low) or value > high:
        bounds = f"above {low:g}" if open_low else f"from {low:g}"
        limit = "" if math.isinf(high) else f" to {high:g}"
        raise UsageError(f"selection rule {name} must be {bounds}{limit}, not {value!r}")
    return float(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _mm(thickness: float | None) -> str:
    return "unknown" if thickness is None else f"{thickness:g} mm"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
