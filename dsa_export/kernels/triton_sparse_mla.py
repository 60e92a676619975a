"""Top-k sparse MLA attention as a Triton kernel: gather the selected latent rows, flash-style online softmax.

Contract (design.md, `dsa::SparseMLA`; reference: `dsa_export.models.semantics.sparse_mla`):
q [B,S,H,DK], kv [B,T,DK], indices [B,S,K] int32 (−1 = empty slot); attributes scale, dv → out [B,S,H,dv] in q's
dtype = softmax(scale · q·kv[idx]ᵀ) · kv[idx, :dv] over the valid slots only; a row without valid slots gives zeros.

Design
------
One program per query row (b, s) and block of BLOCK_H heads; BLOCK_H covers all heads of small models (the tiny
preset: one program per row), and is capped at MAX_BLOCK_H (half of it for fp32 inputs) so the [BLOCK_H, dv] fp32
accumulator stays in registers and the tiles in 48 KiB of shared memory for the real model (128 heads × 512).
It is MQA over the latent: every head reads the same gathered rows.
The program walks the row's K slots in tiles of BLOCK_K: it gathers the selected latent rows (−1 slots are masked,
so they are never read), splits each row into its value part kv[:dv] (DV_P wide) and its RoPE part kv[dv:] (DR_P
wide) so that both have power-of-2 tile widths (512 + 64 for the real model, 32 + 8 → 32 + 16 padded for tiny),
and updates the running max m, the running sum l and the output accumulator in fp32 (online softmax, exp2 with
scale·log2(e) folded in). A row whose slots are all empty keeps l = 0 and is written as zeros.

`scale` is a compile-time constant (SCALE): TensorRT ahead-of-time plugins cannot pass float scalars at run time
(toolchain.md §2.1). Loads are converted to fp32 at once (the Triton interpreter computes bf16 arithmetic wrongly).
On a GPU, bf16 inputs then go into the dots as bf16 (BF16_DOT, as in triton_indexer.py: exact for q and the latent
rows, fp32 accumulation; the probabilities in p·v are rounded to bf16, as flash attention does, inside the bf16
output's precision); fp32 inputs use "ieee". In the interpreter every dot takes fp32 operands ("tf32" for bf16).
For the real model (H 128 → 16 head blocks of 8, dv 512, rope 64) the bf16 kernel compiles to 29 KiB of shared
memory and 176 registers per thread without spills on sm_90a and sm_100a (38 KiB with fp32 operands); the fp32 one,
with blocks of 4 heads, to 45 KiB (dsa_export.kernels.aot checks them against TensorRT's 48 KiB of dynamic shared memory; 16 heads need 56 KiB).

Kernel argument order follows TensorRT's ahead-of-time plugin convention: input pointers, int32 scalars, output
pointers, then the compile-time constants.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsa_export.kernels.common import dot_precision, pow2

NUM_WARPS = 4
NUM_STAGES = 2  # software pipelining depth (the launcher and the AOT build use the same)
BLOCK_K = 16  # slots per tile
MAX_BLOCK_H = 8  # heads per program (MAX_BLOCK_H // 2 for fp32 inputs)


@triton.jit
def sparse_mla_kernel(
    q_ptr, kv_ptr, idx_ptr,  # inputs: q [N,H,DK], kv [ROWS,DK] (the latent pool), indices [N,K] int32 pool rows
    ROWS, K,  # int32: rows of the pool, slots per token
    out_ptr,  # output: [N,H,DV] in q's dtype
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DV_P: tl.constexpr, DR_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BF16_DOT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # the token
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dv = tl.arange(0, DV_P)  # value part of a latent row: [0, DV)
    dr = tl.arange(0, DR_P)  # RoPE part: [DV, DK)
    head_ok = heads[:, None] < H
    dv_ok = dv[None, :] < DV
    dr_ok = dr[None, :] < DK - DV

    q_rows = q_ptr + row * H * DK + heads[:, None] * DK
    q_v = tl.load(q_rows + dv[None, :], mask=head_ok & dv_ok, other=0.0).to(tl.float32)
    q_r = tl.load(q_rows + DV + dr[None, :], mask=head_ok & dr_ok, other=0.0).to(tl.float32)
    if BF16_DOT:  # bf16 inputs on a GPU: bf16 operands (exact), fp32 accumulation, the full tensor-core rate
        q_v, q_r = q_v.to(tl.bfloat16), q_r.to(tl.bfloat16)
    qk_scale: tl.constexpr = SCALE * 1.4426950408889634  # exp(x·scale) = exp2(x·scale·log2 e)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the scaled scores
    l = tl.zeros([BLOCK_H], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_H, DV_P], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        slot = k0 + tl.arange(0, BLOCK_K)
        index = tl.load(idx_ptr + row * K + slot, mask=slot < K, other=-1)
        valid = (index >= 0) & (index < ROWS)  # a row outside the pool is never read (it would fault the GPU)
        kv_rows = kv_ptr + index.to(tl.int64)[:, None] * DK
        kv_v = tl.load(kv_rows + dv[None, :], mask=valid[:, None] & dv_ok, other=0.0).to(tl.float32)
        kv_r = tl.load(kv_rows + DV + dr[None, :], mask=valid[:, None] & dr_ok, other=0.0).to(tl.float32)
        if BF16_DOT:
            kv_v, kv_r = kv_v.to(tl.bfloat16), kv_r.to(tl.bfloat16)

        s = tl.dot(q_v, tl.trans(kv_v), input_precision=DOT_PRECISION)
        s = tl.dot(q_r, tl.trans(kv_r), acc=s, input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_K]
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid slot yet: avoid (−inf) − (−inf)
        p = tl.exp2(s - m_safe[:, None])  # empty slots: exp2(−inf) = 0
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(kv_v.dtype), kv_v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # no valid slot: acc = 0, so the row is written as zeros
    out_rows = out_ptr + row * H * DV + heads[:, None] * DV
    tl.store(out_rows + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=head_ok & dv_ok)


def sparse_mla_constexprs(H: int, DK: int, dv: int, scale: float, dtype: torch.dtype, gpu: bool = True) -> dict:
    """The compile-time constants for one model shape and input dtype (shared by the launcher and the AOT build);
    gpu False: for the interpreter (fp32 dot operands: its bf16 dot is wrong, toolchain.md §3.1)."""
    if not 0 < dv < DK:
        raise ValueError(f"sparse_mla: dv={dv} must be in 1..DK-1 (DK={DK}): the row is value ‖ RoPE part")
    max_heads = MAX_BLOCK_H // 2 if dtype == torch.float32 else MAX_BLOCK_H  # fp32 tiles take twice the bytes
    return {"H": H, "DK": DK, "DV": dv, "SCALE": float(scale), "BLOCK_H": min(max_heads, pow2(H)),
            "BLOCK_K": BLOCK_K, "DV_P": pow2(dv), "DR_P": pow2(DK - dv),
            "DOT_PRECISION": dot_precision(dtype), "BF16_DOT": gpu and dtype != torch.float32}


def sparse_mla_grid(N: int, constexprs: dict) -> tuple[int, int, int]:
    return (N, math.ceil(constexprs["H"] / constexprs["BLOCK_H"]), 1)


def sparse_mla_triton(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int) -> torch.Tensor:
    """out [N,H,dv] in q's dtype; same contract as `dsa_export.models.semantics.sparse_mla`.

    Launches on CUDA tensors, or on CPU tensors when triton was imported with TRITON_INTERPRET=1."""
    N, H, DK = q.shape
    K = indices.shape[-1]
    out = torch.empty((N, H, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.to(torch.int32).contiguous()
    constexprs = sparse_mla_constexprs(H, DK, dv, scale, q.dtype, gpu=q.is_cuda)
    sparse_mla_kernel[sparse_mla_grid(N, constexprs)](
        q, kv, indices, kv.shape[0], K, out, **constexprs, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
