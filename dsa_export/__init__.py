"""dsa-export: DeepSeek-V3.2-Exp (DeepSeek Sparse Attention) from PyTorch to ONNX, TensorRT and Triton Inference Server."""

from __future__ import annotations

from pathlib import Path  # noqa: F401  (annotations)

from dsa_export._version import __version__  # noqa: F401  (the package's version)


def load_model(path_or_preset: str | Path, dtype="float32", seed: int = 0):
    """The eager model (an `nn.Module`) from an HF-layout checkpoint directory, or a preset name (`tiny`, ...) with
    seeded random weights. dtype: float32 or bfloat16 (a torch dtype or its name). `model(input_ids)` returns logits
    [B,S,V] for every position. The indexer, the sparse attention and the routed experts run through the `dsa::`
    custom ops (CPU references, Triton kernels on CUDA). Bad arguments raise a ValueError naming the problem."""
    from dsa_export.errors import DSAExportError
    from dsa_export.kernels import use_custom_ops
    from dsa_export.models import load_checkpoint
    from dsa_export.models.init import random_model
    from dsa_export.formats import torch_dtype, model_dtype_name
    from dsa_export.models.presets import check_fits_in_memory, resolve_source

    dtype = torch_dtype(model_dtype_name(dtype))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DSAExportError(f"seed must be an integer >= 0, got {seed!r}")
    config, checkpoint = resolve_source(path_or_preset)
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, dtype=dtype)
    else:  # the weights `init --preset` writes
        check_fits_in_memory(config, dtype.itemsize, f"preset '{path_or_preset}'")
        model = random_model(config, seed, dtype)
    return use_custom_ops(model)
