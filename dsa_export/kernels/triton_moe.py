"""Routed experts (MoE) as one Triton kernel: tokens grouped by expert, SwiGLU, weighted sum with atomic adds.

Contract (`contracts.ROUTED_EXPERTS` / `ROUTED_EXPERTS_FP8`; reference: `dsa_export.models.semantics.routed_experts`):
x [N,H], experts [N,k] int32, weights [N,k] fp32, gate_up [E,2I,H] (gate ‖ up), down [E,H,I], base [N,H] fp32 →
out [N,H] fp32 = base + Σ_j weights[n,j]·down[e]·h, h = silu(g)·u, [g ‖ u] = gate_up[e]·x[n], e = experts[n,j].
FP8 variant: gate_up/down hold e4m3 codes with fp32 block scales (gate_up_scale [E, 2·ceil(I/BO), ceil(H/BI)]: the
gate's row blocks, then up's; down_scale [E, ceil(H/BO), ceil(I/BI)]; BO, BI = block_out, block_in).

Design
------
One launch (a TensorRT plugin runs one kernel), grid (E, ceil(I/BLOCK_I)): program (e, s) owns expert e and the
I-slice s. It scans the flat routing table experts[0..N·k) in chunks of SCAN and compacts the (token, slot) pairs
routed to e into blocks of BLOCK_M rows (rank = running count + cumsum of the hits; a compare-max puts each hit in
its row). The scan position carries over from block to block, so a program reads the table once in all; an expert
that no token chose does only that. Per block:

1. g, u [BLOCK_M, BLOCK_I]: K-loop over H in BLOCK_K steps, gathered x rows · gate/up rows of the slice (tl.dot);
2. h = silu(g)·u;
3. for every BLOCK_O tile of the H outputs: h · down[e, tile, slice]ᵀ times each row's routing weight,
   `tl.atomic_add`ed into out[token, tile].

The slices' partial sums meet in `out` through the atomics, so the kernel never writes `out` plainly and never zeroes
it: the launcher passes out = base.clone(); in TensorRT the plugin output aliases `base`. `base` is still an argument
(the contract's input order) but is never read.

Precision (the reference's roundings): dots accumulate in fp32; g and u are rounded to x's dtype (as nn.Linear), h is
computed in fp32 and rounded to x's dtype, the down projection accumulates in fp32 and the routing weight multiplies
its fp32 result. FP8 tiles are dequantised as W8·scale in fp32 and rounded to x's dtype; the tile sizes divide the
scale blocks, so each weight tile has one scale. Loads are converted to fp32 at once (the Triton interpreter
computes bf16 arithmetic and bf16 `tl.dot` wrongly, toolchain.md §3.1), and rounding to bf16 is done with integer
ops (`_round`: the interpreter's fp32 → bf16 cast truncates). The dots use "ieee" for fp32 x and "tf32" otherwise,
exact there since every operand is a bf16 value; on a GPU before sm_100, bf16 x gives bf16 dot operands (BF16_DOT:
exact, the full bf16 tensor-core rate; on sm_100a triton 3.7.1 spills 16 bytes with them, so B200 keeps tf32).
For the real model (H 7168, I 2048: grid (E, 32)) the kernels compile to 8–18 KiB of shared memory and 120–198
registers per thread without spills on sm_80…sm_100a (dsa_export.kernels.aot checks them against the 48 KiB of
dynamic shared memory a TensorRT plugin launch gets).

Kernel argument order follows TensorRT's ahead-of-time plugin convention: input pointers in contract order, int32
scalars (N, k; E is the grid's first dimension), output pointers, then the compile-time constants.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsa_export.kernels.common import dot_precision, pow2


# Sized for the real model within 48 KiB of shared memory and without register spills (module docstring): the AOT
# kernels get no pointer-alignment hints, so every tile element costs a 64-bit pointer register; 8 warps spread them.
NUM_WARPS = 8
NUM_STAGES = 1
BLOCK_M = 16  # routed rows per block
MAX_BLOCK_I = 64  # I-slice per program
MAX_BLOCK_K = 32  # H step of the gate/up K-loop
MAX_BLOCK_O = 32  # H outputs per down-projection tile
SCAN = 64  # routing-table entries per scan step


@triton.jit
def _next_block(experts_ptr, e, pos, total, BLOCK_M: tl.constexpr, SCAN: tl.constexpr):
    """The next (up to) BLOCK_M flat pair indices n·k + j with experts == e, scanning from `pos`; −1 = empty row.
    Returns (pairs, count, position after the last pair taken or scanned)."""
    row = tl.arange(0, BLOCK_M)
    pairs = tl.full([BLOCK_M], -1, tl.int32)
    count = pos * 0
    while (count < BLOCK_M) & (pos < total):
        idx = pos + tl.arange(0, SCAN)
        hit = tl.load(experts_ptr + idx, mask=idx < total, other=-1) == e
        rank = count + tl.cumsum(hit.to(tl.int32), axis=0) - 1  # the block row of each hit
        take = hit & (rank < BLOCK_M)
        put = take[None, :] & (rank[None, :] == row[:, None])  # [BLOCK_M, SCAN]: at most one pair per row
        pairs = tl.maximum(pairs, tl.max(tl.where(put, idx[None, :], -1), axis=1))
        hits = tl.sum(hit.to(tl.int32), axis=0)
        # block full before the chunk's end: resume after the last pair taken
        pos = tl.where(count + hits > BLOCK_M, tl.max(tl.where(take, idx, 0), axis=0) + 1, pos + SCAN)
        count = tl.minimum(count + hits, BLOCK_M)
    return pairs, count, pos


@triton.jit
def _round(v, XTYPE: tl.constexpr):
    """fp32 `v` rounded to XTYPE (fp32 or bf16) to nearest even, kept in fp32. bf16 by integer ops: the interpreter's
    fp32 → bf16 cast truncates (its RTNE mode is wrong too), the GPU's rounds to nearest; this is the same on both."""
    if XTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v == v, bits.to(tl.float32, bitcast=True), v)  # NaN stays NaN
    return v


@triton.jit
def _weight_tile(ptrs, mask, scale_ptr, FP8: tl.constexpr, XTYPE: tl.constexpr):
    """A weight tile in fp32 holding x-dtype values; FP8: W8·scale (one scale per tile) rounded to x's dtype."""
    w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if FP8:
        w = _round(w * tl.load(scale_ptr), XTYPE)
    return w


@triton.jit
def _routed_experts(
    x_ptr, experts_ptr, weights_ptr, gate_up_ptr, gate_up_scale_ptr, down_ptr, down_scale_ptr, N, K, out_ptr,
    H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr, SCAN: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_DOT: tl.constexpr,
    FP8: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    tl.static_assert(SCAN >= BLOCK_M)
    if FP8:  # each weight tile lies in one scale block
        tl.static_assert((BLOCK_OUT % BLOCK_I == 0) & (BLOCK_IN % BLOCK_K == 0))
        tl.static_assert((BLOCK_OUT % BLOCK_O == 0) & (BLOCK_IN % BLOCK_I == 0))
    XTYPE: tl.constexpr = x_ptr.dtype.element_ty
    e = tl.program_id(0)
    i0 = tl.program_id(1) * BLOCK_I
    i = i0 + tl.arange(0, BLOCK_I)
    i_ok = i < I
    gate_rows = gate_up_ptr + e.to(tl.int64) * 2 * I * H + i[:, None] * H  # [BLOCK_I, 1]; up rows are I·H further
    down_rows = down_ptr + e.to(tl.int64) * H * I + i[None, :]  # [1, BLOCK_I] columns of down[e]
    # FP8 scale rows of this slice: gate's row block, up's (after the gate's ceil(I/BO) blocks), down's column block
    gate_scales = gate_up_scale_ptr + (e * 2 * tl.cdiv(I, BLOCK_OUT) + i0 // BLOCK_OUT) * tl.cdiv(H, BLOCK_IN)
    up_scales = gate_scales + tl.cdiv(I, BLOCK_OUT) * tl.cdiv(H, BLOCK_IN)
    down_scales = down_scale_ptr + e * tl.cdiv(H, BLOCK_OUT) * tl.cdiv(I, BLOCK_IN) + i0 // BLOCK_IN

    total = N * K
    pos = total * 0
    while pos < total:
        pairs, count, pos = _next_block(experts_ptr, e, pos, total, BLOCK_M, SCAN)
        if count > 0:
            valid = pairs >= 0
            token = tl.where(valid, pairs // K, 0).to(tl.int64)
            route_w = tl.load(weights_ptr + pairs, mask=valid, other=0.0)

            g = tl.zeros([BLOCK_M, BLOCK_I], tl.float32)
            u = tl.zeros([BLOCK_M, BLOCK_I], tl.float32)
            for k0 in range(0, H, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k[None, :] < H
                xt = tl.load(x_ptr + token[:, None] * H + k[None, :], mask=valid[:, None] & k_ok,
                             other=0.0).to(tl.float32)
                w_mask = i_ok[:, None] & k_ok
                wg = _weight_tile(gate_rows + k[None, :], w_mask, gate_scales + k0 // BLOCK_IN, FP8, XTYPE)
                wu = _weight_tile(gate_rows + I * H + k[None, :], w_mask, up_scales + k0 // BLOCK_IN, FP8, XTYPE)
                if BF16_DOT:  # bf16 activations on a GPU: every operand holds bf16 values, exact as bf16
                    xt, wg, wu = xt.to(tl.bfloat16), wg.to(tl.bfloat16), wu.to(tl.bfloat16)
                g = tl.dot(xt, tl.trans(wg), acc=g, input_precision=DOT_PRECISION)
                u = tl.dot(xt, tl.trans(wu), acc=u, input_precision=DOT_PRECISION)
            g = _round(g, XTYPE)  # the projection's output in x's dtype, like nn.Linear
            u = _round(u, XTYPE)
            h = _round(g / (1.0 + tl.exp(-g)) * u, XTYPE)  # silu(g)·u; zero in padded columns

            for o0 in range(0, H, BLOCK_O):
                o = o0 + tl.arange(0, BLOCK_O)
                wd = _weight_tile(down_rows + o[:, None] * I, (o[:, None] < H) & i_ok[None, :],
                                  down_scales + (o0 // BLOCK_OUT) * tl.cdiv(I, BLOCK_IN), FP8, XTYPE)
                if BF16_DOT:
                    part = tl.dot(h.to(tl.bfloat16), tl.trans(wd.to(tl.bfloat16)), input_precision=DOT_PRECISION)
                else:
                    part = tl.dot(h, tl.trans(wd), input_precision=DOT_PRECISION)
                part = part * route_w[:, None]
                tl.atomic_add(out_ptr + token[:, None] * H + o[None, :], part,
                              mask=valid[:, None] & (o[None, :] < H), sem="relaxed")


@triton.jit
def routed_experts_kernel(
    x_ptr, experts_ptr, weights_ptr, gate_up_ptr, down_ptr,  # inputs (contracts.ROUTED_EXPERTS)
    base_ptr,  # input base: never read (out holds it at launch), there for the contract's argument order
    N, K,  # int32: tokens, slots per token
    out_ptr,  # output: [N,H] fp32, holding base at launch
    H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr, SCAN: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_DOT: tl.constexpr,
):
    # the scale pointers are never dereferenced without FP8: pass any pointer
    _routed_experts(x_ptr, experts_ptr, weights_ptr, gate_up_ptr, weights_ptr, down_ptr, weights_ptr, N, K, out_ptr,
                    H, I, BLOCK_M, BLOCK_I, BLOCK_K, BLOCK_O, SCAN, DOT_PRECISION, BF16_DOT, False, 1, 1)


@triton.jit
def routed_experts_fp8_kernel(
    x_ptr, experts_ptr, weights_ptr, gate_up_ptr, gate_up_scale_ptr, down_ptr, down_scale_ptr,  # inputs
    base_ptr,  # input base: never read (out holds it at launch)
    N, K,  # int32: tokens, slots per token
    out_ptr,  # output: [N,H] fp32, holding base at launch
    H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr, SCAN: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_DOT: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    _routed_experts(x_ptr, experts_ptr, weights_ptr, gate_up_ptr, gate_up_scale_ptr, down_ptr, down_scale_ptr, N, K,
                    out_ptr, H, I, BLOCK_M, BLOCK_I, BLOCK_K, BLOCK_O, SCAN, DOT_PRECISION, BF16_DOT, True, BLOCK_OUT,
                    BLOCK_IN)


def _pow2_divisor(n: int) -> int:
    return n & -n  # the largest power of two dividing n


def routed_experts_constexprs(H: int, I: int, dtype: torch.dtype, fp8_block: tuple[int, int] | None = None,
                              capability: int | None = None) -> dict:
    """The compile-time constants for one model shape, activation dtype, (FP8 weights) scale block
    (block_out, block_in) and GPU compute capability (None: the interpreter, whose bf16 dot is wrong); shared by
    the launcher and the AOT build."""
    block_i, block_k, block_o = min(MAX_BLOCK_I, pow2(I)), min(MAX_BLOCK_K, pow2(H)), min(MAX_BLOCK_O, pow2(H))
    constexprs = {}
    if fp8_block is not None:  # tiles must not straddle scale blocks
        block_out, block_in = fp8_block
        block_i = min(block_i, _pow2_divisor(block_out), _pow2_divisor(block_in))
        block_k = min(block_k, _pow2_divisor(block_in))
        block_o = min(block_o, _pow2_divisor(block_out))
        if min(block_i, block_k, block_o) < 16:
            raise ValueError(f"routed_experts_fp8: scale blocks {fp8_block} need tiles of at least 16 that divide "
                             f"them (tl.dot); use multiples of 16")
        constexprs = {"BLOCK_OUT": block_out, "BLOCK_IN": block_in}
    return {"H": H, "I": I, "BLOCK_M": BLOCK_M, "BLOCK_I": block_i, "BLOCK_K": block_k, "BLOCK_O": block_o,
            "SCAN": SCAN, "DOT_PRECISION": dot_precision(dtype),
            # bf16 operands where the compiler keeps them in registers: sm_100a spills 16 bytes with them (triton
            # 3.7.1), so Blackwell keeps fp32 operands (tf32) until that is re-checked
            "BF16_DOT": capability is not None and capability < 100 and dtype != torch.float32,
            **constexprs}


def _capability(x: torch.Tensor) -> int | None:
    if not x.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(x.device)
    return major * 10 + minor


def routed_experts_grid(E: int, constexprs: dict) -> tuple[int, int, int]:
    return (E, math.ceil(constexprs["I"] / constexprs["BLOCK_I"]), 1)


def routed_experts_triton(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                          down: torch.Tensor, base: torch.Tensor, scales: tuple | None = None) -> torch.Tensor:
    """out [N,H] fp32; same contract as `dsa_export.models.semantics.routed_experts` (scales=None) or
    `routed_experts_fp8` (scales = (gate_up_scale, down_scale, block_out, block_in), weights as FP8 codes).

    Launches on CUDA tensors, or on CPU tensors when triton was imported with TRITON_INTERPRET=1."""
    N, H = x.shape
    E, I = gate_up.shape[0], down.shape[-1]
    out = base.float().clone(memory_format=torch.contiguous_format)  # the kernel adds onto it (no zeroing)
    if out.numel() == 0 or experts.numel() == 0:
        return out
    x, experts, weights = x.contiguous(), experts.to(torch.int32).contiguous(), weights.float().contiguous()
    launch = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if scales is None:
        constexprs = routed_experts_constexprs(H, I, x.dtype, capability=_capability(x))
        routed_experts_kernel[routed_experts_grid(E, constexprs)](
            x, experts, weights, gate_up.contiguous(), down.contiguous(), base, N, experts.shape[1], out,
            **constexprs, **launch)
        return out
    gate_up_scale, down_scale, block_out, block_in = scales
    constexprs = routed_experts_constexprs(H, I, x.dtype, (block_out, block_in), capability=_capability(x))
    routed_experts_fp8_kernel[routed_experts_grid(E, constexprs)](
        x, experts, weights, gate_up.contiguous().view(torch.float8_e4m3fn), gate_up_scale.float().contiguous(),
        down.contiguous().view(torch.float8_e4m3fn), down_scale.float().contiguous(), base, N, experts.shape[1], out,
        **constexprs, **launch)
    return out
