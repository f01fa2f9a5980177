"""A result made with a bundled demonstration model says so wherever it goes: the JSON of every command, the
DICOM-SEG and SR algorithm records and series descriptions, one line on stderr; a result of any other checkpoint
(our own training's, the published ones) does not."""

from __future__ import annotations

from pathlib import Path

import pydicom
from conftest import SHARED, SHIPPED_ENCODER, SHIPPED_SEG, require_module, run_cli

require_module("highdicom", "DICOM-SEG and SR writing needs highdicom (the [dicom] extra)")

from ctfm_engine.dicom.seg import Algorithm  # noqa: E402
from ctfm_engine.pipelines import TriageRequest, run_triage  # noqa: E402

HEAD = SHARED / "dicom" / "slicer_head_64x64"
NOTICE = "demonstration model {}, not CT-FM, not for clinical use"


def text_values(dataset: pydicom.Dataset) -> list[str]:
    """Every TextValue and AlgorithmParameters string anywhere in the dataset's content."""
    found = []

    def walk(items: pydicom.Dataset) -> None:
        for element in items:
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)
            elif element.keyword in ("TextValue", "AlgorithmParameters"):
                found.append(str(element.value))

    walk(dataset)
    return found


def test_a_dicom_seg_of_the_demonstration_model_says_so_in_its_algorithm_and_description(tmp_path):
    seg_path = tmp_path / "seg.dcm"
    result = run_cli("segment", HEAD, "--out", tmp_path / "labels.nii.gz", "--dicom-seg", seg_path, "--json")
    assert result.code == 0, result.stderr
    assert result.document["weights"] == {**result.document["weights"], "name": SHIPPED_SEG.name,
                                          "demonstration": True}
    assert result.stderr.count(NOTICE.format(SHIPPED_SEG.name)) == 1
    seg = pydicom.dcmread(seg_path)
    assert seg.SeriesDescription == f"{SHIPPED_SEG.name} segmentation [DEMO, not clinical]"
    parameters = [segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
                  for segment in seg.SegmentSequence]
    assert parameters and all("demonstration=true (not CT-FM, not for clinical use)" in text for text in parameters)


def test_a_triage_sr_records_the_demonstration_flag_of_its_weights_and_only_then(tmp_path, triage_model):
    outcome = run_triage(TriageRequest(HEAD, weights=triage_model))
    assert outcome.weights["demonstration"] is False  # our training's checkpoint is not a bundled one
    plain = pydicom.dcmread(outcome.write_sr(tmp_path / "plain.dcm").path)
    assert not any("demonstration" in text for text in text_values(plain))
    assert "[DEMO" not in plain.SeriesDescription
    # The same result as a demonstration model would record it (no triage model ships, so none is bundled).
    demo = Algorithm.from_identity({**outcome.weights, "demonstration": True}, "0.1.0")
    from ctfm_engine.dicom.sr import write_triage_sr

    marked = pydicom.dcmread(write_triage_sr(outcome.result, outcome.volume, tmp_path / "demo.dcm",
                                             algorithm=demo).path)
    assert any("demonstration=true (not CT-FM, not for clinical use)" in text for text in text_values(marked))
    assert marked.SeriesDescription.endswith("triage [DEMO, not clinical]")


def test_json_of_every_model_command_carries_the_demonstration_flag(tmp_path):
    embed = run_cli("embed", SHARED / "ct-nifti" / "s0335.nii.gz", "--json")
    assert embed.code == 0, embed.stderr
    assert embed.document["weights"]["name"] == SHIPPED_ENCODER.name and embed.document["weights"]["demonstration"]
    assert NOTICE.format(SHIPPED_ENCODER.name) in embed.stderr
    quiet = run_cli("embed", SHARED / "ct-nifti" / "s0335.nii.gz", "--json", "-q")
    assert NOTICE.format(SHIPPED_ENCODER.name) in quiet.stderr  # never silent, not even with --quiet
    explicit = run_cli("embed", SHARED / "ct-nifti" / "s0335.nii.gz", "--weights", SHIPPED_ENCODER, "--json", "-q")
    assert explicit.document["weights"]["demonstration"] is True  # the bundled model chosen by path is one too
    info = run_cli("weights", "info", "--json", "-q")
    assert info.code == 0 and info.document["weights"]["demonstration"] is True
    assert Path(info.document["folder"]).resolve() == SHIPPED_ENCODER.resolve()
