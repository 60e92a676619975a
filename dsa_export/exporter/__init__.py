"""Export wrapper with explicit KV-cache I/O, ONNX export + graph checks, TensorRT engine build."""
