"""What ships into the Triton Inference Server model repository: the Python models and the modules they import.

These files run in the server's Python environment, which has neither dsa_export nor (on a CPU server) torch: each
imports only the standard library, numpy, onnxruntime or tensorrt (+ torch, on a GPU), tokenizers and jinja2,
tritonclient and ml_dtypes (a stage on another node), and its siblings as top-level modules (the repository
writer copies them flat into each model's version directory).
tests/test_serving_standalone.py imports every one of them so. The package imports them from here too (io_spec,
ort_graph, trt_graph, generation, scheduler, stages): one copy of each.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent

# model kind → (its model.py, the modules copied beside it)
SHIPPED = {
    "generate": ("triton_generate.py", ("generation.py", "io_spec.py", "scheduler.py", "stages.py", "ort_graph.py",
                                        "trt_graph.py")),
    "stage": ("triton_stage.py", ("io_spec.py", "stages.py", "ort_graph.py", "trt_graph.py")),
}
# Shipped files that import torch (the TensorRT runner, imported only where the build has engines): every other one
# runs without it.
NEEDS_TORCH = ("trt_graph.py",)


def shipped_files(kind: str) -> list[tuple[Path, str]]:
    """(source file, name in the model's version directory) for a model kind of SHIPPED."""
    model, modules = SHIPPED[kind]
    return [(HERE / model, "model.py"), *((HERE / m, m) for m in modules)]
