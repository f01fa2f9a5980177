"""Semantic search: click a point in one CT, find the same anatomy in other CTs (CT-FM's zero-shot search).

The query is the patch centred on a point (LPS mm) of the source scan; its CT-FM embedding is compared by cosine
similarity with the embedding of every window of each target scan.  Both scans go through the same preprocessing
(SPL, 3x1x1 mm, crop above 0 HU, window [-1024, 2048] HU: the reference app's), so the source and the targets may
have any orientation, spacing and field of view.  Two methods:

``exact``
    The reference method of the CT-FM semantic-search app: slide the patch over the target (default
    16x64x64 voxels = 48x64x64 mm, overlap 0.625, zero end-padding) and embed every window with the encoder.
    A match is a window centre.
``fast``
    One fully convolutional pass per scan gives the encoder's last feature map (stride 16, computed in z-slabs
    with an exact halo so memory stays bounded: :func:`ctfm_engine.models.encoder.last_feature_map`).  A window's
    embedding is the average of the feature cells it covers (the same global average pool the encoder applies
    to a patch), so every window position on the stride-16 lattice is scored at once.  The feature map is cached
    per scan and weights (:class:`FeatureCache`), so later queries on the same scans cost a matrix product.  The
    query embedding comes from the source's feature map the same way, so query and targets are embedded alike.
    The best window is refined below the lattice step by a parabola through its neighbours along each axis.

Decisions where the reference app is silent or arbitrary:

* The heatmap is the window similarity as a smooth field: window similarities sit on the lattice of window
  centres, are min-max normalised, linearly interpolated onto the model grid (nearest beyond the outermost
  centres), smoothed with the app's Gaussian (sigma 5 model voxels), and resampled linearly onto the target's
  source grid.  The app instead lets the last window covering a voxel overwrite it, which depends on loop order.
  Interpolation and smoothing are applied as one separable matrix per axis, which keeps a repeated query cheap.
* A flat similarity map (every window within 1e-6) has no location to show: its heatmap is all zero and the
  result says ``flat``; matches are still listed.  Ties between windows go to the first in (z, y, x) order.
* Matches are distinct places: a window whose centre lies inside the box of a better match is not listed.
* Similarities are plain cosine similarities of the pooled features, as in the app (no centring).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets.segresnet_ds import SegResEncoder

from ctfm_engine.errors import InputError, UsageError
from ctfm_engine.figures import save_figure
from ctfm_engine.io import atomic_output, write_image
from ctfm_engine.models.encoder import DEFAULT_MEMORY_BUDGET_BYTES, last_feature_map, patch_embeddings
from ctfm_engine.preprocess import CTFM_PREPROCESSING, ModelInput, Preprocessing, preprocess, resample
from ctfm_engine.progress import CancelCheck, Progress, check_cancelled
from ctfm_engine.tasks.embed import PatchWindows
from ctfm_engine.volume import CTVolume, Grid

log = logging.getLogger(__name__)

METHODS = ("exact", "fast")
# The reference app's patch: 16x64x64 voxels at 3x1x1 mm (S, P, L), overlap 0.625.
APP_PATCH_MM_ZYX = (48.0, 64.0, 64.0)
APP_OVERLAP = 0.625
# The app smooths its heatmap with monai GaussianSmooth(sigma=5.0), in model voxels.
HEATMAP_SIGMA_VOXELS = 5.0
FEATURE_STRIDE = 16
FLAT_TOLERANCE = 1e-6
CACHE_FORMAT = 1


@dataclass(frozen=True)
class SearchSettings:
    """Patch size (mm along S, P, L), overlap of the exact method's windows, matches per target, preprocessing."""

    patch_mm_zyx: tuple[float, float, float] = APP_PATCH_MM_ZYX
    overlap: float = APP_OVERLAP
    top_k: int = 5
    preprocessing: Preprocessing = CTFM_PREPROCESSING
    batch_size: int = 8
    heatmap_sigma_voxels: float = HEATMAP_SIGMA_VOXELS

    def __post_init__(self) -> None:
        if len(self.patch_mm_zyx) != 3 or min(self.patch_mm_zyx) <= 0:
            raise UsageError(f"patch size must be three positive lengths in mm, got {self.patch_mm_zyx}")
        if not 0.0 <= self.overlap < 1.0:
            raise UsageError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.top_k < 1:
            raise UsageError(f"top-k must be at least 1, got {self.top_k}")

    @property
    def patch_voxels_zyx(self) -> tuple[int, int, int]:
        """The patch in model voxels (at least one per axis)."""
        spacing = self.preprocessing.spacing_zyx_mm
        return tuple(max(1, round(mm / s)) for mm, s in zip(self.patch_mm_zyx, spacing, strict=True))  # type: ignore

    @property
    def patch_cells_zyx(self) -> tuple[int, int, int]:
        """The patch in stride-16 feature cells (the fast method's window)."""
        return tuple(max(1, round(v / FEATURE_STRIDE)) for v in self.patch_voxels_zyx)  # type: ignore[return-value]

    def describe(self) -> dict:
        return {
            "patch_mm_zyx": list(self.patch_mm_zyx),
            "patch_voxels_zyx": list(self.patch_voxels_zyx),
            "overlap": self.overlap,
            "preprocessing": self.preprocessing.describe(),
            "heatmap_sigma_voxels": self.heatmap_sigma_voxels,
        }


# --- results ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    point_lps: tuple[float, float, float]
    similarity: float


@dataclass(frozen=True, eq=False)
class TargetResult:
    input: str
    matches: list[Match]
    heatmap: np.ndarray | None  # on ``heatmap_grid`` (the target's source grid unless asked), [0, 1], float32
    source_grid: Grid
    flat: bool
    cached: bool
    seconds: float
    windows: int
    heatmap_grid: Grid | None = None  # the grid ``heatmap`` sits on; None: ``source_grid``


@dataclass(frozen=True, eq=False)
class SearchResult:
    source: str
    point_lps: tuple[float, float, float]
    method: str
    settings: SearchSettings
    targets: list[TargetResult]
    notes: list[str] = field(default_factory=list)


# --- the similarity field on a lattice of window centres -------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SimilarityField:
    """Window similarities ``values`` (nz, ny, nx) whose window centres form a regular lattice in a model grid:
    centre of ``values[i, j, k]`` = ``first_zyx + (i, j, k) * step_zyx`` in model voxel indices."""

    values: np.ndarray
    first_zyx: np.ndarray
    step_zyx: np.ndarray
    grid: Grid

    def centre_index(self, lattice_zyx: np.ndarray) -> np.ndarray:
        return self.first_zyx + np.asarray(lattice_zyx, dtype=np.float64) * self.step_zyx

    @property
    def flat(self) -> bool:
        return bool(self.values.max() - self.values.min() <= FLAT_TOLERANCE)

    def matches(self, top_k: int, patch_voxels_zyx: Sequence[int], *, refine: bool) -> list[Match]:
        """The ``top_k`` best distinct windows, best first; ties go to the first window in (z, y, x) order."""
        flat_values = self.values.ravel()
        order = np.argsort(-flat_values, kind="stable")
        half = np.asarray(patch_voxels_zyx, dtype=np.float64) / 2.0
        accepted: list[np.ndarray] = []
        matches = []
        for flat_index in order:
            lattice = np.array(np.unravel_index(flat_index, self.values.shape), dtype=np.float64)
            centre = self.centre_index(lattice)
            if any(np.all(np.abs(centre - other) < half) for other in accepted):
                continue
            accepted.append(centre)
            point = self.centre_index(lattice + self._refinement(lattice.astype(int))) if refine else centre
            matches.append(Match(tuple(float(v) for v in self.grid.zyx_index_to_lps(point)),
                                 float(flat_values[flat_index])))
            if len(matches) == top_k:
                break
        return matches

    def _refinement(self, lattice: np.ndarray) -> np.ndarray:
        """Sub-lattice offset of a local maximum: the vertex of a parabola through it and its two neighbours."""
        offset = np.zeros(3)
        for axis in range(3):
            if not 0 < lattice[axis] < self.values.shape[axis] - 1:
                continue
            before, after = lattice.copy(), lattice.copy()
            before[axis] -= 1
            after[axis] += 1
            left, centre, right = (float(self.values[tuple(i)]) for i in (before, lattice, after))
            curvature = left - 2.0 * centre + right
            if curvature < 0:
                offset[axis] = float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))
        return offset

    def heatmap(self, source_grid: Grid, sigma_voxels: float) -> np.ndarray:
        """Min-max normalised similarity, interpolated and smoothed on the model grid, on ``source_grid``."""
        if self.flat:
            return np.zeros(source_grid.shape_zyx, dtype=np.float32)
        return resample(self.model_heatmap(sigma_voxels), self.grid, source_grid, interpolation="linear", fill=0.0)

    def model_heatmap(self, sigma_voxels: float) -> np.ndarray:
        """The heatmap on the model grid (``self.grid``): what a viewer that reslices (Slicer) needs, a fraction of
        the source grid's size for thin-slice scans."""
        if self.flat:
            return np.zeros(self.grid.shape_zyx, dtype=np.float32)
        low, high = float(self.values.min()), float(self.values.max())
        normalised = ((self.values - low) / (high - low)).astype(np.float64)
        on_model = normalised
        for axis, length in enumerate(self.grid.shape_zyx):
            matrix = _axis_operator(length, self.values.shape[axis], self.first_zyx[axis], self.step_zyx[axis],
                                    sigma_voxels)
            on_model = np.moveaxis(np.tensordot(matrix, on_model, axes=([1], [axis])), 0, axis)
        return np.ascontiguousarray(on_model, dtype=np.float32)  # C order: np.save of a strided array is ~20x slower


def _axis_operator(length: int, samples: int, first: float, step: float, sigma: float) -> np.ndarray:
    """(length, samples) matrix: linear interpolation from lattice samples at ``first + i * step`` onto voxels
    0..length-1 (nearest beyond the ends), followed by a Gaussian of ``sigma`` voxels renormalised at the edges."""
    voxels = np.arange(length, dtype=np.float64)
    position = np.clip((voxels - first) / step if samples > 1 else np.zeros(length), 0.0, samples - 1)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, samples - 1)
    fraction = position - lower
    interpolate = np.zeros((length, samples))
    interpolate[voxels.astype(int), lower] += 1.0 - fraction
    interpolate[voxels.astype(int), upper] += fraction
    if sigma <= 0:
        return interpolate
    kernel = np.exp(-0.5 * ((voxels[:, None] - voxels[None, :]) / sigma) ** 2)
    kernel /= kernel.sum(axis=1, keepdims=True)
    return kernel @ interpolate


# --- dense features and their cache ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DenseFeatures:
    """A scan's last feature map (C, nz, ny, nx) on the stride-16 lattice of its (end-padded) model grid."""

    features: np.ndarray
    grid: Grid  # the model grid (before padding)

    def windows(self, cells_zyx: Sequence[int]) -> WindowEmbeddings:
        """Every window of ``cells_zyx`` feature cells, embedded as the average of its cells (stride 16)."""
        cells = [min(c, n) for c, n in zip(cells_zyx, self.features.shape[1:], strict=True)]
        pooled = F.avg_pool3d(torch.from_numpy(self.features)[None], kernel_size=cells, stride=1)[0]
        pooled = F.normalize(pooled, dim=0).permute(1, 2, 3, 0).contiguous().numpy()
        # cell i covers model voxels [16 i, 16 i + 16): a window of c cells from cell 0 is centred at 8 c - 0.5
        first = np.array([FEATURE_STRIDE * c / 2.0 - 0.5 for c in cells])
        return WindowEmbeddings(pooled, first, np.full(3, float(FEATURE_STRIDE)), self.grid)


def volume_key(volume: CTVolume, preprocessing: Preprocessing, weights_sha256: str) -> str:
    """Cache key of a scan's features: its voxels and geometry, the preprocessing, the weights."""
    digest = hashlib.sha256()
    voxels = np.ascontiguousarray(volume.voxels)
    digest.update(str(voxels.dtype).encode())
    digest.update(memoryview(voxels).cast("B"))
    grid = volume.grid
    digest.update(json.dumps([grid.shape_zyx, grid.spacing_xyz_mm, grid.origin_lps_mm,
                              np.round(grid.direction, 9).tolist(), preprocessing.describe(), weights_sha256,
                              CACHE_FORMAT], default=list).encode())
    return digest.hexdigest()


class FeatureCache:
    """Dense feature maps by scan and weights: the last few in memory, and all on disk when given a folder."""

    def __init__(self, folder: str | Path | None = None, capacity: int = 8) -> None:
        self.folder = None if folder is None else Path(folder)
        self.capacity = capacity
        self._memory: OrderedDict[str, DenseFeatures] = OrderedDict()

    def get(self, key: str) -> DenseFeatures | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if self.folder is None or not (self.folder / f"{key}.npz").is_file():
            return None
        try:
            with np.load(self.folder / f"{key}.npz") as stored:
                grid = Grid(tuple(stored["shape_zyx"]), tuple(stored["spacing_xyz_mm"]),
                            tuple(stored["origin_lps_mm"]), stored["direction"])
                features = DenseFeatures(stored["features"].astype(np.float32), grid)
        except (OSError, ValueError, KeyError) as error:  # a damaged cache file is recomputed, not trusted
            log.warning("ignoring unreadable cached features %s: %s", key[:12], error)
            return None
        self._remember(key, features)
        return features

    def put(self, key: str, features: DenseFeatures) -> None:
        self._remember(key, features)
        if self.folder is None:
            return
        grid = features.grid
        with atomic_output(self.folder / f"{key}.npz") as temporary, open(temporary, "wb") as stream:
            np.savez(stream, features=features.features, shape_zyx=np.array(grid.shape_zyx),
                     spacing_xyz_mm=np.array(grid.spacing_xyz_mm), origin_lps_mm=np.array(grid.origin_lps_mm),
                     direction=grid.direction)

    def _remember(self, key: str, features: DenseFeatures) -> None:
        self._memory[key] = features
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)


# --- the search ------------------------------------------------------------------------------------------------


class SemanticSearch:
    """Semantic search with one loaded encoder; keeps a feature cache across queries (the fast method)."""

    def __init__(
        self,
        encoder: SegResEncoder,
        weights_sha256: str,
        *,
        device: torch.device | str = "cpu",
        settings: SearchSettings = SearchSettings(),
        cache: FeatureCache | None = None,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        precision: str = "fp32",
    ) -> None:
        """``precision`` of the fast method's dense pass: fp32, or bf16 on a CPU (fp16 on a GPU) under autocast
        where :func:`ctfm_engine.pipelines.search.open_searcher` measured that it keeps the features (the exact
        method, the reference, stays fp32)."""
        self.device = torch.device(device)
        self.precision = precision
        self.encoder = encoder.eval().to(self.device)
        if self.device.type == "cpu":
            # oneDNN runs 3-D convolutions ~18 % faster on channels-last weights (measured at CT-FM's width on a
            # 100x299x299 scan, same features to 3e-6 relative); both methods use the converted encoder.
            self.encoder = self.encoder.to(memory_format=torch.channels_last_3d)
        self.weights_sha256 = weights_sha256
        self.settings = settings
        self.cache = cache if cache is not None else FeatureCache()
        self.memory_budget_bytes = memory_budget_bytes

    def with_settings(self, settings: SearchSettings) -> SemanticSearch:
        """The same encoder and feature cache with other settings (the cache keys hold the preprocessing)."""
        sibling = copy.copy(self)
        sibling.settings = settings
        return sibling

    # -- public API --

    def search(
        self,
        source: CTVolume,
        point_lps: Sequence[float],
        targets: Sequence[CTVolume],
        *,
        method: str = "fast",
        heatmaps: bool = True,
        heatmap_grid: str = "source",
        progress: Progress | None = None,
        cancel: CancelCheck | None = None,
        source_key: str | None = None,
        target_keys: Sequence[str] | None = None,
    ) -> SearchResult:
        """Search the patch at ``point_lps`` of ``source`` in every target (see the module docstring).

        ``heatmap_grid``: ``source`` puts each heatmap on its target's voxel grid (files, figures); ``model`` leaves
        it on the model grid it is computed on (``TargetResult.heatmap_grid``), for viewers that reslice.
        ``source_key`` and ``target_keys`` (one per target) are the scans' feature-cache keys (:meth:`key`) for a
        caller that keeps its scans across queries and has keyed them once; without them each scan is hashed.
        """
        if heatmap_grid not in ("source", "model"):
            raise UsageError(f"heatmap_grid must be 'source' or 'model', got {heatmap_grid!r}")
        if method not in METHODS:
            raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if not targets:
            raise UsageError("no target scans to search in: give at least one target")
        if target_keys is not None and len(target_keys) != len(targets):
            raise ValueError(f"{len(target_keys)} target keys for {len(targets)} targets")
        point = check_point_inside(source, point_lps)
        notes = []
        steps = len(targets) + 1
        check_cancelled(cancel)
        if method == "fast":
            source_features = self.features(source, key=source_key)
            query = self.fast_query(source_features, point)
        else:
            source_input = preprocess(source, self.settings.preprocessing)
            query = self.exact_query(source_input, point)
            source_features = None
        if not _inside_body(source_features.grid if source_features else source_input.grid, point):
            notes.append("the query point lies outside the body (outside the crop above 0 HU): expect weak matches")
        if progress is not None:
            progress(1, steps)
        results = []
        for index, target in enumerate(targets):
            check_cancelled(cancel)
            started = time.perf_counter()
            if method == "fast":
                key = target_keys[index] if target_keys is not None else self.key(target)
                cached = self.cache.get(key) is not None
                similarity_field = self.fast_field(self.features(target, key=key), query)
                windows = similarity_field.values.size
            else:
                cached = False
                similarity_field = self.exact_field(preprocess(target, self.settings.preprocessing), query, cancel)
                windows = similarity_field.values.size
            matches = similarity_field.matches(self.settings.top_k, self.settings.patch_voxels_zyx,
                                               refine=method == "fast")
            sigma, heatmap, on_grid = self.settings.heatmap_sigma_voxels, None, None
            if heatmaps and heatmap_grid == "model":
                heatmap, on_grid = similarity_field.model_heatmap(sigma), similarity_field.grid
            elif heatmaps:
                heatmap, on_grid = similarity_field.heatmap(target.grid, sigma), target.grid
            if similarity_field.flat:
                notes.append(f"target {index + 1}: the similarity is the same everywhere; no location stands out")
            results.append(TargetResult(target.source, matches, heatmap, target.grid, similarity_field.flat, cached,
                                        time.perf_counter() - started, windows, on_grid))
            if progress is not None:
                progress(index + 2, steps)
        return SearchResult(source.source, tuple(float(v) for v in point), method, self.settings, results, notes)

    def key(self, volume: CTVolume) -> str:
        """The scan's feature-cache key (:func:`volume_key`: a hash of its voxels, geometry, the preprocessing and
        the weights).  Hashing a 512x512x300 scan takes ~0.2 s: a caller that keeps scans across queries keys each
        once and passes the key to :meth:`features` and :meth:`search`."""
        weights = self.weights_sha256 if self.precision == "fp32" else f"{self.weights_sha256}:{self.precision}"
        return volume_key(volume, self.settings.preprocessing, weights)

    def features(self, volume: CTVolume, key: str | None = None) -> DenseFeatures:
        """The scan's dense last feature map, from the cache or computed (and cached) under ``key``, the scan's
        :meth:`key` when the caller has it (else it is computed here)."""
        key = key if key is not None else self.key(volume)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        model_input = preprocess(volume, self.settings.preprocessing)
        features = DenseFeatures(self.dense_features(model_input.image), model_input.grid)
        self.cache.put(key, features)
        return features

    @torch.inference_mode()
    def dense_features(self, image: np.ndarray) -> np.ndarray:
        """Last feature map of a model-space image end-padded with zeros to a multiple of the stride."""
        padding = [(0, (-n) % FEATURE_STRIDE) for n in image.shape]
        padded = np.pad(image, padding) if any(p for _, p in padding) else image
        tensor = torch.from_numpy(np.ascontiguousarray(padded))[None, None].to(self.device)
        if self.device.type == "cpu":
            tensor = tensor.contiguous(memory_format=torch.channels_last_3d)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            features = last_feature_map(self.encoder, tensor, memory_budget_bytes=self.memory_budget_bytes)
        return features[0].float().cpu().numpy()

    # -- fast method --

    def fast_query(self, features: DenseFeatures, point_lps: np.ndarray) -> np.ndarray:
        """The query embedding from the source's window lattice, interpolated trilinearly at the point."""
        return features.windows(self.settings.patch_cells_zyx).at(point_lps)

    def fast_field(self, features: DenseFeatures, query: np.ndarray) -> SimilarityField:
        return features.windows(self.settings.patch_cells_zyx).field(query)

    # -- exact method --

    def exact_query(self, model_input: ModelInput, point_lps: np.ndarray) -> np.ndarray:
        """Embedding of the patch centred on the point (zero-padded where it leaves the model volume)."""
        size = np.array(self.settings.patch_voxels_zyx)
        centre = np.rint(model_input.grid.lps_to_zyx_index(point_lps)).astype(int)
        start = centre - size // 2
        patch = np.zeros(size, dtype=np.float32)
        source = [slice(max(s, 0), min(s + n, limit)) for s, n, limit in
                  zip(start, size, model_input.image.shape, strict=True)]
        if all(piece.stop > piece.start for piece in source):
            target = tuple(slice(piece.start - s, piece.stop - s) for piece, s in zip(source, start, strict=True))
            patch[target] = model_input.image[tuple(source)]
        with torch.inference_mode():
            vector = patch_embeddings(self.encoder, torch.from_numpy(patch)[None, None].to(self.device))
        return _unit(vector[0].float().cpu().numpy())

    def exact_field(self, model_input: ModelInput, query: np.ndarray, cancel: CancelCheck | None) -> SimilarityField:
        """Every window of the reference splitter embedded and compared with the query."""
        windows = self.exact_windows(model_input, cancel)
        return windows.field(query)

    def exact_windows(self, model_input: ModelInput, cancel: CancelCheck | None = None) -> WindowEmbeddings:
        """Unit-normalised embeddings of every window of the reference splitter (zero end-padding)."""
        windows = PatchWindows(self.settings.patch_voxels_zyx, self.settings.overlap)
        starts = windows.starts(model_input.image.shape)
        counts = [len({start[axis] for start in starts}) for axis in range(3)]
        size = np.array(windows.size_zyx)
        image = model_input.image
        vectors = []
        batch_size = self.settings.batch_size
        with torch.inference_mode():
            for first in range(0, len(starts), batch_size):
                check_cancelled(cancel)
                chunk = starts[first : first + batch_size]
                batch = np.zeros((len(chunk), 1, *size), dtype=np.float32)
                for row, (z, y, x) in enumerate(chunk):
                    patch = image[z : z + size[0], y : y + size[1], x : x + size[2]]
                    batch[row, 0, : patch.shape[0], : patch.shape[1], : patch.shape[2]] = patch
                embedded = patch_embeddings(self.encoder, torch.from_numpy(batch).to(self.device)).float()
                vectors.append(F.normalize(embedded, dim=1).cpu().numpy())
        step = np.array([float(s) if n > 1 else 1.0 for s, n in zip(windows.step_zyx, counts, strict=True)])
        lattice = np.concatenate(vectors).reshape(*counts, -1)
        return WindowEmbeddings(lattice, (size - 1) / 2.0, step, model_input.grid)


@dataclass(frozen=True, eq=False)
class WindowEmbeddings:
    """Unit window embeddings (nz, ny, nx, C) on a lattice of window centres (model voxel indices)."""

    vectors: np.ndarray
    first_zyx: np.ndarray
    step_zyx: np.ndarray
    grid: Grid

    def field(self, query: np.ndarray) -> SimilarityField:
        values = (self.vectors @ np.asarray(query, dtype=np.float32)).astype(np.float32)
        return SimilarityField(values, self.first_zyx, self.step_zyx, self.grid)

    def at(self, point_lps: np.ndarray) -> np.ndarray:
        """The unit embedding of a window centred at ``point_lps``: trilinear between lattice windows (clamped)."""
        shape = np.array(self.vectors.shape[:3])
        position = (self.grid.lps_to_zyx_index(point_lps) - self.first_zyx) / self.step_zyx
        position = np.clip(position, 0.0, shape - 1)
        lower = np.floor(position).astype(int)
        fraction = position - lower
        vector = np.zeros(self.vectors.shape[3])
        for corner in np.ndindex(2, 2, 2):
            index = np.minimum(lower + np.array(corner), shape - 1)
            weight = np.prod(np.where(np.array(corner) == 1, fraction, 1.0 - fraction))
            vector += weight * self.vectors[tuple(index)]
        return _unit(vector)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _inside_body(grid: Grid, point_lps: np.ndarray) -> bool:
    index = grid.lps_to_zyx_index(point_lps)
    return bool(np.all(index >= -0.5) and np.all(index <= np.array(grid.shape_zyx) - 0.5))


def check_point_inside(volume: CTVolume, point_lps: Sequence[float]) -> np.ndarray:
    """The query point as an array; InputError naming the scan when it lies outside the scan's voxels."""
    point = np.asarray(point_lps, dtype=np.float64)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise UsageError(f"the query point must be three finite LPS coordinates in mm, got {list(point_lps)}")
    index = volume.lps_to_zyx_index(point)
    shape = np.array(volume.shape_zyx)
    if np.any(index < -0.5) or np.any(index > shape - 0.5):
        corners = volume.zyx_index_to_lps(np.array([[0, 0, 0], shape - 1]))
        low, high = corners.min(axis=0), corners.max(axis=0)
        extent = ", ".join(f"{axis} {lo:.1f}..{hi:.1f}" for axis, lo, hi in zip("LPS", low, high, strict=True))
        raise InputError(f"{volume.source}: the query point ({', '.join(f'{v:.1f}' for v in point)}) LPS mm lies "
                         f"outside this scan (it covers {extent} mm)")
    return point


def write_heatmap(result: TargetResult, path: str | Path) -> Path:
    """The target's heatmap on its source grid as NIfTI/NRRD (float32, [0, 1]), written atomically."""
    if result.heatmap is None:
        raise ValueError("this result was computed without heatmaps")
    return write_image(result.source_grid.image(result.heatmap), path)


def heatmap_stem(index: int, source: str) -> str:
    """File stem for a target's outputs: its position and its file or folder name (no other path parts)."""
    name = Path(source.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{index + 1:02d}_{name or 'target'}"


def _display_view(grid: Grid, arrays: Sequence[np.ndarray], spacing_mm: float) -> tuple[Grid, list[np.ndarray]]:
    """Arrays resampled onto an isotropic grid whose axes point S, P, L (radiological display order)."""
    from ctfm_engine.preprocess import spl_grid

    view = spl_grid(grid, (spacing_mm, spacing_mm, spacing_mm))
    return view, [resample(np.asarray(a, dtype=np.float32), grid, view, fill=fill)
                  for a, fill in zip(arrays, (-1024.0, 0.0), strict=False)]


def write_search_figure(
    source: CTVolume,
    result: SearchResult,
    index: int,
    target: CTVolume,
    path: str | Path,
    *,
    weights_name: str = "",
) -> Path:
    """A PNG a radiologist can read: the query in the source (axial) and the target's axial, coronal and sagittal
    planes through the best match with the similarity heatmap over the CT (magma, 50 %) and the top matches marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = result.targets[index]
    spacing = float(max(1.0, min(min(source.spacing_xyz_mm), min(target.spacing_xyz_mm))))
    source_view, (source_ct,) = _display_view(source.grid, [source.voxels], spacing)
    heat = found.heatmap if found.heatmap is not None else np.zeros(target.shape_zyx, np.float32)
    target_view, (target_ct, target_heat) = _display_view(target.grid, [target.voxels, heat], spacing)

    def clamp(view: Grid, point: Sequence[float]) -> np.ndarray:
        index_zyx = np.rint(view.lps_to_zyx_index(np.asarray(point)))
        return np.clip(index_zyx, 0, np.array(view.shape_zyx) - 1).astype(int)

    query = clamp(source_view, result.point_lps)
    best = found.matches[0]
    marks = [clamp(target_view, match.point_lps) for match in found.matches]
    window = dict(cmap="gray", vmin=-160, vmax=240)  # soft-tissue window (W 400, L 40)
    figure, axes = plt.subplots(1, 4, figsize=(16, 4.6), facecolor="black")
    panels = [
        (axes[0], source_ct[query[0]], None, (query[2], query[1]), [], "source, axial"),
        (axes[1], target_ct[marks[0][0]], target_heat[marks[0][0]], (marks[0][2], marks[0][1]),
         [(m[2], m[1]) for m in marks[1:] if m[0] == marks[0][0]], "target, axial"),
        (axes[2], target_ct[:, marks[0][1]], target_heat[:, marks[0][1]], (marks[0][2], marks[0][0]),
         [(m[2], m[0]) for m in marks[1:] if m[1] == marks[0][1]], "target, coronal"),
        (axes[3], target_ct[:, :, marks[0][2]], target_heat[:, :, marks[0][2]], (marks[0][1], marks[0][0]),
         [(m[1], m[0]) for m in marks[1:] if m[2] == marks[0][2]], "target, sagittal"),
    ]
    for axis, ct, overlay, mark, others, title in panels:
        origin = "upper" if title.endswith("axial") else "lower"  # superior up in coronal and sagittal views
        axis.imshow(ct, origin=origin, **window)
        if overlay is not None:
            axis.imshow(np.ma.masked_less_equal(overlay, 0.0), origin=origin, cmap="magma", vmin=0, vmax=1,
                        alpha=0.5)
        axis.scatter(*mark, s=160, facecolors="none", edgecolors="cyan", linewidths=2)
        for other in others:
            axis.scatter(*other, s=60, facecolors="none", edgecolors="white", linewidths=1)
        axis.set_title(title, color="white", fontsize=10)
        axis.set_axis_off()
    figure.suptitle(
        f"query ({', '.join(f'{v:.0f}' for v in result.point_lps)}) LPS mm -> best match "
        f"({', '.join(f'{v:.0f}' for v in best.point_lps)}), cosine {best.similarity:.3f} "
        f"[{result.method}{', ' + weights_name if weights_name else ''}; not for clinical use]",
        color="white", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, dpi=90)
