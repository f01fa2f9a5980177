"""What the CTFM module does with MRML, without Qt: worker results become nodes, and a semantic-search session.

``CTFMLogic`` (``CTFM.py``) delegates here, so the path the module takes from a finished job to the nodes a
radiologist sees runs in CI against real MRML (``slicer-core``) and real workers (``tests/test_slicer_session.py``).
Every function takes its scene explicitly; nothing here imports Qt or ``slicer.app``.  Imports ``ctfm_engine``
(through the adapters), so the module loads this only after its dependency check.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctfm_engine.labels import label_table
from CTFMLib import jobs, mrml_adapters

NOT_CLINICAL = "Research use only: CT-FM results are not for clinical decisions."
HEATMAP_OPACITY = 0.4


def provenance(weights: dict[str, Any] | None) -> str:
    """The sentence every result's status line ends with: a demonstration model is named as such (the engine flags
    its weights ``demonstration``), anything else is research use only."""
    if weights and weights.get("demonstration"):
        return f"Made with the demonstration model {weights['name']}, not CT-FM, not for clinical use."
    return NOT_CLINICAL


# --- segmentation and triage results --------------------------------------------------------------------------


def import_segmentation(result: dict[str, Any], volume_node: Any, scene: Any, replace: Any = None) -> Any:
    """A finished segmentation job's labels as a segmentation node beside ``volume_node`` (its study).

    The node is named ``"<volume> segmentation"`` (or keeps the name of ``replace``, the node it replaces), has one
    segment per structure present with name, colour, SNOMED terminology and ``DICOM.SegmentAlgorithmType
    AUTOMATIC`` / ``DICOM.SegmentAlgorithmName "CT-FM <model>"`` (what a DICOM-SEG export writes).
    """
    table = label_table({int(value): name for value, name in result["names"].items()})
    name = replace.GetName() if replace is not None else f"{volume_node.GetName()} segmentation"
    if replace is not None:
        scene.RemoveNode(replace)
    return mrml_adapters.labels_to_segmentation_node(result["labels"], volume_node, table, scene, name=name,
                                                     model_name=result["weights"]["name"])


def import_measurements(result: dict[str, Any], volume_node: Any, scene: Any, replace: Any = None) -> Any:
    """A finished segmentation job's organ measurements (volume, HU statistics on the input's grid) as a table node
    ``"<volume> measurements"`` beside ``volume_node`` (replacing ``replace``), or None when nothing was found."""
    rows = result.get("measurements") or []
    name = replace.GetName() if replace is not None else f"{volume_node.GetName()} measurements"
    if replace is not None:
        scene.RemoveNode(replace)
    if not rows:
        return None
    return mrml_adapters.measurements_to_table_node(rows, volume_node, scene, name)


def describe_segmentation(result: dict[str, Any]) -> str:
    """The status line: structure count, time, the three largest structures, and what made them."""
    rows = result["structures"]
    largest = ", ".join(f"{row['name']} {row['volume_ml']:.0f} mL" for row in rows[:3])
    return f"{len(rows)} structures in {result['seconds']:.0f} s ({largest}). {provenance(result.get('weights'))}"


def describe_triage(result: dict[str, Any]) -> str:
    """The decision, probability, threshold and what the input check found (HTML for a QLabel): the extent the
    scan covers, the skull it found, what the model's field of view leaves out, and the check's notes."""
    checks = result.get("checks") or {}
    found = []
    reasons = list(checks.get("reasons") or [])
    if reasons:
        found.append("not a head CT: " + "; ".join(reasons))
    if "coverage_mm" in checks:
        found.append("the scan covers {:.0f} × {:.0f} × {:.0f} mm (S × P × L)".format(*checks["coverage_mm"]))
    if checks.get("skull_extent_mm"):
        found.append(f"a skull around brain-like tissue over {checks['skull_extent_mm']:.0f} mm along S, "
                     f"{checks.get('cranial_width_mm', 0.0):.0f} mm wide inside")
    cropped = [float(value) for value in checks.get("cropped_away_mm") or ()]
    if any(cropped):
        found.append("the model's field of view leaves out {:.0f} / {:.0f} / {:.0f} mm along S / P / L"
                     .format(*cropped))
    notes = dict.fromkeys([*(checks.get("notes") or []), *result.get("notes", [])])  # each note once, in order
    return (f"<b>{result['decision']}</b>: probability {result['probability']:.3f} (threshold "
            f"{result['threshold']:.2f}, {result.get('threshold_source', '')}).<br>Input check: "
            f"{'; '.join(found) or 'nothing recorded'}." + "".join(f"<br>Note: {note}" for note in notes)
            + f"<br>{provenance(result.get('weights'))}")


def triage_status(result: dict[str, Any]) -> str:
    """The status line of a finished triage: the decision, and what made it."""
    return f"Triage finished: {result['decision']}. {provenance(result.get('weights'))}"


def search_status(event: dict[str, Any]) -> str:
    """The status line of an answered search click: how long it took, and what answered it."""
    return f"Search answered in {event.get('seconds', 0.0):.2f} s. {provenance(event.get('weights'))}"


def describe_weights(weights: dict[str, Any] | None) -> str:
    """``name (sha256 0123456789ab)`` of the checkpoint a job reported (``, a demonstration model`` for one; the
    engine's statement for one that is or claims to be a published checkpoint), or empty."""
    if not weights:
        return ""
    published = weights.get("published")
    return f"{weights['name']} (sha256 {weights['sha256'][:12]})" + (
        ", a demonstration model" if weights.get("demonstration") else "") + (
        f", {published['statement']}" if published else "")


# --- semantic search ------------------------------------------------------------------------------------------


def volume_key(volume_node: Any) -> str:
    """Node ID + voxel modification time: a volume whose voxels changed is sent (and its features computed) again."""
    return f"{volume_node.GetID()}-{volume_node.GetImageData().GetMTime()}"


class SearchSession:
    """One persistent search worker for a source volume and its target volumes in one scene.

    Volumes are sent once (the worker computes and caches their features); each query is answered from the cache.
    ``show_result`` turns a result into one heatmap volume per target, overlays the best target's and moves the
    slice views to its best match.
    """

    def __init__(self, scene: Any, weights: str | Path | None, device: str = "auto", *,
                 cache_dir: str | Path | None = None, top_k: int = 3, skip_ct_check: bool = False,
                 python: str | None = None, work_dir: str | Path | None = None) -> None:
        self.scene = scene
        self.settings = self._settings(weights, device, cache_dir, top_k, skip_ct_check)
        self.worker = jobs.SearchWorker(weights, device, cache_dir=cache_dir, top_k=top_k,
                                        skip_ct_check=skip_ct_check, python=python, work_dir=work_dir)
        self.source: Any = None
        self.targets: list[Any] = []
        self.nodes: dict[str, Any] = {}  # worker volume key -> volume node

    @property
    def alive(self) -> bool:
        return self.worker.alive

    @staticmethod
    def _settings(weights: str | Path | None, device: str, cache_dir: str | Path | None, top_k: int,
                  skip_ct_check: bool) -> tuple:
        return str(weights), device, str(cache_dir), int(top_k), bool(skip_ct_check)

    def matches(self, weights: str | Path | None, device: str, cache_dir: str | Path | None, top_k: int,
                skip_ct_check: bool = False) -> bool:
        """Whether this session was started with these settings (else the caller starts a new one)."""
        return self.settings == self._settings(weights, device, cache_dir, top_k, skip_ct_check)

    def set_volumes(self, source: Any, targets: Sequence[Any]) -> list[str]:
        """Search from ``source`` in ``targets`` from now on; the keys of the volumes sent now (those the worker
        has not seen, or whose voxels changed)."""
        self.source, self.targets = source, list(targets)
        sent = []
        for node in [source, *self.targets]:
            key = volume_key(node)
            if key not in self.nodes:
                self.worker.add_volume(mrml_adapters.volume_node_to_ctvolume(node, keep_small_integers=True), key)
                self.nodes[key] = node
                sent.append(key)
        return sent

    def query(self, markups_node: Any, index: int = 0) -> int:
        """Ask for control point ``index`` of ``markups_node`` (world RAS, sent as LPS); the request id."""
        point = mrml_adapters.markup_point_lps(markups_node, index)
        return self.worker.query(volume_key(self.source), point, [volume_key(node) for node in self.targets],
                                 heatmap_grid="model")

    def show_result(self, event: dict[str, Any], opacity: float = HEATMAP_OPACITY) -> str:
        """Heatmap volume ``"<target> similarity"`` per target (replacing the previous one), the best target's over
        it in every slice view, the views centred on the best match; a summary line per target (HTML).  Heatmaps
        come on the model grid (3 x 1 x 1 mm for CT-FM search): Slicer reslices them onto the views, and a
        thin-slice target's heatmap is a fraction of its size."""
        best, lines = None, []
        for index, target in enumerate(event["targets"]):
            node = self.nodes[target["key"]]
            match = target["matches"][0]
            heatmap = event.get(f"heatmap_{index}")
            if heatmap is not None:
                grid = jobs.grid_from_event(target) if "heatmap_grid" in target else mrml_adapters.grid_of_node(node)
                heatmap_node = self.heatmap_node(f"{node.GetName()} similarity", heatmap, grid)
                if best is None or match["similarity"] > best[0]["similarity"]:
                    best = (match, node, heatmap_node)
            lines.append(f"{node.GetName()}: cosine {match['similarity']:.3f}" + (" (flat)" if target["flat"] else ""))
        if best is not None:
            match, node, heatmap_node = best
            mrml_adapters.show_as_overlay(self.scene, node, heatmap_node, opacity)
            mrml_adapters.jump_slices_to_lps(self.scene, match["point_lps"])
        return "<br>".join(lines + event.get("notes", []))

    def heatmap_node(self, name: str, heatmap: Any, grid: Any) -> Any:
        existing = self.scene.GetFirstNodeByName(name)
        if existing is not None and existing.IsA("vtkMRMLScalarVolumeNode"):
            self.scene.RemoveNode(existing)
        return mrml_adapters.heatmap_to_volume_node(heatmap, grid, self.scene, name)

    def close(self) -> None:
        """Stop the worker; returns at once."""
        self.worker.close()
        self.nodes = {}
