"""CPU reference implementations of the `dsa::` ops in plain torch.

Same results as the readable semantics in `dsa_export.models.semantics`, but with the costs of a real implementation:
- the indexer gathers each sequence's visible keys once (through its block table) and is tiled over that
  sequence's tokens: it holds one tile's [rows, T] scores plus one key chunk's per-head scores (TILE_BYTES
  together), never the whole [S, T] matrix, so a 64K-token prefill fits in well under a GB; keys past a sequence's
  last position are not scored at all; sparse MLA is tiled over tokens;
- the routed experts group the (token, slot) pairs by expert and run each chosen expert once on its tokens: the
  work follows the tokens routed, not the number of experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsa_export.kernels.common import IndexerSplit
from dsa_export.models.semantics import dequantize_experts, key_rows

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
                                sequence: torch.Tensor, block_tables: torch.Tensor, topk: int,
                                block_size: int) -> torch.Tensor:
    """contracts.LIGHTNING_INDEXER: the tokens grouped by sequence, each sequence's visible keys gathered once
    through its block table, then scored in tiles of tokens."""
    N, HI, DI = q.shape
    out = torch.full((N, topk), -1, dtype=torch.int32, device=q.device)
    for s in torch.unique(sequence).tolist():
        tokens = (sequence == s).nonzero().flatten()
        pos = positions[tokens].long()
        seen = int(pos.max()) + 1  # keys past the last position are invisible to every token of the sequence
        rows = key_rows(torch.tensor([s], device=q.device), block_tables, seen, block_size)[0]  # [T]
        if seen <= topk:  # every token keeps all the keys it sees: nothing to score
            t = torch.arange(topk, device=q.device)
            out[tokens] = torch.where(t <= pos[:, None], rows[t.clamp(max=seen - 1)], -1).to(torch.int32)
            continue
        keys = k.index_select(0, rows.clamp(min=0)).float()
        chunk = min(KEY_CHUNK, seen)
        per_tile = _rows_per_tile(4 * (seen + chunk * HI))  # a tile's score rows plus one key chunk's per-head scores
        for t0 in range(0, len(tokens), per_tile):
            tile = tokens[t0:t0 + per_tile]
            tile_pos = pos[t0:t0 + per_tile]
            queries = q[tile].float().reshape(-1, DI)  # [rows·HI, DI]
            weights = w[tile].float().unsqueeze(-1)  # [rows, HI, 1]
            scores = queries.new_empty(weights.shape[0], seen)
            for c0 in range(0, seen, chunk):
                c1 = min(c0 + chunk, seen)
                # keys × (rows·heads): the long dimension as GEMM rows is much faster on CPU than the transpose
                per_head = (keys[c0:c1] @ queries.T).relu_().view(c1 - c0, -1, HI).transpose(0, 1)
                scores[:, c0:c1] = torch.bmm(per_head, weights).squeeze(-1)  # Σ_h w·ReLU(q·k)
            scores.masked_fill_(torch.arange(seen, device=q.device) > tile_pos[:, None], float("-inf"))
            chosen = select_topk(scores, topk)  # positions in the sequence, −1 padded
            out[tile] = torch.where(chosen >= 0, rows[chosen.clamp(min=0)], -1).to(torch.int32)
    return out


EMPTY_KEY = -(2**63)  # no key (the indexer kernels' sentinel)


def indexer_keys(scores: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """fp32 scores and positions → the indexer kernels' int64 keys: (score desc, t asc) in one integer order."""
    bits = torch.where(scores == 0, torch.zeros_like(scores), scores).float().view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    return (ordered << 32) | (0x7FFFFFFF - t.long())


def key_positions(keys: torch.Tensor) -> torch.Tensor:
    return 0x7FFFFFFF - (keys & 0x7FFFFFFF)


def indexer_chunks_reference(q, k, w, positions, sequence, block_tables, topk: int, block_size: int,
                             split: IndexerSplit = IndexerSplit(), tile: int = 16) -> torch.Tensor:
    """dsa::IndexerChunks in torch, one token at a time (the device check's reference, at decode shapes): candidates
    [N + split_rows, topk] int64, each chunk's top keys sorted descending; rows no chunk uses hold EMPTY_KEY."""
    N = q.shape[0]
    out = torch.full((N + split.split_rows, topk), EMPTY_KEY, dtype=torch.int64, device=q.device)
    capacity = block_tables.shape[1] * block_size
    for n in range(N):
        visible = min(int(positions[n]) + 1, capacity)
        chunks = split.chunks(N, visible, topk)
        if not chunks:
            continue
        t = torch.arange(visible, device=q.device)
        rows = block_tables[sequence[n].long(), t // block_size].long() * block_size + t % block_size
        scores = (q[n].float() @ k[rows].float().T).relu().mul(w[n].float()[:, None]).sum(0)
        keys = indexer_keys(scores, t)
        length = split.chunk_length(visible, chunks, tile)
        for c in range(chunks):
            part = keys[c * length:(c + 1) * length]
            best = part.topk(min(topk, len(part))).values  # sorted descending
            out[split.candidate_row(N, n, c), :len(best)] = best
    return out


def indexer_merge_reference(candidates, positions, sequence, block_tables, topk: int, block_size: int,
                            split: IndexerSplit = IndexerSplit()) -> torch.Tensor:
    """dsa::IndexerMerge in torch: each token's top-k of its chunks' keys (all of its keys when it sees at most topk),
    as pool rows, −1 padded: LightningIndexer's indices."""
    N = positions.shape[0]
    out = torch.full((N, topk), -1, dtype=torch.int32, device=candidates.device)
    capacity = block_tables.shape[1] * block_size
    for n in range(N):
        visible = min(int(positions[n]) + 1, capacity)
        chunks = split.chunks(N, visible, topk)
        if chunks:
            keys = candidates[[split.candidate_row(N, n, c) for c in range(chunks)]].flatten()
            keys = keys[keys != EMPTY_KEY]
            t = key_positions(keys.topk(min(topk, len(keys))).values)
        else:
            t = torch.arange(visible, device=candidates.device)
        out[n, :len(t)] = (block_tables[sequence[n].long(), t // block_size].long() * block_size
                           + t % block_size).to(torch.int32)
    return out


def sparse_mla_reference(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
                         dv: int) -> torch.Tensor:
    N, H, DK = q.shape
    K = indices.shape[-1]
    out = q.new_empty(N, H, dv)
    per_tile = _rows_per_tile(K * DK * 4)
    for t0 in range(0, N, per_tile):
        tile = slice(t0, min(t0 + per_tile, N))
        idx = indices[tile]
        valid = (idx >= 0) & (idx < kv.shape[0])  # a row outside the pool: an empty slot
        # gather the chosen latent rows: [rows, K, DK] (index_select is the fast gather on CPU)
        selected = kv.index_select(0, idx.clamp(0, kv.shape[0] - 1).flatten().long()).view(*idx.shape, DK).float()
        selected.masked_fill_(~valid[..., None], 0.0)  # an empty slot read row 0 (another sequence's): zeroed
        scores = torch.bmm(q[tile].float(), selected.transpose(1, 2)).mul_(scale)  # [rows, H, K]
        scores.masked_fill_(~valid[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a token with no valid slot → zeros
        out[tile] = torch.bmm(probs, selected[..., :dv]).to(q.dtype)
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
