"""The view augmentations of CT-FM pre-training (``intrasample_simclr.yaml``), driven by an explicit random generator.

Every random choice comes from the ``numpy.random.Generator`` passed in, so a sample is a pure function of
(seed, epoch, index): training resumed from a checkpoint sees exactly the views it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import GaussianSmooth
from monai.utils import convert_to_tensor


@dataclass(frozen=True)
class ViewAugmentation:
    """Parameters of the four augmentations, in order; defaults are CT-FM's (``intrasample_simclr.yaml``)."""

    crop_scale: tuple[float, float] = (0.33, 1.0)  # RandomResizedCrop: per-axis fraction s ~ U(low, high)
    flip_probability: float = 0.5  # RandFlip along axis 0 (S, cranio-caudal)
    histogram_shift_probability: float = 0.5
    histogram_control_points: int = 5
    smooth_probability: float = 0.5
    smooth_sigma: tuple[float, float] = (0.25, 1.5)  # per axis, in voxels

    def __call__(self, crop: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """One augmented view of ``crop`` (1, z, y, x) in [0, 1]; same shape out."""
        view = random_resized_crop(crop, rng, self.crop_scale)
        if rng.random() < self.flip_probability:
            view = torch.flip(view, dims=(1,))
        if rng.random() < self.histogram_shift_probability:
            view = histogram_shift(view, rng, self.histogram_control_points)
        if rng.random() < self.smooth_probability:
            sigma = rng.uniform(*self.smooth_sigma, size=3)
            view = GaussianSmooth(sigma=tuple(float(s) for s in sigma))(view)
        # MONAI returns MetaTensors, whose per-operation bookkeeping slows the network several-fold: plain tensor out.
        return convert_to_tensor(view, dtype=torch.float32, track_meta=False)


CTFM_VIEW_AUGMENTATION = ViewAugmentation()


def random_resized_crop(crop: torch.Tensor, rng: np.random.Generator, scale: tuple[float, float]) -> torch.Tensor:
    """A sub-box of ``s`` times each side (one s for all axes, random centre), resized back trilinearly.

    As MONAI ``RandScaleCrop(roi_scale=s, random_size=False)`` + ``Resize`` in CT-FM: the volume fraction is s**3.
    """
    size = np.array(crop.shape[1:])
    fraction = rng.uniform(*scale)
    box = np.maximum(1, np.round(size * fraction).astype(int))
    start = [int(rng.integers(0, n - b + 1)) for n, b in zip(size, box, strict=True)]
    sub = crop[:, start[0] : start[0] + box[0], start[1] : start[1] + box[1], start[2] : start[2] + box[2]]
    return F.interpolate(sub[None], size=tuple(int(n) for n in size), mode="trilinear", align_corners=False)[0]


def histogram_shift(view: torch.Tensor, rng: np.random.Generator, control_points: int) -> torch.Tensor:
    """A random monotone piecewise-linear intensity remap (as MONAI ``RandHistogramShift``).

    Control points are spread evenly over the view's intensity range; each interior point, in turn, moves to a
    random place between its (already moved) lower and its upper neighbour, so the mapping stays monotone.
    """
    low, high = float(view.min()), float(view.max())
    if high <= low:
        return view
    reference = np.linspace(low, high, control_points)
    moved = reference.copy()
    for index in range(1, control_points - 1):
        moved[index] = rng.uniform(moved[index - 1], moved[index + 1])
    remapped = np.interp(view.numpy(), reference, moved)
    return torch.from_numpy(remapped.astype(np.float32))
