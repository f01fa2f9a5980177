"""``ctfm demo``: the most complete flow that exists, end to end on the bundled sample CT.

Today that is: read and validate the sample, CT-FM preprocessing, scan and patch embeddings, an npz with
provenance, and a picture of what the model saw.  With no weights configured it uses an *untrained* narrow
encoder, says so loudly, and the numbers it prints mean nothing about CT-FM's quality.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.networks.nets.segresnet_ds import SegResEncoder

from ctfm_engine.io import atomic_output
from ctfm_engine.models.checkpoint import Checkpoint, save_checkpoint
from ctfm_engine.models.encoder import build_encoder, encoder_config
from ctfm_engine.models.registry import bundled_weights, cache_dir, load_encoder
from ctfm_engine.preprocess import ModelInput, preprocess
from ctfm_engine.runtime.device import resolve_device
from ctfm_engine.tasks.embed import Embedder, PatchWindows, write_embeddings
from ctfm_engine.volume import CTVolume, read_volume

log = logging.getLogger("ctfm")

UNTRAINED_NAME = "ctfm-untrained-demo"
UNTRAINED_CARD = """# ctfm-untrained-demo

A CT-FM-architecture encoder (MONAI SegResEncoder, init_filters 8, blocks_down 1,2,2,4,4) with **random
weights** (torch seed 0). It exists only so that `ctfm demo` can show the pipeline on a machine with no CT-FM
weights. Its embeddings carry no meaning. Not for clinical use. Replace it with published CT-FM weights
(`--weights`, `CTFM_WEIGHTS`) or the trained demonstration checkpoint once the training stack ships it.
"""


def sample_ct_path() -> Path:
    return Path(str(resources.files("ctfm_engine") / "data" / "sample_ct.nii.gz"))


def demo_weights(weights: str | None) -> tuple[SegResEncoder, Checkpoint, bool]:
    """``--weights`` or ``CTFM_WEIGHTS`` when given, else the shipped ctfm-mini, else an untrained encoder."""
    if weights or os.environ.get("CTFM_WEIGHTS"):
        encoder, checkpoint = load_encoder(weights)
        return encoder, checkpoint, False
    shipped = bundled_weights("ctfm-mini")
    if shipped is not None:
        encoder, checkpoint = load_encoder(shipped)
        return encoder, checkpoint, False
    folder = cache_dir() / "models" / UNTRAINED_NAME
    if not folder.is_dir():
        torch.manual_seed(0)
        config = encoder_config(init_filters=8)
        save_checkpoint(build_encoder(config), folder, config, card=UNTRAINED_CARD)
    encoder, checkpoint = load_encoder(folder)
    return encoder, checkpoint, True


def run_demo(out_dir: Path, *, weights: str | None = None, device_name: str = "cpu", quiet: bool = False) -> dict:
    volume = read_volume(sample_ct_path())
    device = resolve_device(device_name)
    encoder, checkpoint, untrained = demo_weights(weights)
    if untrained:
        log.warning(
            "NOTE: no CT-FM weights configured; using %s, an UNTRAINED encoder: the pipeline runs, the "
            "embeddings mean nothing (pass --weights or set CTFM_WEIGHTS)", checkpoint.name,
        )
    embedder = Embedder(encoder, device)
    model_input = preprocess(volume, embedder.preprocessing)
    scan = embedder.embed(volume, "scan", model_input=model_input)
    patches = embedder.embed(volume, "patch", windows=PatchWindows(), aggregation="min", model_input=model_input)
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = write_embeddings([scan], out_dir / "scan_embedding.npz", weights=checkpoint.identity,
                           preprocessing=embedder.preprocessing)
    patch_npz = write_embeddings([patches], out_dir / "patch_embeddings.npz", weights=checkpoint.identity,
                                 preprocessing=embedder.preprocessing)
    picture = out_dir / "preprocessing.png"
    draw_overview(volume, model_input, patches.patch_vectors, patches.patch_centres_lps, picture, checkpoint.name)
    model_shape = "x".join(map(str, scan.model_shape_zyx))
    summary = [
        f"input: bundled sample CT ({sample_ct_path().name}, {'x'.join(map(str, volume.shape_zyx))} voxels z,y,x)",
        f"weights: {checkpoint.name} (sha256 {checkpoint.sha256[:16]}...)" + ("  [UNTRAINED]" if untrained else ""),
        f"model space: {model_shape} voxels at 3x1x1 mm (SPL, HU window -1024..2048, foreground crop)",
        f"scan embedding: {scan.vector.size}-d, norm {np.linalg.norm(scan.vector):.3f} -> {npz}",
        f"patch embeddings: {len(patches.patch_vectors)} patches of 24x128x128, min-aggregated -> {patch_npz}",
        f"picture: {picture}",
    ]
    return {
        "command": "demo",
        "weights": checkpoint.identity,
        "untrained_weights": untrained,
        "input": str(sample_ct_path()),
        "outputs": [str(npz), str(patch_npz), str(picture)],
        "results": [{"input": scan.input, "embedding": [float(v) for v in scan.vector]}],
        "summary": summary,
    }


def draw_overview(
    volume: CTVolume,
    model_input: ModelInput,
    patch_vectors: np.ndarray,
    patch_centres_lps: np.ndarray,
    path: Path,
    weights_name: str,
) -> None:
    """Source slices, the model-space input, and each patch's cosine similarity to the central patch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = model_input.image
    figure, axes = plt.subplots(1, 3, figsize=(15, 5))
    # Displayed like a radiologist's axial view: anterior up, patient left on the right of the image.
    source_lps = sitk.GetArrayFromImage(sitk.DICOMOrient(volume.to_sitk(), "LPS"))
    middle = source_lps.shape[0] // 2
    axes[0].imshow(np.clip(source_lps[middle], -160, 240), cmap="gray")
    axes[0].set_title(f"source, axial slice {middle} (HU -160..240)", fontsize=10)
    axes[1].imshow(image[image.shape[0] // 2], cmap="gray", vmin=0.2, vmax=0.45)
    axes[1].set_title(f"model input {'x'.join(map(str, image.shape))} (z,y,x) at 3x1x1 mm", fontsize=10)
    normalised = patch_vectors / np.maximum(np.linalg.norm(patch_vectors, axis=1, keepdims=True), 1e-12)
    centre = np.argmin(np.linalg.norm(patch_centres_lps - patch_centres_lps.mean(axis=0), axis=1))
    similarity = normalised @ normalised[centre]
    index_zyx = model_input.grid.lps_to_zyx_index(patch_centres_lps)
    axes[2].imshow(image.max(axis=0), cmap="gray", vmin=0.2, vmax=0.6)
    points = axes[2].scatter(index_zyx[:, 2], index_zyx[:, 1], c=similarity, cmap="magma", s=60, edgecolors="w")
    axes[2].scatter(index_zyx[centre, 2], index_zyx[centre, 1], marker="x", c="cyan", s=120)
    figure.colorbar(points, ax=axes[2], fraction=0.04, label="cosine similarity to the central patch (x)")
    axes[2].set_title(f"patch embeddings, {weights_name}", fontsize=10)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=90)
    plt.close(figure)
