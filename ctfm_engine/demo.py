"""``ctfm demo``: the most complete flow that exists, end to end on the bundled sample CT.

Today that is: read and validate the sample, CT-FM preprocessing, scan and patch embeddings, an npz with
provenance, a picture of what the model saw, and a whole-body segmentation on the sample's own grid with a table
of structure volumes, the organ measurements (volume and HU statistics per structure) and an overlay picture.
Every step goes through the task layer (``ctfm_engine.pipelines``),
so the demo resolves weights exactly as every other command does: ``--weights``/``--seg-weights`` (a folder or a
hub repo id), the environment variables, the published checkpoints in the cache, then the bundled demonstration
checkpoints (ctfm-mini and ctfm-mini-wholebody-seg, trained by ``training/`` on a handful of public scans: they
show the pipeline, not CT-FM's quality) -- announced, and flagged ``demonstration`` in the results.
Nothing is written until both models have run, so wrong weights leave no partial results behind.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctfm_engine.io import atomic_output
from ctfm_engine.pipelines import EmbeddingRequest, SegmentationRequest, open_encoder, run_embedding, run_segmentation
from ctfm_engine.pipelines.embedding import ModelInput
from ctfm_engine.pipelines.inputs import sample_ct_path
from ctfm_engine.pipelines.segmentation import SegmentationOutcome
from ctfm_engine.readers import read_volume
from ctfm_engine.volume import CTVolume

log = logging.getLogger("ctfm")

DEMONSTRATION_MARK = "  [demonstration model: not CT-FM, not for clinical use]"


def _weights_line(label: str, weights: dict) -> str:
    mark = DEMONSTRATION_MARK if weights.get("demonstration") else ""
    return f"{label}: {weights['name']} (sha256 {weights['sha256'][:16]}...){mark}"


def run_demo(out_dir: Path, *, weights: str | None = None, seg_weights: str | None = None, device_name: str = "cpu",
             quiet: bool = False) -> dict:
    volume = read_volume(sample_ct_path())
    encoder = open_encoder(weights)
    scan_run = run_embedding(EmbeddingRequest([volume], level="scan", device=device_name, keep_model_inputs=True),
                             encoder)
    patch_run = run_embedding(EmbeddingRequest([volume], level="patch", aggregation="min", device=device_name),
                              encoder)
    segmentation = run_segmentation(SegmentationRequest(volume, weights=seg_weights, device=device_name))
    (scan,), (patches,), (model_input,) = scan_run.embeddings, patch_run.embeddings, scan_run.model_inputs
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = scan_run.write(out_dir / "scan_embedding.npz")
    patch_npz = patch_run.write(out_dir / "patch_embeddings.npz")
    picture = out_dir / "preprocessing.png"
    encoder_name = scan_run.weights["name"]
    draw_overview(volume, model_input, patches.patch_vectors, patches.patch_centres_lps, picture, encoder_name)
    structures = segmentation.structures()
    label_path = segmentation.write_labels(out_dir / "segmentation.nii.gz")
    table = write_structure_table(structures, out_dir / "structures.csv")
    overlay = out_dir / "segmentation.png"
    draw_segmentation(segmentation, structures, overlay)
    measurements = segmentation.write_measurements(out_dir / "measurements.csv")
    outputs = [npz, patch_npz, picture, label_path, table, overlay, measurements]
    largest = ", ".join(f"{row['name']} {row['volume_ml']:.0f} mL" for row in structures[:4]) or "nothing"
    summary = [
        f"input: bundled sample CT ({sample_ct_path().name}, {'x'.join(map(str, volume.shape_zyx))} voxels z,y,x)",
        _weights_line("weights", scan_run.weights),
        f"model space: {'x'.join(map(str, scan.model_shape_zyx))} voxels at 3x1x1 mm (SPL, HU window -1024..2048, "
        f"foreground crop)",
        f"scan embedding: {scan.vector.size}-d, norm {np.linalg.norm(scan.vector):.3f} -> {npz}",
        f"patch embeddings: {len(patches.patch_vectors)} patches of 24x128x128, min-aggregated -> {patch_npz}",
        f"picture: {picture}",
        _weights_line("segmentation", segmentation.weights),
        f"segmentation: {len(structures)} structures on the sample's own grid -> {label_path}",
        f"largest: {largest}; all volumes -> {table}; overlay -> {overlay}",
        f"organ measurements (volume, HU mean/SD/median/percentiles on the sample's own grid) -> {measurements}",
    ]
    return {
        "command": "demo",
        "weights": scan_run.weights,
        "segmentation_weights": segmentation.weights,
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


def draw_segmentation(outcome: SegmentationOutcome, structures: list[dict], path: Path) -> None:
    """Axial and coronal slices through the largest structure, labels overlaid in distinct colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    reference = outcome.volume.to_sitk()
    ct = sitk.GetArrayFromImage(sitk.DICOMOrient(reference, "LPS"))
    label_image = sitk.GetImageFromArray(outcome.labels)
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
    weights = outcome.weights
    caution = "demonstration model, not CT-FM, not for clinical use" if weights["demonstration"] else \
        "not for clinical use"
    figure.suptitle(f"whole-body segmentation, {weights['name']} -- {caution}", fontsize=11)
    figure.tight_layout(rect=(0, 0.08, 1, 0.96))
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=90)
    plt.close(figure)
