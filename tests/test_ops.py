"""The dsa:: custom ops: contract, tiled CPU reference vs the plain semantics, opcheck, export, use in the model."""

from pathlib import Path

import pytest
import torch

import dsa_export.kernels.reference as reference
from dsa_export.kernels import CUSTOM_OPS, EXPORT_OPS, use_custom_ops
from dsa_export.models import semantics
from dsa_export.models.cache import Paging
from dsa_export.contracts import LIGHTNING_INDEXER, SPARSE_MLA, WRITE_CACHE
from conftest import random_ids

BS = 4  # rows per block of the test pools


class Step:
    """One packed step over scattered pools: a sequence continuing a prompt with a chunk of 4 tokens (positions
    18..21), another decoding one token (position 9), a fresh prompt of 3 tokens (positions 0..2, fewer keys than
    topk), interleaved; a fourth sequence with no token in the step owns two blocks of huge values; the free blocks
    and the tails of the sequences' last blocks hold NaN. Every sequence's blocks lie out of order in the pool."""
    TABLES = torch.tensor([[11, 3, 7, 0, 12, 5],  # 22 keys: 6 blocks
                           [9, 2, 13, -1, -1, -1],  # 10 keys
                           [14, -1, -1, -1, -1, -1],  # 3 keys
                           [6, 1, -1, -1, -1, -1]], dtype=torch.int32)  # not in the step: junk to it
    BLOCKS = 16  # blocks 4, 8, 10, 15 are free
    LENGTHS = (22, 10, 3)
    SEQUENCE = torch.tensor([0, 1, 0, 2, 0, 2, 0, 2], dtype=torch.int32)
    POSITIONS = torch.tensor([18, 9, 19, 0, 20, 1, 21, 2])

    @classmethod
    def slot(cls, s, t):
        return int(cls.TABLES[s, t // BS]) * BS + t % BS

    @classmethod
    def paging(cls):
        slots = torch.tensor([cls.slot(s, p) for s, p in zip(cls.SEQUENCE.tolist(), cls.POSITIONS.tolist())])
        return Paging(cls.POSITIONS, cls.SEQUENCE, slots, cls.TABLES, BS)

    @classmethod
    def pools(cls, D, dtype=torch.float32, seed=0):
        """(paged pool [BLOCKS·BS, D], contiguous [3, 24, D]: sequence s's keys by position, zeros beyond)."""
        gen = torch.Generator().manual_seed(seed)
        contiguous = torch.zeros(3, 24, D)
        pool = torch.full((cls.BLOCKS * BS, D), float("nan"))
        pool[cls.TABLES[3, :2].repeat_interleave(BS).long() * BS + torch.arange(BS).repeat(2)] = 1e30
        for s, length in enumerate(cls.LENGTHS):
            contiguous[s, :length] = torch.randn(length, D, generator=gen)
            for t in range(length):
                pool[cls.slot(s, t)] = contiguous[s, t]
        return pool.to(dtype), contiguous.to(dtype)

    @staticmethod
    def identity():
        """The contiguous layout's paging: sequence s owns rows s·24 ... in order."""
        return torch.arange(18, dtype=torch.int32).view(3, 6)


def indexer_inputs(B=2, S=5, HI=3, DI=8, past=18, dtype=torch.float32, seed=0, block_size=BS):
    """A [B, S] step over the identity paging, packed: row 0 continues after `past` tokens, row 1 is a fresh prompt
    (fewer visible keys than topk). Returns q, k (the pool), w, positions, sequence, block_tables."""
    gen = torch.Generator().manual_seed(seed)
    positions = (past + torch.arange(S)).expand(B, S).clone()
    positions[1] = torch.arange(S)
    capacity = -(-(past + S) // block_size) * block_size
    paging = Paging.identity(positions, capacity, block_size)
    q = torch.randn(B * S, HI, DI, generator=gen).to(dtype)
    k = torch.randn(B * capacity, DI, generator=gen).to(dtype)
    w = torch.randn(B * S, HI, generator=gen)
    return q, k, w, paging.positions, paging.sequence, paging.block_tables


def mla_inputs(N=6, H=4, ROWS=17, DK=12, K=6, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, H, DK, generator=gen).to(dtype)
    kv = torch.randn(ROWS, DK, generator=gen).to(dtype)
    indices = torch.randint(0, ROWS, (N, K), generator=gen, dtype=torch.int32)
    indices[0, 2:] = -1
    indices[5] = -1  # an empty row
    return q, kv, indices


def write_inputs(ROWS=12, D=5, N=4, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(ROWS, D, generator=gen).to(dtype)
    rows = torch.randn(N, D, generator=gen).to(dtype)
    slots = torch.tensor([9, 0, 4, 11])[:N]
    return cache, rows, slots


def to_rows(positions, sequence, tables):
    """[N, K] positions of each token's sequence (−1 = none) → the pool rows under `tables`."""
    rows = tables.long()[sequence.long()[:, None], positions.clamp(min=0) // BS] * BS + positions.clamp(min=0) % BS
    return torch.where(positions >= 0, rows, -1).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_reference_equals_semantics_and_contract(dtype, monkeypatch):
    monkeypatch.setattr(reference, "TILE_BYTES", 2 * 4 * (23 + 23 * 3))  # two tokens of row 0 per tile
    q, k, w, positions, sequence, tables = indexer_inputs(dtype=dtype)
    got = CUSTOM_OPS.lightning_indexer(q, k, w, positions, sequence, tables, 7, BS)
    expected = semantics.lightning_indexer(q, k, w, positions, sequence, tables, 7, BS)
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)  # same sets; order is not in the contract
    dims = LIGHTNING_INDEXER.check({"q": q, "k": k, "w": w, "positions": positions, "sequence": sequence,
                                    "block_tables": tables}, {"topk": 7, "block_size": BS}, {"indices": got})
    assert (dims["N"], dims["ROWS"], dims["R"], dims["M"]) == (10, 48, 2, 6)
    assert got[5, 0] == 24 and (got[5, 1:] == -1).all()  # row 1's first token: its sequence's first pool row only
    assert ((got[:5] >= 0) & (got[:5] < 24)).all() and (got[5:] < 29).all()  # each token's own sequence's rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_indexer_equals_the_contiguous_semantics(dtype, monkeypatch):
    """Scattered, out-of-order blocks, sequences of different lengths in one step, a prefill chunk, a decode token
    and a fresh prompt interleaved: the same selection as over contiguous caches, mapped through the block tables;
    the NaN and huge rows outside the sequences' keys change nothing."""
    monkeypatch.setattr(reference, "TILE_BYTES", 2 * 4 * (22 + 22 * 3))  # two tokens of the long sequence per tile
    HI, DI, topk = 3, 8, 7
    gen = torch.Generator().manual_seed(1)
    q, w = torch.randn(8, HI, DI, generator=gen).to(dtype), torch.randn(8, HI, generator=gen)
    pool, contiguous = Step.pools(DI, dtype)
    assert pool.isnan().any() and (pool == 1e30).any()
    contiguous_rows = semantics.lightning_indexer(q, contiguous.flatten(0, 1), w, Step.POSITIONS, Step.SEQUENCE,
                                                  Step.identity(), topk, BS)
    expected = torch.where(contiguous_rows >= 0, contiguous_rows % 24, -1)  # positions in each token's sequence
    assert (expected[3, 1:] == -1).all() and (expected[1] >= 0).all()  # the fresh prompt pads, the decode token not
    paging = Step.paging()
    for op in (semantics.lightning_indexer, CUSTOM_OPS.lightning_indexer):
        got = op(q, pool, w, Step.POSITIONS, Step.SEQUENCE, Step.TABLES, topk, BS)
        assert torch.equal(got.sort(-1).values, to_rows(expected, Step.SEQUENCE, Step.TABLES).sort(-1).values)
        assert torch.equal(paging.logical(got).sort(-1).values, expected.sort(-1).values)


def test_indexer_reads_no_pool_row_outside_the_tokens_visible_keys():
    """Every row a token may not see set to NaN or ±huge, one variant at a time: not one index changes."""
    HI, DI, topk = 3, 8, 7
    gen = torch.Generator().manual_seed(2)
    q, w = torch.randn(8, HI, DI, generator=gen), torch.randn(8, HI, generator=gen)
    pool, _ = Step.pools(DI)
    visible = torch.zeros(pool.shape[0], dtype=torch.bool)
    for s, length in enumerate(Step.LENGTHS):
        visible[[Step.slot(s, t) for t in range(length)]] = True
    clean = pool.masked_fill(~visible[:, None], 0.0)
    expected = semantics.lightning_indexer(q, clean, w, Step.POSITIONS, Step.SEQUENCE, Step.TABLES, topk, BS)
    for junk in (float("nan"), float("inf"), -3e38, 3e38):
        dirty = clean.masked_fill(~visible[:, None], junk)
        for op in (semantics.lightning_indexer, CUSTOM_OPS.lightning_indexer):
            got = op(q, dirty, w, Step.POSITIONS, Step.SEQUENCE, Step.TABLES, topk, BS)
            assert torch.equal(got.sort(-1).values, expected.sort(-1).values), (op, junk)


def test_select_topk_breaks_ties_towards_lower_keys():
    scores = torch.tensor([[1.0, 3.0, 1.0, 1.0, float("-inf"), 3.0, 1.0]])
    assert reference.select_topk(scores, 4).tolist() == [[0, 1, 2, 5]]
    assert reference.select_topk(scores, 9).tolist() == [[0, 1, 2, 3, 5, 6, -1, -1, -1]]


def test_indexer_tiles_bound_the_score_block(monkeypatch):
    """Never the whole [S,T] matrix: each tile's score block stays within TILE_BYTES, and a sequence's tiles score
    only its own keys up to its last position (row 1 has 9, not 23)."""
    budget = 2 * 4 * (23 + 23 * 3)  # two tokens: their scores over T=23 keys + a 23-key chunk × 3 heads
    monkeypatch.setattr(reference, "TILE_BYTES", budget)
    blocks = []
    real = reference.select_topk
    monkeypatch.setattr(reference, "select_topk", lambda s, k: blocks.append(tuple(s.shape)) or real(s, k))
    q, k, w, positions, sequence, tables = indexer_inputs(S=9, past=14)
    reference.lightning_indexer_reference(q, k, w, positions, sequence, tables, 4, BS)
    # row 0: 9 tokens, 2 per tile; row 1: 9 keys → budget // (4·(9 + 9·3)) = 5 tokens per tile
    assert blocks == [(2, 23)] * 4 + [(1, 23), (5, 9), (4, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mla_reference_equals_semantics_and_contract(dtype, monkeypatch):
    monkeypatch.setattr(reference, "TILE_BYTES", 6 * 12 * 4)  # one token per tile
    q, kv, indices = mla_inputs(dtype=dtype)
    got = CUSTOM_OPS.sparse_mla(q, kv, indices, 0.3, 8)
    torch.testing.assert_close(got, semantics.sparse_mla(q, kv, indices, 0.3, 8))
    dims = SPARSE_MLA.check({"q": q, "kv": kv, "indices": indices}, {"scale": 0.3, "dv": 8}, {"out": got})
    assert (dims["N"], dims["ROWS"], dims["K"]) == (6, 17, 6)
    assert got.shape == (6, 4, 8) and got.dtype == dtype
    assert torch.equal(got[5], torch.zeros_like(got[5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_sparse_mla_equals_the_contiguous_semantics(dtype):
    """The contiguous selection's positions mapped through the scattered block tables to pool rows: the same
    attention output, the free blocks and block tails NaN, another sequence's blocks huge. (Pool row 0, which the CPU
    implementations gather for −1 slots and weight by 0, is a sequence's key here: finite, as in a served pool.)"""
    H, DK, dv, K = 4, 12, 8, 7
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(8, H, DK, generator=gen).to(dtype)
    pool, contiguous = Step.pools(DK, dtype, seed=4)
    # K positions of each token's sequence it may see, in random order, −1 padded (the fresh prompt's tokens)
    positions = torch.stack([torch.cat([torch.randperm(p + 1, generator=gen), torch.full((K,), -1)])[:K]
                             for p in Step.POSITIONS.tolist()])
    expected = semantics.sparse_mla(q, contiguous.flatten(0, 1), to_rows(positions, Step.SEQUENCE, Step.identity()),
                                    0.3, dv)
    paged = to_rows(positions, Step.SEQUENCE, Step.TABLES)
    assert (paged[3, 1:] == -1).all() and paged[3, 0] == Step.slot(2, 0)
    for op in (semantics.sparse_mla, CUSTOM_OPS.sparse_mla):
        torch.testing.assert_close(op(q, pool, paged, 0.3, dv), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_cache_op_equals_semantics_and_leaves_its_input(dtype):
    """torch.ops.dsa.write_cache is functional (the export makes it one in-place dsa::WriteCache); the eager ops
    write the pool in place."""
    cache, rows, slots = write_inputs(dtype=dtype)
    before = cache.clone()
    got = torch.ops.dsa.write_cache(cache, rows, slots)
    assert torch.equal(cache, before) and got.data_ptr() != cache.data_ptr()
    WRITE_CACHE.check({"cache": cache, "rows": rows, "slots": slots}, {}, {"out": got})
    assert torch.equal(got[slots], rows)
    untouched = [r for r in range(12) if r not in slots.tolist()]
    assert torch.equal(got[untouched], before[untouched])
    eager = CUSTOM_OPS.write_cache(cache, rows, slots)
    assert eager is cache and torch.equal(cache, got)


def test_contract_rejects_a_wrong_shape_or_dtype():
    q, kv, indices = mla_inputs()
    with pytest.raises(ValueError, match="'kv' dim DK=11 disagrees with DK=12"):
        SPARSE_MLA.check({"q": q, "kv": kv[..., :11], "indices": indices}, {"scale": 1.0, "dv": 8})
    with pytest.raises(ValueError, match="'indices' must be int32"):
        SPARSE_MLA.check({"q": q, "kv": kv, "indices": indices.long()}, {"scale": 1.0, "dv": 8})
    q, k, w, positions, sequence, tables = indexer_inputs()
    inputs = {"q": q, "k": k, "w": w, "positions": positions, "sequence": sequence, "block_tables": tables}
    attributes = {"topk": 7, "block_size": BS}
    with pytest.raises(ValueError, match="'sequence' must be int32, got int64"):
        LIGHTNING_INDEXER.check({**inputs, "sequence": sequence.long()}, attributes)
    with pytest.raises(ValueError, match="'sequence' dim N=9 disagrees with N=10"):
        LIGHTNING_INDEXER.check({**inputs, "sequence": sequence[:9]}, attributes)
    with pytest.raises(ValueError, match=r"'block_tables' must have rank 2 \[R,M\]"):
        LIGHTNING_INDEXER.check({**inputs, "block_tables": tables.flatten()}, attributes)
    cache, rows, slots = write_inputs()
    with pytest.raises(ValueError, match="'slots' must be int64, got int32"):
        WRITE_CACHE.check({"cache": cache, "rows": rows, "slots": slots.int()}, {})
    with pytest.raises(ValueError, match="'rows' must be float32, got bfloat16"):
        WRITE_CACHE.check({"cache": cache, "rows": rows.bfloat16(), "slots": slots}, {})
    with pytest.raises(ValueError, match="'rows' dim D=4 disagrees with D=5"):
        WRITE_CACHE.check({"cache": cache, "rows": rows[:, :4], "slots": slots}, {})


def test_write_cache_contract_is_in_place_and_costs_the_written_rows_only():
    assert WRITE_CACHE.aliases == (("out", "cache"),)
    itemsize = {"cache": 2, "rows": 2, "slots": 8}
    small = WRITE_CACHE.cost({"cache": (64, 40), "rows": (3, 40), "slots": (3,)}, {}, itemsize)
    large = WRITE_CACHE.cost({"cache": (1 << 20, 40), "rows": (3, 40), "slots": (3,)}, {}, itemsize)
    assert small == large and small.flops == 0 and small.bytes == 2 * 3 * 40 * 2  # the pool's size is free


def test_torch_schemas_come_from_the_contracts():
    assert LIGHTNING_INDEXER.torch_schema() == \
        ("lightning_indexer(Tensor q, Tensor k, Tensor w, Tensor positions, Tensor sequence, Tensor block_tables, "
         "int topk, int block_size) -> Tensor")
    assert str(torch.ops.dsa.lightning_indexer.default._schema) == f"dsa::{LIGHTNING_INDEXER.torch_schema()}"
    assert str(torch.ops.dsa.sparse_mla.default._schema) == \
        "dsa::sparse_mla(Tensor q, Tensor kv, Tensor indices, float scale, int dv) -> Tensor"
    assert str(torch.ops.dsa.write_cache.default._schema) == \
        "dsa::write_cache(Tensor cache, Tensor rows, Tensor slots) -> Tensor"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k, w, positions, sequence, tables = indexer_inputs(dtype=dtype)
    torch.library.opcheck(torch.ops.dsa.lightning_indexer.default, (q, k, w, positions, sequence, tables, 7, BS))
    pool, _ = Step.pools(8, dtype)
    gen = torch.Generator().manual_seed(5)
    q, w = torch.randn(8, 3, 8, generator=gen).to(dtype), torch.randn(8, 3, generator=gen)
    torch.library.opcheck(torch.ops.dsa.lightning_indexer.default,
                          (q, pool.nan_to_num(0.0), w, Step.POSITIONS, Step.SEQUENCE, Step.TABLES, 7, BS))
    q, kv, indices = mla_inputs(dtype=dtype)
    torch.library.opcheck(torch.ops.dsa.sparse_mla.default, (q, kv, indices, 0.3, 8))
    torch.library.opcheck(torch.ops.dsa.write_cache.default, write_inputs(dtype=dtype))


def test_torch_export_keeps_each_op_as_one_node():
    class Layer(torch.nn.Module):
        def forward(self, q, k_pool, k_rows, w, positions, sequence, tables, slots, mq, kv_pool, kv_rows):
            k_pool = EXPORT_OPS.write_cache(k_pool, k_rows, slots)
            indices = EXPORT_OPS.lightning_indexer(q, k_pool, w, positions, sequence, tables, 4, BS)
            kv_pool = EXPORT_OPS.write_cache(kv_pool, kv_rows, slots)
            return EXPORT_OPS.sparse_mla(mq, kv_pool, indices, 0.5, 8), k_pool, kv_pool

    gen = torch.Generator().manual_seed(6)
    paging = Step.paging()
    k_pool, _ = Step.pools(8)
    kv_pool, _ = Step.pools(12, seed=1)
    k_pool, kv_pool = k_pool.nan_to_num(0.0), kv_pool.nan_to_num(0.0)
    args = (torch.randn(8, 3, 8, generator=gen), k_pool, torch.randn(8, 8, generator=gen),
            torch.randn(8, 3, generator=gen), paging.positions, paging.sequence, paging.block_tables, paging.slots,
            torch.randn(8, 4, 12, generator=gen), kv_pool, torch.randn(8, 12, generator=gen))
    program = torch.export.export(Layer(), args)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets == ["dsa.write_cache.default", "dsa.lightning_indexer.default", "dsa.write_cache.default",
                       "dsa.sparse_mla.default"]
    out, k_out, kv_out = program.module()(*args)
    k_expected = semantics.write_cache(k_pool.clone(), args[2], paging.slots)
    kv_expected = semantics.write_cache(kv_pool.clone(), args[10], paging.slots)
    indices = semantics.lightning_indexer(args[0], k_expected, args[3], *args[4:7], 4, BS)
    assert torch.equal(k_out, k_expected) and torch.equal(kv_out, kv_expected)
    torch.testing.assert_close(out, semantics.sparse_mla(args[8], kv_expected, indices, 0.5, 8))


def test_model_through_custom_ops_equals_masked_dense_reference(tiny_model, tiny_config):
    ids = random_ids(tiny_config, 2, 40, seed=6)
    with torch.no_grad():
        tiny_model.attention = "masked"
        masked = tiny_model(ids)
        use_custom_ops(tiny_model).attention = "sparse"
        through_ops = tiny_model(ids)
    assert tiny_model.ops is CUSTOM_OPS
    assert (through_ops - masked).abs().max() < 1e-4


def test_model_over_scattered_pools_equals_each_sequence_alone(tiny_model, tiny_config):
    """Two prompts of different lengths packed into one step, then a mixed step (a decode token of the first, a
    4-token chunk of the second) over blocks scattered through shared pools: each sequence's logits and cache rows
    are those of the sequence run alone on the model's own (contiguous) cache; the free blocks stay untouched."""
    bs = 8
    use_custom_ops(tiny_model).attention = "sparse"
    a, b = random_ids(tiny_config, 1, 21, seed=7)[0], random_ids(tiny_config, 1, 9, seed=8)[0]
    tables = torch.tensor([[5, 0, 6], [3, 7, -1]], dtype=torch.int32)  # blocks 1, 2, 4 stay free
    steps = [(torch.cat([a[:20], b[:5]]), torch.cat([torch.arange(20), torch.arange(5)]), [0] * 20 + [1] * 5),
             (torch.cat([b[5:7], a[20:], b[7:]]), torch.tensor([5, 6, 20, 7, 8]), [1, 1, 0, 1, 1])]
    c = tiny_config
    pools = ([torch.full((8 * bs, c.kv_lora_rank + c.qk_rope_head_dim), float("nan"))
              for _ in range(c.num_hidden_layers)],
             [torch.full((8 * bs, c.index_head_dim), float("nan")) for _ in range(c.num_hidden_layers)])
    packed = []
    with torch.no_grad():
        for ids, positions, sequence in steps:
            sequence = torch.tensor(sequence, dtype=torch.int32)
            slots = tables.long()[sequence.long(), positions // bs] * bs + positions % bs
            paging = Paging(positions, sequence, slots, tables, bs)
            logits, _, _ = tiny_model.forward_with_cache(ids[None], positions[None], *pools, paging)
            packed.append(logits[0])
        alone = {}
        for name, ids in (("a", a), ("b", b)):
            cache = tiny_model.new_cache(1, len(ids))
            alone[name] = (tiny_model(ids[None], cache=cache)[0], cache)
    first, second = packed
    for got, want in ((first[:20], alone["a"][0][:20]), (first[20:], alone["b"][0][:5]),
                      (second[2], alone["a"][0][20]), (second[[0, 1, 3, 4]], alone["b"][0][5:])):
        assert (got - want).abs().max() < 1e-4
    for s, (name, length) in enumerate((("a", 21), ("b", 9))):
        rows = tables.long()[s, torch.arange(length) // bs] * bs + torch.arange(length) % bs
        for pool, own in zip([*pools[0], *pools[1]], alone[name][1].sequences()):
            torch.testing.assert_close(pool[rows], own[0, :length], atol=1e-5, rtol=1e-5)
    free = torch.cat([torch.arange(k * bs, (k + 1) * bs) for k in (1, 2, 4)])
    assert all(pool[free].isnan().all() for pool in [*pools[0], *pools[1]])


# ---- routed experts --------------------------------------------------------------------------------------------------
def experts_inputs(N=7, H=16, I=8, E=6, k=2, dtype=torch.float32, seed=0):
    """Tokens that pick the same expert several times across the batch (0 and 3), and experts no token picks (2, 4)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=gen).to(dtype)
    experts = torch.tensor([[0, 3], [3, 5], [0, 3], [1, 0], [5, 3], [3, 0], [1, 5]], dtype=torch.int32)[:N, :k]
    weights = torch.rand(N, k, generator=gen)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype)
    base = torch.randn(N, H, generator=gen)
    return x, experts, weights, gate_up, down, base


def quantise_experts(gate_up, down, block):
    """FP8 codes (int8) + block scales per projection, as the checkpoint loader keeps them."""
    from dsa_export.models.fp8 import quantize_weight

    E, two_i, _ = gate_up.shape
    inter = two_i // 2

    def one(w):
        q, s = quantize_weight(w.float(), block)
        return q.view(torch.int8), s

    gu = [[one(gate_up[e, :inter]), one(gate_up[e, inter:])] for e in range(E)]
    gate_up8 = torch.stack([torch.cat([g[0], u[0]]) for g, u in gu])
    gate_up_scale = torch.stack([torch.cat([g[1], u[1]]) for g, u in gu])
    dn = [one(down[e]) for e in range(E)]
    return gate_up8, gate_up_scale, torch.stack([d[0] for d in dn]), torch.stack([d[1] for d in dn])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_experts_reference_equals_semantics_and_contract(dtype):
    from dsa_export.contracts import ROUTED_EXPERTS

    x, experts, weights, gate_up, down, base = experts_inputs(dtype=dtype)
    got = CUSTOM_OPS.routed_experts(x, experts, weights, gate_up, down, base)
    torch.testing.assert_close(got, semantics.routed_experts(x, experts, weights, gate_up, down, base),
                               **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))
    ROUTED_EXPERTS.check(dict(x=x, experts=experts, weights=weights, gate_up=gate_up, down=down, base=base), {},
                         {"out": got})
    # by hand, fp32: token 1 uses experts 3 and 5
    def expert(e, v):
        gu = gate_up[e].float() @ v.float()
        return down[e].float() @ (torch.nn.functional.silu(gu[:8]) * gu[8:])
    if dtype == torch.float32:
        expected = base[1] + weights[1, 0] * expert(3, x[1]) + weights[1, 1] * expert(5, x[1])
        torch.testing.assert_close(got[1], expected, atol=1e-5, rtol=1e-5)


def test_routed_experts_fp8_reference_equals_dequantised_weights():
    x, experts, weights, gate_up, down, base = experts_inputs()
    block = (4, 8)  # several row and column blocks per projection
    gate_up8, gate_up_scale, down8, down_scale = quantise_experts(gate_up, down, block)
    got = CUSTOM_OPS.routed_experts_fp8(x, experts, weights, gate_up8, gate_up_scale, down8, down_scale, base, *block)
    inter = down.shape[-1]
    plain_gate_up = semantics.dequantize_experts(gate_up8, gate_up_scale, *block, inter, torch.float32)
    plain_down = semantics.dequantize_experts(down8, down_scale, *block, down.shape[1], torch.float32)
    torch.testing.assert_close(got, semantics.routed_experts(x, experts, weights, plain_gate_up, plain_down, base))
    assert (plain_gate_up - gate_up).abs().max() < gate_up.abs().max() / 8  # e4m3: 3 mantissa bits


def test_routed_experts_cost_grows_with_chosen_experts_not_all():
    from dsa_export.contracts import ROUTED_EXPERTS

    shapes = dict(x=(1, 16), experts=(1, 2), weights=(1, 2), gate_up=(64, 16, 16), down=(64, 16, 8), base=(1, 16))
    itemsize = dict.fromkeys(shapes, 4)
    one = ROUTED_EXPERTS.cost(shapes, {}, itemsize)
    assert one.flops == 2 * 2 * (16 * 16 + 16 * 8)  # 2 chosen experts, gate ‖ up then down
    assert one.weight_bytes == 2 * (16 * 16 + 16 * 8) * 4  # their weights only, not 64 experts'
    many = ROUTED_EXPERTS.cost({**shapes, "x": (1000, 16), "experts": (1000, 2), "weights": (1000, 2),
                                "base": (1000, 16)}, {}, itemsize)
    assert many.weight_bytes == 64 * (16 * 16 + 16 * 8) * 4  # at most every expert once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_experts_opcheck(dtype):
    x, experts, weights, gate_up, down, base = experts_inputs(dtype=dtype)
    torch.library.opcheck(torch.ops.dsa.routed_experts.default, (x, experts, weights, gate_up, down, base))
    gate_up8, gate_up_scale, down8, down_scale = quantise_experts(gate_up, down, (4, 8))
    torch.library.opcheck(torch.ops.dsa.routed_experts_fp8.default,
                          (x, experts, weights, gate_up8, gate_up_scale, down8, down_scale, base, 4, 8))


def run_decomposition(contract, inputs: dict, attributes: dict, budget: int | None = None, cpu_graph: bool = False,
                      kernels_run: list | None = None):
    """One dsa:: node run by ONNX Runtime through its decomposition (plugins/onnx_ops.py); budget: the tile budget
    in bytes of a tiled op (small: a Loop over many tiles); cpu_graph: as onnxruntime_cpu_graph rewrites it;
    kernels_run: a list to which (op type, node name) of each kernel ONNX Runtime's profiler saw run are added."""
    import json
    import tempfile

    import onnxruntime as ort
    from onnx import helper as oh

    from dsa_export.plugins import onnx_ops

    arrays = {name: t.numpy() for name, t in inputs.items()}
    output = contract.outputs[0].name
    graph = oh.make_graph(
        [oh.make_node(contract.onnx_name, list(arrays), [output], domain=onnx_ops.DSA_DOMAIN, **attributes)], "op",
        [oh.make_tensor_value_info(n, oh.np_dtype_to_tensor_dtype(a.dtype), [f"{n}_{i}" for i in range(a.ndim)])
         for n, a in arrays.items()],  # dynamic, as in an export
        [oh.make_empty_tensor_value_info(output)])
    model = onnx_ops.add_decompositions(oh.make_model(graph, opset_imports=[oh.make_opsetid("", onnx_ops.OPSET)]))
    if budget is not None:
        tiles = {LIGHTNING_INDEXER.onnx_name: ("IndexerTile", "IndexerRows", ["q", "positions"]),
                 SPARSE_MLA.onnx_name: ("SparseMLATile", "SparseMLARows", ["q", "indices"])}[contract.onnx_name]
        for i, function in enumerate(model.functions):
            if function.name == contract.onnx_name:
                model.functions[i].CopyFrom(onnx_ops._tiled_function(contract, *tiles, budget=budget))
    if cpu_graph:
        model = onnx_ops.onnxruntime_cpu_graph(model)
    options = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as trace_dir:
        if kernels_run is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(trace_dir) / "profile")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        result = torch.from_numpy(session.run(None, arrays)[0])
        if kernels_run is not None:
            events = json.loads(Path(session.end_profiling()).read_text())
            kernels_run.extend((e["args"]["op_name"], e["name"]) for e in events if e.get("cat") == "Node")
    return result


@pytest.mark.parametrize("pool_blocks, in_place", [(6, True), (8, False)],
                         ids=["keys fill 5/6 of the pool: scored in place", "5/8: gathered"])
def test_onnx_indexer_one_token_scores_a_pool_its_keys_fill_in_place(pool_blocks, in_place):
    """A decode token whose sequence's keys fill at least 4/5 of the pool scores the pool where it lies and keeps its
    keys' scores (no ReduceMin: the gathering branches' one-sequence test did not run); a smaller share gathers
    them. Either way the semantics, over a pool whose other rows hold NaN and whose blocks are out of order."""
    tables = torch.tensor([[4, 1, 5, 0, 3, -1]], dtype=torch.int32)  # 18 keys in 5 blocks (20 rows)
    gen = torch.Generator().manual_seed(0)
    pool = torch.full((pool_blocks * BS, 8), float("nan"))
    for t in range(18):
        pool[int(tables[0, t // BS]) * BS + t % BS] = torch.randn(8, generator=gen)
    q, w = torch.randn(1, 3, 8, generator=gen), torch.randn(1, 3, generator=gen)
    positions, sequence = torch.tensor([17]), torch.tensor([0], dtype=torch.int32)
    kernels = []
    got = run_decomposition(LIGHTNING_INDEXER, dict(q=q, k=pool, w=w, positions=positions, sequence=sequence,
                                                    block_tables=tables), {"topk": 7, "block_size": BS},
                            kernels_run=kernels)
    expected = semantics.lightning_indexer(q, pool, w, positions, sequence, tables, 7, BS)
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)
    scoring = {op_type for op_type, name in kernels if "IndexScores" in name}
    assert "MatMul" in scoring or "FusedMatMul" in scoring
    assert ("ReduceMin" not in scoring) == in_place


@pytest.mark.parametrize("budget, cpu_graph", [(None, False), (1, False), (None, True), (1, True)],
                         ids=["one tile", "a tile per token", "one tile, CPU copy", "a tile per token, CPU copy"])
def test_onnx_indexer_and_sparse_mla_equal_the_semantics_in_one_tile_and_in_many(budget, cpu_graph):
    """The scattered paged step (NaN and huge rows outside the sequences' keys, a token whose scores all tie): a step
    that fits one tile (the If's direct branch, every decode step) and one looped a token at a time select the same
    rows and attend alike, as exported (TopK sorted, as TensorRT wants) and in ONNX Runtime's CPU copy (unsorted)."""
    import onnx

    from dsa_export.plugins import onnx_ops

    HI, DI, topk = 3, 8, 7
    gen = torch.Generator().manual_seed(1)
    q, w = torch.randn(8, HI, DI, generator=gen), torch.randn(8, HI, generator=gen)
    q[1] = 0.0  # every score of a token with 10 keys for 7 slots is 0: ties go to the lower keys
    pool, _ = Step.pools(DI)
    inputs = dict(q=q, k=pool, w=w, positions=Step.POSITIONS, sequence=Step.SEQUENCE, block_tables=Step.TABLES)
    got = run_decomposition(LIGHTNING_INDEXER, inputs, {"topk": topk, "block_size": BS}, budget, cpu_graph)
    exported = onnx_ops.add_decompositions(onnx.ModelProto())

    def sorted_flags(model):
        return [next((a.i for a in n.attribute if a.name == "sorted"), 1)
                for f in model.functions for n in f.node if n.op_type == "TopK"]
    assert sorted_flags(exported) == [1] and sorted_flags(onnx_ops.onnxruntime_cpu_graph(exported)) == [0]
    expected = semantics.lightning_indexer(q, pool, w, Step.POSITIONS, Step.SEQUENCE, Step.TABLES, topk, BS)
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)
    kv, _ = Step.pools(12, seed=3)
    kv = torch.nan_to_num(kv, nan=0.0, posinf=0.0)
    mla_q = torch.randn(8, 4, 12, generator=gen)
    got = run_decomposition(SPARSE_MLA, dict(q=mla_q, kv=kv, indices=expected), {"scale": 0.3, "dv": 8}, budget)
    torch.testing.assert_close(got, semantics.sparse_mla(mla_q, kv, expected, 0.3, 8), atol=1e-5, rtol=1e-5)


def test_onnx_sparse_mla_reads_nothing_of_an_empty_slots_stand_in_row():
    """Empty slots (-1, or a row outside the pool) anywhere in a token's list, and a token with none valid, over a
    pool whose row 0 (the clamped stand-in) and free rows hold NaN and inf: the decomposition gives the semantics,
    finite everywhere (an empty slot reads a row the token owns; a token without one gives zeros)."""
    gen = torch.Generator().manual_seed(4)
    kv = torch.randn(12, 6, generator=gen)
    kv[0], kv[5], kv[9] = float("nan"), float("inf"), float("nan")
    indices = torch.tensor([[3, -1, 7, 40],  # valid, empty, valid, outside the pool
                            [-1, 2, -1, 4],  # the first slot empty
                            [-1, -1, -1, -1],  # none valid: zeros
                            [8, 1, 11, 6]], dtype=torch.int32)
    q = torch.randn(4, 2, 6, generator=gen)
    got = run_decomposition(SPARSE_MLA, dict(q=q, kv=kv, indices=indices), {"scale": 0.5, "dv": 4})
    assert got.isfinite().all() and got[2].eq(0).all()
    torch.testing.assert_close(got, semantics.sparse_mla(q, kv, indices, 0.5, 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [3, 7], ids=["N·k <= E: per pair", "N·k > E: per expert"])
def test_onnx_routed_experts_equal_the_semantics_per_pair_and_per_expert(tokens):
    from dsa_export.contracts import ROUTED_EXPERTS

    x, experts, weights, gate_up, down, base = experts_inputs(N=tokens)
    got = run_decomposition(ROUTED_EXPERTS, dict(x=x, experts=experts, weights=weights, gate_up=gate_up, down=down,
                                                 base=base), {})
    torch.testing.assert_close(got, semantics.routed_experts(x, experts, weights, gate_up, down, base),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens, fused", [(1, True), (7, True), (7, False)],
                         ids=["a decode token", "N·k > E", "more than FUSED_EXPERTS_PAIRS·E pairs"])
def test_onnxruntime_cpu_graph_runs_few_tokens_routed_experts_as_one_fused_node(tokens, fused, monkeypatch, tmp_path):
    """onnxruntime_cpu_graph: each dsa::RoutedExperts of an export (weights as initializers, k known) runs a step of
    few tokens as ONNX Runtime's com.microsoft::MoE (its profile shows the kernel ran) and more by the decomposition,
    both giving the semantics, for weights that do not sum to one and a zero weight; a node whose k is not known
    keeps its decomposition; the model given is left as it was."""
    import json

    import onnxruntime as ort
    from onnx import helper as oh, numpy_helper

    from dsa_export.contracts import ROUTED_EXPERTS
    from dsa_export.plugins import onnx_ops

    if not fused:  # 7 tokens x 2 slots > 1 pair per expert (6)
        monkeypatch.setattr(onnx_ops, "FUSED_EXPERTS_PAIRS", 1)
    x, experts, weights, gate_up, down, base = experts_inputs(N=tokens)
    weights = weights * 3
    weights[0, 1] = 0.0
    feeds = {"x": x.numpy(), "experts": experts.numpy(), "weights": weights.numpy(), "base": base.numpy()}

    def model(k):
        graph = oh.make_graph(
            [oh.make_node(ROUTED_EXPERTS.onnx_name, ["x", "experts", "weights", "gate_up", "down", "base"], ["out"],
                          "experts_node", domain=onnx_ops.DSA_DOMAIN)], "op",
            [oh.make_tensor_value_info(name, oh.np_dtype_to_tensor_dtype(a.dtype), ["N", a.shape[1] if k else "k"])
             for name, a in feeds.items()],
            [oh.make_empty_tensor_value_info("out")],
            [numpy_helper.from_array(gate_up.numpy(), "gate_up"), numpy_helper.from_array(down.numpy(), "down")])
        return onnx_ops.add_decompositions(oh.make_model(graph, opset_imports=[oh.make_opsetid("", onnx_ops.OPSET)]))

    exported = model(k=True)
    lowered = onnx_ops.onnxruntime_cpu_graph(exported)
    assert [n.op_type for n in exported.graph.node] == [ROUTED_EXPERTS.onnx_name]
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(lowered.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, feeds)[0])
    torch.testing.assert_close(got, semantics.routed_experts(x, experts, weights, gate_up, down, base),
                               atol=1e-5, rtol=1e-5)
    kernels = {e["args"]["op_name"] for e in json.loads(open(session.end_profiling()).read())
               if e.get("cat") == "Node"}
    assert ("MoE" in kernels) == fused and ("NonZero" in kernels) != fused  # NonZero: the loop over experts
    unknown_k = onnx_ops.onnxruntime_cpu_graph(model(k=False))
    assert [n.op_type for n in unknown_k.graph.node] == [ROUTED_EXPERTS.onnx_name]
