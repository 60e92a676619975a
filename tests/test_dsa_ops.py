import torch

from dsa_export.models.semantics import lightning_indexer, sparse_mla


def brute_force_indexer(q, k, w, positions, topk):
    """Per query: score every visible key in a Python loop, sort by (-score, t)."""
    B, S = positions.shape
    out = torch.full((B, S, topk), -1, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            scored = []
            for t in range(int(positions[b, s]) + 1):
                score = sum(float(w[b, s, h]) * max(float(q[b, s, h] @ k[b, t]), 0.0) for h in range(q.shape[2]))
                scored.append((-score, t))
            chosen = [t for _, t in sorted(scored)[:topk]]
            out[b, s, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def test_indexer_matches_brute_force_with_past_and_short_rows():
    gen = torch.Generator().manual_seed(0)
    B, S, T, H, D, topk = 2, 3, 9, 3, 4, 5
    q, k, w = torch.randn(B, S, H, D, generator=gen), torch.randn(B, T, D, generator=gen), torch.randn(B, S, H, generator=gen)
    positions = torch.tensor([[6, 7, 8], [0, 1, 2]])  # row 1 sees fewer keys than topk: −1 slots
    got = lightning_indexer(q, k, w, positions, topk)
    assert torch.equal(got, brute_force_indexer(q, k, w, positions, topk))
    assert (got[1, 0, 1:] == -1).all() and got[1, 0, 0] == 0


def test_indexer_ties_go_to_lower_key_and_pad_when_topk_exceeds_keys():
    q = torch.zeros(1, 1, 2, 4)
    k = torch.randn(1, 6, 4)
    w = torch.ones(1, 1, 2)
    got = lightning_indexer(q, k, w, torch.tensor([[5]]), topk=8)  # all scores tie at 0
    assert got.tolist() == [[[0, 1, 2, 3, 4, 5, -1, -1]]]


def test_sparse_mla_matches_dense_softmax_over_selected_rows_and_empty_rows_are_zero():
    gen = torch.Generator().manual_seed(0)
    B, S, H, T, DK, dv = 1, 2, 3, 7, 6, 4
    q, kv = torch.randn(B, S, H, DK, generator=gen), torch.randn(B, T, DK, generator=gen)
    indices = torch.tensor([[[4, 1, -1], [-1, -1, -1]]], dtype=torch.int32)
    out = sparse_mla(q, kv, indices, scale=0.5, dv=dv)
    rows = kv[0, [4, 1]]
    expected = torch.softmax(q[0, 0] @ rows.T * 0.5, dim=-1) @ rows[:, :dv]
    torch.testing.assert_close(out[0, 0], expected)
    assert torch.equal(out[0, 1], torch.zeros(H, dv))
