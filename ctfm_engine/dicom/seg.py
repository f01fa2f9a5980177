"""DICOM-SEG: a label map written as a Segmentation instance of the CT series it segments, and read back.

A DICOM Segmentation (PS3.3 A.51; Segmentation Storage ``1.2.840.10008.5.1.4.1.1.66.4`` for BINARY, Label Map
Segmentation Storage ``…66.7`` for LABELMAP, Sup 243) joins the CT's study as a new series.  It carries, per
segment, a Segment Description (PS3.3 C.8.20.2): a number, a label, SNOMED CT category and type codes, a
laterality modifier of the type (SCT 7771000 Left / 24028007 Right), optionally an anatomic region, a display
colour (CIELab) and how the segment was made (AUTOMATIC, with an Algorithm Identification).  Its frames are
single slices; each frame names the source slice it segments (Derivation Image Sequence) and where it lies
(Plane Position, in patient LPS millimetres), so frames must align pixel for pixel with the source slices.

Encodings (:class:`SegEncoding`): BINARY stores one bit-packed frame per (segment, slice) holding that segment,
uncompressed (what every SEG reader and the MONAI Deploy SDK writer handle) or JPEG 2000 lossless; LABELMAP
stores one 8/16-bit frame per slice with the segment number in each pixel, uncompressed, RLE or JPEG-LS
lossless: far smaller, newer (2024) and not yet read by every viewer or PACS.

Conventions of this module:

- Segments are the label values present on the source slices, renumbered 1..N in label-value order (empty
  labels are omitted: a segment without frames helps nobody and some viewers choke on it).
- The original label value of each segment is kept in its Tracking ID as ``"<name> [label <value>]"`` (with a
  Tracking UID derived from the source series and the name), so :func:`read_dicom_seg` restores the exact label
  map; a SEG written elsewhere without such Tracking IDs reads back with its segment numbers as label values.
- The model is identified by AlgorithmName/AlgorithmVersion, family "Artificial Intelligence", and
  ``AlgorithmParameters = "weights_sha256=<hex>"`` in every segment's Segmentation Algorithm Identification
  Sequence; the same digest is the instance's DeviceSerialNumber (software has no serial number, and the weights
  digest identifies exactly which model made the SEG).  ManufacturerModelName is the model name,
  SoftwareVersions the engine version.
- SeriesInstanceUID and SOPInstanceUID derive from (source series, weights sha256, encoding, label map, label
  coding), so writing the same result twice yields the same instance: a PACS re-send or an app re-run replaces
  instead of duplicating.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from ctfm_engine import __version__
from ctfm_engine.errors import InputError
from ctfm_engine.io import atomic_output
from ctfm_engine.labels import Code, Label
from ctfm_engine.models.published import STATUSES as PUBLISHED_STATUSES
from ctfm_engine.volume import CTVolume, file_format

log = logging.getLogger(__name__)

MANUFACTURER = "SlicerCTFM"
DEFAULT_SERIES_NUMBER = 901
CONTENT_LABEL = "CTFM_SEG"
# Attributes highdicom copies from the first source image by attribute access; absent ones are added empty.
PATIENT_STUDY_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
# UIDs shared by all slices that the series reader resolves when the files leave them blank: volume.dicom fields.
SERIES_UID_KEYS = {
    "StudyInstanceUID": "study_instance_uid",
    "SeriesInstanceUID": "series_instance_uid",
    "FrameOfReferenceUID": "frame_of_reference_uid",
}
DEIDENTIFICATION_UNSTATED = "not stated in the source images"
TRACKING_ID = re.compile(r"\[label (\d+)\]$")
LO_LENGTH = 64
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# A label without SNOMED coding in the table still needs a category and type: the most general honest codes.
GENERIC_CATEGORY = Code("SCT", "91723000", "Anatomical structure")
GENERIC_TYPE = Code("SCT", "91723000", "Anatomical structure")


class SegEncoding(str, Enum):
    """How the segments are stored: segmentation type and transfer syntax."""

    BINARY = "binary"  # BINARY, uncompressed: the most compatible (what the MONAI Deploy SDK writer emits)
    BINARY_J2K = "binary-j2k"  # BINARY, JPEG 2000 lossless
    LABELMAP = "labelmap"  # LABELMAP, uncompressed
    LABELMAP_RLE = "labelmap-rle"  # LABELMAP, RLE lossless
    LABELMAP_JPEGLS = "labelmap-jpegls"  # LABELMAP, JPEG-LS lossless: the smallest

    @property
    def segmentation_type(self) -> hd.seg.SegmentationTypeValues:
        if self.value.startswith("labelmap"):
            return hd.seg.SegmentationTypeValues.LABELMAP
        return hd.seg.SegmentationTypeValues.BINARY

    @property
    def transfer_syntax_uid(self) -> UID:
        return {
            SegEncoding.BINARY: ExplicitVRLittleEndian,
            SegEncoding.BINARY_J2K: JPEG2000Lossless,
            SegEncoding.LABELMAP: ExplicitVRLittleEndian,
            SegEncoding.LABELMAP_RLE: RLELossless,
            SegEncoding.LABELMAP_JPEGLS: JPEGLSLossless,
        }[self]


@dataclass(frozen=True)
class Algorithm:
    """The model that made a result: name, version, the sha256 of its weights file (64 lowercase hex digits),
    whether it is a bundled demonstration model (recorded in AlgorithmParameters and the series description) and
    how it relates to the published checkpoint its name claims (``verified``, ``size-and-keys`` or ``differs``;
    None for one that claims none), recorded in AlgorithmParameters as ``published=<status>``."""

    name: str
    version: str
    weights_sha256: str
    demonstration: bool = False
    published: str | None = None
    settings: tuple[tuple[str, str], ...] = ()  # how the model was run (spacing, post-processing), recorded too

    def __post_init__(self) -> None:
        if not self.name.strip() or len(self.name) > LO_LENGTH:
            raise ValueError(f"algorithm name must be 1 to {LO_LENGTH} characters, got {self.name!r}")
        if not self.version.strip() or len(self.version) > LO_LENGTH:
            raise ValueError(f"algorithm version must be 1 to {LO_LENGTH} characters, got {self.version!r}")
        if not SHA256_HEX.match(self.weights_sha256):
            raise ValueError(f"weights_sha256 must be 64 lowercase hex digits, got {self.weights_sha256!r}")
        if self.published is not None and self.published not in PUBLISHED_STATUSES:
            raise ValueError(f"published must be one of {', '.join(PUBLISHED_STATUSES)} or None, got "
                             f"{self.published!r}")

    @property
    def parameters(self) -> dict[str, str]:
        """What AlgorithmParameters records (``key=value`` pairs)."""
        parameters = {"weights_sha256": self.weights_sha256}
        if self.demonstration:
            parameters["demonstration"] = "true (not CT-FM, not for clinical use)"
        if self.published is not None:
            parameters["published"] = self.published
        parameters.update(self.settings)
        return parameters

    def describe(self, what: str) -> str:
        """A series description: ``"<name> <what>"``, marked when the model is a demonstration (64 characters)."""
        return (f"{self.name} {what}" + (" [DEMO, not clinical]" if self.demonstration else ""))[:LO_LENGTH]

    @classmethod
    def from_identity(cls, identity: dict[str, Any], version: str,
                      settings: dict[str, str] | None = None) -> Algorithm:
        """From a result's ``weights`` record (``{"name", "sha256", "demonstration"}`` and, for a checkpoint that is
        or claims to be a published one, ``published``), with the run's ``settings`` (e.g. spacing)."""
        published = identity.get("published")
        return cls(name=str(identity["name"])[:LO_LENGTH], version=version, weights_sha256=str(identity["sha256"]),
                   demonstration=bool(identity.get("demonstration")),
                   published=None if not published else str(published["status"]),
                   settings=tuple((settings or {}).items()))

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        """The Segmentation Algorithm Identification Sequence of every segment this algorithm made."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=self.version,
            source=MANUFACTURER,
            parameters=self.parameters,
        )


@dataclass(frozen=True)
class SegInfo:
    """What :func:`write_dicom_seg` wrote.

    ``segments`` lists (segment number, label value, segment label) in segment order; ``frames`` is the number of
    frames stored (BINARY: non-empty (segment, slice) pairs; LABELMAP: non-empty slices); ``seconds`` covers
    reading the source headers, building the instance (frame compression included) and saving it.
    """

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    encoding: SegEncoding
    segments: list[tuple[int, int, str]]
    frames: int
    bytes: int
    seconds: float


def write_dicom_seg(
    labels_zyx: np.ndarray,
    volume: CTVolume,
    label_table: dict[int, Label],
    path: str | Path,
    *,
    algorithm: Algorithm,
    encoding: SegEncoding | str = SegEncoding.BINARY,
    series_number: int = DEFAULT_SERIES_NUMBER,
    series_description: str | None = None,
) -> SegInfo:
    """Write ``labels_zyx`` as a DICOM-SEG of the series ``volume`` was read from, atomically.

    Parameters
    ----------
    labels_zyx
        Integer label map of shape ``volume.shape_zyx`` on ``volume``'s grid (0 = background), e.g.
        ``Segmentation.labels``.
    volume
        The CT volume as :func:`ctfm_engine.dicom.series.read_dicom_series` returned it; its ``dicom`` references
        (files in slice order, resolved UIDs) name the source instances.
    label_table
        Label value -> :class:`~ctfm_engine.labels.Label` (name, colour, SNOMED codes) for every value in the map.
    path
        Where the SEG file goes; nothing is left there when writing fails.
    algorithm
        The model that made the labels (recorded in every segment and as DeviceSerialNumber).
    encoding
        A :class:`SegEncoding` or its value.
    series_number, series_description
        Of the new SEG series; the description defaults to ``"<algorithm name> segmentation"``.

    Returns
    -------
    SegInfo
        Path, UIDs, segments written, frames, file size and the time taken.

    Raises
    ------
    InputError
        When ``volume`` was not read from DICOM, or its files lack a UID the reader did not resolve.
    ValueError
        When the label map does not fit ``volume`` (shape, non-integer or negative values), holds a value
        ``label_table`` does not describe, or has no labelled voxel on the source slices.

    Notes
    -----
    Frames follow the source slices.  When the volume was resampled (gantry tilt de-sheared onto a rectangular
    grid) or its grid otherwise differs from the slices, the map is sampled (nearest neighbour) at each source
    pixel's centre, computed from that slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing.
    """
    started = time.perf_counter()
    encoding = SegEncoding(encoding)
    sources = source_headers(volume)
    labels = _checked_labels(labels_zyx, volume, label_table)
    on_slices = _labels_on_source_slices(labels, volume, sources)
    values = [int(v) for v in np.unique(on_slices) if v != 0]
    if not values:
        raise ValueError(
            f"the label map of {volume.source} has no labelled voxel on the source slices; a DICOM-SEG needs at "
            f"least one segment, so write none for an empty result"
        )
    numbers = np.zeros(int(max(values)) + 1, dtype=np.uint8 if len(values) < 256 else np.uint16)
    numbers[values] = np.arange(1, len(values) + 1)
    series_uid = str(sources[0].SeriesInstanceUID)
    descriptions = [
        _segment_description(number, label_table[value], algorithm, series_uid)
        for number, value in enumerate(values, start=1)
    ]
    entropy = [
        "ctfm-dicom-seg",
        series_uid,
        algorithm.weights_sha256,
        encoding.value,
        _digest(labels),
        repr([label_table[value] for value in values]),
    ]
    with quiet_identifying_warnings():
        seg = _segmentation(
            encoding, sources, numbers[on_slices], descriptions, entropy, algorithm, series_number, series_description
        )
    path = Path(path)
    with atomic_output(path) as temporary:
        seg.save_as(temporary, enforce_file_format=True)
    info = SegInfo(
        path=path,
        sop_instance_uid=str(seg.SOPInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
        encoding=encoding,
        segments=[(number, value, label_table[value].name) for number, value in enumerate(values, start=1)],
        frames=int(seg.NumberOfFrames),
        bytes=path.stat().st_size,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "DICOM-SEG %s (%s): %d segments, %d frames, %d bytes, series %s",
        path.name,
        encoding.value,
        len(values),
        info.frames,
        info.bytes,
        info.series_instance_uid,
    )
    return info


def _segmentation(
    encoding: SegEncoding,
    sources: list[Dataset],
    segment_numbers: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    entropy: list[str],
    algorithm: Algorithm,
    series_number: int,
    series_description: str | None,
) -> hd.seg.Segmentation:
    segmentation = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segment_numbers,
        segmentation_type=encoding.segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
        series_number=series_number,
        sop_instance_uid=generate_uid(entropy_srcs=[*entropy, "instance"]),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=__version__,
        device_serial_number=algorithm.weights_sha256,
        transfer_syntax_uid=encoding.transfer_syntax_uid,
        omit_empty_frames=True,
        content_label=CONTENT_LABEL,
        content_description=f"{algorithm.name} {algorithm.version}"[:LO_LENGTH],
        series_description=(series_description or algorithm.describe("segmentation"))[:LO_LENGTH],
    )
    # Content Identification: ContentCreatorName is type 2 (present, empty for an automatic result); highdicom leaves
    # it out when no name is given, and dcmqi, the reader Slicer uses, warns about the absence.
    segmentation.ContentCreatorName = ""
    # highdicom draws the DimensionOrganizationUID at random: derive it like every other UID, so that the same
    # series, model and labels give the same object byte for byte (a re-send, the MAP and a direct run agree).
    organisation = generate_uid(entropy_srcs=[*entropy, "dimension-organization"])
    dimensions = segmentation.get("DimensionOrganizationSequence", [])
    for item in [*dimensions, *segmentation.get("DimensionIndexSequence", [])]:
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = organisation
    return segmentation


def read_dicom_seg(path: str | Path, volume: CTVolume) -> tuple[np.ndarray, dict[int, str]]:
    """Read a DICOM-SEG of ``volume``'s series back into a label map on ``volume``'s grid.

    Parameters
    ----------
    path
        A BINARY or LABELMAP DICOM-SEG whose frames reference slices of the series ``volume`` was read from
        (written by :func:`write_dicom_seg` or by another tool, e.g. dcmqi).
    volume
        The CT volume of the referenced series, from :func:`~ctfm_engine.dicom.series.read_dicom_series`.

    Returns
    -------
    labels_zyx : np.ndarray
        Unsigned integer label map of shape ``volume.shape_zyx``: each segment's pixels carry its original label
        value (from the Tracking ID ``"… [label <value>]"`` this module writes; otherwise the segment number).
    names : dict[int, str]
        Label value -> SegmentLabel for every segment but background (a LABELMAP's segment 0).

    Raises
    ------
    InputError
        When the file is not a readable DICOM-SEG, references none of the volume's slices, states or shows frames
        not aligned with the slices they reference, or holds overlapping or fractional segments.

    Notes
    -----
    On a volume whose grid is its slices' (the usual case) this reproduces the written map voxel for voxel.  On a
    gantry-tilted series the SEG's frames hold exactly what was written on the tilted source slices; they are
    read back by sampling them (nearest neighbour) at the de-sheared grid's voxel centres, so the result may
    differ from the map given to :func:`write_dicom_seg` by one voxel at structure borders.
    """
    path = Path(path)
    seg = _read_seg(path)
    sources = source_headers(volume)
    slice_uids = [str(header.SOPInstanceUID) for header in sources]
    referenced = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    if not referenced & set(slice_uids):
        raise InputError(
            f"{path}: segments another series (it references none of the {len(slice_uids)} slices of "
            f"{volume.source}); read it with the series it was made from"
        )
    if not referenced <= set(slice_uids):
        log.warning(
            "%s: references %d instances outside series %s; only the frames on its slices are read",
            path.name,
            len(referenced - set(slice_uids)),
            sources[0].SeriesInstanceUID,
        )
    _check_frames_aligned(path, seg, sources)
    try:
        stack = seg.get_pixels_by_source_instance(
            slice_uids,
            combine_segments=True,
            ignore_spatial_locations=True,  # checked above against the slices' own positions
            assert_missing_frames_are_empty=True,
        )
    except (RuntimeError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise InputError(
            f"{path}: its segments cannot be combined into one label map ({reason}); use a SEG with "
            f"non-overlapping binary segments"
        ) from None
    label_values = _label_values(seg)
    lookup = np.zeros(max(int(stack.max()), max(label_values)) + 1, dtype=np.int64)
    for number, value in label_values.items():
        lookup[number] = value
    dtype = np.min_scalar_type(int(lookup.max()))
    on_slices = lookup[stack].astype(dtype)
    names = {value: str(seg.get_segment_description(number).SegmentLabel)
             for number, value in label_values.items() if value != 0}  # 0: a LABELMAP's Background segment
    if _slices_are_grid(volume, sources):
        return on_slices, names
    return _slices_on_grid(on_slices, volume, sources).astype(dtype), names


@contextmanager
def quiet_identifying_warnings() -> Iterator[None]:
    """Silence highdicom's warning about unusual person names: it quotes the patient's name, which logs never hold."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The string .* person name", category=UserWarning)
        yield


def _source_files(volume: CTVolume, needed_by: str) -> list[str]:
    files = volume.dicom.files
    if not files:
        kind = file_format(Path(volume.source)) or "non-DICOM"
        raise InputError(
            f"{needed_by} needs the DICOM series it describes; {volume.source} is a {kind} file: give the folder "
            f"of the DICOM series instead"
        )
    return [str(file) for file in files]


def _checked_labels(labels_zyx: np.ndarray, volume: CTVolume, label_table: dict[int, Label]) -> np.ndarray:
    labels = np.asarray(labels_zyx)
    if labels.shape != volume.shape_zyx:
        raise ValueError(
            f"the label map has shape {labels.shape} but {volume.source} has {volume.shape_zyx} (z, y, x); map the "
            f"labels back onto the source grid before writing a DICOM-SEG"
        )
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"the label map holds {labels.dtype} values; a DICOM-SEG needs integer label values")
    values = np.unique(labels)
    if values.size and values[0] < 0:
        raise ValueError(f"the label map holds the negative label value {int(values[0])}; label values are >= 0")
    unknown = [int(v) for v in values if v != 0 and int(v) not in label_table]
    if unknown:
        raise ValueError(
            f"the label map holds label value(s) {unknown[:10]} that the label table does not describe (it knows "
            f"{len(label_table)} labels); pass the label table of the model that made the map"
        )
    return labels


def source_headers(volume: CTVolume, needed_by: str = "a DICOM-SEG") -> list[Dataset]:
    """The headers (no pixel data) of the slices ``volume`` was read from, in volume slice order.

    Blank Study/Series/SOP Instance, SOP Class and Frame of Reference UIDs are filled with the ones the series
    reader resolved (``volume.dicom``), patient/study attributes the files lack are added empty, and a blank
    DeidentificationMethod of de-identified files says it was not stated, so that the headers can stand as the
    source images of a SEG or the evidence of an SR (which copy the patient and study modules from them).
    InputError for a volume not read from DICOM (naming ``needed_by``, the object to be written), or a blank UID
    the reader did not resolve.
    """
    files = _source_files(volume, needed_by)
    references = volume.dicom
    sop_uids = list(references.sop_instance_uids)
    if len(sop_uids) != len(files):
        sop_uids = [""] * len(files)
    headers = []
    for file, sop_uid in zip(files, sop_uids, strict=True):
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as error:
            raise InputError(f"{file}: cannot be read again to reference it from a DICOM object ({error})") from None
        _fill(header, "SOPInstanceUID", sop_uid, file)
        file_meta = getattr(header, "file_meta", None) or Dataset()
        _fill(header, "SOPClassUID", str(references.sop_class_uid or file_meta.get(
            "MediaStorageSOPClassUID", "")), file)
        for keyword, key in SERIES_UID_KEYS.items():
            _fill(header, keyword, str(getattr(references, key) or ""), file)
        for keyword in PATIENT_STUDY_KEYWORDS:
            if keyword not in header:
                setattr(header, keyword, None)
        if (
            str(header.get("PatientIdentityRemoved", "")).upper() == "YES"
            and not header.get("DeidentificationMethod")
            and not header.get("DeidentificationMethodCodeSequence")
        ):
            # Type 1C once identity is removed: some anonymisers leave it blank, and the copy must not be invalid.
            header.DeidentificationMethod = DEIDENTIFICATION_UNSTATED
        if "SpecificCharacterSet" in header and not header.SpecificCharacterSet:
            del header.SpecificCharacterSet  # blank means the default repertoire, which highdicom spells by absence
        headers.append(header)
    return headers


def _fill(header: Dataset, keyword: str, resolved: str, file: str) -> None:
    if str(header.get(keyword) or "").strip():
        return
    if not resolved:
        raise InputError(
            f"{file}: its {keyword} is blank and the series reader resolved none, so a DICOM object cannot "
            f"reference it; give the series with complete UIDs"
        )
    setattr(header, keyword, resolved)


def _segment_description(
    number: int, label: Label, algorithm: Algorithm, series_uid: str
) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name[:LO_LENGTH],
        segmented_property_category=coded_concept(label.category or GENERIC_CATEGORY),
        segmented_property_type=coded_concept(label.type or GENERIC_TYPE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.identification(),
        tracking_uid=segment_tracking_uid(label, series_uid),
        tracking_id=segment_tracking_id(label),
        anatomic_regions=[coded_concept(label.region)] if label.region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*label.color_rgb),
    )
    # highdicom has no argument for these modifiers (laterality): they sit inside the coded items.
    if label.type_modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            coded_concept(label.type_modifier)
        ]
    if label.region is not None and label.region_modifier is not None:
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [coded_concept(label.region_modifier)]
    return description


def segment_tracking_id(label: Label) -> str:
    """The Tracking ID of ``label``'s segment, ``"<name> [label <value>]"``: a report about the segment reuses it."""
    suffix = f" [label {label.value}]"
    return label.name[: LO_LENGTH - len(suffix)] + suffix


def segment_tracking_uid(label: Label, series_uid: str) -> str:
    """The Tracking UID of ``label``'s segment in a SEG of the series ``series_uid`` (derived from both, so every
    object about that structure of that series, a SEG or a measurement report, names it the same)."""
    return generate_uid(entropy_srcs=["ctfm-segment", series_uid, label.name])


def coded_concept(code: Code) -> hd.sr.CodedConcept:
    """A label table's code as highdicom's coded concept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _digest(labels: np.ndarray) -> str:
    digest = hashlib.sha256(repr(labels.shape).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    return digest.hexdigest()


def _read_seg(path: Path) -> hd.seg.Segmentation:
    if not path.is_file():
        raise InputError(f"{path}: does not exist; give the DICOM-SEG file")
    try:
        seg = hd.seg.segread(path)
    except Exception as error:  # highdicom/pydicom signal unreadable or non-SEG files with many exception types
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise InputError(f"{path}: is not a readable DICOM-SEG ({reason}); give a DICOM Segmentation file") from None
    if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        raise InputError(
            f"{path}: is a FRACTIONAL segmentation (probabilities or occupancies), which is not a label map; give a "
            f"BINARY or LABELMAP DICOM-SEG"
        )
    return seg


def _label_values(seg: hd.seg.Segmentation) -> dict[int, int]:
    """Segment number -> original label value (Tracking ID ``… [label N]``, else the segment number)."""
    values = {}
    for number in seg.segment_numbers:
        match = TRACKING_ID.search(str(seg.get_segment_description(number).get("TrackingID") or ""))
        values[int(number)] = int(match.group(1)) if match else int(number)
    return values


def _plane(header: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A slice's first-pixel centre, row and column unit vectors (LPS) and (row, column) pixel spacing in mm."""
    cosines = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
    row, column = cosines[:3] / np.linalg.norm(cosines[:3]), cosines[3:] / np.linalg.norm(cosines[3:])
    spacing = np.asarray(header.PixelSpacing, dtype=np.float64)
    return np.asarray(header.ImagePositionPatient, dtype=np.float64), row, column, spacing


def _tolerance_mm(volume: CTVolume) -> float:
    return 0.1 * min(volume.spacing_xyz_mm)


def _slices_are_grid(volume: CTVolume, sources: list[Dataset]) -> bool:
    """True when slice k of the source is slice k of ``volume``'s grid (same pixels at the same LPS points)."""
    if volume.dicom.resampled_for_tilt:
        return False
    first = sources[0]
    if volume.shape_zyx != (len(sources), int(first.Rows), int(first.Columns)):
        return False
    tolerance = _tolerance_mm(volume)
    far_corner = np.array([0, int(first.Rows) - 1, int(first.Columns) - 1])
    for k, header in enumerate(sources):
        position, row, column, spacing = _plane(header)
        corner = position + far_corner[2] * spacing[1] * row + far_corner[1] * spacing[0] * column
        expected = volume.zyx_index_to_lps(np.array([[k, 0, 0], [k, *far_corner[1:]]]))
        if np.abs(expected - np.stack([position, corner])).max() > tolerance:
            return False
    return True


def _slice_points(header: Dataset) -> np.ndarray:
    """LPS centres of every pixel of a slice, shape (rows, columns, 3)."""
    position, row, column, spacing = _plane(header)
    rows = np.arange(int(header.Rows), dtype=np.float64)[:, None, None] * spacing[0] * column
    columns = np.arange(int(header.Columns), dtype=np.float64)[None, :, None] * spacing[1] * row
    return position + rows + columns


def _labels_on_source_slices(labels: np.ndarray, volume: CTVolume, sources: list[Dataset]) -> np.ndarray:
    """The label map on the source slices, shape (slices, rows, columns), nearest neighbour where resampling."""
    if _slices_are_grid(volume, sources):
        return labels
    grid = volume.grid
    first = sources[0]
    out = np.zeros((len(sources), int(first.Rows), int(first.Columns)), dtype=labels.dtype)
    for k, header in enumerate(sources):
        index = np.rint(grid.lps_to_zyx_index(_slice_points(header))).astype(np.int64)
        inside = np.all((index >= 0) & (index < np.asarray(grid.shape_zyx)), axis=-1)
        out[k][inside] = labels[tuple(index[inside].T)]
    return out


def _slices_on_grid(on_slices: np.ndarray, volume: CTVolume, sources: list[Dataset]) -> np.ndarray:
    """Source-slice labels (slices, rows, columns) sampled at ``volume``'s voxel centres, nearest neighbour.

    The slices are parallel (one ImageOrientationPatient) but may be shifted sideways (gantry tilt): a voxel takes
    the value of the nearest slice along the normal (within half a slice step) at its in-plane pixel there.
    """
    _, row, column, spacing = _plane(sources[0])
    normal = np.cross(row, column)
    positions = np.array([_plane(header)[0] for header in sources])
    heights = positions @ normal
    half_step = 0.5 * float(np.median(np.diff(heights))) if len(heights) > 1 else _tolerance_mm(volume)
    grid = volume.grid
    out = np.zeros(grid.shape_zyx, dtype=on_slices.dtype)
    y, x = np.mgrid[0 : grid.shape_zyx[1], 0 : grid.shape_zyx[2]]
    for z in range(grid.shape_zyx[0]):
        points = grid.zyx_index_to_lps(np.stack([np.full_like(y, z), y, x], axis=-1))
        k = np.clip(np.searchsorted(heights, points @ normal), 1, len(heights) - 1)
        k = np.where(np.abs(points @ normal - heights[k - 1]) <= np.abs(points @ normal - heights[k]), k - 1, k)
        offset = points - positions[k]
        r = np.rint(offset @ column / spacing[0]).astype(np.int64)
        c = np.rint(offset @ row / spacing[1]).astype(np.int64)
        inside = (np.abs(points @ normal - heights[k]) <= half_step + 1e-6) & (r >= 0) & (c >= 0)
        inside &= (r < on_slices.shape[1]) & (c < on_slices.shape[2])
        out[z][inside] = on_slices[k[inside], r[inside], c[inside]]
    return out


def _check_frames_aligned(path: Path, seg: hd.seg.Segmentation, sources: list[Dataset]) -> None:
    """Refuse frames that do not lie exactly on the source slice they reference (position or orientation)."""
    by_uid = {str(header.SOPInstanceUID): header for header in sources}
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()
    spacing = float(min(_plane(sources[0])[3]))
    for number, frame in enumerate(seg.get("PerFrameFunctionalGroupsSequence") or [], start=1):
        referenced = [
            (source, str(source.ReferencedSOPInstanceUID))
            for derivation in frame.get("DerivationImageSequence") or []
            for source in derivation.get("SourceImageSequence") or []
        ]
        if not referenced:
            raise InputError(
                f"{path}: frame {number} does not name the slice it segments (no Derivation Image Sequence), so "
                f"it cannot be placed on the series; give a SEG that references its source slices"
            )
        for source, uid in referenced:
            header = by_uid.get(uid)
            if header is None:
                continue
            if str(source.get("SpatialLocationsPreserved", "")).upper() == "NO":
                raise InputError(
                    f"{path}: frame {number} states that its pixels are not aligned with slice {uid} it was "
                    f"derived from; this reader needs frames aligned with the source slices"
                )
            position, row, column, _ = _plane(header)
            frame_position = _functional(frame, shared, "PlanePositionSequence", "ImagePositionPatient")
            frame_cosines = _functional(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
            misplaced = frame_position is not None and np.abs(frame_position - position).max() > 0.05 * spacing
            turned = frame_cosines is not None and np.abs(frame_cosines - np.r_[row, column]).max() > 1e-3
            if misplaced or turned:
                raise InputError(
                    f"{path}: frame {number} lies elsewhere than slice {uid} it references (position or "
                    f"orientation differs); this reader needs frames aligned with the source slices"
                )


def _functional(frame: Dataset, shared: Dataset, sequence: str, keyword: str) -> np.ndarray | None:
    for group in (frame, shared):
        items: Any = group.get(sequence)
        if items and keyword in items[0]:
            return np.asarray(items[0].get(keyword), dtype=np.float64)
    return None
