"""dsa-export: DeepSeek-V3.2-Exp (DeepSeek Sparse Attention) from PyTorch to ONNX, TensorRT and Triton Inference Server."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load_model(path_or_preset: str | Path, dtype=None, seed: int = 0):
    """The eager model (an `nn.Module`) from an HF-layout checkpoint directory, or a preset name (`tiny`, ...) with
    seeded random weights. `model(input_ids)` returns logits [B,S,V] for every position. The indexer and the sparse
    attention run through the `dsa::` custom ops (tiled reference on CPU, Triton kernels on CUDA)."""
    import torch

    from dsa_export.kernels import use_custom_ops
    from dsa_export.models import get_preset, load_checkpoint
    from dsa_export.models.checkpoint import random_model

    dtype = dtype or torch.float32
    if Path(path_or_preset).exists():
        model = load_checkpoint(path_or_preset, dtype=dtype)
    else:  # the weights `init --preset` writes
        model = random_model(get_preset(str(path_or_preset)), seed, dtype)
    return use_custom_ops(model)
