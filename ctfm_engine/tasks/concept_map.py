"""PCA concept map: CT-FM's dense features of CTs, coloured so that similar features look alike (the
CT-FM meta-concept notebook, ``notebooks/semantic-eval/meta_concept_analysis.ipynb``).

1. Each CT is preprocessed as in pre-training (SPL, 3x1x1 mm, crop to the box of voxels above 0 HU, HU window
   [-1024, 2048]) and its last feature map is computed in one fully convolutional pass
   (:func:`~ctfm_engine.models.encoder.last_feature_map`): one C-vector per 16x16x16 block of model voxels
   (48x16x16 mm), the scale CT-FM was pre-trained at.
2. A PCA is fitted jointly over the scans.  Each sample is the C-vector of one feature cell of one scan
   (channel-last flattening per scan); only cells at least half inside the body (HU > -500) are samples, so air
   does not take a component.  Features are z-scored over the samples, then reduced to 3 components.  When there
   are more than ``max_samples`` cells, a seeded random subset fits the PCA.
3. Component signs are fixed: PC0 is oriented so that most of the body is light (its median over the samples
   lies in the upper half of its range; the notebook negated PC0 to make the body light), PC1 and PC2 have
   their largest loading positive.  Each component is min-max scaled jointly over the body cells of all
   scans, then L = 100 x PC0, a = 255 x PC1 - 128, b = 255 x PC2 - 128 (CIELAB, the notebook's mapping), and
   converted to sRGB (D65).  Because PCA and z-scoring are affine per cell, the component maps are interpolated
   instead of the C-dimensional features: the result equals upsampling the features first.
4. The component maps are resampled linearly onto each source grid (the cell grid is the model grid with 16x
   coarser spacing, centred on each block); background -- HU < -500 or outside the foreground crop -- is black.

Choices where the notebook differs:

* The notebook flattened its two stacked maps with ``view(512, -1).T``, which mixes the scans (a "sample" held
  even channels of both); here each sample is one cell of one scan, and the projections go back to that scan.
* The notebook fed 24x64x64 patches magnified 8x4x4 (sliding window, overlap 0.75, unnormalised Gaussian sum)
  to get finer maps.  Here the encoder sees the CT at its pre-training scale and the map has the encoder's
  stride-16 resolution, smoothly interpolated: coarser (48 mm along z), but ~128x cheaper and without asking
  the model about tissue magnified beyond anything it saw.
* The notebook's PC0 > 12 background rule is replaced by the HU rule above.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.networks.nets.segresnet_ds import SegResEncoder

from ctfm_engine.errors import CTFMError, InputError
from ctfm_engine.figures import (
    CT_DISPLAY_HU,
    VIEW_NAMES,
    height_over_width,
    new_figure,
    orthogonal_views,
    save_figure,
)
from ctfm_engine.io import atomic_output
from ctfm_engine.models.encoder import DEFAULT_MEMORY_BUDGET_BYTES, last_feature_map
from ctfm_engine.preprocess import CTFM_PREPROCESSING, ModelInput, Preprocessing, preprocess, resample
from ctfm_engine.progress import CancelCheck, Progress, check_cancelled
from ctfm_engine.volume import CTVolume, Grid

log = logging.getLogger(__name__)

BODY_ABOVE_HU = -500.0
FEATURE_STRIDE = 16
COMPONENTS = 3
DEFAULT_MAX_SAMPLES = 100_000
DEFAULT_SEED = 42  # the notebook's PCA random_state
# A cell is a PCA sample when at least this share of its model voxels is body.
SAMPLE_BODY_FRACTION = 0.5
PICTURE_SIZE_PX = (900, 1260)
PICTURE_DPI = 100

# CIELAB -> XYZ (CIE constants) -> linear sRGB, D65 white (IEC 61966-2-1).
D65_WHITE_XYZ = np.array([0.95047, 1.0, 1.08883])
LAB_EPSILON = 216.0 / 24389.0
LAB_KAPPA = 24389.0 / 27.0
XYZ_TO_LINEAR_SRGB = np.array([
    [3.2404542, -1.5371385, -0.4985314],
    [-0.9692660, 1.8760108, 0.0415560],
    [0.0556434, -0.2040259, 1.0572252],
])


@dataclass(frozen=True, eq=False)
class DenseFeatures:
    """One CT's last feature map (C, d, h, w), the grid of its cell centres, and each cell's share of body voxels."""

    volume: CTVolume
    model_input: ModelInput
    features: np.ndarray
    cell_grid: Grid
    body_fraction: np.ndarray

    @property
    def sample_cells(self) -> np.ndarray:
        """(d, h, w) booleans: the cells that are PCA samples (mostly body; any body when no cell is mostly)."""
        mostly = self.body_fraction >= SAMPLE_BODY_FRACTION
        return mostly if mostly.any() else self.body_fraction > 0


def body_threshold(preprocessing: Preprocessing) -> float:
    """BODY_ABOVE_HU in model units (the HU window scaled to [0, 1])."""
    low, high = preprocessing.hu_window
    return (BODY_ABOVE_HU - low) / (high - low)


@torch.inference_mode()
def dense_features(
    volume: CTVolume,
    encoder: SegResEncoder,
    *,
    device: torch.device | str = "cpu",
    preprocessing: Preprocessing = CTFM_PREPROCESSING,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> DenseFeatures:
    """The encoder's stride-16 feature map of the whole preprocessed CT, with the geometry of its cells."""
    model_input = preprocess(volume, preprocessing)
    image = torch.from_numpy(model_input.image)[None, None]
    feature_map = last_feature_map(encoder.eval().to(device), image.to(device), memory_budget_bytes=memory_budget_bytes)
    features = feature_map[0].float().cpu().numpy()
    cells = features.shape[1:]
    # Blocks at the far edge run past the image (the stride-2 convolutions pad); they count as empty there.
    padded = [(0, FEATURE_STRIDE * n - s) for n, s in zip(cells, image.shape[2:], strict=True)][::-1]
    pad = [amount for pair in padded for amount in pair]
    body = F.pad((image > body_threshold(preprocessing)).float(), pad)
    grid = model_input.grid
    spacing_xyz = tuple(FEATURE_STRIDE * s for s in grid.spacing_xyz_mm)
    first_centre = grid.zyx_index_to_lps(np.full(3, (FEATURE_STRIDE - 1) / 2.0))
    return DenseFeatures(
        volume=volume,
        model_input=model_input,
        features=features,
        cell_grid=Grid(cells, spacing_xyz, tuple(first_centre), grid.direction),
        body_fraction=F.avg_pool3d(body, FEATURE_STRIDE)[0, 0].numpy(),
    )


def cell_samples(features: np.ndarray, cells: np.ndarray | None = None) -> np.ndarray:
    """Channel-last flattening of ONE scan's (C, d, h, w) features: one row per cell (optionally only ``cells``).

    Scans are flattened one at a time and stacked by rows, never reshaped together (the notebook's bug).
    """
    rows = features.reshape(features.shape[0], -1).T
    return rows if cells is None else rows[np.asarray(cells, dtype=bool).reshape(-1)]


@dataclass(frozen=True, eq=False)
class ConceptFit:
    """A joint PCA of z-scored features with fixed signs, and the joint range of each component over the samples."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    low: np.ndarray
    high: np.ndarray
    samples: int
    fitted_on: int

    def project(self, features: np.ndarray) -> np.ndarray:
        """(C, ...) features -> (3, ...) component values."""
        rows = cell_samples(features)
        projected = ((rows - self.mean) / self.scale) @ self.components.T
        return projected.T.reshape(len(self.components), *features.shape[1:])

    def normalise(self, projected: np.ndarray) -> np.ndarray:
        """(3, ...) component values -> [0, 1] by the joint min-max of the samples (clipped)."""
        shape = (-1,) + (1,) * (projected.ndim - 1)
        span = np.maximum(self.high - self.low, 1e-12).reshape(shape)
        return np.clip((projected - self.low.reshape(shape)) / span, 0.0, 1.0)


def fit_concepts(
    features: Sequence[np.ndarray],
    sample_cells: Sequence[np.ndarray],
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> ConceptFit:
    """Fit the joint PCA over the sample cells of every scan (see the module doc for signs and scaling).

    ``features[i]`` is scan i's (C, d, h, w) map and ``sample_cells[i]`` its (d, h, w) sample mask.
    """
    try:
        from sklearn.decomposition import PCA
    except ImportError:
        raise CTFMError("concept maps need scikit-learn: pip install 'ctfm-engine[insight]'") from None
    samples = np.concatenate([cell_samples(f, cells) for f, cells in zip(features, sample_cells, strict=True)])
    if len(samples) < COMPONENTS + 1:
        raise InputError(f"only {len(samples)} feature cells inside the body; a concept map needs at least "
                         f"{COMPONENTS + 1} (give larger scans)")
    generator = np.random.default_rng(seed)
    chosen = np.sort(generator.choice(len(samples), max_samples, replace=False)) if len(samples) > max_samples \
        else np.arange(len(samples))
    fitting = samples[chosen].astype(np.float64)
    mean = fitting.mean(axis=0)
    scale = fitting.std(axis=0)
    scale[scale < 1e-12] = 1.0
    pca = PCA(n_components=COMPONENTS, random_state=seed).fit((fitting - mean) / scale)
    components = pca.components_.copy()
    for index in range(1, COMPONENTS):
        if components[index, np.argmax(np.abs(components[index]))] < 0:
            components[index] *= -1
    projected = ((samples - mean) / scale) @ components.T
    first = projected[:, 0]
    if np.median(first) < (first.min() + first.max()) / 2.0:
        components[0] *= -1
        projected[:, 0] *= -1
    return ConceptFit(mean=mean, scale=scale, components=components,
                      explained_variance_ratio=pca.explained_variance_ratio_.copy(), low=projected.min(axis=0),
                      high=projected.max(axis=0), samples=len(samples), fitted_on=len(chosen))


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (..., 3) with L in [0, 100] to sRGB (..., 3) in [0, 1] under D65 (out-of-gamut colours clipped)."""
    lab = np.asarray(lab, dtype=np.float64)
    lightness, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    fy = (lightness + 16.0) / 116.0
    f = np.stack([fy + a / 500.0, fy, fy - b / 200.0], axis=-1)
    linear = np.where(f**3 > LAB_EPSILON, f**3, (116.0 * f - 16.0) / LAB_KAPPA)
    # Y is exact from L (the cube-root branch meets the linear one at L = 8)
    linear[..., 1] = np.where(lightness > LAB_KAPPA * LAB_EPSILON, fy**3, lightness / LAB_KAPPA)
    rgb = np.clip((linear * D65_WHITE_XYZ) @ XYZ_TO_LINEAR_SRGB.T, 0.0, 1.0)
    return np.where(rgb <= 0.0031308, 12.92 * rgb, 1.055 * rgb ** (1.0 / 2.4) - 0.055)


def concept_lab(normalised: np.ndarray) -> np.ndarray:
    """(3, ...) components in [0, 1] -> (..., 3) CIELAB: L = 100 PC0, a = 255 PC1 - 128, b = 255 PC2 - 128."""
    return np.stack([100.0 * normalised[0], 255.0 * normalised[1] - 128.0, 255.0 * normalised[2] - 128.0], axis=-1)


@dataclass(frozen=True, eq=False)
class ConceptMap:
    """One CT's concept map: RGB (z, y, x, 3) uint8 on its source grid, black outside the body."""

    volume: CTVolume
    rgb: np.ndarray
    body: np.ndarray

    def write(self, path: str | Path) -> Path:
        """An RGB colour volume on the source grid as NRRD (kinds RGB-color, uint8: Slicer shows it in colour)."""
        path = Path(path)
        if not path.name.lower().endswith(".nrrd"):
            raise ValueError(f"{path}: a concept map is written as .nrrd")
        grid = self.volume.grid
        image = sitk.GetImageFromArray(self.rgb, isVector=True)
        image.SetSpacing(grid.spacing_xyz_mm)
        image.SetOrigin(grid.origin_lps_mm)
        image.SetDirection(tuple(float(d) for d in grid.direction.ravel()))
        with atomic_output(path) as temporary:
            named = temporary.with_name(temporary.name + ".nrrd")
            try:
                sitk.WriteImage(image, str(named), useCompression=True)
                written = named.read_bytes()
            finally:
                named.unlink(missing_ok=True)
            # ITK labels the colour axis a plain vector; NRRD's RGB-color kind says what it is.
            header_end = written.index(b"\n\n")
            header = written[:header_end].replace(b"\nkinds: vector ", b"\nkinds: RGB-color ")
            temporary.write_bytes(header + written[header_end:])
        return path

    def draw(self, path: str | Path, weights_name: str) -> Path:
        """PNG: axial, coronal and sagittal slices through the body's centre, CT | concept map side by side."""
        views = orthogonal_views(self.volume.grid, [self.volume.voxels, self.rgb], self.body_centre_zyx())
        # rows as tall as their slices, within limits so a thin slab's coronal view stays visible
        ratios = [min(max(height_over_width(view), 0.25), 1.5) for view in views]
        figure, axes = new_figure(len(VIEW_NAMES), 2, PICTURE_SIZE_PX, PICTURE_DPI, height_ratios=ratios)
        for row, view in zip(axes, views, strict=True):
            ct, rgb = view.planes
            row[0].imshow(np.clip(ct, *CT_DISPLAY_HU), cmap="gray", aspect=view.aspect, interpolation="nearest")
            row[1].imshow(rgb, aspect=view.aspect, interpolation="nearest")
            row[0].set_title(f"{view.name}: CT (HU {CT_DISPLAY_HU[0]:g}..{CT_DISPLAY_HU[1]:g})", fontsize=10)
            row[1].set_title(f"{view.name}: concept map", fontsize=10)
            for axis in row:
                axis.axis("off")
        figure.suptitle(f"CT-FM concept map (joint PCA -> CIELAB), {weights_name}\n"
                        f"similar colour = similar features; black = outside the body", fontsize=11)
        return save_figure(figure, path, PICTURE_DPI)

    def body_centre_zyx(self) -> np.ndarray:
        """The mean voxel index of the body (the volume's centre when there is none)."""
        index = np.argwhere(self.body[::2, ::2, ::2]) * 2
        return index.mean(axis=0) if len(index) else (np.array(self.body.shape) - 1) / 2.0


def colour_scan(scan: DenseFeatures, fit: ConceptFit) -> ConceptMap:
    """The concept map of one scan on its source grid, given the joint fit."""
    normalised = fit.normalise(fit.project(scan.features)).astype(np.float32)
    source = scan.volume.grid
    on_source = np.stack([resample(channel, scan.cell_grid, source, interpolation="linear") for channel in normalised])
    inside_crop = scan.model_input.to_source(np.ones(scan.model_input.grid.shape_zyx, dtype=np.uint8)) > 0
    body = inside_crop & (scan.volume.voxels > BODY_ABOVE_HU)
    rgb = lab_to_srgb(concept_lab(on_source))
    rgb = np.round(rgb * 255.0).astype(np.uint8)
    rgb[~body] = 0
    return ConceptMap(volume=scan.volume, rgb=rgb, body=body)


def concept_maps(
    volumes: Sequence[CTVolume],
    encoder: SegResEncoder,
    *,
    device: torch.device | str = "cpu",
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = DEFAULT_SEED,
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
    preprocessing: Preprocessing = CTFM_PREPROCESSING,
) -> tuple[list[ConceptMap], ConceptFit]:
    """Concept maps of several CTs coloured by one joint PCA, and the fit; ``progress`` counts scans embedded."""
    scans = []
    for done, volume in enumerate(volumes, start=1):
        check_cancelled(cancel)
        scans.append(dense_features(volume, encoder, device=device, preprocessing=preprocessing))
        if progress is not None:
            progress(done, len(volumes))
    check_cancelled(cancel)
    fit = fit_concepts([s.features for s in scans], [s.sample_cells for s in scans], max_samples=max_samples,
                       seed=seed)
    log.info("concept map: PCA on %d of %d body cells, explained variance %s", fit.fitted_on, fit.samples,
             ", ".join(f"{100 * r:.1f}%" for r in fit.explained_variance_ratio))
    maps = []
    for scan in scans:
        check_cancelled(cancel)
        maps.append(colour_scan(scan, fit))
    return maps, fit
