"""One prefill/decode/generate interface over eager, ONNX Runtime and TensorRT sessions."""

from dsa_export.runtime.backends import Backend, EagerBackend, OnnxRuntimeBackend, StepResult
from dsa_export.runtime.session import Session

__all__ = ["Backend", "EagerBackend", "OnnxRuntimeBackend", "Session", "StepResult"]
