"""The task layer: what every face (the ``ctfm`` command, the Slicer worker, the MONAI Deploy app, ``ctfm demo``)
calls.  One function per task takes a typed request -- the input scan (a CTVolume or a path), the weights spec, the
runtime, the window, the post-processing, a progress callback and a cancel check -- and returns a typed outcome with
its provenance (``weights``: ``{"name", "sha256", "demonstration"}``) that writes its own files.

The faces never read checkpoints, pick default models or preprocess: the weights policy lives in
:mod:`ctfm_engine.models.registry` and is applied here, inputs are validated here before any model loads, and the
engine's errors say what is wrong in domain terms (each face words the remedy; see :mod:`ctfm_engine.errors`).
"""

from ctfm_engine.pipelines.embedding import EmbeddingOutcome, EmbeddingRequest, open_encoder, run_embedding
from ctfm_engine.pipelines.inputs import ScanSource
from ctfm_engine.pipelines.search import Searcher, SearchOutcome, SearchRequest, open_searcher, run_search
from ctfm_engine.pipelines.segmentation import SegmentationOutcome, SegmentationRequest, run_segmentation
from ctfm_engine.pipelines.triage import TriageOutcome, TriageRequest, run_triage

__all__ = [
    "EmbeddingOutcome", "EmbeddingRequest", "open_encoder", "run_embedding",
    "ScanSource",
    "SearchOutcome", "SearchRequest", "Searcher", "open_searcher", "run_search",
    "SegmentationOutcome", "SegmentationRequest", "run_segmentation",
    "TriageOutcome", "TriageRequest", "run_triage",
]
