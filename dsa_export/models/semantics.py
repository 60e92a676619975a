"""The two DSA functions with the contracts of design.md, in plain torch: what the `dsa::` custom ops compute.

The model calls exactly these two functions, so tracing can swap them for custom ops one for one.
These are the simple, readable semantics; memory-bounded tiling and kernels live in `dsa_export.kernels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visible_keys(positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B,S,T] bool: key t is visible to the query at `positions[b,s]` iff t <= that position."""
    return torch.arange(num_keys, device=positions.device) <= positions[..., None]


def lightning_indexer(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                      topk: int) -> torch.Tensor:
    """indices [B,S,topk] int32 of the visible keys with the largest I[b,s,t] = Σ_h w[b,s,h]·ReLU(q[b,s,h]·k[b,t]).

    q [B,S,HI,DI], k [B,T,DI], w [B,S,HI] fp32, positions [B,S]. Slots beyond the number of visible keys are −1.
    Ties go to the lower t (a stable sort), so every implementation can agree on the exact set.
    """
    num_keys = k.shape[1]
    scores = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu()
    scores = torch.einsum("bsht,bsh->bst", scores, w.float())
    visible = visible_keys(positions, num_keys)
    scores = scores.masked_fill(~visible, float("-inf"))
    kept = min(topk, num_keys)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :kept]
    indices = torch.where(visible.gather(-1, order), order, -1)
    if kept < topk:
        indices = torch.nn.functional.pad(indices, (0, topk - kept), value=-1)
    return indices.to(torch.int32)


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, dv: int) -> torch.Tensor:
    """out [B,S,H,dv]: softmax(scale · q·kv[idx]) · kv[idx, :dv] over the selected latent rows only.

    q [B,S,H,DK] absorbed queries, kv [B,T,DK] latent cache (the value is its first dv dims), indices [B,S,K]
    int32 with −1 for an empty slot. A row with no valid index gives zeros. Computed in fp32.
    """
    batch = torch.arange(kv.shape[0], device=kv.device)[:, None, None]
    valid = indices >= 0
    rows = kv[batch, indices.clamp(min=0).long()].float()  # [B,S,K,DK]
    scores = torch.einsum("bshd,bskd->bshk", q.float(), rows) * scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-empty rows: softmax of all −inf is NaN → 0
    out = torch.einsum("bshk,bskd->bshd", probs, rows[..., :dv])
    return out.to(q.dtype)


def dequantize_experts(weight: torch.Tensor, scale: torch.Tensor, block_out: int, block_in: int, rows: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """[E, P·rows, cols] FP8 expert weights (e4m3, or its uint8 codes; P projections of `rows` rows stacked, e.g.
    gate ‖ up) → `dtype`: W8 · scale per block, in fp32, each projection with its own row blocks
    (contracts.fp8_scale_shape)."""
    if weight.dtype == torch.uint8:
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
    """`routed_experts` with FP8 e4m3 expert weights (as uint8 codes) and their block scales
    (contracts.ROUTED_EXPERTS_FP8)."""
    inter = down.shape[-1]
    return routed_experts(x, experts, weights,
                          dequantize_experts(gate_up, gate_up_scale, block_out, block_in, inter, x.dtype),
                          dequantize_experts(down, down_scale, block_out, block_in, down.shape[1], x.dtype), base)


def write_cache(cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Write rows[b, s] at cache[b, 0, positions[b, s]] in place (layout: models/cache.py); returns `cache`."""
    B, S, D = rows.shape
    cache[:, 0].scatter_(1, positions[..., None].expand(B, S, D).long(), rows.to(cache.dtype))
    return cache
