"""Where models run: torch devices now; onnxruntime backends and export arrive with the segmentation issue."""
