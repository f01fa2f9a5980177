"""What the CT-FM encoder sees, from input scans to pictures and scores, once, for every face.

:func:`run_saliency` (occlusion saliency, OFD), :func:`run_concept_maps` (one joint PCA of the dense features of
several scans, as colours) and :func:`run_organ_centroid_distance` (semantic search of each labelled structure of one
scan in another, scored by the labels) read and validate their inputs before the encoder loads, resolve the encoder
by the one weights policy (announced when it is the bundled demonstration model) and return outcomes carrying
``weights`` (``{"name", "sha256", "demonstration"}``) that write their own files; the face picks the file names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctfm_engine.errors import UsageError
from ctfm_engine.models.checkpoint import Checkpoint
from ctfm_engine.pipelines.embedding import open_encoder
from ctfm_engine.pipelines.inputs import Scan, ValidatedScans, as_source, read_scan, scan_name
from ctfm_engine.pipelines.search import Searcher, open_searcher
from ctfm_engine.progress import CancelCheck, Progress
from ctfm_engine.tasks.concept_map import DEFAULT_SEED, ConceptFit, ConceptMap, concept_maps
from ctfm_engine.tasks.ocd import MINIMUM_VOXELS, OrganQuery, organ_centroid_distances, read_label_map, write_ocd_figure
from ctfm_engine.tasks.saliency import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MASK_SIZE,
    DEFAULT_OVERLAP,
    DEFAULT_SMOOTH_MM,
    Saliency,
    check_settings,
    saliency,
)
from ctfm_engine.tasks.search import APP_OVERLAP, APP_PATCH_MM_ZYX, METHODS, SearchSettings
from ctfm_engine.volume import CTVolume

log = logging.getLogger("ctfm_engine.insight")

OCCLUSIONS = ("gaussian", "zero")


# --- occlusion saliency ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaliencyRequest:
    """OFD saliency of one scan: occlusion boxes of ``mask_size`` voxels at 3 mm, ``occlusion`` "gaussian" (MONAI's,
    the paper's) or "zero" (air), the map smoothed by a 3-D Gaussian of ``smooth_mm`` (0: none)."""

    input: Scan
    weights: str | Path | None = None
    series_uid: str | None = None
    hu_offset: float | None = None
    mask_size: int = DEFAULT_MASK_SIZE
    overlap: float = DEFAULT_OVERLAP
    occlusion: str = "gaussian"
    batch_size: int = DEFAULT_BATCH_SIZE
    smooth_mm: float = DEFAULT_SMOOTH_MM
    device: str = "cpu"
    progress: Progress | None = field(default=None, compare=False)  # occluded volumes done of all
    cancel: CancelCheck | None = field(default=None, compare=False)

    def check(self) -> None:
        try:
            check_settings(self.mask_size, self.overlap, self.batch_size)
        except ValueError as error:
            raise UsageError(f"saliency settings: {error}") from None
        if self.occlusion not in OCCLUSIONS:
            raise UsageError(f"occlusion {self.occlusion!r}: choose one of {', '.join(OCCLUSIONS)}")
        if not self.smooth_mm >= 0:
            raise UsageError(f"smoothing sigma {self.smooth_mm} mm: give 0 (no smoothing) or a positive sigma in mm")


@dataclass(frozen=True)
class SaliencyOutcome:
    """The saliency map on the input's grid (see :class:`~ctfm_engine.tasks.saliency.Saliency`) and its provenance."""

    saliency: Saliency
    checkpoint: Checkpoint
    device: str

    @property
    def weights(self) -> dict[str, Any]:
        return self.checkpoint.identity

    def write_volume(self, path: str | Path) -> Path:
        """The saliency volume (float32, 0..2) on the input's grid as NIfTI/NRRD/MHA, atomically."""
        return self.saliency.write(path)

    def draw(self, path: str | Path) -> Path:
        """PNG: three slices through the most salient voxel, saliency over the CT."""
        return self.saliency.draw(path, self.checkpoint.name)


def run_saliency(request: SaliencyRequest) -> SaliencyOutcome:
    """Saliency of ``request.input``: settings and input are checked before the encoder loads."""
    request.check()
    volume = read_scan(as_source(request.input, request.series_uid, request.hu_offset))
    from ctfm_engine.runtime.device import resolve_device

    device = resolve_device(request.device)
    encoder, checkpoint = open_encoder(request.weights)
    log.info("saliency of %s with %s (sha256 %s) on %s", Path(volume.source).name, checkpoint.name,
             checkpoint.sha256[:12], device)
    result = saliency(volume, encoder, mask_size=request.mask_size, overlap=request.overlap,
                      occlusion="gaussian" if request.occlusion == "gaussian" else 0.0, batch_size=request.batch_size,
                      smooth_mm=request.smooth_mm, device=device, progress=request.progress, cancel=request.cancel)
    return SaliencyOutcome(result, checkpoint, str(device))


# --- concept maps -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptMapRequest:
    """Concept maps of one or more scans, coloured by one PCA fitted jointly on all of them."""

    inputs: Sequence[Scan]
    weights: str | Path | None = None
    series_uid: str | None = None
    hu_offset: float | None = None
    device: str = "cpu"
    progress: Progress | None = field(default=None, compare=False)  # scans embedded of all
    cancel: CancelCheck | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ConceptMapOutcome:
    """One RGB concept map per input (on its own grid), the joint PCA fit, and the provenance."""

    maps: list[ConceptMap]
    inputs: list[str]
    fit: ConceptFit
    checkpoint: Checkpoint
    device: str
    seconds: float
    seed: int = DEFAULT_SEED

    @property
    def weights(self) -> dict[str, Any]:
        return self.checkpoint.identity

    def write_volume(self, index: int, path: str | Path) -> Path:
        """Input ``index``'s concept map as an RGB volume on its own grid (NRRD keeps the colour), atomically."""
        return self.maps[index].write(path)

    def draw(self, index: int, path: str | Path) -> Path:
        """PNG of input ``index``'s concept map beside its CT."""
        return self.maps[index].draw(path, self.checkpoint.name)


def run_concept_maps(request: ConceptMapRequest) -> ConceptMapOutcome:
    """Concept maps of every input; all are validated before the encoder loads."""
    if not request.inputs:
        raise UsageError("no scans: give at least one")
    scans = ValidatedScans([as_source(item, request.series_uid, request.hu_offset) for item in request.inputs])
    from ctfm_engine.runtime.device import resolve_device

    device = resolve_device(request.device)
    encoder, checkpoint = open_encoder(request.weights)
    log.info("concept map of %d scan(s) with %s (sha256 %s) on %s", len(scans), checkpoint.name,
             checkpoint.sha256[:12], device)
    started = time.perf_counter()
    maps, fit = concept_maps(scans.volumes(), encoder, device=device, progress=request.progress,
                             cancel=request.cancel)
    return ConceptMapOutcome(maps, [scan_name(scan) for scan in scans.scans], fit, checkpoint, str(device),
                             time.perf_counter() - started)


# --- organ centroid distance --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrganCentroidRequest:
    """Organ centroid distance: each structure labelled in both scans is searched from its centroid in ``source``
    in ``target``; label maps are sampled (nearest) onto their scan's grid and use the same label numbers."""

    source: Scan
    source_labels: str | Path
    target: Scan
    target_labels: str | Path
    weights: str | Path | None = None
    series_uid: str | None = None
    hu_offset: float | None = None
    method: str = "fast"
    organs: Sequence[int] | None = None  # only these label numbers (default: every shared structure)
    minimum_voxels: int = MINIMUM_VOXELS
    patch_mm_zyx: tuple[float, float, float] = APP_PATCH_MM_ZYX
    overlap: float = APP_OVERLAP
    device: str = "cpu"
    progress: Progress | None = field(default=None, compare=False)  # structures done of all
    cancel: CancelCheck | None = field(default=None, compare=False)

    def settings(self) -> SearchSettings:
        if self.method not in METHODS:
            raise UsageError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        return SearchSettings(tuple(self.patch_mm_zyx), self.overlap, top_k=1)


@dataclass(frozen=True)
class OrganCentroidOutcome:
    """One row per structure searched, their summary (OCD mean with CI, median, share inside), and provenance."""

    structures: list[OrganQuery]
    summary: dict[str, Any]
    settings: SearchSettings
    method: str
    source: CTVolume
    target: CTVolume
    searcher: Searcher

    @property
    def weights(self) -> dict[str, Any]:
        return self.searcher.weights

    @property
    def device(self) -> str:
        return self.searcher.device

    def rows(self) -> list[dict[str, Any]]:
        """Each structure as JSON-able values (points as [x, y, z] LPS mm)."""
        return [vars(row) | {"query_lps": list(row.query_lps), "match_lps": list(row.match_lps),
                             "centroid_lps": list(row.centroid_lps)} for row in self.structures]

    def write_figure(self, path: str | Path, source_name: str, target_name: str) -> Path:
        """A bar per structure (distance to its centroid, hits and misses coloured) as PNG."""
        title = (f"{source_name} -> {target_name}, {self.method} search "
                 f"[{self.searcher.checkpoint.name}; not for clinical use]")
        return write_ocd_figure(self.structures, self.summary, path, title)


def run_organ_centroid_distance(request: OrganCentroidRequest) -> OrganCentroidOutcome:
    """Search every shared structure; scans and label maps are read and checked before the encoder loads."""
    from ctfm_engine.labels import totalsegmentator_names
    from ctfm_engine.training.metrics import ocd_summary

    settings = request.settings()
    source = read_scan(as_source(request.source, request.series_uid, request.hu_offset))
    target = read_scan(as_source(request.target, request.series_uid, request.hu_offset))
    source_labels = read_label_map(request.source_labels, source)
    target_labels = read_label_map(request.target_labels, target)
    searcher = open_searcher(request.weights, device=request.device, settings=settings, disk_cache=False)
    structures = organ_centroid_distances(
        searcher.search, source, source_labels, target, target_labels, names=totalsegmentator_names(),
        organs=request.organs, minimum_voxels=request.minimum_voxels, method=request.method,
        progress=request.progress, cancel=request.cancel)
    return OrganCentroidOutcome(structures, ocd_summary(structures), settings, request.method, source, target,
                                searcher)

