"""CT-FM embeddings from input scans to vectors with provenance, once, for every face.

:func:`run_embedding` reads and validates every input before the encoder loads, resolves the encoder weights by
the one policy (``CTFM_WEIGHTS``, the published ct_fm_feature_extractor in the cache, then the bundled
demonstration model), embeds each scan at scan or patch level and returns the embeddings with the weights record
and the preprocessing; the outcome writes its own ``.npz``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.networks.nets.segresnet_ds import SegResEncoder

from ctfm_engine.errors import UsageError
from ctfm_engine.models.checkpoint import Checkpoint
from ctfm_engine.models.registry import announce, load_encoder
from ctfm_engine.pipelines.inputs import Scan, ValidatedScans, as_source
from ctfm_engine.preprocess import ModelInput, Preprocessing, preprocess, preprocessing_named
from ctfm_engine.progress import Progress
from ctfm_engine.tasks.embed import (
    AGGREGATIONS,
    LEVELS,
    MIR_OVERLAP,
    MIR_PATCH_SIZE_ZYX,
    Embedder,
    Embedding,
    PatchWindows,
    write_embeddings,
)

log = logging.getLogger("ctfm_engine.embedding")


def open_encoder(weights: str | Path | None = None, *,
                 allow_segmentation_encoder: bool = False) -> tuple[SegResEncoder, Checkpoint]:
    """The CT-FM encoder the policy picks for ``weights`` (announced when it is a demonstration model).  A
    segmentation checkpoint's encoder is refused unless ``allow_segmentation_encoder``: it is not CT-FM's."""
    encoder, checkpoint = load_encoder(weights, allow_segmentation_encoder=allow_segmentation_encoder)
    announce(checkpoint)
    return encoder, checkpoint


@dataclass(frozen=True)
class EmbeddingRequest:
    """Embeddings of one or more scans: whole scan, or sliding patches aggregated per scan (the 3D-MIR recipe)."""

    inputs: Sequence[Scan]
    weights: str | Path | None = None
    series_uid: str | None = None
    hu_offset: float | None = None
    level: str = "scan"
    patch_size_zyx: tuple[int, int, int] = MIR_PATCH_SIZE_ZYX
    overlap: float = MIR_OVERLAP
    aggregation: str = "min"
    batch_size: int = 4
    device: str = "cpu"
    preprocessing: str = "pretraining"  # or "card": the ct_fm_feature_extractor card's snippet (native spacing)
    allow_segmentation_encoder: bool = False
    keep_model_inputs: bool = False  # the preprocessed images, for pictures of what the model saw
    progress: Progress | None = field(default=None, compare=False)  # scans done of all
    patch_progress: Progress | None = field(default=None, compare=False)  # patches done of one scan

    def windows(self) -> PatchWindows:
        if self.level not in LEVELS:
            raise UsageError(f"level {self.level!r}: choose one of {', '.join(LEVELS)}")
        if self.aggregation not in AGGREGATIONS:
            raise UsageError(f"aggregation {self.aggregation!r}: choose one of {', '.join(sorted(AGGREGATIONS))}")
        if self.batch_size < 1:
            raise UsageError(f"batch size {self.batch_size}: must be at least 1")
        preprocessing_named(self.preprocessing)
        try:
            return PatchWindows(tuple(self.patch_size_zyx), self.overlap)
        except ValueError as error:
            raise UsageError(f"patch size/overlap: {error}") from None


@dataclass(frozen=True)
class EmbeddingOutcome:
    embeddings: list[Embedding]
    checkpoint: Checkpoint
    preprocessing: Preprocessing
    device: str
    level: str
    aggregation: str | None
    model_inputs: list[ModelInput] | None = None
    preprocessing_choice: str = "pretraining"

    @property
    def weights(self) -> dict[str, Any]:
        return self.checkpoint.identity

    def write(self, path: str | Path) -> Path:
        """Embeddings and provenance as ``.npz`` (numpy.load opens it), atomically."""
        if Path(path).suffix != ".npz":
            raise UsageError(f"{path}: embeddings are written as .npz (numpy.load opens them)")
        return write_embeddings(self.embeddings, path, weights=self.weights, preprocessing=self.preprocessing,
                                preprocessing_choice=self.preprocessing_choice)


def run_embedding(request: EmbeddingRequest,
                  encoder: tuple[SegResEncoder, Checkpoint] | None = None) -> EmbeddingOutcome:
    """Embed every input of ``request``; all are validated before the encoder loads.  ``encoder`` may be one
    :func:`open_encoder` gave, to embed several requests with one load (``request.weights`` is then not read)."""
    windows = request.windows()
    scans = ValidatedScans([as_source(item, request.series_uid, request.hu_offset) for item in request.inputs])
    from ctfm_engine.runtime.device import resolve_device

    device = resolve_device(request.device)
    encoder, checkpoint = encoder if encoder is not None else open_encoder(
        request.weights, allow_segmentation_encoder=request.allow_segmentation_encoder)
    log.info("weights %s (sha256 %s) on %s, %s preprocessing", checkpoint.name, checkpoint.sha256[:12], device,
             request.preprocessing)
    embedder = Embedder(encoder, device, preprocessing_named(request.preprocessing))
    embeddings, model_inputs = [], []
    for done, volume in enumerate(scans, start=1):
        model_input = preprocess(volume, embedder.preprocessing)
        embeddings.append(embedder.embed(volume, request.level, windows=windows, aggregation=request.aggregation,
                                         batch_size=request.batch_size, progress=request.patch_progress,
                                         model_input=model_input))
        if request.keep_model_inputs:
            model_inputs.append(model_input)
        if request.progress is not None:
            request.progress(done, len(scans))
    return EmbeddingOutcome(embeddings, checkpoint, embedder.preprocessing, str(device), request.level,
                            request.aggregation if request.level == "patch" else None,
                            model_inputs if request.keep_model_inputs else None, request.preprocessing)
