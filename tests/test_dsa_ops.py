"""The plain semantics of the dsa:: ops (models/semantics.py) on paged pools, against brute force."""

import torch

from dsa_export.models.semantics import key_rows, lightning_indexer, sparse_mla, write_cache

BS = 2  # rows per block: small, so that every sequence spans several blocks
# Three sequences whose blocks lie scattered and out of order in a pool of 10 blocks (blocks 1 and 6 are free);
# -1: no block there. Sequence 0 continues a prompt (positions 6..8: 5 blocks), sequence 1 decodes one token at
# position 2 (2 blocks), sequence 2 is a fresh prompt (positions 0, 1: 1 block).
TABLES = torch.tensor([[7, 2, 9, 0, 5], [8, 3, -1, -1, -1], [4, -1, -1, -1, -1]], dtype=torch.int32)
# the packed step: the sequences' tokens interleaved
SEQUENCE = torch.tensor([0, 1, 0, 2, 0, 2], dtype=torch.int32)
POSITIONS = torch.tensor([6, 2, 7, 0, 8, 1])
LENGTHS = [9, 3, 2]  # keys each sequence holds after the step


def row_of(s, t):
    return int(TABLES[s, t // BS]) * BS + t % BS


def paged_keys(D, seed=0):
    """The pool [20, D]: every sequence's keys at their rows, NaN everywhere else (free blocks, block tails)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.full((10 * BS, D), float("nan"))
    for s, length in enumerate(LENGTHS):
        for t in range(length):
            pool[row_of(s, t)] = torch.randn(D, generator=gen)
    return pool


def brute_force_indexer(q, pool, w, topk):
    """Per token: score every visible key of its sequence in a Python loop, sort by (-score, t), give pool rows."""
    out = torch.full((q.shape[0], topk), -1, dtype=torch.int32)
    for n, (s, p) in enumerate(zip(SEQUENCE.tolist(), POSITIONS.tolist())):
        scored = []
        for t in range(p + 1):
            k = pool[row_of(s, t)]
            score = sum(float(w[n, h]) * max(float(q[n, h] @ k), 0.0) for h in range(q.shape[1]))
            scored.append((-score, t))
        chosen = [row_of(s, t) for _, t in sorted(scored)[:topk]]
        out[n, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def test_key_rows_follow_the_block_table():
    rows = key_rows(SEQUENCE, TABLES, 9, BS)
    assert rows.shape == (6, 9) and rows.dtype == torch.int64
    assert rows[0].tolist() == [14, 15, 4, 5, 18, 19, 0, 1, 10]  # sequence 0: blocks 7, 2, 9, 0, 5
    assert rows[1].tolist() == [16, 17, 6, 7] + [-1] * 5  # sequence 1: blocks 8, 3, then none
    assert torch.equal(rows[3], rows[5]) and rows[3].tolist() == [8, 9] + [-1] * 7


def test_indexer_matches_brute_force_through_scattered_blocks():
    gen = torch.Generator().manual_seed(0)
    H, D, topk = 3, 4, 5
    pool = paged_keys(D)
    q, w = torch.randn(6, H, D, generator=gen), torch.randn(6, H, generator=gen)
    got = lightning_indexer(q, pool, w, POSITIONS, SEQUENCE, TABLES, topk, BS)
    assert got.dtype == torch.int32 and got.shape == (6, topk)
    assert torch.equal(got, brute_force_indexer(q, pool, w, topk))
    assert got[3].tolist() == [row_of(2, 0), -1, -1, -1, -1]  # the fresh prompt's first token sees one key
    assert sorted(got[1].tolist()) == [-1, -1, 6, 16, 17]  # the decode token: its sequence's 3 keys, nothing else
    visible = {s: {row_of(s, t) for t in range(length)} for s, length in enumerate(LENGTHS)}
    for n, s in enumerate(SEQUENCE.tolist()):  # only rows of the token's own sequence, never NaN rows
        assert {r for r in got[n].tolist() if r >= 0} <= visible[s]


def test_indexer_ties_go_to_the_lower_position_not_the_lower_row_and_pad_when_topk_exceeds_keys():
    q = torch.zeros(1, 2, 4)
    k = torch.randn(6, 4)
    w = torch.ones(1, 2)
    tables = torch.tensor([[2, 0, 1]], dtype=torch.int32)  # positions 0, 1 in rows 4, 5; 2, 3 in 0, 1; 4, 5 in 2, 3
    got = lightning_indexer(q, k, w, torch.tensor([5]), torch.tensor([0], dtype=torch.int32), tables, 8, BS)
    assert got.tolist() == [[4, 5, 0, 1, 2, 3, -1, -1]]  # all scores tie at 0: in position order


def test_sparse_mla_matches_dense_softmax_over_selected_rows_and_empty_rows_are_zero():
    gen = torch.Generator().manual_seed(0)
    N, H, ROWS, DK, dv = 2, 3, 7, 6, 4
    q, kv = torch.randn(N, H, DK, generator=gen), torch.randn(ROWS, DK, generator=gen)
    indices = torch.tensor([[4, 1, -1], [-1, -1, -1]], dtype=torch.int32)
    out = sparse_mla(q, kv, indices, scale=0.5, dv=dv)
    rows = kv[[4, 1]]
    expected = torch.softmax(q[0] @ rows.T * 0.5, dim=-1) @ rows[:, :dv]
    torch.testing.assert_close(out[0], expected)
    assert torch.equal(out[1], torch.zeros(H, dv))


def test_write_cache_writes_the_slots_in_place_and_nothing_else():
    cache = torch.arange(40.0).view(10, 4)
    before = cache.clone()
    storage = cache.data_ptr()
    rows = -1.0 - torch.arange(12.0).view(3, 4)
    slots = torch.tensor([7, 0, 4])
    out = write_cache(cache, rows, slots)
    assert out is cache and cache.data_ptr() == storage  # in place
    assert torch.equal(cache[slots], rows)
    untouched = [r for r in range(10) if r not in (7, 0, 4)]
    assert torch.equal(cache[untouched], before[untouched])


def test_write_cache_converts_rows_to_the_pool_dtype():
    cache = torch.zeros(4, 3, dtype=torch.bfloat16)
    rows = torch.tensor([[1.0, 2.5, -3.0]])
    write_cache(cache, rows, torch.tensor([2]))
    assert cache.dtype == torch.bfloat16 and cache[2].tolist() == [1.0, 2.5, -3.0]
    assert not cache[[0, 1, 3]].any()
