"""``ctfm demo``: the most complete flow that exists, end to end on the bundled sample CT.

Today that is: read and validate the sample, CT-FM preprocessing, scan and patch embeddings, an npz with
provenance, a picture of what the model saw, and a whole-body segmentation on the sample's own grid with a table
of structure volumes and an overlay picture.  By default it uses the demonstration checkpoints shipped in the
package (ctfm-mini and ctfm-mini-wholebody-seg, trained by ``training/`` on a handful of public scans -- they show
the pipeline, not CT-FM's quality); ``--weights`` and ``--seg-weights`` put published CT-FM checkpoints in their
place.  With nothing shipped or configured it falls back on an *untrained* narrow encoder and says so loudly.
"""

from __future__ import annotations

import csv
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
from ctfm_engine.tasks.segment import Segmentation, open_segmentation_model, segment
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


def demo_segmentation_weights(seg_weights: str | None) -> str | None:
    """``--seg-weights`` when given, else the shipped ctfm-mini-wholebody-seg (None: the demo skips segmentation)."""
    if seg_weights:
        return seg_weights
    shipped = bundled_weights("ctfm-mini-wholebody-seg")
    return None if shipped is None else str(shipped)


def run_demo(out_dir: Path, *, weights: str | None = None, seg_weights: str | None = None, device_name: str = "cpu",
             quiet: bool = False) -> dict:
    volume = read_volume(sample_ct_path())
    device = resolve_device(device_name)
    encoder, checkpoint, untrained = demo_weights(weights)
    # Both models are read before anything is written: wrong weights leave no partial results behind.
    seg_folder = demo_segmentation_weights(seg_weights)
    segmenter = None if seg_folder is None else open_segmentation_model(seg_folder)
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
    outputs = [npz, patch_npz, picture]
    model_shape = "x".join(map(str, scan.model_shape_zyx))
    segmentation_lines, segmentation_identity = [], None
    if segmenter is not None:
        seg_checkpoint = segmenter.checkpoint
        segmentation_identity = seg_checkpoint.identity
        result = segment(volume, segmenter.network, segmenter.preprocessing, segmenter.roi_size_zyx,
                         segmenter.overlap, device)
        names = segmenter.names
        structures = result.structures(names)
        label_path = result.write(out_dir / "segmentation.nii.gz")
        table = write_structure_table(structures, out_dir / "structures.csv")
        overlay = out_dir / "segmentation.png"
        draw_segmentation(result, structures, overlay, seg_checkpoint.name)
        outputs += [label_path, table, overlay]
        largest = ", ".join(f"{row['name']} {row['volume_ml']:.0f} mL" for row in structures[:4]) or "nothing"
        segmentation_lines = [
            f"segmentation: {seg_checkpoint.name} (sha256 {seg_checkpoint.sha256[:16]}...), {len(structures)} "
            f"structures on the sample's own grid -> {label_path}",
            f"largest: {largest}; all volumes -> {table}; overlay -> {overlay}",
        ]
    summary = [
        f"input: bundled sample CT ({sample_ct_path().name}, {'x'.join(map(str, volume.shape_zyx))} voxels z,y,x)",
        f"weights: {checkpoint.name} (sha256 {checkpoint.sha256[:16]}...)" + ("  [UNTRAINED]" if untrained else ""),
        f"model space: {model_shape} voxels at 3x1x1 mm (SPL, HU window -1024..2048, foreground crop)",
        f"scan embedding: {scan.vector.size}-d, norm {np.linalg.norm(scan.vector):.3f} -> {npz}",
        f"patch embeddings: {len(patches.patch_vectors)} patches of 24x128x128, min-aggregated -> {patch_npz}",
        f"picture: {picture}",
        *segmentation_lines,
    ]
    return {
        "command": "demo",
        "weights": checkpoint.identity,
        "segmentation_weights": segmentation_identity,
        "untrained_weights": untrained,
        "input": str(sample_ct_path()),
        "outputs": [str(path) for path in outputs],
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


def write_structure_table(structures: list[dict], path: Path) -> Path:
    """label, name, voxels, volume_ml per present structure, written atomically."""
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["label", "name", "voxels", "volume_ml"])
        writer.writeheader()
        writer.writerows(structures)
    return path


def draw_segmentation(result: Segmentation, structures: list[dict], path: Path, weights_name: str) -> None:
    """Axial and coronal slices through the largest structure, labels overlaid in distinct colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    reference = result.volume.to_sitk()
    ct = sitk.GetArrayFromImage(sitk.DICOMOrient(reference, "LPS"))
    label_image = sitk.GetImageFromArray(result.labels)
    label_image.CopyInformation(reference)
    labels = sitk.GetArrayFromImage(sitk.DICOMOrient(label_image, "LPS"))
    if structures:
        centre = np.argwhere(labels == structures[0]["label"]).mean(axis=0).round().astype(int)
    else:
        centre = np.array(labels.shape) // 2
    colours = plt.get_cmap("tab20")(np.arange(20))
    palette = ListedColormap(colours)
    spacing_zyx = np.array(sitk.DICOMOrient(reference, "LPS").GetSpacing())[::-1]
    views = [("axial", ct[centre[0]], labels[centre[0]], 1.0),
             ("coronal", ct[::-1, centre[1]], labels[::-1, centre[1]], spacing_zyx[0] / spacing_zyx[2])]
    figure, axes = plt.subplots(1, 2, figsize=(12, 6))
    for axis, (title, image, overlay, aspect) in zip(axes, views, strict=True):
        axis.imshow(np.clip(image, -160, 240), cmap="gray", aspect=aspect)
        masked = np.ma.masked_equal(overlay, 0)
        axis.imshow(masked % 20, cmap=palette, vmin=0, vmax=19, alpha=0.45, aspect=aspect, interpolation="nearest")
        axis.set_title(f"{title} (patient left on the right)", fontsize=10)
        axis.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[row["label"] % 20]) for row in structures[:12]]
    figure.legend(handles, [f"{row['name']} ({row['volume_ml']:.0f} mL)" for row in structures[:12]],
                  loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle(f"whole-body segmentation, {weights_name} -- demonstration model, not for clinical use",
                    fontsize=11)
    figure.tight_layout(rect=(0, 0.08, 1, 0.96))
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=90)
    plt.close(figure)
