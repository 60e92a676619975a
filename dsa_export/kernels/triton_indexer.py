"""Lightning indexer as two Triton kernels: scores Σ_h w·ReLU(q_h·k_t) with a top-k per chunk of keys, then a merge.

Contract (contracts.LIGHTNING_INDEXER; reference: `dsa_export.models.semantics.lightning_indexer`):
q [N,HI,DI], k [ROWS,DI] (the key pool), w [N,HI] fp32, positions [N], sequence [N], block_tables [R,M] → indices
[N,topk] int32: the pool rows of the visible keys (t <= positions[n]) of token n's sequence with the largest score;
ties go to the lower t; slots beyond the visible count hold −1. Key t of the sequence is pool row
block_tables[s, t // BLOCK_SIZE]·BLOCK_SIZE + t % BLOCK_SIZE (models/cache.py). The two kernels are the TensorRT
plugins dsa::IndexerChunks and dsa::IndexerMerge (contracts.INDEXER_CHUNKS / INDEXER_MERGE): a TensorRT plugin
launches one kernel, and the split needs a second launch to merge.

Design
------
Split keys (flash-decoding's idea applied to top-k): a decode step has few tokens but long contexts, so one program
per token would stream 128K keys on a handful of SMs. Each token's visible keys are cut into chunks (the split rule,
kernels/common.IndexerSplit: about SPLIT_ROWS programs in all, at most MAX_SPLITS chunks per token, chunks of at
least MIN_CHUNK keys); one program per (token, chunk) keeps that chunk's top-k, and the merge kernel (one program per
token) combines the token's chunk lists. A prefill step (N >= SPLIT_ROWS / 2) has one chunk per token: the merge only
maps that list to pool rows.

`indexer_chunks_kernel`: SPLIT_ROWS programs, each going over candidate rows program, program + SPLIT_ROWS, ... of
`candidates` [N + SPLIT_ROWS, TOPK] int64: row n holds token n's chunk 0, row N + n·(splits−1) + (c−1) its chunk c.
Per chunk it loads the token's q [HI,DI] and w [HI] once, then streams the chunk's keys in tiles of BLOCK_T keys
(a tile lies inside one block of the pool: one block-table read per tile). Per tile:

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
The chunk's keys, sorted descending, go to its candidate row.

`indexer_merge_kernel`: per token, the same running top-k over its chunk lists, in tiles of MERGE_T keys. A list is
sorted, so once one of its tiles cannot enter the top-k none after it can: the walk of that list stops there (most
lists give one or two tiles once `best` has filled). Then the keys' positions are mapped to pool rows.

A token that sees at most TOPK keys keeps them all: no chunk program scores anything for it and the merge writes its
keys 0..visible−1 (DSA costs no more than dense attention at short context).

Per-program state: `best` = TOPK_P int64 (8·TOPK_P bytes; 16 KiB for topk 2048, i.e. 32 registers per thread at
4 warps), the q tile HI_P·DI_P fp32, and one key tile BLOCK_T·DI_P fp32 plus its [HI_P, BLOCK_T] scores. The
compiler stages dot operands and sort exchanges through shared memory; `dsa_export.kernels.aot` records the
resulting shared memory and register counts per GPU and checks them against the architecture limits and TensorRT's
48 KiB of shared memory. For the real model (HI 64, DI 128, topk 2048) the fp32 variant compiles to exactly 48 KiB
(a 32 KiB q tile and the 16 KiB top-k exchange) and the bf16/fp8 ones to 32 KiB on sm_90a, without spills (16-key
tiles, no pipelining: 64-key tiles or 2 stages need 56–80 KiB).

Padding: tl.arange and tl.dot need power-of-2 sizes ≥ 16, so HI, DI and topk are padded (HI_P, DI_P, TOPK_P) and
masked; padded heads have w = 0 and q = 0. BLOCK_T, MERGE_T ≤ TOPK_P so that a tile fits into the merge.

Precision: every load is converted to fp32 at once (the Triton interpreter computes bf16 arithmetic and bf16
`tl.dot` wrongly, toolchain.md §3.1). On a GPU, bf16 and fp8 (e4m3) inputs then go into the dot as bf16 (BF16_DOT:
exact for both, the full bf16 tensor-core rate, half the shared memory of fp32 operands), accumulated in fp32;
fp32 inputs run with input_precision "ieee", so GPU scores match the fp32 reference. In the interpreter every dot
takes fp32 operands ("tf32" for bf16/fp8 inputs: exact there too, their mantissas fit in tf32's 10 bits).

Next step for speed: blocks of query rows sharing a key tile in prefill (each token still reads its keys itself).

Kernel argument order follows TensorRT's ahead-of-time plugin convention: input pointers, then int32 scalars,
then output pointers, then the compile-time constants (dsa_export.kernels.aot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_export.kernels.common import IndexerSplit, dot_precision, pow2

EMPTY_KEY = tl.constexpr(-(2**63))  # sorts below every real key; stands for "no key" (−1 in the output)
NUM_WARPS = 4
NUM_STAGES = 1  # software pipelining depth (the launcher and the AOT build use the same); 2 exceeds 48 KiB for fp32
MAX_BLOCK_T = 16  # keys per tile (capped by TOPK_P); larger tiles exceed 48 KiB of shared memory for the real model
MAX_MERGE_T = 64  # candidate keys per tile of the merge (capped by TOPK_P)


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
def _token_split(row, pos_ptr, N, M, TOPK: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT_ROWS: tl.constexpr,
                 MAX_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr):
    """(visible keys, chunks, splits of the step) of token `row` by the split rule, the same in both kernels."""
    num_visible = tl.minimum(tl.load(pos_ptr + row).to(tl.int64) + 1, M.to(tl.int64) * BLOCK_SIZE)
    splits = tl.maximum(1, tl.minimum(MAX_SPLITS, SPLIT_ROWS // N))  # per token, for the whole step
    chunks = tl.minimum(splits, (num_visible + MIN_CHUNK - 1) // MIN_CHUNK)
    chunks = tl.where(num_visible <= TOPK, 0, chunks)  # a token that keeps all its keys scores none
    return num_visible, chunks, splits


@triton.jit
def indexer_chunks_kernel(
    q_ptr, k_ptr, w_ptr, pos_ptr, seq_ptr, bt_ptr,  # inputs: q [N,HI,DI], k [ROWS,DI] (the key pool), w [N,HI],
    # positions [N], sequence [N], block_tables [R,M]
    N, M,  # int32: tokens; blocks per row of the block table
    out_ptr,  # output: candidates [N + SPLIT_ROWS, TOPK] int64, each chunk's keys sorted descending
    HI: tl.constexpr, DI: tl.constexpr, TOPK: tl.constexpr,
    HI_P: tl.constexpr, DI_P: tl.constexpr, TOPK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SKIP_TILES: tl.constexpr, BF16_DOT: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, MAX_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr,
):
    heads = tl.arange(0, HI_P)
    dims = tl.arange(0, DI_P)
    slot = tl.arange(0, TOPK_P)
    for candidate in range(tl.program_id(0), N + SPLIT_ROWS, tl.num_programs(0)):
        # which (token, chunk) this candidate row holds: row n is chunk 0 of token n, N + n·(splits−1) + c − 1 chunk c
        splits = tl.maximum(1, tl.minimum(MAX_SPLITS, SPLIT_ROWS // N))
        extra = tl.maximum(candidate - N, 0)
        row = tl.where(candidate < N, candidate, extra // tl.maximum(splits - 1, 1))
        chunk = tl.where(candidate < N, 0, 1 + extra % tl.maximum(splits - 1, 1))
        used = (row < N) & ((candidate < N) | (splits > 1))  # candidate rows past N·splits hold nothing
        row = tl.minimum(row, N - 1).to(tl.int64)
        num_visible, chunks, splits = _token_split(row, pos_ptr, N, M, TOPK, BLOCK_SIZE, SPLIT_ROWS, MAX_SPLITS,
                                                   MIN_CHUNK)
        active = used & (chunk < chunks)
        # the chunk's keys: whole tiles, so that a tile never straddles a block
        length = ((num_visible + chunks - 1) // tl.maximum(chunks, 1) + BLOCK_T - 1) // BLOCK_T * BLOCK_T
        start = chunk * length
        stop = tl.where(active, tl.minimum(start + length, num_visible), start)

        table = bt_ptr + tl.load(seq_ptr + row).to(tl.int64) * M  # the token's sequence's blocks
        q = tl.load(q_ptr + row * HI * DI + heads[:, None] * DI + dims[None, :],
                    mask=active & (heads[:, None] < HI) & (dims[None, :] < DI), other=0.0).to(tl.float32)
        if BF16_DOT:  # bf16/fp8 inputs on a GPU: bf16 operands (exact for both) at the full tensor-core rate
            q = q.to(tl.bfloat16)
        w = tl.load(w_ptr + row * HI + heads, mask=active & (heads < HI), other=0.0).to(tl.float32)
        best = tl.full([TOPK_P], EMPTY_KEY, tl.int64)  # running top-k keys, sorted descending
        for t0 in range(start, stop, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            visible = t < stop
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
        tl.store(out_ptr + candidate * TOPK + slot, best,  # < 2^31: N < 1M tokens
                 mask=active & (slot < TOPK))


@triton.jit
def indexer_merge_kernel(
    cand_ptr, pos_ptr, seq_ptr, bt_ptr,  # inputs: candidates [N + SPLIT_ROWS, TOPK] int64, positions [N],
    # sequence [N], block_tables [R,M]
    N, M,  # int32: tokens; blocks per row of the block table
    out_ptr,  # output: indices [N,TOPK] int32, pool rows
    TOPK: tl.constexpr, TOPK_P: tl.constexpr, MERGE_T: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, MAX_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # the token
    num_visible, chunks, splits = _token_split(row, pos_ptr, N, M, TOPK, BLOCK_SIZE, SPLIT_ROWS, MAX_SPLITS,
                                               MIN_CHUNK)
    slot = tl.arange(0, TOPK_P)
    # one chunk: its list is the answer
    best = tl.load(cand_ptr + row * TOPK + slot, mask=(chunks == 1) & (slot < TOPK), other=EMPTY_KEY)
    for chunk in range(0, tl.where(chunks > 1, chunks, 0)):
        candidate = tl.where(chunk == 0, row, N + row * (splits - 1) + chunk - 1).to(tl.int64)
        t0 = 0
        improves = True
        while improves & (t0 < TOPK):  # a sorted list: stop at its first tile that cannot enter the top-k
            t = t0 + tl.arange(0, MERGE_T)
            key = tl.load(cand_ptr + candidate * TOPK + t, mask=t < TOPK, other=EMPTY_KEY)
            improves = tl.max(key, axis=0) > tl.min(best, axis=0)
            if improves:
                best = _merge_tile(best, key, TOPK_P, MERGE_T)
            t0 += MERGE_T

    # a token that keeps all: its keys 0..num_visible-1, as keys of score 0
    best = tl.where((chunks == 0) & (slot < num_visible), 0x7FFFFFFF - slot.to(tl.int64), best)
    chosen = best != EMPTY_KEY
    t = (0x7FFFFFFF - (best & 0x7FFFFFFF)).to(tl.int64)  # the selected keys' positions in the sequence
    table = bt_ptr + tl.load(seq_ptr + row).to(tl.int64) * M
    block = tl.load(table + t // BLOCK_SIZE, mask=chosen, other=-1).to(tl.int64)
    index = tl.where(chosen, block * BLOCK_SIZE + t % BLOCK_SIZE, -1)  # → their pool rows
    tl.store(out_ptr + row * TOPK + slot, index.to(tl.int32), mask=slot < TOPK)


def indexer_constexprs(HI: int, DI: int, topk: int, block_size: int, dtype: torch.dtype,
                       capability: int | None = None, split: IndexerSplit = IndexerSplit()) -> dict:
    """The chunk kernel's compile-time constants for one model shape, block size, input dtype and GPU compute
    capability (e.g. 90; None for the interpreter). Shared by the launcher and the AOT build, so both compile the
    same kernel."""
    topk_p = pow2(topk)
    block_t = min(MAX_BLOCK_T, topk_p)
    if block_size % block_t:
        raise ValueError(f"lightning_indexer: the pool's block size {block_size} must be a multiple of {block_t}")
    return {"HI": HI, "DI": DI, "TOPK": topk, "HI_P": pow2(HI), "DI_P": pow2(DI), "TOPK_P": topk_p,
            "BLOCK_T": block_t, "BLOCK_SIZE": block_size, "DOT_PRECISION": dot_precision(dtype),
            # triton 3.7.1 crashes compiling the skip test for sm_100 (module docstring): always merge there
            "SKIP_TILES": capability is None or capability < 100,
            # not in the interpreter, whose bf16 tl.dot is wrong (toolchain.md §3.1)
            "BF16_DOT": capability is not None and dtype != torch.float32, **split.constexprs()}


def merge_constexprs(topk: int, block_size: int, split: IndexerSplit = IndexerSplit()) -> dict:
    """The merge kernel's compile-time constants (no dtype: it reads int64 keys)."""
    topk_p = pow2(topk)
    return {"TOPK": topk, "TOPK_P": topk_p, "MERGE_T": min(MAX_MERGE_T, topk_p), "BLOCK_SIZE": block_size,
            **split.constexprs()}


def lightning_indexer_triton(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                             sequence: torch.Tensor, block_tables: torch.Tensor, topk: int,
                             block_size: int, split: IndexerSplit = IndexerSplit()) -> torch.Tensor:
    """indices [N,topk] int32 (pool rows); same contract as `dsa_export.models.semantics.lightning_indexer`. The two
    kernels as the TensorRT plugins launch them (grids, arguments, the candidates between them).

    Launches on CUDA tensors, or on CPU tensors when triton was imported with TRITON_INTERPRET=1. `split`: the
    split rule (the tests split tiny contexts with small constants)."""
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
    candidates = torch.empty((N + split.split_rows, topk), dtype=torch.int64, device=q.device)
    M = block_tables.shape[1]
    # the plugin launches SPLIT_ROWS programs; any number covers every candidate row (each program steps by the
    # grid), and here the candidate rows a chunk can be in are enough
    programs = min(split.split_rows, N * split.splits(N))
    indexer_chunks_kernel[(programs,)](q, k, w, positions, sequence, block_tables, N, M, candidates,
                                         **indexer_constexprs(HI, DI, topk, block_size, q.dtype, capability, split),
                                         num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    indexer_merge_kernel[(N,)](candidates, positions, sequence, block_tables, N, M, out,
                               **merge_constexprs(topk, block_size, split), num_warps=NUM_WARPS)
    return out
