"""One prefill/decode/generate interface over eager, ONNX Runtime and TensorRT sessions."""
