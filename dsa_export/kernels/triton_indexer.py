"""Lightning indexer as a Triton kernel: fused score Σ_h w·ReLU(q_h·k_t) and causal top-k in one pass.

Contract (contracts.LIGHTNING_INDEXER; reference: `dsa_export.models.semantics.lightning_indexer`):
q [N,HI,DI], k [ROWS,DI] (the key pool), w [N,HI] fp32, positions [N], sequence [N], block_tables [R,M] → indices
[N,topk] int32: the pool rows of the visible keys (t <= positions[n]) of token n's sequence with the largest score;
ties go to the lower t; slots beyond the visible count hold −1. Key t of the sequence is pool row
block_tables[s, t // BLOCK_SIZE]·BLOCK_SIZE + t % BLOCK_SIZE (models/cache.py).

Design
------
One program per token. It loads the token's q [HI,DI] and w [HI] once, then streams its sequence's keys in tiles of
BLOCK_T keys (a tile lies inside one block of the pool: one block-table read per tile), stopping at the last visible
key. Per tile:

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

Nothing but the final indices (the selected positions mapped to their pool rows) is written to global memory: no
score row, no scratch buffer.
Per-program state: `best` = TOPK_P int64 (8·TOPK_P bytes; 16 KiB for topk 2048, i.e. 32 registers per thread at
4 warps), the q tile HI_P·DI_P fp32, and one key tile BLOCK_T·DI_P fp32 plus its [HI_P, BLOCK_T] scores. The
compiler stages dot operands and sort exchanges through shared memory; `dsa_export.kernels.aot` records the
resulting shared memory and register counts per GPU and checks them against the architecture limits and TensorRT's
48 KiB of shared memory. For the real model (HI 64, DI 128, topk 2048) the fp32 variant compiles to exactly 48 KiB
(a 32 KiB q tile and the 16 KiB top-k exchange) and the bf16/fp8 ones to 32 KiB on sm_90a, without spills (16-key
tiles, no pipelining: 64-key tiles or 2 stages need 56–80 KiB).

Padding: tl.arange and tl.dot need power-of-2 sizes ≥ 16, so HI, DI and topk are padded (HI_P, DI_P, TOPK_P) and
masked; padded heads have w = 0 and q = 0. BLOCK_T ≤ TOPK_P so that a tile fits into the merge.

Precision: every load is converted to fp32 at once (the Triton interpreter computes bf16 arithmetic and bf16
`tl.dot` wrongly, toolchain.md §3.1). On a GPU, bf16 and fp8 (e4m3) inputs then go into the dot as bf16 (BF16_DOT:
exact for both, the full bf16 tensor-core rate, half the shared memory of fp32 operands), accumulated in fp32;
fp32 inputs run with input_precision "ieee", so GPU scores match the fp32 reference. In the interpreter every dot
takes fp32 operands ("tf32" for bf16/fp8 inputs: exact there too, their mantissas fit in tf32's 10 bits).

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
    q_ptr, k_ptr, w_ptr, pos_ptr, seq_ptr, bt_ptr,  # inputs: q [N,HI,DI], k [ROWS,DI] (the key pool), w [N,HI],
    # positions [N], sequence [N], block_tables [R,M]
    M,  # int32: blocks per row of the block table
    out_ptr,  # output: indices [N,TOPK] int32, pool rows
    HI: tl.constexpr, DI: tl.constexpr, TOPK: tl.constexpr,
    HI_P: tl.constexpr, DI_P: tl.constexpr, TOPK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SKIP_TILES: tl.constexpr, BF16_DOT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # the token
    table = bt_ptr + tl.load(seq_ptr + row).to(tl.int64) * M  # its sequence's blocks
    heads = tl.arange(0, HI_P)
    dims = tl.arange(0, DI_P)

    q = tl.load(q_ptr + row * HI * DI + heads[:, None] * DI + dims[None, :],
                mask=(heads[:, None] < HI) & (dims[None, :] < DI), other=0.0).to(tl.float32)
    if BF16_DOT:  # bf16/fp8 inputs on a GPU: bf16 operands (exact for both) at the full tensor-core rate
        q = q.to(tl.bfloat16)
    w = tl.load(w_ptr + row * HI + heads, mask=heads < HI, other=0.0).to(tl.float32)
    # keys 0..position are visible; the loop stops after the last one
    num_visible = tl.minimum(tl.load(pos_ptr + row).to(tl.int64) + 1, M.to(tl.int64) * BLOCK_SIZE)

    # a token that sees at most TOPK keys keeps them all: nothing to score (DSA costs no more than dense attention
    # at short context)
    keeps_all = num_visible <= TOPK
    best = tl.full([TOPK_P], EMPTY_KEY, tl.int64)  # running top-k keys, sorted descending
    for t0 in range(0, tl.where(keeps_all, 0, num_visible), BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        visible = t < num_visible
        # a tile lies in one block (BLOCK_T divides BLOCK_SIZE): its rows are consecutive in the pool
        block = tl.load(table + t0 // BLOCK_SIZE).to(tl.int64)
        rows = block * BLOCK_SIZE + t0 % BLOCK_SIZE + tl.arange(0, BLOCK_T)
        k = tl.load(k_ptr + rows[:, None] * DI + dims[None, :],
                    mask=visible[:, None] & (dims[None, :] < DI) & (block >= 0), other=0.0).to(tl.float32)
        if BF16_DOT:
            k = k.to(tl.bfloat16)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [HI_P, BLOCK_T], fp32 accumulation
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
    # a token that keeps all: its keys 0..num_visible-1, as keys of score 0
    best = tl.where(keeps_all & (slot < num_visible), 0x7FFFFFFF - slot.to(tl.int64), best)
    chosen = best != EMPTY_KEY
    t = (0x7FFFFFFF - (best & 0x7FFFFFFF)).to(tl.int64)  # the selected keys' positions in the sequence
    block = tl.load(table + t // BLOCK_SIZE, mask=chosen, other=-1).to(tl.int64)
    index = tl.where(chosen, block * BLOCK_SIZE + t % BLOCK_SIZE, -1)  # → their pool rows
    tl.store(out_ptr + row * TOPK + slot, index.to(tl.int32), mask=slot < TOPK)


def indexer_constexprs(HI: int, DI: int, topk: int, block_size: int, dtype: torch.dtype,
                       capability: int | None = None) -> dict:
    """The compile-time constants for one model shape, block size, input dtype and GPU compute capability (e.g. 90;
    None for the interpreter). Shared by the launcher and the AOT build, so both compile the same kernel."""
    topk_p = pow2(topk)
    block_t = min(MAX_BLOCK_T, topk_p)
    if block_size % block_t:
        raise ValueError(f"lightning_indexer: the pool's block size {block_size} must be a multiple of {block_t}")
    return {"HI": HI, "DI": DI, "TOPK": topk, "HI_P": pow2(HI), "DI_P": pow2(DI), "TOPK_P": topk_p,
            "BLOCK_T": block_t, "BLOCK_SIZE": block_size, "DOT_PRECISION": dot_precision(dtype),
            # triton 3.7.1 crashes compiling the skip test for sm_100 (module docstring): always merge there
            "SKIP_TILES": capability is None or capability < 100,
            # not in the interpreter, whose bf16 tl.dot is wrong (toolchain.md §3.1)
            "BF16_DOT": capability is not None and dtype != torch.float32}


def lightning_indexer_triton(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                             sequence: torch.Tensor, block_tables: torch.Tensor, topk: int,
                             block_size: int) -> torch.Tensor:
    """indices [N,topk] int32 (pool rows); same contract as `dsa_export.models.semantics.lightning_indexer`.

    Launches on CUDA tensors, or on CPU tensors when triton was imported with TRITON_INTERPRET=1."""
    N, HI, DI = q.shape
    out = torch.empty((N, topk), dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out
    q, k, w, positions = q.contiguous(), k.contiguous(), w.float().contiguous(), positions.long().contiguous()
    sequence, block_tables = sequence.to(torch.int32).contiguous(), block_tables.to(torch.int32).contiguous()
    capability = None
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        capability = major * 10 + minor
    lightning_indexer_kernel[(N,)](q, k, w, positions, sequence, block_tables, block_tables.shape[1], out,
                                   **indexer_constexprs(HI, DI, topk, block_size, q.dtype, capability),
                                   num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
