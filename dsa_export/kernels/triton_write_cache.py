"""The paged cache write as a Triton kernel: each token's new row copied to its slot of the layer's pool.

Contract (contracts.WRITE_CACHE; reference: `dsa_export.models.semantics.write_cache`): cache [ROWS,D], rows [N,D],
slots [N] int64 → out [ROWS,D] = cache with row slots[n] replaced by rows[n]. In place: a TensorRT plugin's output
aliases `cache` (the pool is allocated once), so the kernel writes `out` and never reads `cache`; the launcher here
passes the same tensor as both. One program per token; a slot outside the pool is not written.

Kernel argument order follows TensorRT's ahead-of-time plugin convention: input pointers, int32 scalars, output
pointers, then the compile-time constants (dsa_export.kernels.aot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_export.kernels.common import pow2

NUM_WARPS = 1
NUM_STAGES = 1


@triton.jit
def write_cache_kernel(
    cache_ptr, rows_ptr, slots_ptr,  # inputs: cache [ROWS,D] (never read: the output is it), rows [N,D], slots [N]
    ROWS, D,  # int32: rows of the pool, row width (a layer's latent and key pools share the kernel)
    out_ptr,  # output: the pool, [ROWS,D]
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token)
    d = tl.arange(0, BLOCK_D)
    row = tl.load(rows_ptr + token * D + d, mask=d < D)
    tl.store(out_ptr + slot * D + d, row.to(out_ptr.dtype.element_ty), mask=(d < D) & (slot >= 0) & (slot < ROWS))


def write_cache_constexprs(*widths: int) -> dict:
    """BLOCK_D covers the widest row the kernel writes (the latent pool's, and the indexer keys')."""
    return {"BLOCK_D": pow2(max(widths))}


def write_cache_triton(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Writes the rows into `cache` in place and returns it (contracts.WRITE_CACHE, out aliasing cache).

    Launches on CUDA tensors, or on CPU tensors when triton was imported with TRITON_INTERPRET=1."""
    if rows.shape[0] == 0:
        return cache
    rows, slots = rows.to(cache.dtype).contiguous(), slots.long().contiguous()
    write_cache_kernel[(rows.shape[0],)](cache, rows, slots, cache.shape[0], cache.shape[1], cache,
                                         **write_cache_constexprs(cache.shape[1]), num_warps=NUM_WARPS,
                                         num_stages=NUM_STAGES)
    return cache
