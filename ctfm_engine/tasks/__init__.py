"""What CT-FM is used for: embeddings, segmentation, head-CT triage, semantic search and its organ centroid distance,
scan retrieval over an archive, and insight (occlusion saliency, concept maps)."""
