"""Where models run: torch devices, backends (PyTorch eager, onnxruntime CPU/CUDA/TensorRT) and the ONNX export."""
