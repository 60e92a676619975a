"""The dsa:: op contracts as plain data, ONNX schemas + decompositions, TensorRT plugin registration (lazy import)."""
