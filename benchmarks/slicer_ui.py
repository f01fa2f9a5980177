"""How long the Slicer module holds the UI thread: ours (worker process + polling) vs a blocking module, side by side.

A Slicer module that runs the model in its own process (TotalSegmentator's blocking call, or inference in the UI
thread) freezes Slicer for the whole inference.  The CTFM module does only this on the UI thread:

- start: volume node -> CTVolume (a copy of the voxels), the job folder written, the worker process started;
- every 100 ms: ``Job.poll()`` (reads the events the worker wrote);
- end: the labels -> a segmentation node (one segment per structure, terminology), or for a search click the
  heatmap volumes, overlay and slice jump.

Measured with real MRML (the PyPI package ``slicer-core``), the real worker and the shipped demonstration model:

- ``sample``: the bundled sample CT (122x101x30): the whole job through the module's path, and the same segmentation
  in-process (what a blocking module freezes for); ratio = blocking stall / our longest stall;
- ``large``: a 512x512x300 CT made from a real scan (benchmarks/embed.py ``large_ct``), stored as int16 as Slicer
  loads DICOM CT: start (the job is cancelled right after), the import of a 41-structure label map of that size (the
  sample's real TotalSegmentator labels resampled onto that grid: import cost depends on size and structure count,
  not on which scan) against Slicer's ``ImportLabelmapToSegmentationNode``, and a search click with a full-size
  heatmap.  The blocking reference for this size is the in-process inference time of
  ``benchmarks/segment.py`` (minutes on CPU); ``--blocking-large`` runs it here too.

    PYTHONPATH=SlicerCTFM .venv/bin/python benchmarks/slicer_ui.py
    PYTHONPATH=SlicerCTFM .venv/bin/python benchmarks/slicer_ui.py --blocking-large  # also in-process, large CT

``PYTHONPATH=SlicerCTFM`` makes the module's ``CTFMLib`` importable (it is not an installed package, as in Slicer,
which puts the module folder on its path); ``ctfm_engine`` is the installed engine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer  # from slicer-core, Slicer's Qt-free MRML
import vtk
from CTFMLib import jobs, mrml_adapters, session
from embed import large_ct

from ctfm_engine.readers import read_volume

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "ctfm_engine" / "data" / "sample_ct.nii.gz"
SAMPLE_LABELS = SHARED / "totalsegmentator" / "example_seg.nii.gz"
SEG_MODEL = ROOT / "ctfm_engine" / "weights" / "ctfm-mini-wholebody-seg"
ENCODER = ROOT / "ctfm_engine" / "weights" / "ctfm-mini"


def new_scene():
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    scene = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(scene)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        view = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
        view.SetLayoutName(name)
        view.SetOrientation(orientation)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
    return scene, colours


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def run_job_like_the_widget(job: jobs.Job, timeout: float = 3600.0) -> list[float]:
    """Poll every 100 ms as the widget's QTimer does; the duration of every poll()."""
    durations = []
    deadline = time.monotonic() + timeout
    while not job.finished and time.monotonic() < deadline:
        _, seconds = timed(job.poll)
        durations.append(seconds)
        time.sleep(0.1)
    if not job.finished:
        raise RuntimeError(f"job still {job.state} after {timeout} s")
    return durations


def import_through_slicer_logic(labels: np.ndarray, node, scene) -> float:
    """The usual import (a labelmap node through vtkSlicerSegmentationsModuleLogic), timed; nodes removed after."""
    started = time.perf_counter()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(labelmap, labels)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation, ""):
        raise RuntimeError("Slicer's import failed")
    seconds = time.perf_counter() - started
    scene.RemoveNode(labelmap)
    scene.RemoveNode(segmentation)
    return seconds


def blocking_segmentation(volume) -> float:
    """What a blocking module freezes for: the same segmentation in this (the UI) thread."""
    from ctfm_engine.models.segmentation import inference_network
    from ctfm_engine.runtime.backends import TorchBackend
    from ctfm_engine.tasks.segment import open_segmentation_model, segment

    started = time.perf_counter()
    model = open_segmentation_model(SEG_MODEL)
    module, head = inference_network(model.network)
    segment(volume, preprocessing=model.preprocessing, roi_size_zyx=model.roi_size_zyx, overlap=model.overlap,
            backend=TorchBackend(module, "cpu"), head=head)
    return time.perf_counter() - started


def sample_rows() -> list[tuple[str, float]]:
    scene, colours = new_scene()
    node = mrml_adapters.ctvolume_to_volume_node(read_volume(SAMPLE), scene, "sample")
    volume, convert = timed(mrml_adapters.volume_node_to_ctvolume, node)
    job, start = timed(jobs.start_segmentation, volume, SEG_MODEL, "cpu")
    wall_started = time.perf_counter()
    polls = run_job_like_the_widget(job)
    wall = time.perf_counter() - wall_started
    if job.state != "done":
        raise RuntimeError(f"segmentation job {job.state}: {job.error}")
    _, imported = timed(session.import_segmentation, job.result, node, scene)
    ours = max(convert + start, max(polls), imported)
    blocking = blocking_segmentation(volume)
    colours.SetMRMLScene(None)
    print(f"\nsample CT {volume.shape_zyx[::-1]} (x, y, z), shipped model, 2-thread CPU")
    print(f"  ours: start {convert + start:.3f} s (copy {convert:.3f} + write & spawn {start:.3f}); "
          f"{len(polls)} polls, longest {max(polls) * 1000:.1f} ms, median {np.median(polls) * 1000:.2f} ms; "
          f"import {len(job.result['structures'])} structures {imported:.3f} s; job wall {wall:.1f} s")
    print(f"  blocking module (in-process segmentation): {blocking:.1f} s frozen")
    print(f"  longest UI stall: ours {ours:.3f} s vs blocking {blocking:.1f} s -> {blocking / ours:.0f}x shorter")
    return [("sample", ours), ("sample-blocking", blocking)]


def wait_for_answer(search, request: int, timeout: float, interval: float) -> dict:
    """Poll the search worker as the module's timer does until ``request`` is answered."""
    deadline = time.monotonic() + timeout
    while request not in search.worker.results:
        error = search.worker.errors.get(request) or search.worker.error
        if error is not None or not search.alive or time.monotonic() > deadline:
            raise RuntimeError(f"search request {request} was not answered: {error or 'timed out'}")
        search.worker.poll()
        time.sleep(interval)
    return search.worker.results[request]


def median_of(repeats: int, measure) -> float:
    """The median of ``repeats`` runs of ``measure()`` (seconds): this VM's memory timings vary several-fold."""
    return float(np.median([measure() for _ in range(repeats)]))


def large_rows(blocking_large: bool, repeats: int) -> None:
    scene, colours = new_scene()
    volume = large_ct()
    node = mrml_adapters.ctvolume_to_volume_node(volume, scene, "large")
    slicer.util.updateVolumeFromArray(node, np.rint(volume.voxels).astype(np.int16))  # as Slicer loads DICOM CT
    float_copy = median_of(repeats, lambda: timed(mrml_adapters.volume_node_to_ctvolume, node)[1])
    copy = mrml_adapters.volume_node_to_ctvolume(node, keep_small_integers=True)

    def start_once() -> tuple[float, float]:
        small, convert = timed(mrml_adapters.volume_node_to_ctvolume, node, keep_small_integers=True)
        job, start = timed(jobs.start_segmentation, small, SEG_MODEL, "cpu")
        job.cancel()
        job.wait(30)
        return convert, start

    starts = [start_once() for _ in range(repeats)]
    convert, start = (float(np.median([row[column] for row in starts])) for column in (0, 1))

    labels_image = sitk.ReadImage(str(SAMPLE_LABELS))
    reference = volume.to_sitk()
    labels = sitk.GetArrayFromImage(sitk.Resample(labels_image, reference.GetSize(), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, labels_image.GetOrigin(),
                                                  tuple(s * n / m for s, n, m in zip(labels_image.GetSpacing(),
                                                                                     labels_image.GetSize(),
                                                                                     reference.GetSize(),
                                                                                     strict=True)),
                                                  labels_image.GetDirection(), 0, sitk.sitkUInt8))
    from ctfm_engine.labels import totalsegmentator_names

    names = totalsegmentator_names()
    present = [int(v) for v in np.unique(labels) if v]
    reference_import = median_of(repeats, lambda: import_through_slicer_logic(labels, node, scene))
    result = {"labels": labels, "names": {str(v): names[v] for v in present},
              "weights": {"name": "ctfm-mini-wholebody-seg", "sha256": "0" * 64}}

    def import_once() -> float:
        imported_node, seconds = timed(session.import_segmentation, result, node, scene)
        scene.RemoveNode(imported_node)
        return seconds

    imported = median_of(repeats, import_once)

    def send_once() -> float:
        fresh = session.SearchSession(scene, ENCODER, "cpu", top_k=3)
        try:
            return timed(fresh.set_volumes, node, [node])[1]
        finally:
            fresh.close()

    send = median_of(repeats, send_once)
    search = session.SearchSession(scene, ENCODER, "cpu", top_k=3)
    try:
        search.set_volumes(node, [node])
        markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query")
        centre = mrml_adapters.lps_to_ras(volume.zyx_index_to_lps(np.array(volume.shape_zyx) / 2))
        markups.AddControlPoint(vtk.vtkVector3d(*centre))
        request, query = timed(search.query, markups)
        first_answer = time.perf_counter()
        event = wait_for_answer(search, request, 1800, 0.1)
        first_answer = time.perf_counter() - first_answer
        shown = median_of(repeats, lambda: timed(search.show_result, event)[1])

        def later_click(step: int) -> float:
            # another spot in the same volumes: the features are cached in the worker
            markups.SetNthControlPointPosition(0, *(np.array(centre) + (10.0 * step, -5.0 * step, 4.0 * step)))
            asked = time.perf_counter()
            wait_for_answer(search, search.query(markups), 60, 0.005)
            return time.perf_counter() - asked

        later = [later_click(step) for step in range(1, repeats + 1)]
    finally:
        search.close()
    colours.SetMRMLScene(None)
    heatmap_shape = event["heatmap_0"].shape
    print(f"\nlarge CT {volume.shape_zyx[::-1]} (x, y, z), int16 node ({copy.voxels.nbytes / 2**20:.0f} MiB); "
          f"medians of {repeats}")
    print(f"  segmentation start {convert + start:.3f} s (int16 copy {convert:.3f} + write & spawn {start:.3f}; "
          f"a float32 copy would take {float_copy:.3f})")
    print(f"  import of {len(present)} structures: {imported:.3f} s (Slicer's ImportLabelmapToSegmentationNode: "
          f"{reference_import:.3f} s, {reference_import / imported:.1f}x)")
    print(f"  search: send the volume {send:.3f} s; click {query * 1000:.1f} ms; show the heatmap (model grid "
          f"{heatmap_shape[::-1]}, Slicer reslices it), overlay and jump {shown:.3f} s")
    print(f"  search answers (not UI time: the worker computes): first click {first_answer:.1f} s (features of the "
          f"volume), later clicks median {np.median(later):.2f} s (max {max(later):.2f}) (2-core CPU)")
    if blocking_large:
        blocking = blocking_segmentation(copy)
        longest = max(convert + start, imported, send, shown)
        print(f"  blocking module (in-process segmentation): {blocking:.1f} s frozen -> ours {blocking / longest:.0f}x "
              f"shorter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocking-large", action="store_true", help="also segment the large CT in-process")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs per large-CT measurement (median)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    sample_rows()
    if not args.skip_large:
        large_rows(args.blocking_large, args.repeats)


if __name__ == "__main__":
    main()
