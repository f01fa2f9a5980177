"""Training library: intra-sample self-supervised pre-training, segmentation fine-tuning, recipes, model cards."""
