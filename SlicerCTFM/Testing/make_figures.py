"""Figures for SlicerCTFM's README: what the module shows, rendered without Slicer.

Slicer cannot run on the machines this project is built on, so these are not screenshots.  The pictures are made
from results computed through the very API the Slicer module calls -- ``CTFMLib.jobs.start_segmentation``,
``start_triage`` and ``SearchWorker``, each running the engine in a worker process -- and drawn the way Slicer's
four-up layout shows them: a dark window, the module panel on the left (input, active model with its sha256,
progress, the result text) and axial, coronal and sagittal slice views in radiological convention (patient left on
the right of the axial and coronal views, superior up) with orientation letters at the edges.

Inputs: the bundled sample CT (``ctfm_engine/data/sample_ct.nii.gz``) for segmentation and semantic search (the
target of the search is the shared TotalSegmentator example CT when present, else the sample itself), and the real
head CT DICOM series ``/work/shared/data/dicom/slicer_head_64x64`` for triage.  Triage needs a triage checkpoint;
none is shipped, so a tiny one is fitted here for one epoch exactly as ``tests/conftest.py``'s ``triage_model``
fixture does (``ctfm finetune`` with the mechanics recipe and the small-grid overrides) and the figure says that it
is a demonstration checkpoint, not a model.

Run::

    PYTHONPATH=SlicerCTFM .venv/bin/python SlicerCTFM/Testing/make_figures.py --out SlicerCTFM/Resources/Screenshots

``PYTHONPATH=SlicerCTFM`` makes the module's ``CTFMLib`` importable, as Slicer does by putting the module folder on
its path; ``ctfm_engine`` is the installed engine.

It writes ``segmentation.png``, ``triage.png`` and ``search.png`` (each atomically; about 1300 x 760 pixels).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
from CTFMLib import jobs

from ctfm_engine.dicom.series import read_dicom_series
from ctfm_engine.figures import CT_DISPLAY_HU, View, new_figure, orthogonal_views, save_figure
from ctfm_engine.labels import label_table
from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SlicerCTFM"

SHARED = Path(os.environ.get("CTFM_SHARED_DATA", ROOT.parent / "shared" / "data"))
SAMPLE_CT = ROOT / "ctfm_engine" / "data" / "sample_ct.nii.gz"
SEARCH_TARGET = SHARED / "totalsegmentator" / "example_ct_sm.nii.gz"
HEAD_CT = SHARED / "dicom" / "slicer_head_64x64"
TRIAGE_RECIPE = ROOT / "training" / "finetune_triage_mechanics_cpu.yaml"
# tests/conftest.py TRIAGE_SMALL: the mechanics recipe on a coarse grid, one epoch.
TRIAGE_SMALL = ["data.spacing_zyx_mm=[15,8,8]", "data.spatial_size_zyx=[16,32,32]", "data.visits_per_epoch=1",
                "trainer.max_epochs=1"]
NOT_CLINICAL = "Research use only: CT-FM results are not for clinical decisions."  # CTFM.py's wording

# The look of Slicer's slice views: the colour of each view's bar, its letter, and the letters at its edges
# (top, bottom, left, right) in radiological convention.
VIEW_STYLE = {
    "axial": ("#f34a33", "R", "Axial", ("A", "P", "R", "L")),
    "coronal": ("#6eb04b", "G", "Coronal", ("S", "I", "R", "L")),
    "sagittal": ("#edd54c", "Y", "Sagittal", ("S", "I", "A", "P")),
}
BACKGROUND = "#000000"
PANEL = "#2b2b2b"
TEXT = "#e8e8e8"
ACCENT = "#7fb7ff"
SIZE_PX = (1300, 760)
DPI = 100
MAX_BYTES = 300_000  # README figures stay small
HEATMAP_CMAP = "hot"  # black-red-yellow-white, the family of Slicer's PET-Heat colour map
HEATMAP_HIDE_BELOW = 0.5  # mrml_adapters.heatmap_to_volume_node's default display threshold
HEATMAP_OPACITY = 0.4  # the module's overlay opacity (CTFMLib/session.py)


# --- running the module's job API ------------------------------------------------------------------------------


def run_job(job: jobs.Job, what: str, timeout: float = 900.0) -> dict[str, Any]:
    """Poll ``job`` as the module's 100 ms timer does until it ends; its result (or exit with its error), with
    ``progress``: the last report of each stage, {stage: (done, total)}."""
    last, stages = None, {}
    while not job.finished:
        job.poll()
        if job.progress is not None and job.progress != last:
            last = job.progress
            stages[last.stage] = (last.done, last.total)
            print(f"  {what}: {last.stage} {last.done}/{last.total}", file=sys.stderr)
        if time.monotonic() - job.started_at > timeout:
            job.cancel()
        time.sleep(0.1)
    if job.state != "done" or job.result is None:
        message = job.error.message if job.error else job.state
        raise SystemExit(f"{what} failed: {message}\n" + "\n".join(job.log[-20:]))
    return {**job.result, "progress": stages}


def wait_worker(worker: jobs.SearchWorker, condition: Any, what: str, timeout: float = 600.0) -> float:
    """Poll the search worker until ``condition()``; the seconds it took as the module sees them."""
    started = time.perf_counter()
    while not condition():
        worker.poll()
        if worker.error is not None or not worker.alive:
            raise SystemExit(f"{what} failed: {worker.error}\n" + "\n".join(worker.log[-20:]))
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"{what}: no answer within {timeout:.0f} s")
        time.sleep(0.005)
    return time.perf_counter() - started


def train_demo_triage_checkpoint(folder: Path) -> Path:
    """A tiny triage checkpoint fitted for one epoch by ``ctfm finetune``, as tests/conftest.py ``triage_model``."""
    from ctfm_engine.cli import main

    overrides = [*TRIAGE_SMALL, f"output.dir={folder}", f"output.export={folder / 'triage-demo-checkpoint'}"]
    arguments = ["finetune", "--config", str(TRIAGE_RECIPE), "--json", "-q",
                 *[part for override in overrides for part in ("--set", override)]]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(arguments)
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    if code != 0:
        raise SystemExit(f"training the demonstration triage checkpoint failed ({code}): {err.getvalue()[-2000:]}")
    return Path(json.loads(out.getvalue())["export"])


# --- drawing ---------------------------------------------------------------------------------------------------


def layout(title: str, top: float = 0.5) -> tuple[Any, Any, list[Any]]:
    """A Slicer-like window: the module panel on the left, a 2 x 2 grid of views on the right whose top row has
    the fraction ``top`` of the height (thin volumes give more room to the axial row)."""
    figure, _ = new_figure(1, 1, SIZE_PX, DPI)
    figure.clear()
    figure.set_facecolor(BACKGROUND)
    panel = figure.add_axes((0.0, 0.0, 0.30, 1.0))
    panel.set_facecolor(PANEL)
    panel.set_xticks([])
    panel.set_yticks([])
    for spine in panel.spines.values():
        spine.set_visible(False)
    panel.set_xlim(0, 1)
    panel.set_ylim(0, 1)
    views = []
    low, high, gap = 0.035, 0.925, 0.05  # room for the footer, the title and each view's bar
    heights = ((high - low - gap) * top, (high - low - gap) * (1 - top))
    for row, column in ((0, 0), (0, 1), (1, 0), (1, 1)):
        left = 0.31 + column * 0.345
        bottom = high - heights[0] if row == 0 else low
        views.append(figure.add_axes((left, bottom, 0.335, heights[row])))
    figure.text(0.31, 0.99, title, color=TEXT, fontsize=9.5, va="top", ha="left")
    return figure, panel, views


def draw_view(axis: Any, view: View, heading: str = "", overlay: Any = None, marks: Sequence[tuple] = (),
              window_hu: tuple[float, float] = CT_DISPLAY_HU) -> None:
    """One slice view: the CT in ``window_hu`` (low, high), an optional RGBA overlay, marks, Slicer's bar and
    letters.  ``marks`` are (row, column, colour, size) in the view's pixels.
    """
    colour, letter, name, letters = VIEW_STYLE[view.name]
    axis.set_facecolor(BACKGROUND)
    axis.imshow(view.planes[0], cmap="gray", vmin=window_hu[0], vmax=window_hu[1], aspect=view.aspect,
                interpolation="bilinear")
    if overlay is not None:
        axis.imshow(overlay, aspect=view.aspect, interpolation="nearest")
    for row, column, mark_colour, size in marks:
        axis.scatter([column], [row], s=size, facecolors="none", edgecolors=mark_colour, linewidths=2)
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_color(colour)
        spine.set_linewidth(1.5)
    axis.set_title(f" {letter}  {name}{'  ' + heading if heading else ''}", color="black", fontsize=8.5, loc="left",
                   pad=2, backgroundcolor=colour)
    style = dict(color="#ffcc66", fontsize=10, fontweight="bold", transform=axis.transAxes)
    top, bottom, left, right = letters
    axis.text(0.5, 0.985, top, ha="center", va="top", **style)
    axis.text(0.5, 0.015, bottom, ha="center", va="bottom", **style)
    axis.text(0.012, 0.5, left, ha="left", va="center", **style)
    axis.text(0.988, 0.5, right, ha="right", va="center", **style)


class Panel:
    """Writes the module panel's sections top to bottom, as lines of text in the left axes."""

    def __init__(self, axis: Any) -> None:
        self.axis = axis
        self.y = 0.975
        self.axis.text(0.04, self.y, "CT-FM", color=TEXT, fontsize=13, fontweight="bold", va="top")
        self.axis.text(0.96, self.y, "Modules: CTFM", color="#aaaaaa", fontsize=8, va="top", ha="right")
        self.y -= 0.06

    def section(self, name: str) -> None:
        self.y -= 0.01
        self.axis.plot([0.03, 0.97], [self.y - 0.032, self.y - 0.032], color="#555555", linewidth=0.8)
        self.axis.text(0.04, self.y, f"\u25be {name}", color=ACCENT, fontsize=9.5, fontweight="bold", va="top")
        self.y -= 0.045

    def line(self, text: str, *, colour: str = TEXT, size: float = 8.5, bold: bool = False, indent: float = 0.06,
             step: float = 0.032) -> None:
        self.axis.text(indent, self.y, text, color=colour, fontsize=size, va="top",
                       fontweight="bold" if bold else "normal")
        self.y -= step

    def swatch(self, rgb: Sequence[int], text: str) -> None:
        self.axis.add_patch(_rectangle((0.07, self.y - 0.021), 0.035, 0.019, [c / 255 for c in rgb]))
        self.line(text, indent=0.125, size=8, step=0.027)

    def progress(self, stage: str, done: int, total: int) -> None:
        """Slicer's progress bar at 100 % and the status text "done"."""
        self.axis.add_patch(_rectangle((0.06, self.y - 0.028), 0.88, 0.026, "#3a3a3a", edge="#777777"))
        self.axis.add_patch(_rectangle((0.06, self.y - 0.028), 0.88, 0.026, "#2f7d32"))
        self.axis.text(0.5, self.y - 0.015, f"{stage} {done}/{total} \u2014 done", color="white", fontsize=8,
                       ha="center", va="center")
        self.y -= 0.042


def _rectangle(xy: tuple[float, float], width: float, height: float, colour: Any, edge: str | None = None) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle(xy, width, height, facecolor=colour, edgecolor=edge or "none", linewidth=0.8)


def model_line(weights: dict[str, str]) -> str:
    """The panel's "Active:" text (CTFMLogic.describeWeights)."""
    return f"{weights['name']} (sha256 {weights['sha256'][:12]})"


def centre_of(mask: np.ndarray) -> np.ndarray:
    """The voxel (z, y, x) of ``mask`` nearest its centroid, so the slices cut through the structure."""
    points = np.argwhere(mask)
    centroid = points.mean(axis=0)
    return points[np.argmin(np.linalg.norm(points - centroid, axis=1))].astype(float)


def view_marks(grid: Any, point_lps: Sequence[float], colour: str, size: float) -> list[list[tuple]]:
    """Per view (axial, coronal, sagittal through the point itself) the mark at ``point_lps``: (row, column, ...)."""
    index = grid.lps_to_zyx_index(np.asarray(point_lps, dtype=float))
    marker = np.zeros(grid.shape_zyx, np.uint8)
    z, y, x = np.clip(np.rint(index).astype(int), 0, np.array(grid.shape_zyx) - 1)
    marker[z, y, x] = 1
    marks = []
    for view in orthogonal_views(grid, [marker], index):
        found = np.argwhere(view.planes[0] == 1)
        marks.append([(found[0][0], found[0][1], colour, size)] if len(found) else [])
    return marks


# --- the three figures -----------------------------------------------------------------------------------------


def segmentation_figure(volume: CTVolume, result: dict[str, Any], path: Path) -> Path:
    """The label overlay with the structures' own colours, a legend of the largest with volumes in mL."""
    labels = result["labels"]
    table = label_table({int(value): name for value, name in result["names"].items()})
    structures = result["structures"]
    lut = np.zeros((256, 4), np.float32)
    for value, label in table.items():
        lut[value] = (*(c / 255 for c in label.color_rgb), 0.5)
    centre = centre_of(labels == structures[0]["label"]) if structures else np.array(volume.shape_zyx) / 2
    views = orthogonal_views(volume.grid, [volume.voxels, labels], centre)
    figure, panel_axis, axes = layout("Slice views: segmentation overlay (segment opacity 50 %), "
                                      "slices through the largest structure", top=0.66)
    for axis, view in zip(axes[1:], views, strict=True):
        draw_view(axis, View(view.name, (view.planes[0],), view.aspect), overlay=lut[view.planes[1]])
    draw_projection(axes[0], volume, labels, lut)
    panel = Panel(panel_axis)
    panel.section("Inputs")
    panel.line(f"Input CT:  {Path(volume.source).name}")
    panel.line(f"{'x'.join(map(str, volume.shape_zyx[::-1]))} voxels, "
               f"{' x '.join(f'{s:.1f}' for s in volume.spacing_xyz_mm)} mm", colour="#aaaaaa", size=8)
    panel.section("Segmentation")
    panel.progress("segmenting", *result["progress"].get("segmenting", (1, 1)))
    panel.line(f"{len(structures)} structures in {result['seconds']:.0f} s on {result.get('device', 'cpu')}",
               bold=True)
    panel.line("Largest structures (volume):", colour="#aaaaaa", size=8)
    for row in structures[:10]:
        panel.swatch(table[int(row["label"])].color_rgb, f"{row['name']}  {row['volume_ml']:.0f} mL")
    panel.line("[ Export DICOM-SEG ]  (for volumes loaded from the DICOM database)", colour="#aaaaaa", size=7.5)
    panel.section("Model")
    panel.line(f"Active:  {model_line(result['weights'])}", size=8)
    panel.line("demonstration model (trained on 1 labelled CT)", colour="#ff9f80", size=8)
    panel.line(NOT_CLINICAL, colour="#ff9f80", size=7.5)
    footer(figure)
    return save(figure, path)


def draw_projection(axis: Any, volume: CTVolume, labels: np.ndarray | None = None, lut: np.ndarray | None = None,
                    title: str = "3D stand-in: anterior projection of the segments") -> None:
    """The 3D view's stand-in: a bone maximum-intensity projection from the front, and with ``labels`` the first
    segment met from the front in its colour (``lut``: label value -> RGBA)."""
    import SimpleITK as sitk

    grid = volume.grid
    aspect = orthogonal_views(grid, [np.zeros(grid.shape_zyx, np.uint8)], np.array(grid.shape_zyx) / 2)[1].aspect
    ct = sitk.GetArrayFromImage(sitk.DICOMOrient(grid.image(volume.voxels.astype(np.float32)), "LPS"))
    bone = np.clip((ct.max(axis=1)[::-1] - 200) / 1600, 0, 1)  # (S down the rows, R..L along the columns)
    axis.set_facecolor(BACKGROUND)
    axis.imshow(bone, cmap="gray", aspect=aspect, vmin=0, vmax=1)
    if labels is not None and lut is not None:
        oriented = sitk.GetArrayFromImage(sitk.DICOMOrient(grid.image(labels), "LPS"))
        front = np.argmax(oriented > 0, axis=1)  # first labelled voxel from the anterior side
        first = np.take_along_axis(oriented, front[:, None, :], axis=1)[:, 0, :][::-1]
        colours = lut[first].copy()
        colours[..., 3] = np.where(first > 0, 0.45, 0.0)
        axis.imshow(colours, aspect=aspect, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_color("#8888ff")
        spine.set_linewidth(1.5)
    axis.set_title(f" 1  {title}", color="black", fontsize=8.5, loc="left", pad=2, backgroundcolor="#8888ff")
    style = dict(color="#ffcc66", fontsize=10, fontweight="bold", transform=axis.transAxes)
    axis.text(0.5, 0.985, "S", ha="center", va="top", **style)
    axis.text(0.5, 0.015, "I", ha="center", va="bottom", **style)
    axis.text(0.012, 0.5, "R", ha="left", va="center", **style)
    axis.text(0.988, 0.5, "L", ha="right", va="center", **style)


def triage_figure(volume: CTVolume, result: dict[str, Any], path: Path) -> Path:
    """The head CT and the triage panel: probability, decision, threshold, what the input check found."""
    views = orthogonal_views(volume.grid, [volume.voxels], brain_level(volume))
    figure, panel_axis, axes = layout("Slice views: the head CT that was triaged (window W 150, L 50); "
                                      "triage answers for the whole scan")
    for axis, view in zip(axes[1:], views, strict=True):
        draw_view(axis, view, window_hu=(-25.0, 125.0))
    checks = result.get("checks", {})
    draw_projection(axes[0], volume, title="3D stand-in: bone projection from the front")
    panel = Panel(panel_axis)
    panel.section("Inputs")
    panel.line(f"Input CT:  {Path(volume.source.rstrip('/')).name} (DICOM)")
    panel.line(f"{'x'.join(map(str, volume.shape_zyx[::-1]))} voxels, "
               f"{' x '.join(f'{s:.2f}' for s in volume.spacing_xyz_mm)} mm", colour="#aaaaaa", size=8)
    panel.section("Triage")
    panel.progress("triage", *result["progress"].get("triage", (2, 2)))
    colour = "#ff7070" if result["decision"] == "abnormal" else "#80e080"
    panel.line(f"{result['decision']}", colour=colour, size=12, bold=True, step=0.042)
    panel.line(f"probability  {result['probability']:.3f}")
    panel.line(f"threshold    {result['threshold']:.2f}  ({result.get('threshold_source', '')})")
    found = "; ".join(checks.get("reasons", []) or []) or "a head CT the model can judge"
    panel.line("Input check:", colour="#aaaaaa", size=8)
    for text in _wrap(found, 52):
        panel.line(text, size=8, indent=0.09, step=0.028)
    coverage = checks.get("coverage_mm")
    if coverage:
        panel.line(f"coverage {' x '.join(f'{c:.0f}' for c in coverage)} mm (S, A-P, L-R)", size=8, indent=0.09)
    for note in result.get("notes", [])[:2]:
        for text in _wrap(f"Note: {note}", 52)[:3]:
            panel.line(text, size=7.5, indent=0.09, step=0.026, colour="#cccccc")
    panel.section("Model")
    panel.line(f"Active:  {model_line(result['weights'])}", size=8)
    panel.line("DEMONSTRATION CHECKPOINT, NOT A MODEL:", colour="#ff9f80", size=8, bold=True)
    panel.line("fitted for one epoch to show the workflow;", colour="#ff9f80", size=8)
    panel.line("its probability means nothing.", colour="#ff9f80", size=8)
    panel.line(NOT_CLINICAL, colour="#ff9f80", size=7.5)
    footer(figure)
    return save(figure, path)


def brain_level(volume: CTVolume) -> np.ndarray:
    """A voxel (z, y, x) at the centre of the scan in-plane and 30 % of its extent above its centre along S."""
    shape = np.array(volume.shape_zyx, dtype=float)
    corners = np.array([[z, y, x] for z in (0, shape[0] - 1) for y in (0, shape[1] - 1) for x in (0, shape[2] - 1)])
    superior = volume.zyx_index_to_lps(corners)[:, 2]
    centre = volume.zyx_index_to_lps((shape - 1) / 2)
    centre[2] += 0.3 * (superior.max() - superior.min())
    return volume.lps_to_zyx_index(centre)


def deepest_point(mask: np.ndarray, spacing_xyz_mm: Sequence[float]) -> np.ndarray:
    """The voxel (z, y, x) of ``mask`` farthest from its boundary (in mm): the middle of a structure."""
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(mask, sampling=tuple(spacing_xyz_mm)[::-1])
    return np.array(np.unravel_index(np.argmax(depth), mask.shape), dtype=float)


def search_figure(source: CTVolume, target: CTVolume, point_lps: Sequence[float], clicked: str,
                  result: dict[str, Any], weights: dict[str, str], timings: dict[str, float], path: Path) -> Path:
    """Source view with the clicked point; target views with the heatmap (PET-Heat-like) and the best match."""
    import matplotlib.pyplot as plt

    found = result["targets"][0]
    best = found["matches"][0]
    heat = result["heatmap_0"]
    source_index = source.grid.lps_to_zyx_index(np.asarray(point_lps, float))
    best_index = target.grid.lps_to_zyx_index(np.asarray(best["point_lps"], float))
    source_views = orthogonal_views(source.grid, [source.voxels], source_index)
    target_views = orthogonal_views(target.grid, [target.voxels, heat], best_index)
    figure, panel_axis, axes = layout("Slice views: top left the input CT with the clicked point (cyan); the "
                                      "others the target, similarity heatmap, best match (green)", top=0.66)
    colormap = plt.get_cmap(HEATMAP_CMAP)
    click = view_marks(source.grid, point_lps, "cyan", 220)[0]
    draw_view(axes[0], source_views[0], heading="input CT (query)", marks=click)
    best_marks = view_marks(target.grid, best["point_lps"], "#33ff66", 260)
    for axis, view, marks in zip(axes[1:], target_views, best_marks, strict=True):
        similarity = view.planes[1]
        rgba = colormap(np.clip(similarity, 0, 1))
        rgba[..., 3] = np.where(similarity >= HEATMAP_HIDE_BELOW, HEATMAP_OPACITY, 0.0)
        draw_view(axis, View(view.name, (view.planes[0],), view.aspect), heading="target", overlay=rgba, marks=marks)
    panel = Panel(panel_axis)
    panel.section("Inputs")
    panel.line(f"Input CT:  {Path(source.source).name}")
    panel.section("Semantic search")
    panel.line(f"Clicked: the middle of the segmented {clicked}", size=8)
    panel.line(f"Query point:  ({', '.join(f'{v:.0f}' for v in point_lps)}) mm LPS", size=8)
    panel.line(f"Search in:  {Path(target.source).name}", size=8)
    panel.progress("features", 2, 2)
    panel.line(f"cosine {best['similarity']:.3f} at ({', '.join(f'{v:.0f}' for v in best['point_lps'])})"
               + (" (flat)" if found["flat"] else ""), bold=True)
    for rank, match in enumerate(found["matches"][1:], start=2):
        panel.line(f"#{rank}  cosine {match['similarity']:.3f} at "
                   f"({', '.join(f'{v:.0f}' for v in match['point_lps'])})", size=8, indent=0.09, step=0.027)
    panel.line(f"features of 2 volumes: {timings['loading']:.1f} s (once)", size=8, colour="#aaaaaa")
    panel.line(f"first click {timings['first']:.2f} s; repeated click {timings['repeated']:.2f} s", size=8.5,
               bold=True)
    panel.line(f"(worker's own time for the repeat: {result['seconds']:.2f} s)", size=8, colour="#aaaaaa")
    panel.line(f"heatmap: hot (PET-Heat family), hidden below {HEATMAP_HIDE_BELOW}", size=8, colour="#aaaaaa")
    panel.section("Model")
    panel.line(f"Active:  {model_line(weights)}", size=8)
    panel.line("demonstration encoder: matches are often not", colour="#ff9f80", size=8)
    panel.line("anatomically right (see README caveats)", colour="#ff9f80", size=8)
    panel.line(NOT_CLINICAL, colour="#ff9f80", size=7.5)
    footer(figure)
    return save(figure, path)


def save(figure: Any, path: Path) -> Path:
    """``save_figure``, then, when the PNG is over ``MAX_BYTES``, the same picture reduced to 256 colours."""
    save_figure(figure, path, dpi=DPI)
    if path.stat().st_size > MAX_BYTES:
        from PIL import Image

        from ctfm_engine.io import atomic_output

        with Image.open(path) as image:
            reduced = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        with atomic_output(path) as temporary:
            reduced.save(temporary, format="PNG", optimize=True)
    return path


def footer(figure: Any) -> None:
    figure.text(0.305, 0.008, "Rendered by SlicerCTFM/Testing/make_figures.py from results of the module's job API "
                "(CTFMLib.jobs) -- not a screenshot of Slicer.", color="#888888", fontsize=7.5, va="bottom")


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


# --- main ------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=MODULE / "Resources" / "Screenshots")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=("segmentation", "triage", "search"), action="append")
    arguments = parser.parse_args(argv)
    wanted = set(arguments.only or ("segmentation", "triage", "search"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    arguments.out.mkdir(parents=True, exist_ok=True)
    sample = read_volume(SAMPLE_CT)
    with tempfile.TemporaryDirectory(prefix="ctfm-figures-") as scratch:
        work = Path(scratch)
        segmentation = None
        if wanted & {"segmentation", "search"}:
            print("segmentation (start_segmentation) ...", file=sys.stderr)
            segmentation = run_job(jobs.start_segmentation(sample, None, arguments.device, work_dir=work / "jobs"),
                                   "segmentation")
        if "segmentation" in wanted:
            print(segmentation_figure(sample, segmentation, arguments.out / "segmentation.png"))
        if "triage" in wanted:
            if not HEAD_CT.is_dir():
                print(f"skipping triage.png: the head CT {HEAD_CT} is not here", file=sys.stderr)
            else:
                print("training the demonstration triage checkpoint (ctfm finetune, 1 epoch) ...", file=sys.stderr)
                checkpoint = train_demo_triage_checkpoint(work / "triage-run")
                head = read_dicom_series(HEAD_CT)
                result = run_job(jobs.start_triage(head, checkpoint, arguments.device, work_dir=work / "jobs"),
                                 "triage")
                print(triage_figure(head, result, arguments.out / "triage.png"))
        if "search" in wanted:
            target = read_volume(SEARCH_TARGET) if SEARCH_TARGET.is_file() else sample
            # The click: the middle of the segmented liver (or of the largest structure), as a user would pick it.
            labels, rows = segmentation["labels"], segmentation["structures"]
            organ = next((row for row in rows if row["name"] == "liver"), rows[0])
            point = sample.zyx_index_to_lps(deepest_point(labels == organ["label"], sample.spacing_xyz_mm))
            worker = jobs.SearchWorker(None, arguments.device, cache_dir=work / "features", top_k=3,
                                       work_dir=work / "jobs")
            try:
                keys = [worker.add_volume(sample, "source"), worker.add_volume(target, "target")]
                timings = {"loading": wait_worker(worker, lambda: set(keys) <= set(worker.loaded), "loading")}
                for name in ("first", "repeated"):
                    request = worker.query("source", point, ["target"])
                    timings[name] = wait_worker(worker, lambda r=request: r in worker.results or r in worker.errors,
                                                "search")
                    if request in worker.errors:
                        raise SystemExit(f"search failed: {worker.errors[request].message}")
                result = worker.results[request]
                print(search_figure(sample, target, point, organ["name"], result, worker.weights, timings,
                                    arguments.out / "search.png"))
            finally:
                worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
