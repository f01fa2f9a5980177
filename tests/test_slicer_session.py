"""The CTFM module's logic path from a finished worker to the nodes a radiologist sees (CTFMLib.session), on real
MRML from the PyPI package slicer-core, real workers and real CT: the segmentation node of a job, and a semantic
search session from a point list to heatmap volumes, overlay and slice views, across volumes of other orientation."""

from __future__ import annotations

import importlib
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_CT, SAMPLE_LABELS, SHARED, SHIPPED_ENCODER, SHIPPED_SEG, require_module

from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume

require_module("slicer_core", "the Slicer session tests need the PyPI package slicer-core (Qt-free MRML)")
slicer = importlib.import_module("slicer")
vtk = importlib.import_module("vtk")
adapters = importlib.import_module("CTFMLib.mrml_adapters")
jobs = importlib.import_module("CTFMLib.jobs")
session = importlib.import_module("CTFMLib.session")
from test_slicer_adapters import _nodes, _segment_array, _tag, slicer_scene  # noqa: E402

HEART = SHARED / "ct-nifti" / "s0335.nii.gz"
SLICER_HEAD = SHARED / "dicom" / "slicer_head_64x64"  # 93 slices of 1.5 mm: 140 mm along S
LIVER = 5
DEMONSTRATION = "demonstration model {}, not CT-FM, not for clinical use"


@pytest.fixture
def scene():
    yield from slicer_scene()


def _finish(poll, done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        poll()
        time.sleep(0.02)
    assert done(), f"not finished after {timeout} s"


def _liver_centroid_lps() -> np.ndarray:
    labels = sitk.ReadImage(str(SAMPLE_LABELS))
    index_zyx = np.argwhere(sitk.GetArrayViewFromImage(labels) == LIVER).mean(axis=0)
    return np.array(labels.TransformContinuousIndexToPhysicalPoint(index_zyx[::-1].tolist()))


def test_a_segmentation_job_becomes_a_named_coded_automatic_segmentation_in_the_study(scene, tmp_path) -> None:
    whole = read_volume(SAMPLE_CT)
    box = (slice(None), slice(20, 80), slice(25, 100))  # 4 sliding windows instead of 20
    origin = whole.zyx_index_to_lps(np.array([0.0, 20.0, 25.0]))
    ct = adapters.ctvolume_to_volume_node(
        CTVolume(np.ascontiguousarray(whole.voxels[box]), whole.spacing_xyz_mm, tuple(origin), whole.direction,
                 "abdomen crop"),
        scene, "abdomen CT")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.GetSceneItemID(), "study")
    hierarchy.CreateItem(study, ct)
    job = jobs.start_segmentation(adapters.volume_node_to_ctvolume(ct), SHIPPED_SEG, "cpu", work_dir=tmp_path)
    _finish(job.poll, lambda: job.finished, 240)
    assert job.state == "done", job.error
    labels = job.result["labels"]
    present = sorted(int(value) for value in np.unique(labels) if value)
    assert len(present) >= 3, present

    node = session.import_segmentation(job.result, ct, scene)
    assert node.GetName() == "abdomen CT segmentation"
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    contents = node.GetSegmentation()
    assert contents.GetNumberOfSegments() == len(present)
    names = {int(value): name for value, name in job.result["names"].items()}
    for index in range(contents.GetNumberOfSegments()):
        segment = contents.GetNthSegment(index)
        value = next(v for v in present if names[v] == segment.GetName())
        assert np.array_equal(_segment_array(scene, node, contents.GetNthSegmentID(index), ct) > 0, labels == value)
        assert _tag(segment, "DICOM.SegmentAlgorithmType") == "AUTOMATIC"
        assert _tag(segment, "DICOM.SegmentAlgorithmName") == "CT-FM ctfm-mini-wholebody-seg"
        assert "~SCT^" in _tag(segment, segment.GetTerminologyEntryTagName())

    # The measurements table beside it: one row per segment, the HU statistics of exactly those voxels of the input.
    table_node = session.import_measurements(job.result, ct, scene)
    assert table_node.GetName() == "abdomen CT measurements"
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(table_node)) == study
    table = table_node.GetTable()
    assert table.GetNumberOfRows() == len(present)
    assert [table.GetColumn(i).GetName() for i in range(3)] == ["Structure", "Volume (mL)", "Mean (HU)"]
    assert table_node.GetColumnUnitLabel("Mean (HU)") == "HU"
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    hu = whole.voxels[box].astype(np.float64)
    for row in range(table.GetNumberOfRows()):
        value = next(v for v in present if names[v] == table.GetValue(row, 0).ToString())
        inside = hu[labels == value]
        assert table.GetValue(row, 1).ToDouble() == pytest.approx(inside.size * voxel_ml, abs=0.006)
        assert table.GetValue(row, 2).ToDouble() == pytest.approx(inside.mean(), abs=0.051)
        sd = inside.std(ddof=1) if inside.size > 1 else 0.0  # the sample SD (SimpleITK's sigma); one voxel: 0
        assert table.GetValue(row, 3).ToDouble() == pytest.approx(sd, abs=0.051)
        assert table.GetValue(row, 4).ToDouble() == pytest.approx(np.median(inside), abs=0.051)
    again_table = session.import_measurements(job.result, ct, scene, replace=table_node)
    assert again_table.GetName() == "abdomen CT measurements" and len(_nodes(scene, "vtkMRMLTableNode")) == 1

    # Apply again with the same output node: the node is replaced, its name kept, nothing piles up.
    node.SetName("my segmentation")
    again = session.import_segmentation(job.result, ct, scene, replace=node)
    assert again.GetName() == "my segmentation" and len(_nodes(scene, "vtkMRMLSegmentationNode")) == 1
    # The shipped model is a demonstration model: the status line says so, and so did the engine in the log.
    assert job.result["weights"]["demonstration"] is True
    summary = session.describe_segmentation(job.result)
    assert summary.startswith(f"{len(present)} structures in ")
    assert summary.endswith(f"Made with the {DEMONSTRATION.format('ctfm-mini-wholebody-seg')}.")
    assert session.describe_weights(job.result["weights"]) == (
        f"ctfm-mini-wholebody-seg (sha256 {job.result['weights']['sha256'][:12]}), a demonstration model")
    assert f"WARNING: {DEMONSTRATION.format('ctfm-mini-wholebody-seg')}" in job.log


def test_search_session_answers_clicks_with_heatmaps_overlay_and_views_across_orientations(scene, tmp_path) -> None:
    source = adapters.ctvolume_to_volume_node(read_volume(SAMPLE_CT), scene, "abdomen")
    heart = adapters.ctvolume_to_volume_node(read_volume(HEART), scene, "chest")
    image = sitk.ReadImage(str(HEART))
    reoriented_image = sitk.PermuteAxes(sitk.Flip(image, [True, False, True]), [1, 0, 2])
    reoriented = adapters.ctvolume_to_volume_node(CTVolume.from_sitk(reoriented_image, source="s0335 reoriented"),
                                                  scene, "chest reoriented")
    assert not np.allclose(adapters.grid_of_node(heart).direction, adapters.grid_of_node(reoriented).direction)

    search = session.SearchSession(scene, SHIPPED_ENCODER, "cpu", top_k=1, work_dir=tmp_path)
    try:
        sent = search.set_volumes(source, [heart, reoriented])
        assert sent == [session.volume_key(node) for node in (source, heart, reoriented)]
        assert search.matches(SHIPPED_ENCODER, "cpu", None, 1) and not search.matches(SHIPPED_ENCODER, "cuda", None, 1)
        markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query")
        markups.AddControlPoint(vtk.vtkVector3d(*adapters.lps_to_ras(_liver_centroid_lps())))
        request = search.query(markups)
        _finish(search.worker.poll, lambda: request in search.worker.results or not search.alive, 300)
        event = search.worker.results[request]
        summary = search.show_result(event)
        assert "chest: cosine" in summary and "chest reoriented: cosine" in summary
        assert event["weights"] == search.worker.weights and event["weights"]["demonstration"] is True
        assert session.search_status(event).endswith(f"Made with the {DEMONSTRATION.format('ctfm-mini')}.")

        # One heatmap per target, on the model grid the worker reports (Slicer reslices it), high at the best match.
        for index, target in enumerate((heart, reoriented)):
            heatmap = scene.GetFirstNodeByName(f"{target.GetName()} similarity")
            assert heatmap is not None
            entry = event["targets"][index]
            assert adapters.grid_of_node(heatmap).matches(jobs.grid_from_event(entry), tolerance_mm=1e-4)
            values = slicer.util.arrayFromVolume(heatmap)
            # the worker's field as it came, and its peak above the display threshold (0.5) under which the overlay
            # is transparent
            np.testing.assert_array_equal(values, event[f"heatmap_{index}"])
            assert values.max() > 0.5
            at_match = adapters.volume_node_to_ctvolume(heatmap).lps_to_zyx_index(entry["matches"][0]["point_lps"])
            assert values[tuple(np.rint(at_match).astype(int))] > 0.5
        # The same field as the engine's heatmap on the target's own grid (what `ctfm search` writes), just coarser.
        from ctfm_engine.preprocess import resample

        fine_request = search.worker.query(session.volume_key(source), _liver_centroid_lps(),
                                           [session.volume_key(heart)], heatmap_grid="source")
        _finish(search.worker.poll, lambda: fine_request in search.worker.results or not search.alive, 60)
        fine = search.worker.results[fine_request]["heatmap_0"]
        assert fine.shape == adapters.grid_of_node(heart).shape_zyx
        coarse = resample(event["heatmap_0"], jobs.grid_from_event(event["targets"][0]),
                          adapters.grid_of_node(heart), interpolation="linear", fill=0.0)
        np.testing.assert_allclose(coarse, fine, atol=1 / 255 + 1e-5)  # both travel as 8-bit codes (1/510 each)
        # The same patient stored two ways: the same best match in patient coordinates.
        one, other = (np.array(target["matches"][0]["point_lps"]) for target in event["targets"])
        assert np.linalg.norm(one - other) < 1.0, (one, other)
        best = max(event["targets"], key=lambda target: target["matches"][0]["similarity"])
        best_node = search.nodes[best["key"]]
        for composite in _nodes(scene, "vtkMRMLSliceCompositeNode"):
            assert composite.GetBackgroundVolumeID() == best_node.GetID()
            assert scene.GetNodeByID(composite.GetForegroundVolumeID()).GetName() == f"{best_node.GetName()} similarity"
        match_ras = adapters.lps_to_ras(best["matches"][0]["point_lps"])
        for view in _nodes(scene, "vtkMRMLSliceNode"):
            slice_to_ras = view.GetSliceToRAS()
            assert np.allclose([slice_to_ras.GetElement(row, 3) for row in range(3)], match_ras, atol=1e-3)

        # A second click (a new point; the module keeps the newest) is answered from the cached features.
        markups.AddControlPoint(vtk.vtkVector3d(*adapters.lps_to_ras(_liver_centroid_lps() + [0.0, 0.0, 20.0])))
        started = time.perf_counter()
        again = search.query(markups, 1)
        _finish(search.worker.poll, lambda: again in search.worker.results or not search.alive, 60)
        seconds = time.perf_counter() - started
        search.show_result(search.worker.results[again])
        similarity_nodes = [node for node in _nodes(scene, "vtkMRMLScalarVolumeNode")
                            if node.GetName().endswith(" similarity")]
        assert len(similarity_nodes) == 2, "each click replaces the heatmaps instead of adding new ones"
        print(f"repeated query answered in {seconds:.2f} s (features cached)")

        # Checking the same volumes again sends nothing; a volume whose voxels changed is sent again.
        assert search.set_volumes(source, [heart, reoriented]) == []
        voxels = slicer.util.arrayFromVolume(heart)
        voxels[0, 0, 0] += 1.0
        slicer.util.arrayFromVolumeModified(heart)
        assert search.set_volumes(source, [heart]) == [session.volume_key(heart)]
    finally:
        search.close()
    assert not search.alive


def test_a_triage_job_is_shown_with_its_decision_probability_and_what_the_input_check_found(
        scene, tmp_path, triage_model) -> None:
    head = adapters.ctvolume_to_volume_node(read_volume(SLICER_HEAD), scene, "head CT")
    job = jobs.start_triage(adapters.volume_node_to_ctvolume(head), triage_model, "cpu", work_dir=tmp_path)
    _finish(job.poll, lambda: job.finished, 240)
    assert job.state == "done", job.error
    result = job.result
    text = session.describe_triage(result)
    assert text.startswith(f"<b>{result['decision']}</b>: probability {result['probability']:.3f}")
    assert result["decision"] == ("abnormal" if result["probability"] >= result["threshold"] else "normal")
    coverage = result["checks"]["coverage_mm"]
    assert 120 < coverage[0] < 160  # the series spans 140 mm along S
    assert "the scan covers {:.0f} × {:.0f} × {:.0f} mm".format(*coverage) in text
    assert f"over {result['checks']['skull_extent_mm']:.0f} mm along S" in text
    assert "not a head CT" not in text and text.endswith(f"<br>{session.NOT_CLINICAL}")
    assert result["weights"]["demonstration"] is False  # fitted by the test, not a shipped demonstration model
    assert session.triage_status(result) == f"Triage finished: {result['decision']}. {session.NOT_CLINICAL}"
    assert session.describe_weights(result["weights"]) == (
        f"{result['weights']['name']} (sha256 {result['weights']['sha256'][:12]})")

    # The abdomen is refused by the input check before any model loads, with the reason the panel shows.
    abdomen = adapters.ctvolume_to_volume_node(read_volume(SAMPLE_CT), scene, "abdomen")
    refused = jobs.start_triage(adapters.volume_node_to_ctvolume(abdomen), triage_model, "cpu", work_dir=tmp_path)
    _finish(refused.poll, lambda: refused.finished, 120)
    assert (refused.state, refused.error.exit_code) == ("failed", 3)
    assert "not a head CT" in refused.error.message and "no cranium found" in refused.error.message


def test_every_status_line_names_a_demonstration_model_as_one() -> None:
    """No triage model ships, so a demonstration triage result is built here; the other two come from real jobs."""
    demonstration = {"name": "ctfm-mini", "sha256": "0" * 64, "demonstration": True}
    published = {"name": "ct_fm_feature_extractor", "sha256": "1" * 64, "demonstration": False}
    triage = {"decision": "normal", "probability": 0.2, "threshold": 0.5, "checks": {}}
    segmentation = {"structures": [{"name": "liver", "volume_ml": 1500.0}], "seconds": 12.0}
    search = {"seconds": 0.4, "targets": []}
    for describe, result in ((session.describe_segmentation, segmentation), (session.describe_triage, triage),
                             (session.triage_status, triage), (session.search_status, search)):
        assert DEMONSTRATION.format("ctfm-mini") in describe({**result, "weights": demonstration})
        for weights in (published, None):
            text = describe({**result, "weights": weights})
            assert "demonstration" not in text and text.endswith(session.NOT_CLINICAL)
