"""What the engine does when a DICOM series lacks its identifying UIDs: the missing-UID policy, in one place.

Every object written back to an archive (DICOM-SEG, SR) references its source by UIDs: the StudyInstanceUID it
joins, the SeriesInstanceUID and SOPInstanceUIDs of the slices it was derived from and the FrameOfReferenceUID
that places it in the patient.  Real exports sometimes leave these blank (anonymisers, research converters: the
TotalSegmentator example series has empty Study, Series and SOP Instance UIDs), and some old CT lacks a
FrameOfReferenceUID altogether.  highdicom cannot build a SEG without them, so the reader resolves each one:

==========================  ============================================================================
UID (blank or absent)       resolved to
==========================  ============================================================================
SOPInstanceUID              the file meta's MediaStorageSOPInstanceUID when present (recovered, not
                            derived); otherwise derived from the series key, the ImagePositionPatient and
                            the InstanceNumber of the file
SeriesInstanceUID           derived from the series' SOP Instance UIDs (as resolved above), sorted, so it
                            does not depend on file names or order; every thickness block of a
                            mixed-thickness series shares it
StudyInstanceUID            derived from the (resolved) SeriesInstanceUID
FrameOfReferenceUID         derived from the (resolved) SeriesInstanceUID
==========================  ============================================================================

A derived UID is ``2.25.`` followed by the decimal value of the first 15 bytes (120 bits) of a SHA-256 over the
UID's keyword and its inputs (PS3.5 B.2, a UUID-style root): at most 42 characters, valid, the same on every read
of the same files and different for different inputs.  Derived UIDs are unknown to the archive the files came
from, so a SEG referencing them will not be linked to the source images there; that is why the policy can be
switched to ``"refuse"``, which raises InputError naming the first file and the missing UID instead of deriving
(recovering a SOPInstanceUID from the file meta is allowed under both policies: the archive knows that one).

The series key used for grouping files whose SeriesInstanceUID is blank (:func:`series_key`) is part of the same
policy: the attributes that stay constant within a series identify it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ctfm_engine.errors import InputError, UsageError

MissingUIDPolicy = Literal["derive", "refuse"]
MISSING_UID_POLICIES: tuple[str, ...] = ("derive", "refuse")
DERIVED_UID_ROOT = "2.25."
DERIVED_UID_BYTES = 15
# What identifies a series whose SeriesInstanceUID is blank (besides its ImageOrientationPatient).
SERIES_ATTRIBUTES = ("StudyInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "FrameOfReferenceUID")
DERIVED_SERIES_KEY_PREFIX = "derived-"
# The UIDs a whole series shares, in the order they are checked and reported.
SHARED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


@dataclass(frozen=True)
class SeriesUIDs:
    """The resolved (never blank) UIDs of one series.

    Attributes
    ----------
    study_instance_uid, series_instance_uid, frame_of_reference_uid:
        The series' UIDs, from the files or derived.
    sop_instance_uids:
        One UID per file, in the order the files were given.
    derived:
        Keywords of the UIDs that were derived (in the order StudyInstanceUID, SeriesInstanceUID,
        FrameOfReferenceUID, SOPInstanceUID); empty when the files carry all of them.
    recovered_from_file_meta:
        How many SOPInstanceUIDs were blank in the dataset and taken from the file meta information.
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    derived: tuple[str, ...]
    recovered_from_file_meta: int


def derived_uid(*parts: str) -> str:
    """A valid, deterministic DICOM UID for ``parts``: ``2.25.`` + the first 15 bytes of their SHA-256 in decimal.

    Each part is hashed with its length in front, so ``("ab", "c")`` and ``("a", "bc")`` give different UIDs.
    """
    digest = hashlib.sha256()
    for part in parts:
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return DERIVED_UID_ROOT + str(int.from_bytes(digest.digest()[:DERIVED_UID_BYTES], "big"))


def check_policy(missing_uids: str) -> MissingUIDPolicy:
    """``missing_uids`` if it names a policy; UsageError otherwise."""
    if missing_uids not in MISSING_UID_POLICIES:
        raise UsageError(
            f"missing_uids must be one of {', '.join(repr(p) for p in MISSING_UID_POLICIES)}, not {missing_uids!r}"
        )
    return missing_uids  # type: ignore[return-value]


def series_key(header: Dataset) -> str:
    """The id that groups a file with the rest of its series: its SeriesInstanceUID, or ``derived-`` + 8 hex digits.

    Without a SeriesInstanceUID, the attributes in :data:`SERIES_ATTRIBUTES` and the ImageOrientationPatient
    (rounded to 3 decimals) identify the series.
    """
    uid = header_text(header, "SeriesInstanceUID")
    if uid:
        return uid
    orientation = tuple(f"{round(float(v), 3) + 0.0:.3f}" for v in header.get("ImageOrientationPatient") or ())
    key = (*(header_text(header, keyword) for keyword in SERIES_ATTRIBUTES), orientation)
    return DERIVED_SERIES_KEY_PREFIX + hashlib.sha1(repr(key).encode()).hexdigest()[:8]


def resolve_uids(
    key: str, files: Sequence[tuple[Path, Dataset]], missing_uids: MissingUIDPolicy = "derive"
) -> SeriesUIDs:
    """Resolve the UIDs of one series by the policy in the module docstring.

    Parameters
    ----------
    key:
        The series key of the files (:func:`series_key`); an input of derived SOP Instance UIDs.
    files:
        (path, header) of every file of the whole series (all thickness blocks), in any order.
    missing_uids:
        ``"derive"`` derives what is blank; ``"refuse"`` raises InputError naming the first file (in the given
        order) that lacks a UID.
    """
    policy = check_policy(missing_uids)
    if not files:
        raise ValueError("resolve_uids needs at least one file")
    if policy == "refuse":
        for path, header in files:
            for keyword in (*SHARED_UIDS, "SOPInstanceUID"):
                if not _uid_in(header, keyword):
                    raise InputError(
                        f"{path}: has no {keyword} (blank or absent) and missing UIDs are refused; re-export the "
                        f"series with its UIDs or let the reader derive them (missing_uids='derive')"
                    )
    derived: set[str] = set()
    sop_uids: list[str] = []
    for _path, header in files:
        uid = _uid_in(header, "SOPInstanceUID")
        if not uid:
            position = "\\".join(header_values(header, "ImagePositionPatient"))
            uid = derived_uid("SOPInstanceUID", key, position, header_text(header, "InstanceNumber"))
            derived.add("SOPInstanceUID")
        sop_uids.append(uid)

    def shared(keyword: str, *inputs: str) -> str:
        value = next((header_text(header, keyword) for _path, header in files if header_text(header, keyword)), "")
        if value:
            return value
        derived.add(keyword)
        return derived_uid(keyword, *inputs)

    series_uid = shared("SeriesInstanceUID", *sorted(sop_uids))
    study_uid = shared("StudyInstanceUID", series_uid)
    frame_uid = shared("FrameOfReferenceUID", series_uid)
    return SeriesUIDs(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_uid,
        sop_instance_uids=tuple(sop_uids),
        derived=tuple(keyword for keyword in (*SHARED_UIDS, "SOPInstanceUID") if keyword in derived),
        recovered_from_file_meta=sum(
            not header_text(header, "SOPInstanceUID") and bool(_uid_in(header, "SOPInstanceUID"))
            for _path, header in files
        ),
    )


def header_text(header: Dataset, keyword: str) -> str:
    """The attribute's value as stripped text; empty when it is absent or blank."""
    value = header.get(keyword)
    return "" if value is None else str(value).strip()


def header_values(header: Dataset, keyword: str) -> list[str]:
    """The values of a (possibly multi-valued) attribute as stripped texts; empty when it is absent or blank."""
    value = header.get(keyword)
    if value is None or value == "":
        return []
    return [str(v).strip() for v in (value if isinstance(value, MultiValue) else [value])]


def _uid_in(header: Dataset, keyword: str) -> str:
    """The UID the file carries for ``keyword``; for SOPInstanceUID the file meta's copy stands in for a blank."""
    uid = header_text(header, keyword)
    if not uid and keyword == "SOPInstanceUID":
        uid = header_text(getattr(header, "file_meta", None) or Dataset(), "MediaStorageSOPInstanceUID")
    return uid
