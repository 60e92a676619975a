"""The `dsa::` ops with the contracts of contracts.py, in plain torch: what the custom ops compute.

The model calls exactly these functions, so tracing can swap them for custom ops one for one.
These are the simple, readable semantics; memory-bounded tiling and kernels live in `dsa_export.kernels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visible_keys(positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[..., T] bool: key t is visible to the token at `positions[...]` iff t <= that position."""
    return torch.arange(num_keys, device=positions.device) <= positions[..., None]


def key_rows(sequence: torch.Tensor, block_tables: torch.Tensor, num_keys: int, block_size: int) -> torch.Tensor:
    """[N, T] int64: the pool row of key t (t < num_keys) of each token's sequence (models/cache.py); -1 where the
    sequence has no block there."""
    t = torch.arange(num_keys, device=block_tables.device)
    blocks = block_tables.long()[sequence.long()][:, t // block_size]  # [N, T]
    return torch.where(blocks >= 0, blocks * block_size + t % block_size, -1)


def lightning_indexer(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                      sequence: torch.Tensor, block_tables: torch.Tensor, topk: int, block_size: int) -> torch.Tensor:
    """indices [N,topk] int32: the pool rows of the visible keys of each token's sequence with the largest
    I[n,t] = Σ_h w[n,h]·ReLU(q[n,h]·k[row of t]).

    q [N,HI,DI], k [ROWS,DI] (the pool), w [N,HI] fp32, positions [N], sequence [N], block_tables [R,M]. Slots beyond
    the number of visible keys are −1. Ties go to the lower t (a stable sort), so every implementation can agree on
    the exact set."""
    num_keys = int(positions.max()) + 1
    rows = key_rows(sequence, block_tables, num_keys, block_size)
    keys = k[rows.clamp(min=0)].float()  # [N, T, DI]
    scores = torch.einsum("nhd,ntd->nht", q.float(), keys).relu()
    scores = torch.einsum("nht,nh->nt", scores, w.float())
    visible = visible_keys(positions, num_keys)
    scores = scores.masked_fill(~visible, float("-inf"))
    kept = min(topk, num_keys)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :kept]
    indices = torch.where(visible.gather(-1, order), rows.gather(-1, order), -1)
    if kept < topk:
        indices = torch.nn.functional.pad(indices, (0, topk - kept), value=-1)
    return indices.to(torch.int32)


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int) -> torch.Tensor:
    """out [N,H,dv]: softmax(scale · q·kv[row]) · kv[row, :dv] over the selected pool rows only.

    q [N,H,DK] absorbed queries, kv [ROWS,DK] latent pool (the value is its first dv dims), indices [N,K] int32
    pool rows with −1 for an empty slot (a row outside the pool counts as empty: a GPU kernel must never read it). A
    token with no valid index gives zeros. Computed in fp32."""
    valid = (indices >= 0) & (indices < kv.shape[0])
    # [N,K,DK]; an empty slot's stand-in row (row 0, another sequence's) is zeroed: nothing of it can leak in
    rows = kv[indices.clamp(0, kv.shape[0] - 1).long()].float().masked_fill(~valid[..., None], 0.0)
    scores = torch.einsum("nhd,nkd->nhk", q.float(), rows) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-empty rows: softmax of all −inf is NaN → 0
    out = torch.einsum("nhk,nkd->nhd", probs, rows[..., :dv])
    return out.to(q.dtype)


def dequantize_experts(weight: torch.Tensor, scale: torch.Tensor, block_out: int, block_in: int, rows: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """[E, P·rows, cols] FP8 expert weights (e4m3, or its codes as int8; P projections of `rows` rows stacked, e.g.
    gate ‖ up) → `dtype`: W8 · scale per block, in fp32, each projection with its own row blocks
    (contracts.fp8_scale_shape)."""
    if weight.dtype == torch.int8:
        weight = weight.view(torch.float8_e4m3fn)
    E, total, cols = weight.shape
    row = torch.arange(total, device=weight.device)
    row_block = (row // rows) * -(-rows // block_out) + (row % rows) // block_out
    col_block = torch.arange(cols, device=weight.device) // block_in
    return (weight.float() * scale.float()[:, row_block][:, :, col_block]).to(dtype)


def routed_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """out [N,H] fp32 = base + Σ_j weights[n,j]·SwiGLU-expert_{experts[n,j]}(x[n]) (contracts.ROUTED_EXPERTS).

    x [N,H], experts/weights [N,k], gate_up [E,2I,H] (gate ‖ up), down [E,H,I], base [N,H] fp32. The projections
    round to x's dtype like nn.Linear, the activation runs in fp32, the down projection accumulates in fp32.
    Readable form: one gathered expert per (token, slot); the kernels group tokens by expert instead."""
    inter = down.shape[-1]
    out = base.float().clone()
    for j in range(experts.shape[1]):
        e = experts[:, j].long()
        gu = (gate_up[e] @ x[:, :, None]).squeeze(-1)  # [N, 2I] in x's dtype
        h = (F.silu(gu[:, :inter].float()) * gu[:, inter:].float()).to(x.dtype)
        out += weights[:, j, None].float() * (down[e].float() @ h.float()[:, :, None]).squeeze(-1)
    return out


def routed_experts_fp8(x, experts, weights, gate_up, gate_up_scale, down, down_scale, base, block_out: int,
                       block_in: int) -> torch.Tensor:
    """`routed_experts` with FP8 e4m3 expert weights (as int8 codes) and their block scales
    (contracts.ROUTED_EXPERTS_FP8)."""
    inter = down.shape[-1]
    return routed_experts(x, experts, weights,
                          dequantize_experts(gate_up, gate_up_scale, block_out, block_in, inter, x.dtype),
                          dequantize_experts(down, down_scale, block_out, block_in, down.shape[1], x.dtype), base)


def write_cache(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Write rows[n] at pool row slots[n] in place (layout: models/cache.py); returns `cache`."""
    cache.index_copy_(0, slots.long(), rows.to(cache.dtype))
    return cache
