"""CPU reference implementations of the `dsa::` ops in plain torch.

Same results as the readable semantics in `dsa_export.models.semantics`, but with the costs of a real implementation:
- the indexer and sparse MLA are tiled over queries: the indexer holds one query tile's [rows, T] scores plus one key
  chunk's per-head scores (TILE_BYTES together), never the whole [S, T] matrix, so a 64K-token prefill fits in well
  under a GB; keys a tile cannot see (beyond its largest position) are not scored at all;
- the routed experts group the (token, slot) pairs by expert and run each chosen expert once on its tokens: the
  work follows the tokens routed, not the number of experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsa_export.models.semantics import dequantize_experts

TILE_BYTES = 256 << 20  # fp32 scratch for one query tile
KEY_CHUNK = 4096  # keys scored per GEMM: small, reused buffers instead of one [T, rows·HI] block


def select_topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """[R,T] scores (−inf = invisible) → [R,topk] int64 key indices, ascending, −1 padded; ties to the lower t.

    torch.topk does not promise which of several equal scores it keeps, so take its k-th value as a threshold,
    keep everything above it and fill the remaining room with the lowest-t keys equal to it."""
    rows, num_keys = scores.shape
    kept = min(topk, num_keys)
    kth = scores.topk(kept, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = scores > kth
    tie = (scores == kth) & (kth > float("-inf"))
    room = kept - above.sum(-1, keepdim=True)
    chosen = above | (tie & (tie.cumsum(-1) <= room))
    if bool((chosen.sum(-1) == kept).all()):  # every row keeps exactly `kept` keys (the usual case): read them off
        indices = chosen.nonzero()[:, 1].view(rows, kept)
    else:  # rows with fewer visible keys: the chosen ones first (ascending t), then −1
        key = torch.arange(num_keys, device=scores.device)
        indices = torch.where(chosen, key, num_keys).topk(kept, dim=-1, largest=False).values
        indices = torch.where(indices < num_keys, indices, -1)
    return torch.nn.functional.pad(indices, (0, topk - kept), value=-1)


def _rows_per_tile(bytes_per_row: int) -> int:
    return max(1, TILE_BYTES // max(bytes_per_row, 1))


def lightning_indexer_reference(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                                topk: int) -> torch.Tensor:
    B, S, HI, DI = q.shape
    T = k.shape[1]
    out = torch.full((B, S, topk), -1, dtype=torch.int32, device=q.device)
    chunk = min(KEY_CHUNK, T)
    rows = _rows_per_tile(4 * (T + chunk * HI))  # a tile's score rows plus one key chunk's per-head scores
    for b in range(B):
        keys = k[b].float()
        for s0 in range(0, S, rows):
            tile = slice(s0, min(s0 + rows, S))
            pos = positions[b, tile]
            seen = min(int(pos.max()) + 1, T)  # keys past the tile's last position are invisible to all of it
            queries = q[b, tile].float().reshape(-1, DI)  # [rows·HI, DI]
            weights = w[b, tile].float().unsqueeze(-1)  # [rows, HI, 1]
            scores = queries.new_empty(weights.shape[0], seen)
            for t0 in range(0, seen, chunk):
                t1 = min(t0 + chunk, seen)
                # keys × (rows·heads): the long dimension as GEMM rows is much faster on CPU than the transpose
                per_head = (keys[t0:t1] @ queries.T).relu_().view(t1 - t0, -1, HI).transpose(0, 1)
                scores[:, t0:t1] = torch.bmm(per_head, weights).squeeze(-1)  # Σ_h w·ReLU(q·k)
            scores.masked_fill_(torch.arange(seen, device=q.device) > pos[:, None], float("-inf"))
            out[b, tile] = select_topk(scores, topk).to(torch.int32)
    return out


def sparse_mla_reference(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
                         dv: int) -> torch.Tensor:
    B, S, H, DK = q.shape
    K = indices.shape[-1]
    out = q.new_empty(B, S, H, dv)
    rows = _rows_per_tile(K * DK * 4)
    for b in range(B):
        for s0 in range(0, S, rows):
            tile = slice(s0, min(s0 + rows, S))
            idx = indices[b, tile]
            valid = idx >= 0
            # gather the chosen latent rows: [rows, K, DK] (index_select is the fast gather on CPU)
            selected = kv[b].index_select(0, idx.clamp(min=0).flatten().long()).view(*idx.shape, DK).float()
            scores = torch.bmm(q[b, tile].float(), selected.transpose(1, 2)).mul_(scale)  # [rows, H, K]
            scores.masked_fill_(~valid[:, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a row with no valid slot → zeros
            out[b, tile] = torch.bmm(probs, selected[..., :dv]).to(q.dtype)
    return out


def routed_experts_reference(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                             down: torch.Tensor, base: torch.Tensor, scales: tuple | None = None) -> torch.Tensor:
    """contracts.ROUTED_EXPERTS (scales=None) or ROUTED_EXPERTS_FP8 (scales = (gate_up_scale, down_scale,
    block_out, block_in)): tokens grouped by expert; only the experts some token chose are touched."""
    num_slots = experts.shape[1]
    inter = down.shape[-1]
    out = base.float().clone()
    flat = experts.flatten().long()
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=gate_up.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    for e in counts.nonzero().flatten().tolist():
        pairs = order[starts[e]:starts[e] + counts[e]]
        tokens = pairs // num_slots
        w_gate_up, w_down = gate_up[e:e + 1], down[e:e + 1]
        if scales is not None:
            gate_up_scale, down_scale, block_out, block_in = scales
            w_gate_up = dequantize_experts(w_gate_up, gate_up_scale[e:e + 1], block_out, block_in, inter, x.dtype)
            w_down = dequantize_experts(w_down, down_scale[e:e + 1], block_out, block_in, down.shape[1], x.dtype)
        gu = x[tokens] @ w_gate_up[0].T  # [m, 2I], rounded to x's dtype like nn.Linear
        h = (F.silu(gu[:, :inter].float()) * gu[:, inter:].float()).to(x.dtype)
        y = h.float() @ w_down[0].float().T  # fp32 accumulation
        out.index_add_(0, tokens, y * weights.flatten()[pairs, None].float())
    return out
