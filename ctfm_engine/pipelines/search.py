"""Semantic search from a clicked point to matches and heatmaps in other scans, once, for every face.

:func:`open_searcher` loads the encoder the weights policy picks and wraps it in a :class:`Searcher` that keeps
feature maps in memory (and on disk) across queries: the Slicer module keeps one alive, one click after another.
:func:`run_search` is one query: the source is read and the point checked before anything else, targets are
validated before the encoder loads, and the outcome writes its own heatmaps and figures.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ctfm_engine.errors import UsageError
from ctfm_engine.models.checkpoint import Checkpoint
from ctfm_engine.models.registry import cache_dir
from ctfm_engine.pipelines.embedding import open_encoder
from ctfm_engine.pipelines.inputs import Scan, ScanSource, ValidatedScans, as_source, read_scan, sample_ct_path
from ctfm_engine.preprocess import Preprocessing, preprocessing_named
from ctfm_engine.progress import CancelCheck, Progress
from ctfm_engine.tasks.search import (
    APP_OVERLAP,
    APP_PATCH_MM_ZYX,
    METHODS,
    FeatureCache,
    SearchResult,
    SearchSettings,
    SemanticSearch,
    check_point_inside,
    heatmap_stem,
    write_heatmap,
    write_search_figure,
)
from ctfm_engine.volume import CTVolume

log = logging.getLogger("ctfm_engine.search")


@dataclass(frozen=True)
class Searcher:
    """A loaded encoder ready to search, with its feature cache and provenance; reuse it for repeated queries."""

    search: SemanticSearch
    checkpoint: Checkpoint
    device: str
    runtime: Any = None  # the dense pass's runtime Choice (precision, how chosen, trials)

    @property
    def weights(self) -> dict[str, Any]:
        return self.checkpoint.identity


def open_searcher(weights: str | Path | None = None, *, device: str = "cpu", settings: SearchSettings | None = None,
                  cache_folder: str | Path | None = None, disk_cache: bool = True,
                  allow_segmentation_encoder: bool = False, precision: str | None = None) -> Searcher:
    """The encoder the policy picks, wrapped for search; features are cached in memory and, unless ``disk_cache``
    is False, in ``cache_folder`` (default ``<ctfm cache>/features``).  A segmentation checkpoint's encoder is
    refused unless ``allow_segmentation_encoder``.  The fast method's dense pass runs in ``precision``, or (None)
    in the fastest one whose features keep what a search ranks (:func:`dense_pass_runtime`)."""
    from ctfm_engine.runtime.device import resolve_device

    torch_device = resolve_device(device)
    encoder, checkpoint = open_encoder(weights, allow_segmentation_encoder=allow_segmentation_encoder)
    folder = None if not disk_cache else Path(cache_folder) if cache_folder is not None else cache_dir() / "features"
    settings = settings or SearchSettings()
    choice = dense_pass_runtime(encoder, checkpoint, torch_device, settings, precision)
    search = SemanticSearch(encoder, checkpoint.sha256, device=torch_device, settings=settings,
                            cache=FeatureCache(folder), precision=choice.runtime.precision)
    return Searcher(search, checkpoint, str(torch_device), choice)


def dense_pass_runtime(encoder: Any, checkpoint: Checkpoint, device: Any, settings: SearchSettings,
                       precision: str | None) -> Any:
    """PyTorch fp32, or the faster reduced precision (bf16 autocast on CPUs with native bf16, fp16 on a GPU) when,
    measured once on the bundled sample CT, every cell of its dense features keeps a cosine of at least 0.999 with
    fp32's (:func:`ctfm_engine.runtime.selection.feature_agreement`); cached like segmentation's choice."""
    import torch

    from ctfm_engine.runtime.selection import (
        Choice,
        Runtime,
        cache_name,
        choose_runtime,
        feature_agreement,
        requested,
    )

    if precision is not None:
        return Choice(Runtime("torch", precision), "requested")
    if requested("auto", None) is not None:  # CTFM_BACKEND pins the runtime: the dense pass stays PyTorch fp32
        return Choice(Runtime("torch", "fp32"), "requested")
    key = {"task": "search-dense-pass", "weights_sha256": checkpoint.sha256,
           "preprocessing": settings.preprocessing.describe()}

    def sample() -> Any:
        from ctfm_engine.preprocess import preprocess

        return torch.from_numpy(preprocess(read_scan(ScanSource(sample_ct_path())), settings.preprocessing).image)

    def build(runtime: Any) -> Any:
        if runtime.backend != "torch":
            raise ValueError("the dense pass runs in PyTorch")
        search = SemanticSearch(encoder, checkpoint.sha256, device=device, settings=settings,
                                precision=runtime.precision)
        return lambda image: torch.from_numpy(search.dense_features(image.numpy()))

    return choose_runtime(key, device, build, sample, feature_agreement,
                          cache_dir() / "runtime" / cache_name("search", checkpoint.sha256, key),
                          progress=lambda line: log.warning("%s", line),
                          allowed=lambda runtime: runtime.backend == "torch")


@dataclass(frozen=True)
class SearchRequest:
    """Find the anatomy at ``point_lps`` (patient LPS mm) of ``source`` in each target."""

    source: Scan
    point_lps: tuple[float, float, float]
    targets: Sequence[Scan]
    weights: str | Path | None = None
    series_uid: str | None = None
    hu_offset: float | None = None
    method: str = "fast"
    patch_mm_zyx: tuple[float, float, float] = APP_PATCH_MM_ZYX
    overlap: float = APP_OVERLAP
    top_k: int = 5
    batch_size: int = 8
    heatmaps: bool = False
    heatmap_grid: str = "source"  # "source": each target's grid; "model": the grid they are computed on
    disk_cache: bool = True
    device: str = "cpu"
    # "pretraining" (CT-FM's 3x1x1 mm, the search app's) or "card": the feature-extractor card's crop and intensity
    # at the query scan's own voxel size, to which every target is brought so that windows compare like with like
    preprocessing: str = "pretraining"
    allow_segmentation_encoder: bool = False
    precision: str | None = None  # of the fast method's dense pass; None: chosen by measurement
    progress: Progress | None = field(default=None, compare=False)
    cancel: CancelCheck | None = field(default=None, compare=False)

    def settings(self) -> SearchSettings:
        if self.method not in METHODS:
            raise UsageError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        preprocessing_named(self.preprocessing)
        return SearchSettings(tuple(self.patch_mm_zyx), self.overlap, self.top_k, batch_size=self.batch_size)

    def preprocessing_for(self, source: CTVolume) -> Preprocessing:
        """The preprocessing of this search: a fixed spacing, the query scan's own with "card"."""
        chosen = preprocessing_named(self.preprocessing)
        if chosen.spacing_zyx_mm is None:
            return replace(chosen, spacing_zyx_mm=chosen.spacing_for(source.grid))
        return chosen


@dataclass(frozen=True)
class SearchOutcome:
    result: SearchResult
    source: CTVolume
    targets: list[CTVolume]
    searcher: Searcher
    settings: SearchSettings | None = None  # as this search ran them (its preprocessing resolved)

    @property
    def weights(self) -> dict[str, Any]:
        return self.searcher.weights

    def write_heatmaps(self, folder: str | Path) -> list[tuple[Path, Path]]:
        """Each target's heatmap (NIfTI on the target's grid) and a PNG a radiologist can read, in ``folder``."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder}: exists and is not a folder")
        written = []
        for index, target in enumerate(self.result.targets):
            stem = heatmap_stem(index, target.input)
            heatmap = write_heatmap(target, folder / f"{stem}_similarity.nii.gz")
            figure = write_search_figure(self.source, self.result, index, self.targets[index],
                                         folder / f"{stem}_search.png", weights_name=self.searcher.checkpoint.name)
            written.append((heatmap, figure))
        return written


def run_search(request: SearchRequest, searcher: Searcher | None = None) -> SearchOutcome:
    """One query: the source and point are checked first, every target is validated before the encoder loads."""
    settings = request.settings()
    source = read_scan(as_source(request.source, request.series_uid, request.hu_offset))
    check_point_inside(source, request.point_lps)
    if not request.targets:
        raise UsageError("no target scans to search in: give at least one target")
    targets = ValidatedScans([as_source(item, request.series_uid, request.hu_offset) for item in request.targets])
    settings = replace(settings, preprocessing=request.preprocessing_for(source))
    if searcher is None:
        searcher = open_searcher(request.weights, device=request.device, settings=settings,
                                 disk_cache=request.disk_cache,
                                 allow_segmentation_encoder=request.allow_segmentation_encoder,
                                 precision=request.precision)
    search = searcher.search
    if search.settings.preprocessing != settings.preprocessing:  # a kept searcher, another preprocessing
        search = search.with_settings(replace(search.settings, preprocessing=settings.preprocessing))
    log.info("weights %s (sha256 %s) on %s, method %s, %s preprocessing", searcher.checkpoint.name,
             searcher.checkpoint.sha256[:12], searcher.device, request.method, request.preprocessing)
    volumes = targets.volumes()
    result = search.search(source, request.point_lps, volumes, method=request.method,
                           heatmaps=request.heatmaps, heatmap_grid=request.heatmap_grid,
                           progress=request.progress, cancel=request.cancel)
    for note in result.notes:
        log.warning("%s", note)
    return SearchOutcome(result, source, volumes, searcher, search.settings)

