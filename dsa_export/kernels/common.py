"""What the Triton kernels share: tile sizes rounded to powers of two, and the precision of their dots."""

from __future__ import annotations

import torch


def pow2(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= n (and >= minimum: tl.dot needs tiles of at least 16)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: "ieee" for fp32 inputs (scores match the fp32 reference), "tf32" otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"
