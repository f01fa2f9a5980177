"""Series selection, the missing-UID policy, mixed slice thickness and compressed transfer syntaxes on real DICOM.

Data (shared/data README section 5): ts_abdomen_20slices_j2k (JPEG 2000, blank UIDs), slicer_head_64x64 (93 slices,
no ImageType, no FrameOfReferenceUID), ge_head_gantry_tilt (18.5 degree tilt, 4 mm and 7 mm blocks in one series),
dcmqi ct-3slice (uncompressed, full UIDs) and its liver SEG.  Localizer, DERIVED, coronal and MR series are copies
of real slicer_head slices with those header values changed (the shared data holds no MR series).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SHARED, TS_DICOM, missing_real_part, require, require_module
from pydicom.uid import (
    UID,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from ctfm_engine.dicom.selection import (
    SelectionRules,
    SeriesCandidate,
    list_series,
    select_candidates,
    select_series,
)
from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.dicom.uids import derived_uid
from ctfm_engine.errors import InputError, UsageError

HEAD = SHARED / "dicom" / "slicer_head_64x64"
TILT = SHARED / "dicom" / "ge_head_gantry_tilt"
CT_3SLICE = SHARED / "dicom" / "dcmqi" / "segmentations" / "ct-3slice"
LIVER_SEG = SHARED / "dicom" / "dcmqi" / "segmentations" / "liver.dcm"
TILT_UID = "1.2.826.0.1.3680043.9.4245.3115138630835728997848661150714813892"
PATIENT_NAMES = ("Austrialian", "JANCT000", "REMOVED")


def dicom_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if not path.name.startswith(("LICENSE", "README")))


def head_files(count: int) -> list[Path]:
    """The first ``count`` slicer_head slices along z (CTHead1 ... CTHead<count>)."""
    return [HEAD / f"CTHead{k}.dcm" for k in range(1, count + 1)]


def link_files(sources: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        (folder / source.name).symlink_to(source)
    return folder


def retagged_series(sources: list[Path], folder: Path, **attributes: object) -> Path:
    """Copies of real slices as a new series (new Series/SOP Instance UIDs) with ``attributes`` changed."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for source in sources:
        dataset = pydicom.dcmread(source)
        for keyword, value in attributes.items():
            setattr(dataset, keyword, value)
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        dataset.save_as(folder / source.name)
    return folder


def series_uid_of(folder: Path) -> str:
    return str(pydicom.dcmread(dicom_files(folder)[0], stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two studies' worth of real series plus a SEG, the way an archive export arrives."""
    require((SHARED / "dicom").is_dir(), f"shared DICOM test data not found at {SHARED}")
    root = tmp_path_factory.mktemp("archive")
    link_files(dicom_files(TS_DICOM), root / "abdomen")
    link_files(dicom_files(HEAD), root / "study2" / "head")
    link_files(dicom_files(TILT), root / "tilt")
    link_files([LIVER_SEG], root / "seg")
    scout = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    retagged_series(
        head_files(2), root / "study2" / "scout", ImageType=scout, SeriesNumber=1, SeriesDescription="Scout"
    )
    derived = ["DERIVED", "SECONDARY", "AXIAL"]
    retagged_series(head_files(93), root / "study2" / "derived", ImageType=derived, SeriesNumber=900)
    original = ["ORIGINAL", "PRIMARY", "AXIAL"]
    retagged_series(
        head_files(12), root / "study2" / "mr", Modality="MR", SOPClassUID=MRImageStorage, ImageType=original
    )
    coronal = root / "study2" / "coronal"
    retagged_series(head_files(12), coronal, ImageOrientationPatient=[1, 0, 0, 0, 0, -1], ImageType=original)
    for path in dicom_files(coronal):  # stack the slices along y, as a coronal series is stacked
        dataset = pydicom.dcmread(path)
        dataset.ImagePositionPatient = [0.0, 1.5 * (int(dataset.InstanceNumber) - 1), 0.0]
        dataset.save_as(path)
    return root


@pytest.fixture(scope="module")
def mixed_candidates(mixed_folder: Path) -> list[SeriesCandidate]:
    return list_series(mixed_folder)


def by_folder(candidates: list[SeriesCandidate]) -> dict[str, SeriesCandidate]:
    """The candidates keyed by the sub-folder (and thickness block) they come from."""
    keyed = {}
    for candidate in candidates:
        name = candidate.files[0].parent.name
        block = candidate.series_id.partition("#")[2]
        keyed[f"{name}#{block}" if block else name] = candidate
    return keyed


# --- selection ---------------------------------------------------------------------------------------------------


def test_every_image_series_is_a_candidate_and_non_images_are_not(mixed_candidates: list[SeriesCandidate]) -> None:
    candidates = by_folder(mixed_candidates)
    assert set(candidates) == {"abdomen", "head", "tilt#4mm", "tilt#7mm", "scout", "derived", "mr", "coronal"}
    abdomen = candidates["abdomen"]
    assert abdomen.series_id.startswith("derived-")
    assert (abdomen.instances, abdomen.thickness_mm, abdomen.kernel) == (20, 3.0, "Br38f\\3")
    assert abdomen.transfer_syntax == "JPEG 2000 Image Compression (Lossless Only)"
    assert UID(abdomen.series_instance_uid).is_valid
    assert abdomen.derived_uids == ("StudyInstanceUID", "SeriesInstanceUID")
    head = candidates["head"]
    assert (head.instances, head.image_type, head.plane, head.obliquity_deg, head.tilt_deg) == (93, (), "axial", 0, 0)
    tilt = candidates["tilt#4mm"]
    assert tilt.plane == "axial"
    assert tilt.obliquity_deg == pytest.approx(18.5, abs=0.05)  # the tilt is in ImageOrientationPatient...
    assert tilt.tilt_deg == pytest.approx(18.5, abs=0.05)  # ...and the positions are sheared by it
    assert candidates["coronal"].plane == "coronal"
    assert candidates["scout"].localizer and not abdomen.localizer
    assert all(not c.files[0].name.endswith("liver.dcm") for c in candidates.values())
    json.dumps([candidate.as_dict() for candidate in candidates.values()])  # JSON-ready


def test_default_rules_pick_the_largest_axial_ct_and_say_why_others_were_skipped(
    mixed_folder: Path, mixed_candidates: list[SeriesCandidate], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ctfm_engine.dicom.selection"):
        selection = select_series(mixed_folder)
    candidates = by_folder(mixed_candidates)
    assert selection.chosen == candidates["head"]  # no ImageType at all: cannot be judged, so not skipped for it
    reasons = {candidate.series_id: reason for candidate, reason in selection.skipped}
    assert len(reasons) == len(candidates) - 1
    assert reasons[candidates["scout"].series_id] == "localizer, 2 slices < 10"
    assert reasons[candidates["derived"].series_id] == "ImageType DERIVED"
    assert reasons[candidates["mr"].series_id] == "modality MR"
    assert reasons[candidates["coronal"].series_id] == "coronal"
    below = f"ranked below {selection.chosen.series_id}: fewer slices"
    assert reasons[candidates["abdomen"].series_id] == f"{below} (20 < 93)"
    assert (
        reasons[candidates["tilt#4mm"].series_id] == reasons[candidates["tilt#7mm"].series_id] == f"{below} (14 < 93)"
    )
    skipped_lines = [r for r in caplog.records if r.levelno == logging.INFO and "skipped" in r.getMessage()]
    assert len(skipped_lines) == len(selection.skipped)
    assert "modality MR" in caplog.text and "(series 1, CT, 2 images, 'Scout'): localizer" in caplog.text
    assert not any(name in caplog.text for name in PATIENT_NAMES)
    document = json.loads(json.dumps(selection.as_dict()))
    assert document["chosen"]["series_id"] == selection.chosen.series_id
    assert {entry["reason"] for entry in document["skipped"]} == set(reasons.values())
    volume = read_dicom_series(mixed_folder, series_uid=selection.chosen.series_id)
    assert volume.shape_zyx == (93, 64, 64)
    assert [Path(path) for path in volume.dicom.files] == sorted(
        selection.chosen.files, key=lambda p: int(p.stem[6:])
    )


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (SelectionRules(require_original=False), "derived"),  # 93 slices each; series number 900 before 123456
        (SelectionRules(preferred_thickness_mm=7.0), "tilt#7mm"),
        (SelectionRules(preferred_thickness_mm=7.0, max_thickness_mm=5.0), "tilt#4mm"),  # 4 mm is 1 mm nearer than 3
        (SelectionRules(preferred_kernels=("^std",)), "tilt#4mm"),  # a tie with 7 mm, broken by the id
        (SelectionRules(preferred_kernels=("nothing", r"br3\d")), "abdomen"),
        (SelectionRules(preferred_kernels=("std",), min_slices=15), "head"),  # the STD+ blocks have 14 slices
        (SelectionRules(orientation="coronal", require_original=False, min_slices=12), "coronal"),
        (SelectionRules(modalities=("MR",), orientation=None), "mr"),
    ],
    ids=["any-image-type", "thickness", "max-thickness", "kernel-tie", "kernel-order", "min-slices", "coronal", "mr"],
)
def test_rules_change_the_choice(mixed_candidates: list[SeriesCandidate], rules: SelectionRules, expected: str) -> None:
    chosen = select_candidates(mixed_candidates, rules, source="archive").chosen
    assert chosen == by_folder(mixed_candidates)[expected]


def test_rule_reasons_for_thickness_and_kernel(mixed_candidates: list[SeriesCandidate]) -> None:
    candidates = by_folder(mixed_candidates)
    rules = SelectionRules(preferred_thickness_mm=7.0, max_thickness_mm=5.0)
    selection = select_candidates(mixed_candidates, rules, source="archive")
    reasons = {candidate.series_id: reason for candidate, reason in selection.skipped}
    assert reasons[candidates["tilt#7mm"].series_id] == "thickness 7 mm > 5 mm"
    assert reasons[candidates["abdomen"].series_id] == (
        f"ranked below {TILT_UID}#4mm: thickness 3 mm is further from the preferred 7 mm than 4 mm"
    )
    selection = select_candidates(mixed_candidates, SelectionRules(preferred_kernels=("std",)), source="archive")
    reasons = {candidate.series_id: reason for candidate, reason in selection.skipped}
    assert reasons[candidates["abdomen"].series_id].endswith(
        "kernel Br38f\\3 matches the preferred kernels less well than STD+"
    )
    assert reasons[candidates["tilt#7mm"].series_id].endswith("equal rank, later series id")


def test_no_eligible_series_lists_each_with_its_reason(
    mixed_folder: Path, mixed_candidates: list[SeriesCandidate]
) -> None:
    with pytest.raises(InputError) as info:
        select_series(mixed_folder, SelectionRules(min_slices=100))
    message = str(info.value)
    assert info.value.exit_code == 3
    assert message.startswith(f"{mixed_folder}: holds no series that meets the selection rules (")
    candidates = by_folder(mixed_candidates)
    abdomen, mr = candidates["abdomen"].series_id, candidates["mr"].series_id
    assert f"{abdomen} (no series number, CT, 20 images, 'CT Body 3.0'): 20 slices < 100" in message
    assert f"{mr} (series 123456, MR, 12 images, 'None'): modality MR, 12 slices < 100" in message
    assert message.count("slices < 100") == len(candidates)
    assert not any(name in message for name in PATIENT_NAMES)


def test_rules_file_round_trip_and_refusals(tmp_path: Path) -> None:
    rules = SelectionRules(
        modalities=("CT", "PT"),
        orientation=None,
        min_slices=40,
        preferred_kernels=("^B3\\d", "STANDARD"),
        preferred_thickness_mm=1.5,
        max_thickness_mm=5,
    )
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules.as_dict()))
    assert SelectionRules.from_file(path) == rules
    yaml = require_module("yaml", "YAML rules files need PyYAML (the [train] extra)")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules.as_dict()))
    assert SelectionRules.from_file(tmp_path / "rules.yaml") == rules
    (tmp_path / "partial.json").write_text('{"min_slices": 20}')
    assert SelectionRules.from_file(tmp_path / "partial.json") == SelectionRules(min_slices=20)

    (tmp_path / "typo.json").write_text('{"min_slice": 20}')
    with pytest.raises(UsageError) as info:
        SelectionRules.from_file(tmp_path / "typo.json")
    assert str(info.value).startswith(f"{tmp_path / 'typo.json'}: unknown selection rule 'min_slice'")
    assert info.value.exit_code == 2
    for text, problem in [
        ('{"min_slices": "ten"}', "min_slices must be a whole number"),
        ('{"orientation": "oblique"}', "orientation must be"),
        ('{"preferred_kernels": ["(unclosed"]}', "not a regular expression"),
        ('{"max_thickness_mm": -1}', "max_thickness_mm must be above 0"),
        ('["CT"]', "must hold a mapping"),
        ("{not json", "is not valid JSON"),
    ]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(UsageError, match=problem):
            SelectionRules.from_file(tmp_path / "bad.json")


# --- missing UIDs ----------------------------------------------------------------------------------------------


def test_derived_uid_is_valid_deterministic_and_separates_its_parts() -> None:
    uid = derived_uid("SeriesInstanceUID", "1.2.3")
    assert UID(uid).is_valid and uid.startswith("2.25.") and len(uid) < 64
    assert uid == derived_uid("SeriesInstanceUID", "1.2.3")
    assert uid != derived_uid("StudyInstanceUID", "1.2.3")
    assert derived_uid("ab", "c") != derived_uid("a", "bc")


def test_blank_uids_are_derived_deterministically_and_sop_uids_come_from_the_file_meta(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = link_files(dicom_files(TS_DICOM), tmp_path / "renamed" / "copy")
    second = read_dicom_series(elsewhere)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctfm_engine.dicom.series"):
        first = read_dicom_series(TS_DICOM)
    info = first.dicom.as_dict()
    keys = ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid", "sop_instance_uids")
    assert {key: info[key] for key in keys} == {key: second.dicom.as_dict()[key] for key in keys}
    assert info["derived_uids"] == ["StudyInstanceUID", "SeriesInstanceUID"]
    assert len({info["study_instance_uid"], info["series_instance_uid"], info["frame_of_reference_uid"]}) == 3
    for uid in (info["study_instance_uid"], info["series_instance_uid"], *info["sop_instance_uids"]):
        assert UID(uid).is_valid
    file_meta_uids = [
        pydicom.dcmread(path, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for path in info["files"]
    ]
    assert info["sop_instance_uids"] == file_meta_uids
    assert info["frame_of_reference_uid"].startswith("1.3.12.2.1107.5.1.4.60064")  # present in the files: kept
    assert first.series_instance_uid is None  # the file's own, blank
    warnings = [r for r in caplog.records if "derived deterministically" in r.getMessage()]
    assert len(warnings) == 1
    assert "lacks StudyInstanceUID, SeriesInstanceUID in its files" in warnings[0].getMessage()
    assert "(20 SOPInstanceUIDs taken from the file meta)" in warnings[0].getMessage()


def test_refuse_policy_names_a_file_and_the_missing_uid() -> None:
    with pytest.raises(InputError) as info:
        read_dicom_series(TS_DICOM, missing_uids="refuse")
    message = str(info.value)
    assert message.startswith(f"{dicom_files(TS_DICOM)[0]}: has no StudyInstanceUID (blank or absent)")
    assert "missing_uids='derive'" in message
    with pytest.raises(UsageError):
        read_dicom_series(TS_DICOM, missing_uids="invent")  # type: ignore[arg-type]


def test_missing_frame_of_reference_is_derived_or_refused() -> None:
    volume = read_dicom_series(HEAD)
    assert volume.dicom.derived_uids == ("FrameOfReferenceUID",)
    assert UID(volume.dicom.frame_of_reference_uid).is_valid
    assert volume.dicom.series_instance_uid == series_uid_of(HEAD)
    assert volume.dicom.frame_of_reference_uid == derived_uid("FrameOfReferenceUID", series_uid_of(HEAD))
    with pytest.raises(InputError, match=r"CTHead1\.dcm: has no FrameOfReferenceUID"):
        read_dicom_series(HEAD, missing_uids="refuse")


def test_sop_and_series_uids_without_file_meta_copies_are_derived_from_position(tmp_path: Path) -> None:
    folder = tmp_path / "blank"
    folder.mkdir()
    for path in dicom_files(CT_3SLICE):
        dataset = pydicom.dcmread(path)
        dataset.SOPInstanceUID = ""
        dataset.SeriesInstanceUID = ""
        del dataset.file_meta.MediaStorageSOPInstanceUID
        dataset.save_as(folder / path.name, enforce_file_format=False)
    volume = read_dicom_series(folder)
    again = read_dicom_series(folder)
    info = volume.dicom.as_dict()
    assert info["derived_uids"] == ["SeriesInstanceUID", "SOPInstanceUID"]
    assert len(set(info["sop_instance_uids"])) == 3
    assert all(UID(uid).is_valid for uid in info["sop_instance_uids"])
    assert info["sop_instance_uids"] == list(again.dicom.sop_instance_uids)
    assert info["series_instance_uid"] == derived_uid("SeriesInstanceUID", *sorted(info["sop_instance_uids"]))
    original = read_dicom_series(CT_3SLICE)
    assert info["study_instance_uid"] == original.dicom.study_instance_uid  # present: kept
    np.testing.assert_array_equal(volume.voxels, original.voxels)


# --- mixed slice thickness (ge_head_gantry_tilt) ------------------------------------------------------------------


def test_mixed_thickness_series_is_listed_as_one_block_per_thickness() -> None:
    candidates = list_series(TILT)
    assert [(c.series_id, c.instances, c.thickness_mm) for c in candidates] == [
        (f"{TILT_UID}#4mm", 14, 4.0),
        (f"{TILT_UID}#7mm", 14, 7.0),
    ]
    assert [p.name for p in candidates[0].files] == [f"{k:02d}.dcm" for k in range(1, 15)]
    assert all(c.series_instance_uid == TILT_UID and c.tilt_deg == pytest.approx(18.5, abs=0.05) for c in candidates)


@pytest.mark.parametrize(("block", "step_mm", "names"), [("4mm", 4.0, range(1, 15)), ("7mm", 7.0, range(15, 29))])
def test_each_thickness_block_reads_de_sheared(block: str, step_mm: float, names: range) -> None:
    volume = read_dicom_series(TILT, series_uid=f"{TILT_UID}#{block}")
    assert volume.shape_zyx[0] == 14
    assert volume.spacing_xyz_mm[2] == pytest.approx(step_mm, abs=0.01)
    assert volume.dicom.resampled_for_tilt is True
    assert volume.dicom.gantry_tilt_deg == pytest.approx(18.5, abs=0.05)
    assert volume.dicom.slice_thickness_mm == step_mm
    assert volume.dicom.series_id == f"{TILT_UID}#{block}"
    assert volume.dicom.series_instance_uid == TILT_UID
    assert sorted(Path(p).name for p in volume.dicom.files) == [f"{k:02d}.dcm" for k in names]
    sop_uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in volume.dicom.files]
    assert list(volume.dicom.sop_instance_uids) == sop_uids


def test_block_reads_as_the_same_slices_alone(tmp_path: Path) -> None:
    alone = read_dicom_series(link_files(dicom_files(TILT)[:14], tmp_path / "only4mm"))
    block = read_dicom_series(TILT, series_uid=f"{TILT_UID}#4mm")
    np.testing.assert_array_equal(alone.voxels, block.voxels)
    assert alone.grid.matches(block.grid, tolerance_mm=1e-6)


def test_whole_mixed_series_is_refused_naming_the_blocks() -> None:
    for series_uid in (None, TILT_UID):
        with pytest.raises(InputError) as info:
            read_dicom_series(TILT, series_uid=series_uid)
        message = str(info.value)
        assert message.startswith(f"{TILT}: uneven slice spacing: steps from 1.08 to 7.00 mm")
        assert f"because series {TILT_UID} mixes slice thicknesses 4 mm (14 slices) and 7 mm (14 slices)" in message
        assert message.endswith(f"read one thickness at a time with --series {TILT_UID}#4mm or --series {TILT_UID}#7mm")
    with pytest.raises(InputError, match="#4mm.*#7mm.*pick one with --series UID"):
        read_dicom_series(TILT, series_uid=f"{TILT_UID}#5mm")


# --- compressed transfer syntaxes --------------------------------------------------------------------------------


def test_real_jpeg2000_series_agrees_with_an_independent_decoder() -> None:
    """SimpleITK/GDCM (the reader) and pylibjpeg-openjpeg (through pydicom) decode the same HU values."""
    require_module("openjpeg", "pylibjpeg-openjpeg (the [dicom] extra) is needed as the independent decoder")
    volume = read_dicom_series(TS_DICOM)
    for k, path in enumerate(volume.dicom.files):
        dataset = pydicom.dcmread(path)
        hu = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        np.testing.assert_array_equal(volume.voxels[k], hu.astype(np.float32))


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=["rle", "jpeg-ls", "j2k"])
@pytest.mark.parametrize("source", [HEAD, CT_3SLICE], ids=["slicer-head", "ct-3slice"])
def test_lossless_transfer_syntaxes_read_identically(tmp_path: Path, source: Path, syntax: UID) -> None:
    folder = tmp_path / "compressed"
    folder.mkdir()
    for path in dicom_files(source):
        dataset = pydicom.dcmread(path)
        try:
            dataset.compress(syntax, generate_instance_uid=False)
        except (RuntimeError, ImportError) as error:
            missing_real_part(f"pydicom cannot encode {syntax.name} here (the [dicom] extra's encoders): {error}")
        dataset.save_as(folder / path.name)
    original, compressed = read_dicom_series(source), read_dicom_series(folder)
    assert compressed.dicom.transfer_syntax_uid == syntax
    assert [c.transfer_syntax for c in list_series(folder)] == [syntax.name]
    assert os.path.getsize(folder / dicom_files(source)[0].name) < dicom_files(source)[0].stat().st_size
    np.testing.assert_array_equal(compressed.voxels, original.voxels)
    assert compressed.grid.matches(original.grid, tolerance_mm=1e-9)
    assert compressed.dicom.sop_instance_uids == original.dicom.sop_instance_uids
    assert compressed.dicom.hu_offset_applied == original.dicom.hu_offset_applied
