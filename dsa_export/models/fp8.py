"""FP8 block formats (dsa-architecture.md §5 and §7): weight dequantisation, and the indexer's FP8 simulation."""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def dequantize_weight(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[i,j] = W8[i,j] · scale_inv[i // bo, j // bi] (`weight_dequant`); partial edge blocks are fine."""
    bo, bi = block
    out, inp = weight.shape
    scale = scale_inv.float().repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    return (weight.float() * scale).to(dtype)


def quantize_weight(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `dequantize_weight`: per block, scale_inv = amax / 448, W8 = W / scale_inv in e4m3."""
    bo, bi = block
    out, inp = weight.shape
    rows, cols = math.ceil(out / bo), math.ceil(inp / bi)
    padded = weight.float().new_zeros(rows * bo, cols * bi)
    padded[:out, :inp] = weight.float()
    blocks = padded.view(rows, bo, cols, bi)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(rows * bo, cols * bi)
    return q[:out, :inp].to(FP8).contiguous(), scale_inv


def hadamard_matrix(n: int, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix H_n / sqrt(n) (n a power of two)."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def fp8_act_roundtrip(x: torch.Tensor, block: int) -> torch.Tensor:
    """`act_quant` then dequantise: per `block` elements of the last dim, UE8M0 (power-of-two) scale, e4m3 values."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (q.float() * scale).reshape(shape).to(x.dtype)


def simulate_indexer_fp8(x: torch.Tensor, hadamard: torch.Tensor) -> torch.Tensor:
    """Hadamard rotation + FP8 round trip of indexer q or k. Rotation keeps q·k (H is orthonormal); FP8 perturbs it
    the way the deployed FP8 kernels do. DeepSeek's `rotate_activation` returns the input's dtype, so the rotation is
    rounded to x's dtype (bf16 in the real model) before `act_quant` picks the e4m3 codes."""
    block = min(128, x.shape[-1])
    rotated = (x.float() @ hadamard.float()).to(x.dtype)
    return fp8_act_roundtrip(rotated, block)
