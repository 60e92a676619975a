"""Lightning indexer as a Triton kernel: fused score Σ_h w·ReLU(q_h·k_t) and causal top-k in one pass.

Contract (design.md, `dsa::LightningIndexer`; reference: `dsa_export.models.semantics.lightning_indexer`):
q [B,S,HI,DI], k [B,T,DI], w [B,S,HI] fp32, positions [B,S] int → indices [B,S,topk] int32 of the visible keys
(t <= positions[b,s]) with the largest score; ties go to the lower t; slots beyond the visible count hold −1.

Design
------
One program per query row (b, s). It loads the row's q [HI,DI] and w [HI] once, then streams the key cache in tiles
of BLOCK_T keys, stopping at the last visible key. Per tile:

1. scores: one `tl.dot` q·kᵀ → [HI, BLOCK_T], ReLU, weight by w, sum over heads → [BLOCK_T] (all fp32);
2. pack each (score, t) into one int64 *key* that orders exactly like the contract: the score's fp32 bits mapped
   to an int32 with the same order (sign-magnitude → two's complement) in the high half, `INT32_MAX − t` in the low
   half, so equal scores rank the lower t higher. Every key is unique, so "top-k" is exact. Invisible keys get
   EMPTY_KEY (INT64_MIN), which loses to every real key and is written out as −1;
3. merge into a running top-k kept in registers: `best` [TOPK_P] int64, sorted descending. If the tile's largest
   key does not beat the smallest key in `best` the tile is skipped (the usual case once `best` has filled up).
   Otherwise the tile is sorted ascending and padded in front with EMPTY_KEY to TOPK_P; then the element-wise
   max of (`best` descending, tile ascending) holds exactly the TOPK_P largest keys of both, as a bitonic
   sequence, and one `tl.bitonic_merge` (log2 TOPK_P steps) sorts it again (the bitonic-merge step of bitonic sort).
   SKIP_TILES=False merges every tile (same result, more work). It is used for sm_100: triton 3.7.1 crashes there
   ("parent layout must have at least rank >= 2" in TritonNvidiaGPUOptimizeTMemLayoutsPass) when a tensor-core
   (tcgen05) dot result feeds the data-dependent `if`. Re-check when triton is upgraded.

Nothing but the final indices is written to global memory: no score row, no scratch buffer.
Per-program state: `best` = TOPK_P int64 (8·TOPK_P bytes; 16 KiB for topk 2048, i.e. 32 registers per thread at
4 warps), the q tile HI_P·DI_P fp32, and one key tile BLOCK_T·DI_P fp32 plus its [HI_P, BLOCK_T] scores. The
compiler stages dot operands and sort exchanges through shared memory; `dsa_export.kernels.aot` records the
resulting shared memory and register counts per GPU and checks them against the architecture limits and TensorRT's
48 KiB of dynamic shared memory. For the real model (HI 64, DI 128, topk 2048) every variant compiles to exactly
48 KiB of shared memory and 110–162 registers per thread without spills on sm_80…sm_100a (16-key tiles, no
pipelining: 64-key tiles or 2 stages need 56–80 KiB).

Padding: tl.arange and tl.dot need power-of-2 sizes ≥ 16, so HI, DI and topk are padded (HI_P, DI_P, TOPK_P) and
masked; padded heads have w = 0 and q = 0. BLOCK_T ≤ TOPK_P so that a tile fits into the merge.

Precision: every load is converted to fp32 at once (the Triton interpreter computes bf16 arithmetic and bf16
`tl.dot` wrongly, toolchain.md §3.1; on a GPU it costs nothing extra for correctness). fp8 (e4m3) inputs load and
convert the same way, in the interpreter too. The dot runs with
input_precision "ieee" for fp32 inputs, so GPU scores match the fp32 reference, and "tf32" for bf16/fp8 inputs,
which is exact there (their 7- or 3-bit mantissas fit in tf32's 10 bits) and uses the tensor cores.

Limits of this first version: one row per program, so decode (B·S small) uses few SMs and prefill re-reads the key
cache once per query; a split over T (per-chunk top-k written to a small scratch, then a merge kernel) and blocks
of query rows sharing a key tile are the next steps for speed.

Kernel argument order follows TensorRT's ahead-of-time plugin convention: input pointers, then int32 scalars,
then output pointers, then the compile-time constants (dsa_export.kernels.aot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_export.kernels.common import dot_precision, pow2

EMPTY_KEY = tl.constexpr(-(2**63))  # sorts below every real key; stands for "no key" (−1 in the output)
NUM_WARPS = 4
NUM_STAGES = 1  # software pipelining depth (the launcher and the AOT build use the same); 2 exceeds 48 KiB for fp32
MAX_BLOCK_T = 16  # keys per tile (capped by TOPK_P); larger tiles exceed 48 KiB of shared memory for the real model


@triton.jit
def _merge_tile(best, key, TOPK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """The TOPK_P largest of `best` (TOPK_P keys, sorted descending) and `key` (BLOCK_T keys), sorted descending."""
    tile = tl.sort(key)  # ascending
    # pad in front to TOPK_P: rows of EMPTY_KEY, the sorted tile last, so it stays ascending
    pad_rows: tl.constexpr = TOPK_P // BLOCK_T
    r = tl.arange(0, pad_rows)[:, None]
    tile = tl.reshape(tl.where(r == pad_rows - 1, tile[None, :], EMPTY_KEY), [TOPK_P])
    # max(descending, ascending) keeps the TOPK_P largest of both as a bitonic sequence; one merge sorts it
    return tl.bitonic_merge(tl.maximum(best, tile), descending=True)


@triton.jit
def lightning_indexer_kernel(
    q_ptr, k_ptr, w_ptr, pos_ptr,  # inputs: q [B,S,HI,DI], k [B,T,DI], w [B,S,HI], positions [B,S]
    S, T,  # int32: queries per batch row, keys in the cache
    out_ptr,  # output: indices [B,S,TOPK] int32
    HI: tl.constexpr, DI: tl.constexpr, TOPK: tl.constexpr,
    HI_P: tl.constexpr, DI_P: tl.constexpr, TOPK_P: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SKIP_TILES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # flat b*S + s
    b = row // S
    heads = tl.arange(0, HI_P)
    dims = tl.arange(0, DI_P)

    q = tl.load(q_ptr + row * HI * DI + heads[:, None] * DI + dims[None, :],
                mask=(heads[:, None] < HI) & (dims[None, :] < DI), other=0.0).to(tl.float32)
    w = tl.load(w_ptr + row * HI + heads, mask=heads < HI, other=0.0).to(tl.float32)
    # keys 0..position are visible; the loop stops after the last one
    num_visible = tl.minimum(tl.load(pos_ptr + row).to(tl.int64) + 1, T)

    best = tl.full([TOPK_P], EMPTY_KEY, tl.int64)  # running top-k keys, sorted descending
    k_rows = k_ptr + b * T * DI
    for t0 in range(0, num_visible, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        visible = t < num_visible
        k = tl.load(k_rows + t[:, None] * DI + dims[None, :],
                    mask=visible[:, None] & (dims[None, :] < DI), other=0.0).to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [HI_P, BLOCK_T]
        score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)  # [BLOCK_T]

        # (score desc, t asc) packed into one int64; -0.0 → +0.0 first because torch ranks them equal
        score = tl.where(score == 0.0, 0.0, score)
        bits = score.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 with the same order as the float
        key = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - t)
        key = tl.where(visible, key, EMPTY_KEY)

        if SKIP_TILES:
            if tl.max(key, axis=0) > tl.min(best, axis=0):  # some key in this tile makes the running top-k
                best = _merge_tile(best, key, TOPK_P, BLOCK_T)
        else:
            best = _merge_tile(best, key, TOPK_P, BLOCK_T)

    slot = tl.arange(0, TOPK_P)
    index = tl.where(best == EMPTY_KEY, -1, 0x7FFFFFFF - (best & 0x7FFFFFFF))
    tl.store(out_ptr + row * TOPK + slot, index.to(tl.int32), mask=slot < TOPK)


def indexer_constexprs(HI: int, DI: int, topk: int, dtype: torch.dtype, capability: int | None = None) -> dict:
    """The compile-time constants for one model shape, input dtype and GPU compute capability (e.g. 90; None for
    the interpreter). Shared by the launcher and the AOT build, so both compile the same kernel."""
    topk_p = pow2(topk)
    return {"HI": HI, "DI": DI, "TOPK": topk, "HI_P": pow2(HI), "DI_P": pow2(DI), "TOPK_P": topk_p,
            "BLOCK_T": min(MAX_BLOCK_T, topk_p), "DOT_PRECISION": dot_precision(dtype),
            # triton 3.7.1 crashes compiling the skip test for sm_100 (module docstring): always merge there
            "SKIP_TILES": capability is None or capability < 100}


def lightning_indexer_triton(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                             topk: int) -> torch.Tensor:
    """indices [B,S,topk] int32; same contract as `dsa_export.models.semantics.lightning_indexer`.

    Launches on CUDA tensors, or on CPU tensors when triton was imported with TRITON_INTERPRET=1."""
    B, S, HI, DI = q.shape
    T = k.shape[1]
    out = torch.empty((B, S, topk), dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out
    q, k, w, positions = q.contiguous(), k.contiguous(), w.float().contiguous(), positions.long().contiguous()
    capability = None
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        capability = major * 10 + minor
    lightning_indexer_kernel[(B * S,)](q, k, w, positions, S, T, out,
                                       **indexer_constexprs(HI, DI, topk, q.dtype, capability),
                                       num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
