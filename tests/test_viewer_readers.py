"""What the viewers' own DICOM-SEG readers make of our SEGs (issue 20): every encoding write_dicom_seg offers, on
three real series, read by highdicom, pydicom, dcmqi's segimage2itkimage (the reader of 3D Slicer's
QuantitativeReporting) and the Cornerstone3D adapters under Node (OHIF 3.13.2's SEG loading, tests/readers_js).

Every reader's result is compared voxel for voxel, slice by slice (matched by SOP Instance UID), with our label map
where the source slices lie; where a reader refuses an encoding, the refusal itself is asserted.  OUTCOMES is the
table of both, and every cell of it is asserted here.

Series: (a) the JPEG 2000 abdomen with TotalSegmentator's 31 structures; (b) the gantry-tilted head, one SEG per
thickness block (4 mm and 7 mm); (c) an oblique series derived here from the Slicer head CT: its slices, pixels
untouched, re-placed by a rotation (new ImageOrientationPatient/ImagePositionPatient and UIDs).  (b) and (c) are
labelled by thresholding their own CT (body > -300 HU, skull > 300 HU), so every label map is asymmetric: a flipped,
shifted or reordered frame cannot pass.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import SHARED, TS_DICOM, require
from pydicom.uid import generate_uid

from ctfm_engine.dicom.seg import Algorithm, SegEncoding, SegInfo, source_headers, write_dicom_seg
from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.labels import Label, label_table, totalsegmentator_names
from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume, Grid

TS_EXPECTED = SHARED / "totalsegmentator" / "example_seg_dicom.nii.gz"
TILT_DICOM = SHARED / "dicom" / "ge_head_gantry_tilt"
HEAD_DICOM = SHARED / "dicom" / "slicer_head_64x64"
READERS_JS = Path(__file__).resolve().parent / "readers_js"
ALGORITHM = Algorithm("ctfm-test-seg", "0.1.0", "3f" * 32)
BODY, SKULL = 1, 91  # 91 = skull in TotalSegmentator's numbering (SNOMED coded); body has generic codes
TRACKING_ID = re.compile(r"\[label (\d+)\]$")
LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"

# The versions the table is about (tests/readers_js/package.json pins OHIF 3.13.2's own: @ohif/app 3.13.2 depends on
# @cornerstonejs/* 5.6.8 and dcmjs 0.52.0).
DCMQI_VERSION = "1.5.7"
JS_VERSIONS = {"@cornerstonejs/adapters": "5.6.8", "@cornerstonejs/core": "5.6.8",
               "@cornerstonejs/dicom-image-loader": "5.6.8", "dcmjs": "0.52.0",
               "@cornerstonejs/codec-openjpeg": "1.3.0", "@cornerstonejs/codec-charls": "1.2.3"}

# --- the table: what each reader does with each encoding on each kind of series ---------------------------------
READS = "reads"  # the reader's labels equal ours voxel for voxel on every source slice
J2K_LOSSY = "JPEG 2000 (Lossless only) uses lossy compression, not supported for Segmentation objects"
JPEGLS_LOSSY = "JPEG-LS Lossless uses lossy compression, not supported for Segmentation objects"
TILT_GEOMETRY = "is outside image geometry"  # dcmqi exits 0 without writing an image
NO_CODEC = "Multiframe encapsulated PixelData fragments cannot be converted to binary frames"
KINDS = ("axial", "tilted", "oblique")


def _cells(**refusals: str) -> dict[SegEncoding, str]:
    return {encoding: refusals.get(encoding.name, READS) for encoding in SegEncoding}


OUTCOMES: dict[str, dict[str, dict[SegEncoding, str]]] = {
    "highdicom": {kind: _cells() for kind in KINDS},
    "pydicom": {kind: _cells() for kind in KINDS},
    "dcmqi": {
        "axial": _cells(BINARY_J2K=J2K_LOSSY, LABELMAP_JPEGLS=JPEGLS_LOSSY),
        "oblique": _cells(BINARY_J2K=J2K_LOSSY, LABELMAP_JPEGLS=JPEGLS_LOSSY),
        "tilted": _cells(BINARY=TILT_GEOMETRY, BINARY_J2K=J2K_LOSSY, LABELMAP=TILT_GEOMETRY,
                         LABELMAP_RLE=TILT_GEOMETRY, LABELMAP_JPEGLS=JPEGLS_LOSSY),
    },
    # createFromDicomSegImageId, frames decoded by dicom-image-loader's decoders (OpenJPEG, CharLS, RLE)
    "ohif": {kind: _cells() for kind in KINDS},
    # createLabelmapsFromDICOMBuffer (generateToolState's path): the adapters' own decoding, no JPEG codecs
    "adapters-buffer": {kind: _cells(BINARY_J2K=NO_CODEC, LABELMAP_JPEGLS=NO_CODEC) for kind in KINDS},
}


# --- the series, their label maps and SEGs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One source series (or thickness block), our label map for it and its SEG in every encoding."""

    name: str
    kind: str  # a key of OUTCOMES' rows
    volume: CTVolume
    labels: np.ndarray  # on volume's grid (z, y, x)
    on_slices: dict[str, np.ndarray]  # SOP Instance UID -> our labels where that source slice's pixels lie
    viewer_sources: tuple[Path, ...]  # the instances a viewer shows the SEG on (the series' display set)
    segs: dict[SegEncoding, SegInfo]

    def label_values(self, encoding: SegEncoding) -> dict[int, int]:
        """Segment number -> label value, as written."""
        return {number: value for number, value, _ in self.segs[encoding].segments}


def labels_where_slices_lie(labels: np.ndarray, volume: CTVolume) -> dict[str, np.ndarray]:
    """Our labels at every pixel centre of every source slice (nearest voxel of ``volume``'s grid), by SOP UID.

    On a series whose slices are its grid this is slice k of the map; on a gantry-tilted series (resampled onto a
    rectangular grid) it is what the SEG's frames must hold: the map sampled where the sheared slices lie.
    """
    grid = volume.grid
    out = {}
    for uid, path in zip(volume.dicom.sop_instance_uids, volume.dicom.files, strict=True):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        cosines = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
        rows = np.arange(int(header.Rows))[:, None, None] * row_spacing * cosines[3:]
        columns = np.arange(int(header.Columns))[None, :, None] * column_spacing * cosines[:3]
        points = np.asarray(header.ImagePositionPatient, dtype=np.float64) + rows + columns
        index = np.rint(grid.lps_to_zyx_index(points)).astype(np.int64)
        inside = np.all((index >= 0) & (index < np.asarray(grid.shape_zyx)), axis=-1)
        on_slice = np.zeros(inside.shape, dtype=labels.dtype)
        on_slice[inside] = labels[tuple(index[inside].T)]
        out[str(uid)] = on_slice
    return out


def write_segs(labels: np.ndarray, volume: CTVolume, table: dict[int, Label],
               folder: Path) -> dict[SegEncoding, SegInfo]:
    folder.mkdir(parents=True, exist_ok=True)
    return {encoding: write_dicom_seg(labels, volume, table, folder / f"{encoding.value}.dcm", algorithm=ALGORITHM,
                                      encoding=encoding)
            for encoding in SegEncoding}


def threshold_labels(volume: CTVolume) -> np.ndarray:
    hu = volume.voxels
    return np.where(hu > 300, SKULL, np.where(hu > -300, BODY, 0)).astype(np.uint8)


def abdomen_case(folder: Path) -> Case:
    """(a): TotalSegmentator's result for the abdomen, resampled (nearest) onto the DICOM volume's grid."""
    volume = read_volume(TS_DICOM)
    expected = sitk.ReadImage(str(TS_EXPECTED))
    labels = sitk.GetArrayFromImage(sitk.Resample(expected, volume.to_sitk(), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    # The files leave their UIDs blank; the SEG references the ones the reader resolved.  A viewer can place it only
    # on instances carrying those UIDs, as an archive would serve them: copies with the resolved UIDs filled in.
    copies = folder / "source"
    copies.mkdir(parents=True)
    viewer_sources = []
    for number, (header, path) in enumerate(zip(source_headers(volume), volume.dicom.files, strict=True)):
        original = pydicom.dcmread(path)
        header.file_meta = original.file_meta
        header.file_meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID
        header.add(original["PixelData"])
        header.save_as(copies / f"{number:03d}.dcm", enforce_file_format=True)
        viewer_sources.append(copies / f"{number:03d}.dcm")
    table = label_table(totalsegmentator_names())
    return Case("abdomen", "axial", volume, labels, labels_where_slices_lie(labels, volume), tuple(viewer_sources),
                write_segs(labels, volume, table, folder / "seg"))


def tilted_cases(folder: Path) -> list[Case]:
    """(b): the gantry-tilted head, one volume (and SEG) per thickness block; a viewer shows all 28 slices."""
    series_uid = str(pydicom.dcmread(TILT_DICOM / "01.dcm", stop_before_pixels=True).SeriesInstanceUID)
    volumes = {block: read_dicom_series(TILT_DICOM, series_uid=f"{series_uid}#{block}") for block in ("4mm", "7mm")}
    viewer_sources = tuple(Path(path) for volume in volumes.values() for path in volume.dicom.files)
    table = label_table({BODY: "body", SKULL: "skull"})
    cases = []
    for block, volume in volumes.items():
        assert volume.dicom.resampled_for_tilt
        labels = threshold_labels(volume)
        cases.append(Case(f"tilt-{block}", "tilted", volume, labels, labels_where_slices_lie(labels, volume),
                          viewer_sources, write_segs(labels, volume, table, folder / block)))
    return cases


def rotation(axis: int, degrees: float) -> np.ndarray:
    radians = np.radians(degrees)
    matrix = np.eye(3)
    first, second = (n for n in range(3) if n != axis)
    matrix[[first, first, second, second], [first, second, first, second]] = (
        np.cos(radians), -np.sin(radians), np.sin(radians), np.cos(radians))
    return matrix


# Not axis-aligned in any way: 30 degrees about x, -15 about y, 20 about z (LPS axes).
OBLIQUE = rotation(2, 20.0) @ rotation(1, -15.0) @ rotation(0, 30.0)


def oblique_case(folder: Path) -> Case:
    """(c): the Slicer head CT re-placed by OBLIQUE about the patient origin, as a new series of its own.

    Only geometry and identity change (ImageOrientationPatient and ImagePositionPatient rotated, written with 6 and
    4 decimals as scanners do; new Study, Series, SOP Instance and Frame of Reference UIDs); pixels are untouched.
    """
    sources = folder / "source"
    sources.mkdir(parents=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    for path in sorted(HEAD_DICOM.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        cosines = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64).reshape(2, 3) @ OBLIQUE.T
        dataset.ImageOrientationPatient = [round(float(value), 6) for value in cosines.ravel()]
        position = OBLIQUE @ np.asarray(dataset.ImagePositionPatient, dtype=np.float64)
        dataset.ImagePositionPatient = [round(float(value), 4) for value in position]
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
        dataset.FrameOfReferenceUID = frame_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.SeriesDescription = "derived test data: CTHeadAxialDicom re-placed obliquely"
        dataset.save_as(sources / path.name, enforce_file_format=True)
    volume = read_dicom_series(sources)
    labels = threshold_labels(volume)
    table = label_table({BODY: "body", SKULL: "skull"})
    return Case("oblique", "oblique", volume, labels, labels_where_slices_lie(labels, volume),
                tuple(Path(path) for path in volume.dicom.files), write_segs(labels, volume, table, folder / "seg"))


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    folder = tmp_path_factory.mktemp("viewer-readers")
    built = [abdomen_case(folder / "abdomen"), *tilted_cases(folder / "tilt"), oblique_case(folder / "oblique")]
    return {case.name: case for case in built}


CASES = ("abdomen", "tilt-4mm", "tilt-7mm", "oblique")


# --- comparing a reader's labels with ours --------------------------------------------------------------------------


def assert_same_labels(read: dict[str, np.ndarray], case: Case, reader: str, encoding: SegEncoding) -> None:
    """``read`` (SOP UID -> label values on that slice) equals ours on every slice of the series it covers; slices
    of the display set outside ``case`` (the other thickness block) must stay empty."""
    missing = set(case.on_slices) - set(read)
    assert not missing, f"{reader} gave no labels for {len(missing)} of the {len(case.on_slices)} source slices"
    differing = {}
    for uid, labels in read.items():
        expected = case.on_slices.get(uid)
        expected = np.zeros_like(labels) if expected is None else expected
        assert labels.shape == expected.shape, f"{reader}: slice {uid} has shape {labels.shape}, not {expected.shape}"
        if (count := int(np.count_nonzero(labels != expected))) > 0:
            differing[uid] = count
    assert not differing, (
        f"{reader} shows {case.name} {encoding.value} differently from our label map on {len(differing)} slices "
        f"({sum(differing.values())} voxels; first: {next(iter(differing.items()))})")


def to_label_values(numbers: np.ndarray, values: dict[int, int]) -> np.ndarray:
    """Segment numbers -> label values (0 stays 0); a number the SEG does not describe fails."""
    unknown = set(np.unique(numbers).tolist()) - set(values) - {0}
    assert not unknown, f"segment numbers {sorted(unknown)} are not among the SEG's segments {sorted(values)}"
    lookup = np.zeros(max([*values, int(numbers.max(initial=0))]) + 1, dtype=np.int64)
    for number, value in values.items():
        lookup[number] = value
    return lookup[numbers]


def outcome_of(reader: str, case: Case, encoding: SegEncoding) -> str:
    return OUTCOMES[reader][case.kind][encoding]


# --- the label maps themselves ---------------------------------------------------------------------------------------


def test_abdomen_label_map_is_totalsegmentators_on_the_dicom_grid(cases: dict[str, Case]) -> None:
    case = cases["abdomen"]
    nifti = read_volume(TS_EXPECTED, check_hu=False)
    assert np.allclose(nifti.direction, np.diag([1, -1, 1])) and np.allclose(case.volume.direction, np.eye(3))
    # The NIfTI stores y flipped: its voxel (z, y, x) is the DICOM grid's (z, rows - 1 - y, x), same LPS point.
    shape = np.array(case.volume.shape_zyx)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1).T
    flipped = corners * [1, -1, 1] + [0, shape[1] - 1, 0]
    np.testing.assert_allclose(nifti.grid.zyx_index_to_lps(corners), case.volume.grid.zyx_index_to_lps(flipped),
                               atol=1e-3)
    np.testing.assert_array_equal(case.labels, nifti.voxels[:, ::-1, :].astype(np.uint8))
    assert len(np.unique(case.labels)) - 1 == 31


@pytest.mark.parametrize("name", CASES)
def test_label_maps_are_asymmetric_and_lie_on_the_source_slices(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    labels = case.labels
    assert len(np.unique(labels)) >= 3
    for axis in range(3):
        flipped = np.flip(labels, axis)
        labelled = (labels > 0) | (flipped > 0)
        assert np.count_nonzero((labels != flipped) & labelled) > 0.1 * np.count_nonzero(labelled), (
            f"{name}: the label map is nearly symmetric along axis {axis}; a flip would go unnoticed")
    if case.kind != "tilted":  # slice k of the grid is source slice k; a tilted one is checked against its own CT
        stack = np.stack([case.on_slices[str(uid)] for uid in case.volume.dicom.sop_instance_uids])
        np.testing.assert_array_equal(stack, labels)


@pytest.mark.parametrize("name", ["tilt-4mm", "tilt-7mm"])
def test_tilted_label_map_on_each_slice_matches_that_slices_own_ct(cases: dict[str, Case], name: str) -> None:
    """What readers must show on a tilted slice is where that slice's own pixels are bone and body (the de-shearing
    interpolates, so borders may differ by a voxel: Dice 0.97 or more per slice and label)."""
    case = cases[name]
    for uid, path in zip(case.volume.dicom.sop_instance_uids, case.volume.dicom.files, strict=True):
        slice_ = pydicom.dcmread(path)
        hu = slice_.pixel_array * float(slice_.RescaleSlope) + float(slice_.RescaleIntercept)
        shown = case.on_slices[str(uid)]
        for value, own in ((SKULL, hu > 300), (BODY, (hu > -300) & (hu <= 300))):
            dice = 2 * np.count_nonzero(own & (shown == value)) / (np.count_nonzero(own) + np.count_nonzero(
                shown == value))
            assert dice > 0.95, f"{name} {path.name}: label {value} on the slice vs its own CT: Dice {dice:.3f}"


# --- highdicom and pydicom --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(SegEncoding), ids=lambda encoding: encoding.value)
@pytest.mark.parametrize("name", CASES)
def test_highdicom_reads_every_encoding_voxel_for_voxel(cases: dict[str, Case], name: str,
                                                        encoding: SegEncoding) -> None:
    case = cases[name]
    assert outcome_of("highdicom", case, encoding) == READS
    seg = hd.seg.segread(case.segs[encoding].path)
    uids = list(case.on_slices)
    stack = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    values = to_label_values(stack, case.label_values(encoding))
    assert_same_labels(dict(zip(uids, values, strict=True)), case, "highdicom", encoding)


def frame_references(seg: pydicom.Dataset) -> list[tuple[str, int | None, np.ndarray]]:
    """Per frame: the SOP UID its Derivation Image Sequence names, its segment number (None for LABELMAP, whose
    pixels are segment numbers) and its ImagePositionPatient."""
    references = []
    for group in seg.PerFrameFunctionalGroupsSequence:
        (source,) = [item for derivation in group.DerivationImageSequence for item in derivation.SourceImageSequence]
        number = (int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                  if "SegmentIdentificationSequence" in group else None)
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        references.append((str(source.ReferencedSOPInstanceUID), number, position))
    return references


@pytest.mark.parametrize("encoding", list(SegEncoding), ids=lambda encoding: encoding.value)
@pytest.mark.parametrize("name", CASES)
def test_pydicom_frames_lie_on_the_slices_they_name(cases: dict[str, Case], name: str,
                                                    encoding: SegEncoding) -> None:
    """Frames decoded by pydicom's pixel handlers, each put on the slice its Derivation Image Sequence names, where
    its Plane Position and the shared Plane Orientation must put it too."""
    case = cases[name]
    assert outcome_of("pydicom", case, encoding) == READS
    seg = pydicom.dcmread(case.segs[encoding].path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    headers = {str(uid): pydicom.dcmread(path, stop_before_pixels=True)
               for uid, path in zip(case.volume.dicom.sop_instance_uids, case.volume.dicom.files, strict=True)}
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose(np.asarray(orientation, dtype=np.float64),
                               np.asarray(next(iter(headers.values())).ImageOrientationPatient, dtype=np.float64),
                               atol=1e-6)
    values = case.label_values(encoding)
    read = {uid: np.zeros(case.on_slices[uid].shape, dtype=np.int64) for uid in case.on_slices}
    for frame, (uid, number, position) in zip(frames, frame_references(seg), strict=True):
        np.testing.assert_allclose(position, np.asarray(headers[uid].ImagePositionPatient, dtype=np.float64),
                                   atol=1e-3)
        if number is None:  # LABELMAP: the pixels are segment numbers
            read[uid] = to_label_values(frame, values)
        else:
            assert not np.any(read[uid][frame != 0]), f"frame of segment {number} overlaps another on {uid}"
            read[uid][frame != 0] = values[number]
    assert_same_labels(read, case, "pydicom", encoding)


# --- dcmqi: segimage2itkimage -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dcmqi_reader() -> Path:
    found = shutil.which("segimage2itkimage", path=str(Path(sys.executable).parent)) or shutil.which(
        "segimage2itkimage")
    require(found, "dcmqi's segimage2itkimage is not installed (PyPI dcmqi, in the [dev] extra that make installs)")
    return Path(found)


def onto_volume(image: sitk.Image, volume: CTVolume) -> np.ndarray:
    """dcmqi's image pasted into ``volume``'s grid, once checked that every one of its voxel centres is one of the
    grid's (within 1 % of the smallest voxel size)."""
    grid = Grid.of_image(image)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in grid.shape_zyx], indexing="ij")).reshape(3, -1).T
    at = volume.grid.lps_to_zyx_index(grid.zyx_index_to_lps(corners))
    offset = np.rint(at).astype(np.int64)
    assert np.abs(at - offset).max() < 0.01, f"dcmqi's grid is not the source grid: corners at {at.round(3)}"
    start, stop = offset.min(axis=0), offset.max(axis=0) + 1
    assert np.all(stop - start == grid.shape_zyx) and np.all(start >= 0), (
        f"dcmqi's grid is turned or outside the source grid: {start}..{stop}")
    assert np.all(stop <= volume.shape_zyx)
    pasted = np.zeros(volume.shape_zyx, dtype=np.int64)
    pasted[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))] = sitk.GetArrayFromImage(image)
    return pasted


@pytest.mark.parametrize("encoding", list(SegEncoding), ids=lambda encoding: encoding.value)
@pytest.mark.parametrize("name", CASES)
def test_dcmqi_reads_or_refuses_as_the_table_says(cases: dict[str, Case], name: str, encoding: SegEncoding,
                                                   dcmqi_reader: Path, tmp_path: Path) -> None:
    """dcmqi writes one image per segment (BINARY) or one image of segment numbers (LABELMAP) with meta.json naming
    each labelID's segment; its images must sit on the source grid and hold our labels, or it refuses."""
    case = cases[name]
    run = subprocess.run([str(dcmqi_reader), "--inputDICOM", str(case.segs[encoding].path), "--outputDirectory",
                          str(tmp_path), "--outputType", "nrrd"], capture_output=True, text=True, timeout=120)
    log = run.stdout + run.stderr
    images = sorted(tmp_path.glob("*.nrrd"))
    expected = outcome_of("dcmqi", case, encoding)
    if expected != READS:
        assert not images, f"dcmqi was expected to refuse ({expected}) but wrote {[p.name for p in images]}"
        assert expected in log, f"dcmqi's refusal changed (rc {run.returncode}):\n{log[-2000:]}"
        assert run.returncode == (0 if expected == TILT_GEOMETRY else 1), log[-2000:]
        return
    assert run.returncode == 0 and images, f"dcmqi failed (rc {run.returncode}):\n{log[-2000:]}"
    meta = json.loads((tmp_path / "meta.json").read_text())
    label_of = {int(segment["labelID"]): int(TRACKING_ID.search(segment["TrackingIdentifier"]).group(1))
                for group in meta["segmentAttributes"] for segment in group if "TrackingIdentifier" in segment}
    assert label_of == {number: value for number, value in case.label_values(encoding).items()}
    numbers = np.zeros(case.volume.shape_zyx, dtype=np.int64)
    for path in images:
        pasted = onto_volume(sitk.ReadImage(str(path)), case.volume)
        assert not np.any(numbers[pasted != 0]), f"{path.name} overlaps an earlier segment image"
        numbers = np.where(pasted != 0, pasted, numbers)
    labels = to_label_values(numbers, label_of)
    assert_same_labels(dict(zip(map(str, case.volume.dicom.sop_instance_uids), labels, strict=True)), case, "dcmqi",
                       encoding)


def test_dcmqi_is_the_version_the_table_names(dcmqi_reader: Path) -> None:
    assert importlib.metadata.version("dcmqi") == DCMQI_VERSION
    run = subprocess.run([str(dcmqi_reader), "--version"], capture_output=True, text=True, timeout=60)
    assert f"tag: v{DCMQI_VERSION}" in run.stdout + run.stderr


# --- OHIF's reader: the Cornerstone3D adapters under Node -------------------------------------------------------------


Reports = dict[tuple[str, str], Path]


@pytest.fixture(scope="module")
def adapters_reports(cases: dict[str, Case], tmp_path_factory: pytest.TempPathFactory) -> Reports:
    """Runs tests/readers_js/read_seg.mjs once per display set (in parallel): (case name, encoding value) -> the
    folder holding its ``<id>.<reader>.json`` / ``.raw`` files, ``<id>`` = ``<case>--<encoding>``."""
    node = shutil.which("node")
    require(node, "Node.js is not installed (make test installs nodejs and npm); OHIF's reader runs under Node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    require(tuple(int(part) for part in version.lstrip("v").split(".")[:2]) >= (20, 6),
            f"Node.js {version} is too old for tests/readers_js (module.register needs 20.6 or newer)")
    require((READERS_JS / "node_modules" / ".installed").is_file(),
            "tests/readers_js is not installed (make test runs npm install there: make "
            "tests/readers_js/node_modules/.installed)")
    folder = tmp_path_factory.mktemp("readers-js")
    groups: dict[tuple[Path, ...], list[Case]] = {}
    for case in cases.values():
        groups.setdefault(case.viewer_sources, []).append(case)
    runs = []
    for number, (sources, members) in enumerate(groups.items()):
        out = folder / f"display-set-{number}"
        out.mkdir()
        job = {"sources": [str(path) for path in sources], "out": str(out),
               "segs": [{"id": f"{case.name}--{encoding.value}", "path": str(info.path)}
                        for case in members for encoding, info in case.segs.items()]}
        (out / "job.json").write_text(json.dumps(job))
        process = subprocess.Popen([node, "--import", "./node_interop.mjs", "read_seg.mjs", str(out / "job.json")],
                                   cwd=READERS_JS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        runs.append((process, out, members))
    failures, reports = [], {}
    for process, out, members in runs:
        try:
            _, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        if process.returncode != 0:
            failures.append(f"read_seg.mjs for {members[0].name} exited {process.returncode}:\n{stderr[-3000:]}")
        reports.update({(case.name, encoding.value): out for case in members for encoding in SegEncoding})
    assert not failures, "\n".join(failures)
    return reports


def adapters_report(reports: Reports, case: Case, encoding: SegEncoding, reader: str) -> tuple[dict, Path]:
    folder, stem = reports[(case.name, encoding.value)], f"{case.name}--{encoding.value}.{reader}"
    return json.loads((folder / f"{stem}.json").read_text()), folder / f"{stem}.raw"


@pytest.mark.parametrize("encoding", list(SegEncoding), ids=lambda encoding: encoding.value)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("reader", ["ohif", "adapters-buffer"])
def test_ohif_adapters_read_or_refuse_as_the_table_says(cases: dict[str, Case], adapters_reports: Reports,
                                                         reader: str, name: str, encoding: SegEncoding) -> None:
    """The labelmap OHIF builds: one labelmap image per image of the display set, each frame placed on the image
    its Derivation Image Sequence names, holding our labels; or the reader's refusal."""
    case = cases[name]
    report, raw = adapters_report(adapters_reports, case, encoding, "ohif" if reader == "ohif" else "buffer")
    assert report["versions"] == JS_VERSIONS
    expected = outcome_of(reader, case, encoding)
    if expected != READS:
        assert not report["ok"] and expected in report["error"], report
        return
    assert report["ok"], f"{reader} refused {name} {encoding.value}: {report['error']}"
    assert not report["warnings"], report["warnings"]
    sources = report["sources"]
    assert report["labelmapSets"] == 1 and not report["overlappingSegments"]
    assert report["labelmapReferences"] == list(range(len(sources)))
    references = frame_references(pydicom.dcmread(case.segs[encoding].path, stop_before_pixels=True))
    assert len(report["frameToSource"]) == len(references)
    for (index, number), (uid, written_number, _) in zip(report["frameToSource"], references, strict=True):
        assert index is not None and sources[index] == uid, f"a frame of {uid} is placed on {index}"
        assert number == written_number
    numbers = np.fromfile(raw, dtype=np.uint8).reshape(report["shape"])
    values = to_label_values(numbers, case.label_values(encoding))
    assert_same_labels(dict(zip(sources, values, strict=True)), case, reader, encoding)


@pytest.mark.parametrize("encoding", list(SegEncoding), ids=lambda encoding: encoding.value)
def test_ohif_colour_table_is_positional_so_labelmap_colours_shift_by_one(
    cases: dict[str, Case], adapters_reports: Reports, encoding: SegEncoding
) -> None:
    """OHIF 3.13.2 takes its colour table from the adapters' segment metadata by position (entry k paints labelmap
    value k) but its segment list by SegmentNumber.  A BINARY SEG's entry k is segment k; a LABELMAP SEG's
    SegmentSequence starts with segment 0, Background (highdicom writes it), so entry k is segment k - 1: labels
    are right, and each segment is painted in the colour of the segment numbered one below it."""
    case = cases["abdomen"]
    report, _ = adapters_report(adapters_reports, case, encoding, "ohif")
    assert report["ok"], report["error"]
    written = [(number, name) for number, _, name in case.segs[encoding].segments]
    entries = [(index, number, name) for index, number, name, _ in report["segmentMetadata"]]
    if pydicom.dcmread(case.segs[encoding].path, stop_before_pixels=True).SOPClassUID == LABELMAP_SOP_CLASS:
        assert entries == [(1, 0, "Background")] + [(number + 1, number, name) for number, name in written]
    else:
        assert entries == [(number, number, name) for number, name in written]


def test_readers_js_pins_exact_versions() -> None:
    manifest = json.loads((READERS_JS / "package.json").read_text())
    dependencies = manifest["dependencies"]
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", version) for version in dependencies.values()), dependencies
    lock = json.loads((READERS_JS / "package-lock.json").read_text())["packages"]
    assert {name: lock[f"node_modules/{name}"]["version"] for name in JS_VERSIONS} == JS_VERSIONS
    assert all(lock[f"node_modules/{name}"]["version"] == version for name, version in dependencies.items())
