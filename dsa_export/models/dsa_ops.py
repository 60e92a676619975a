"""The two DSA functions with the contracts of design.md, in plain torch: what the `dsa::` custom ops compute.

The model calls exactly these two functions, so tracing can swap them for custom ops one for one.
These are the simple, readable semantics; memory-bounded tiling and kernels live in `dsa_export.kernels`.
"""

from __future__ import annotations

import torch


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
