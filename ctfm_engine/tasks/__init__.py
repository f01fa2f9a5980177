"""What CT-FM is used for: embeddings now; segmentation, triage, search and retrieval as their issues land."""
