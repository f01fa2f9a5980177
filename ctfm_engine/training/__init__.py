"""Intra-sample self-supervised pre-training and fine-tuning (filled by the training issue)."""
