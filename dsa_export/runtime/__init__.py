"""One prefill/decode/generate interface over the eager model and the exported graphs (ONNX Runtime, TensorRT)."""

from dsa_export.runtime.backends import Backend, EagerBackend, GraphBackend, StepResult, available_backends
from dsa_export.runtime.session import Session

__all__ = ["Backend", "EagerBackend", "GraphBackend", "Session", "StepResult", "available_backends"]
