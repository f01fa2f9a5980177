"""Occlusion-based feature deviation (OFD) saliency: which parts of a CT its CT-FM embedding depends on most.

The CT-FM paper's method, as its script ``generate_saliency_maps.py`` ran it with MONAI ``OcclusionSensitivity``:

1. Preprocess with the saliency recipe: SPL, 3x3x3 mm, crop to the box of voxels above 0 HU (CF-raw), HU window
   [-1024, 2048] to [0, 1].  The base embedding is the whole volume's last feature map, average-pooled.
2. Slide an occlusion mask (default 10x10x10 model voxels = 30 mm, overlap 0.25, windows laid out as MONAI's
   sliding-window inference lays them out) over the volume.  ``"gaussian"`` occlusion multiplies the masked
   region by 1 - Gaussian (0 at the centre, 1 at the corners: MONAI's kernel, sigma 0.25 x mask); a number fills
   the region with that value in model units instead (0.0 = -1024 HU, air).  Each occluded volume is embedded.
3. Each voxel gets the Gaussian-weighted mean (MONAI's importance map, sigma 0.125 x mask) of the embeddings of
   the occlusions covering it -- a plain mean for fill occlusions, which occlude the whole box alike (MONAI's
   choice too); its saliency is 1 - cos(base embedding, that mean): 0 where occluding changes nothing, up to 2.
4. The map is resampled linearly onto the source grid; voxels outside the foreground crop get 0.

Choices where the paper and its code differ, made here:

* Mask size: the code's 10x10x10 voxels at 3 mm (30 mm) is the default, not the paper's "8x8x8 patches"; both
  are a ``mask_size`` away.  A mask larger than the volume along an axis is cut to the volume there.
* Display blur: the code blurred the finished map per axial slice (torchvision 2-D Gaussian, kernel 7, sigma 4
  voxels = 12 mm), which smooths in-plane only.  The blended map does need smoothing -- MONAI's importance map
  (sigma 0.125 x mask) is so peaked that each voxel takes the embedding of its nearest occlusion, giving blocks
  one occlusion step wide -- so here a 3-D Gaussian of the same 12 mm (SimpleITK recursive Gaussian, in mm, edges
  extended) is applied on the model grid before mapping back.  It is applied to the volume written for Slicer as
  well as to the PNG, so the two show the same values; ``smooth_mm=0`` gives the unsmoothed map, and
  :attr:`Saliency.model_values` always holds it.
* The per-voxel weighted mean of the embeddings is accumulated in z-slabs under a memory budget instead of as a
  (C, Z, Y, X) map (MONAI's output, 3 GB for a 512-d encoder on a 100x120x120 volume); the values are the same
  (pinned by a test against ``monai.visualize.OcclusionSensitivity``).

Cost: one encoder pass over the whole volume per occlusion (a few hundred to a few thousand passes), which is
why the paper's recipe works at 3 mm; a larger ``mask_size`` or a smaller ``overlap`` make it cheaper.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.networks.nets.segresnet_ds import SegResEncoder
from monai.visualize import OcclusionSensitivity

from ctfm_engine.figures import CT_DISPLAY_HU, new_figure, orthogonal_views, save_figure
from ctfm_engine.io import write_image
from ctfm_engine.models.encoder import DEFAULT_MEMORY_BUDGET_BYTES, last_feature_map
from ctfm_engine.preprocess import ModelInput, Preprocessing, preprocess
from ctfm_engine.progress import CancelCheck, Progress, check_cancelled
from ctfm_engine.volume import CTVolume

# The saliency script's preprocessing: isotropic 3 mm, CF-raw, the CT-FM HU window.
SALIENCY_PREPROCESSING = Preprocessing(spacing_zyx_mm=(3.0, 3.0, 3.0), hu_window=(-1024.0, 2048.0),
                                       foreground_above_hu=0.0)
DEFAULT_MASK_SIZE = 10
DEFAULT_OVERLAP = 0.25
DEFAULT_BATCH_SIZE = 12  # the script's n_batch
# The script's display blur (sigma 4 voxels at 3 mm), here in 3-D.
DEFAULT_SMOOTH_MM = 12.0
# sliding_window_inference's default Gaussian importance (sigma = 0.125 x window), which OcclusionSensitivity uses.
BLEND_SIGMA_SCALE = 0.125
# Memory for the per-voxel accumulation of embeddings (C x slab voxels, float64).
BLEND_BUDGET_BYTES = 256 << 20
PICTURE_SIZE_PX = (1500, 560)
PICTURE_DPI = 100

Occlusion = str | float | Callable[[torch.Tensor], torch.Tensor]


class OcclusionMap(NamedTuple):
    """OFD saliency on the model grid, how many occluded volumes it took, and the mask size used per axis."""

    values: np.ndarray
    occlusions: int
    mask_size_zyx: tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class Saliency:
    """An OFD saliency map on the source grid (smoothed by ``smooth_mm``), the raw map on the model grid, and how
    they were made."""

    volume: CTVolume
    values: np.ndarray
    model_values: np.ndarray
    model_input: ModelInput
    mask_size_zyx: tuple[int, int, int]
    overlap: float
    occlusion: str
    occlusions: int
    smooth_mm: float
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def most_salient_index_zyx(self) -> tuple[int, int, int]:
        """The source voxel of highest saliency (first in (z, y, x) order on ties)."""
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(self.values)), self.values.shape))

    @property
    def most_salient_lps(self) -> np.ndarray:
        return self.volume.zyx_index_to_lps(np.array(self.most_salient_index_zyx, dtype=np.float64))

    def write(self, path: str | Path) -> Path:
        """The saliency volume (float32, 0..2) on the source grid as NIfTI/NRRD/MHA, written atomically."""
        return write_image(self.volume.grid.image(self.values.astype(np.float32)), path)

    def draw(self, path: str | Path, weights_name: str) -> Path:
        """PNG: axial, coronal and sagittal slices through the most salient voxel, saliency in magma over the CT."""
        views = orthogonal_views(self.volume.grid, [self.volume.voxels, self.values], self.most_salient_index_zyx)
        figure, axes = new_figure(1, 3, PICTURE_SIZE_PX, PICTURE_DPI)
        top = max(float(self.values.max()), 1e-12)
        image = None
        for axis, view in zip(axes[0], views, strict=True):
            ct, values = view.planes
            axis.imshow(np.clip(ct, *CT_DISPLAY_HU), cmap="gray", aspect=view.aspect, interpolation="nearest")
            # outside the foreground crop there is no saliency (0): the CT shows there without a tint
            image = axis.imshow(np.ma.masked_equal(values, 0.0), cmap="magma", vmin=0.0, vmax=top, alpha=0.5,
                                aspect=view.aspect, interpolation="nearest")
            axis.set_title(view.name, fontsize=10)
            axis.axis("off")
        figure.colorbar(image, ax=list(axes[0]), fraction=0.02, pad=0.01, label="saliency 1 - cos(base, occluded)")
        size = "x".join(str(n) for n in self.mask_size_zyx)
        spacing = "x".join(f"{mm:g}" for mm in self.model_input.preprocessing.spacing_zyx_mm)
        x, y, z = self.most_salient_lps
        figure.suptitle(f"occlusion saliency (OFD), {weights_name}: {self.occlusions} {self.occlusion} occlusions of "
                        f"{size} voxels at {spacing} mm, overlap {self.overlap:g}, smoothed {self.smooth_mm:g} mm\n"
                        f"most salient at LPS ({x:.0f}, {y:.0f}, {z:.0f}) mm; slices through it", fontsize=11)
        return save_figure(figure, path, PICTURE_DPI)


def occlusion_windows(shape_zyx: Sequence[int], mask_size_zyx: Sequence[int],
                      overlap: float) -> list[tuple[slice, slice, slice]]:
    """The occlusion boxes, laid out as MONAI's sliding-window inference lays out windows of that size.

    The step is int(mask x (1 - overlap)) (at least 1; the whole axis when the mask spans it); the last box on an
    axis is moved back to end at the volume's edge.
    """
    step = [size if size == length else max(int(size * (1.0 - overlap)), 1)
            for length, size in zip(shape_zyx, mask_size_zyx, strict=True)]
    return dense_patch_slices(tuple(shape_zyx), tuple(mask_size_zyx), step)  # type: ignore[return-value]


def check_settings(mask_size: int | Sequence[int], overlap: float, batch_size: int) -> tuple[int, int, int]:
    """The mask size per axis; ValueError for settings that cannot work."""
    size = (int(mask_size),) * 3 if isinstance(mask_size, (int, np.integer)) else tuple(int(s) for s in mask_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"mask size must be a positive number of voxels (or three), got {mask_size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return size  # type: ignore[return-value]


@torch.inference_mode()
def occlusion_saliency(
    encoder: SegResEncoder,
    image: np.ndarray,
    *,
    mask_size: int | Sequence[int] = DEFAULT_MASK_SIZE,
    overlap: float = DEFAULT_OVERLAP,
    occlusion: Occlusion = "gaussian",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> OcclusionMap:
    """OFD saliency of a model-space ``image`` (z, y, x) in [0, 1], on the same grid (see the module doc).

    ``occlusion`` is ``"gaussian"``, a fill value in model units, or a function that returns the occluded version
    of a (1, 1, z, y, x) region.  A mask longer than the image along an axis is cut to the image there.
    ``progress`` receives (occluded volumes embedded, total); ``cancel`` is checked between batches.
    """
    shape = tuple(int(n) for n in image.shape)
    mask = tuple(min(size, length) for size, length in
                 zip(check_settings(mask_size, overlap, batch_size), shape, strict=True))
    device = torch.device(device)
    encoder = encoder.eval().to(device)
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    replace = _occluder(occlusion, volume, mask)
    windows = occlusion_windows(shape, mask, overlap)

    def embed(batch: torch.Tensor) -> torch.Tensor:
        return last_feature_map(encoder, batch, memory_budget_bytes=memory_budget_bytes).mean(dim=(2, 3, 4)).float()

    base = embed(volume)[0].cpu()
    embeddings = []
    for first in range(0, len(windows), batch_size):
        check_cancelled(cancel)
        chunk = windows[first : first + batch_size]
        batch = volume.repeat(len(chunk), 1, 1, 1, 1)
        for row, box in enumerate(chunk):
            batch[(slice(row, row + 1), slice(None), *box)] = replace(volume[(slice(None), slice(None), *box)])
        embeddings.append(embed(batch).cpu())
        if progress is not None:
            progress(first + len(chunk), len(windows))
    check_cancelled(cancel)
    blend = "gaussian" if occlusion == "gaussian" else "constant"
    values = _blend_saliency(base, torch.cat(embeddings), windows, shape, mask, blend)
    return OcclusionMap(values, len(windows), mask)  # type: ignore[arg-type]


def _occluder(occlusion: Occlusion, volume: torch.Tensor,
              mask: tuple[int, int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that turns a masked region into its occluded version (MONAI's kernels for the named modes)."""
    if callable(occlusion):
        return occlusion
    if occlusion == "gaussian":
        with warnings.catch_warnings():  # MONAI indexes with a list, which torch >= 2.9 warns about
            warnings.simplefilter("ignore", UserWarning)
            multiplier, _ = OcclusionSensitivity.gaussian_occlusion(volume, mask)
        return lambda region: region * multiplier
    if isinstance(occlusion, str):
        raise ValueError(f"occlusion must be 'gaussian', a fill value or a function, got {occlusion!r}")
    fill = float(occlusion)
    return lambda region: torch.full_like(region, fill)


def _blend_saliency(base: torch.Tensor, embeddings: torch.Tensor, windows: Sequence[tuple[slice, slice, slice]],
                    shape: tuple[int, ...], mask: tuple[int, int, int], blend: str) -> np.ndarray:
    """1 - cos(base, weighted mean of the embeddings of the windows covering each voxel), in z-slabs; ``blend`` is
    MONAI's importance-map mode ("gaussian" or "constant")."""
    # float64: a trained encoder's saliency can be ~1e-5, where float32 rounding of the cosine would show.
    weight = compute_importance_map(mask, mode=blend, sigma_scale=BLEND_SIGMA_SCALE, dtype=torch.float64)
    embeddings, base = embeddings.double(), base.double()
    channels = embeddings.shape[1]
    slab = max(1, min(shape[0], BLEND_BUDGET_BYTES // (8 * channels * shape[1] * shape[2])))
    base_unit = base / base.norm().clamp_min(1e-12)
    saliency = np.zeros(shape, dtype=np.float32)
    for start in range(0, shape[0], slab):
        stop = min(start + slab, shape[0])
        total = torch.zeros(channels, stop - start, shape[1], shape[2], dtype=torch.float64)
        weights = torch.zeros(stop - start, shape[1], shape[2], dtype=torch.float64)
        for vector, (z, y, x) in zip(embeddings, windows, strict=True):
            first, last = max(z.start, start), min(z.stop, stop)
            if first >= last:
                continue
            part = weight[first - z.start : last - z.start]
            total[:, first - start : last - start, y, x] += vector[:, None, None, None] * part
            weights[first - start : last - start, y, x] += part
        mean = total / weights.clamp_min(1e-12)
        cosine = torch.einsum("c,czyx->zyx", base_unit, mean) / mean.norm(dim=0).clamp_min(1e-12)
        saliency[start:stop] = (1.0 - cosine).clamp(0.0, 2.0).numpy()
    return saliency


def saliency(
    volume: CTVolume,
    encoder: SegResEncoder,
    *,
    mask_size: int | Sequence[int] = DEFAULT_MASK_SIZE,
    overlap: float = DEFAULT_OVERLAP,
    occlusion: Occlusion = "gaussian",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    smooth_mm: float = DEFAULT_SMOOTH_MM,
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
    preprocessing: Preprocessing = SALIENCY_PREPROCESSING,
) -> Saliency:
    """OFD saliency of a CT with the saliency recipe, mapped back onto the CT's own grid (see the module doc)."""
    started = time.perf_counter()
    model_input = preprocess(volume, preprocessing)
    occluded = occlusion_saliency(encoder, model_input.image, mask_size=mask_size, overlap=overlap,
                                             occlusion=occlusion, batch_size=batch_size, device=device,
                                             progress=progress, cancel=cancel)
    if smooth_mm < 0:
        raise ValueError(f"smoothing sigma must be 0 (none) or positive mm, got {smooth_mm}")
    shown = occluded.values
    if smooth_mm > 0:
        smoothed = sitk.SmoothingRecursiveGaussian(model_input.grid.image(occluded.values), float(smooth_mm))
        shown = sitk.GetArrayFromImage(smoothed)
    values = np.clip(model_input.to_source(shown, interpolation="linear", fill=0.0), 0.0, 2.0)
    described = occlusion if isinstance(occlusion, str) else (
        "custom" if callable(occlusion) else f"fill {float(occlusion):g}")
    return Saliency(
        volume=volume,
        values=values.astype(np.float32),
        model_values=occluded.values,
        model_input=model_input,
        mask_size_zyx=occluded.mask_size_zyx,
        overlap=overlap,
        occlusion=described,
        occlusions=occluded.occlusions,
        smooth_mm=float(smooth_mm),
        seconds=time.perf_counter() - started,
        settings={"preprocessing": preprocessing.describe(), "mask_mm_zyx": [
            size * spacing for size, spacing in zip(occluded.mask_size_zyx, preprocessing.spacing_zyx_mm, strict=True)],
            "blend_sigma_scale": BLEND_SIGMA_SCALE},
    )

