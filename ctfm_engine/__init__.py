"""ctfm_engine: the CT-FM foundation model as an engine for segmentation, triage, search and embeddings."""

__version__ = "0.1.0"
