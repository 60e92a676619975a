"""The Triton kernels against the torch reference (`dsa_export.models.semantics`), run by the Triton interpreter on CPU.

TRITON_INTERPRET=1 has to be set before triton is first imported in the process: triton chooses interpreter or
compiler when `@triton.jit` runs (for its own tl.sum/tl.sort too, at `import triton`), not at launch. So it is set
here, above every import, and nothing in tests/ may import triton at collection time before this module (pytest
collects test_aot.py first; it and dsa_export.kernels.aot import triton only inside functions). The fixture below
fails with the fix if that ever breaks. Shapes are tiny: the interpreter runs every program in numpy.
"""

import os
from dataclasses import asdict

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see above)

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from dsa_export.kernels import aot, launch  # noqa: E402
from dsa_export.kernels.triton_indexer import (  # noqa: E402
    NUM_WARPS, indexer_chunks_kernel, indexer_constexprs, indexer_merge_kernel, lightning_indexer_triton,
    merge_constexprs)
from dsa_export.kernels.common import IndexerSplit  # noqa: E402
from dsa_export.kernels.reference import (  # noqa: E402
    EMPTY_KEY, indexer_chunks_reference, indexer_merge_reference, key_positions, routed_experts_reference)
from dsa_export.kernels.triton_moe import (  # noqa: E402
    BLOCK_M, routed_experts_constexprs, routed_experts_kernel, routed_experts_triton)
from dsa_export.kernels.triton_sparse_mla import sparse_mla_triton  # noqa: E402
from dsa_export.kernels.triton_write_cache import (  # noqa: E402
    write_cache_constexprs, write_cache_kernel, write_cache_triton)
from dsa_export.models.cache import BLOCK_SIZE  # noqa: E402
from dsa_export.models.semantics import (  # noqa: E402
    key_rows, lightning_indexer, routed_experts, routed_experts_fp8, sparse_mla, visible_keys, write_cache)
from dsa_export.models.fp8 import quantize_weight  # noqa: E402
from dsa_export.models.presets import get_preset  # noqa: E402
from dsa_export.targets import TARGETS  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreted():
    if not isinstance(tl.sum, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU: "
                    "add `os.environ.setdefault('TRITON_INTERPRET', '1')` at the top of tests/conftest.py")


BS = 16  # pool block size in most tests: the smallest the indexer takes (a 16-key tile lies inside one block)


class Paged:
    """A packed step over a pool whose blocks are scattered at random and out of order.

    positions[s]: the positions of sequence s's tokens in the step (it holds keys 0 .. max of them); the tokens are
    interleaved round-robin across the sequences. `spare` blocks stay free; they and the tails of the sequences' last
    blocks hold `junk`. keys [R, T, DI]: each sequence's keys by position (zeros beyond), the contiguous layout (T a
    whole number of blocks)."""

    def __init__(self, positions, HI, DI, dtype=torch.float32, seed=0, spare=2, junk=float("nan"), block_size=BS):
        gen = torch.Generator().manual_seed(seed)
        self.block_size = bs = block_size
        self.lengths = [max(p) + 1 for p in positions]
        blocks = [-(-length // bs) for length in self.lengths]
        self.pool_blocks = sum(blocks) + spare
        order = torch.randperm(self.pool_blocks, generator=gen).tolist()
        self.tables = torch.full((len(positions), max(blocks)), -1, dtype=torch.int32)
        for s, count in enumerate(blocks):
            self.tables[s, :count] = torch.tensor(order[:count], dtype=torch.int32)
            order = order[count:]
        self.keys = self.contiguous(lambda n: torch.randn(n, DI, generator=gen))
        self.k = self.pool_of(self.keys, junk).to(dtype)
        self.keys = self.keys.to(dtype)
        self.visible = self.pool_of(torch.ones(*self.keys.shape[:2], 1), 0.0)[:, 0].bool()  # rows holding a key
        tokens = [(s, p[i]) for i in range(max(map(len, positions))) for s, p in enumerate(positions) if i < len(p)]
        self.sequence = torch.tensor([s for s, _ in tokens], dtype=torch.int32)
        self.positions = torch.tensor([p for _, p in tokens])
        self.q = torch.randn(len(tokens), HI, DI, generator=gen).to(dtype)
        self.w = torch.randn(len(tokens), HI, generator=gen)

    def contiguous(self, make):
        """[R, T, D]: make(length) rows for each sequence, zeros beyond its length."""
        T = self.tables.shape[1] * self.block_size
        return torch.stack([torch.cat([make(n), torch.zeros(T - n, make(0).shape[-1])]) for n in self.lengths])

    def pool_of(self, values, junk=float("nan")):
        """The pool [blocks·block_size, D] holding values [R, T, D] (by position) in this step's blocks, junk
        elsewhere."""
        pool = torch.full((self.pool_blocks * self.block_size, values.shape[-1]), junk)
        for s, length in enumerate(self.lengths):
            pool[self.rows(torch.full((length,), s), torch.arange(length))] = values[s, :length].float()
        return pool

    def to_contiguous(self, indices):
        """Pool rows → rows of the contiguous layout [R·T] (sequence s's position t at s·T + t); −1 stays."""
        T = self.keys.shape[1]
        where = torch.full((self.k.shape[0],), -1)
        for s, length in enumerate(self.lengths):
            where[self.rows(torch.full((length,), s), torch.arange(length))] = s * T + torch.arange(length)
        return torch.where(indices >= 0, where[indices.clamp(min=0).long()], -1).to(torch.int32)

    def rows(self, sequence, positions):
        """Pool rows of the given positions of the given sequences (−1 stays −1)."""
        bs = self.block_size
        rows = self.tables.long()[sequence.long(), positions.clamp(min=0) // bs] * bs + positions.clamp(min=0) % bs
        return torch.where(positions >= 0, rows, -1)

    @property
    def args(self):
        return self.q, self.k, self.w, self.positions, self.sequence, self.tables

    def contiguous_indexer(self, topk):
        """The selection over the contiguous caches (keys [R, T]: the identity paging), mapped to this pool's rows."""
        R, T, _ = self.keys.shape
        identity = torch.arange(R * T // self.block_size, dtype=torch.int32).view(R, -1)
        chosen = lightning_indexer(self.q, self.keys.flatten(0, 1), self.w, self.positions, self.sequence, identity,
                                   topk, self.block_size)
        positions = torch.where(chosen >= 0, chosen.long() % T, -1)
        return self.rows(self.sequence[:, None].expand_as(positions), positions).to(torch.int32)

    def scores(self):
        """I[n, row] in fp32 for every pool row; −inf where the row is no key token n may see."""
        num_keys = int(self.positions.max()) + 1
        rows = key_rows(self.sequence, self.tables, num_keys, self.block_size)
        visible = visible_keys(self.positions, num_keys) & (rows >= 0)
        scores = torch.einsum("nhd,ntd->nht", self.q.float(), self.k[rows.clamp(min=0)].float()).relu()
        scores = torch.einsum("nht,nh->nt", scores, self.w.float())
        out = torch.full((len(rows), self.k.shape[0]), float("-inf"))
        for n in range(len(rows)):
            out[n, rows[n][visible[n]]] = scores[n][visible[n]]
        return out


def assert_same_selection(got, expected, scores, rel_tol=1e-5):
    """Per token: the same number of −1 slots, no duplicates, and the same row set, except that rows whose scores tie
    with the token's cut-off (up to fp32 rounding of the head sum) may be swapped."""
    assert got.shape == expected.shape and got.dtype == torch.int32
    for n, (row, ref) in enumerate(zip(got.tolist(), expected.tolist())):
        chosen, wanted = {t for t in row if t >= 0}, {t for t in ref if t >= 0}
        assert row.count(-1) == ref.count(-1), (n, row, ref)
        assert len(chosen) == len(row) - row.count(-1), f"duplicate rows for token {n}: {row}"
        if chosen != wanted:
            cut = min(scores[n, t].item() for t in wanted)
            for t in chosen ^ wanted:
                assert abs(scores[n, t].item() - cut) <= rel_tol * max(1.0, abs(cut)), \
                    f"token {n}: row {t} (score {scores[n, t].item()}) is no tie with the cut-off {cut}"


def run_indexer_kernel(q, k, w, positions, sequence, tables, topk, capability, block_size=BS, split=IndexerSplit()):
    """Launch both kernels directly, as the plugins do (the chunk kernel on its constant grid of SPLIT_ROWS
    programs), with the constants the AOT build uses for `capability` (e.g. 100: no tile skip)."""
    N, HI, DI = q.shape
    chunk_constants = indexer_constexprs(HI, DI, topk, block_size, q.dtype, capability, split)
    candidates = torch.empty((N + chunk_constants["SPLIT_ROWS"], topk), dtype=torch.int64)
    out = torch.empty((N, topk), dtype=torch.int32)
    indexer_chunks_kernel[(chunk_constants["SPLIT_ROWS"],)](
        q.contiguous(), k.contiguous(), w.contiguous(), positions.contiguous(), sequence, tables, N, tables.shape[1],
        candidates, **chunk_constants, num_warps=NUM_WARPS)
    indexer_merge_kernel[(N,)](candidates, positions.contiguous(), sequence, tables, N, tables.shape[1], out,
                               **merge_constexprs(topk, block_size, split), num_warps=NUM_WARPS)
    return out


# ---- lightning indexer -----------------------------------------------------------------------------------------------
# sequence 0 continues with a 3-token chunk after 40 cached tokens (several blocks and key tiles), sequence 1 decodes
# one token, sequence 2 is a fresh prompt (its tokens see 1..3 keys, fewer than topk)
MIXED = [[40, 41, 42], [20], [0, 1, 2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_over_scattered_blocks_equals_the_contiguous_selection(dtype):
    step = Paged(MIXED, HI=8, DI=16, dtype=dtype)
    assert step.k.isnan().any() and not torch.equal(step.tables.flatten()[:4], torch.arange(4, dtype=torch.int32))
    got = lightning_indexer_triton(*step.args, topk=8, block_size=BS)
    expected = step.contiguous_indexer(8)
    scores = step.scores()
    assert_same_selection(got, expected, scores)
    assert_same_selection(got, lightning_indexer(*step.args, 8, BS), scores)
    fresh = (step.sequence == 2).nonzero().flatten().tolist()
    assert got[fresh[0]].tolist() == [int(step.rows(torch.tensor(2), torch.tensor(0)))] + [-1] * 7
    assert (got[fresh[2]] >= 0).sum() == 3
    for n in range(len(got)):  # only rows of the token's own sequence, at positions it may see
        own = step.rows(step.sequence[n].expand(int(step.positions[n]) + 1), torch.arange(int(step.positions[n]) + 1))
        assert set(got[n][got[n] >= 0].tolist()) <= set(own.tolist())


def test_indexer_reads_no_pool_row_outside_the_tokens_visible_keys():
    """Every row outside the sequences' keys (free blocks, block tails) NaN, ±inf or ±huge: the same indices."""
    step = Paged(MIXED, HI=8, DI=16, seed=1, junk=0.0)
    clean = lightning_indexer_triton(*step.args, topk=8, block_size=BS)
    assert_same_selection(clean, step.contiguous_indexer(8), step.scores())
    for junk in (float("nan"), float("inf"), -3e38):
        dirty = step.k.masked_fill(~step.visible[:, None], junk)
        got = lightning_indexer_triton(step.q, dirty, *step.args[2:], topk=8, block_size=BS)
        assert torch.equal(got, clean), junk


def test_indexer_topk_larger_than_a_tile_and_without_tile_skipping():
    # topk 70 → a 128-key running top-k fed by 16-key tiles over 7 scattered blocks; capability 100 compiles the
    # variant that merges every tile
    step = Paged([[100, 101], [30]], HI=4, DI=16, seed=1)
    expected = step.contiguous_indexer(70)
    scores = step.scores()
    assert_same_selection(lightning_indexer_triton(*step.args, topk=70, block_size=BS), expected, scores)
    assert_same_selection(run_indexer_kernel(*step.args, 70, capability=100), expected, scores)


def test_indexer_ties_go_to_the_lower_position_and_topk_beyond_the_cache_is_padded():
    # positions 0..15 in rows 16..31, 16..20 in rows 0..4: every score is 0 (−0.0 with the negative weights)
    q = torch.zeros(1, 2, 16)
    k = torch.randn(32, 16)
    tables = torch.tensor([[1, 0]], dtype=torch.int32)
    args = (torch.tensor([20]), torch.tensor([0], dtype=torch.int32), tables)
    got = lightning_indexer_triton(q, k, -torch.ones(1, 2), *args, topk=24, block_size=BS)
    assert got.tolist() == [list(range(16, 32)) + list(range(5)) + [-1, -1, -1]]
    # exact ties at 2.0 among positions 1, 2 and 17 (row 1 < rows 17, 18): the lower positions win
    q[..., 0] = 1.0
    k[:, 0] = 0.5
    k[[17, 18, 1], 0] = 2.0
    got = lightning_indexer_triton(q, k, torch.ones(1, 2), *args, topk=2, block_size=BS)
    assert got.tolist() == [[17, 18]]
    got = lightning_indexer_triton(q, k, torch.ones(1, 2), *args, topk=3, block_size=BS)
    assert sorted(got[0].tolist()) == [1, 17, 18]


def test_indexer_fp8_inputs():
    step = Paged([[15, 16], [3]], HI=8, DI=16, seed=2)
    step.q, step.k = step.q.to(torch.float8_e4m3fn), step.k.to(torch.float8_e4m3fn)
    got = lightning_indexer_triton(*step.args, topk=8, block_size=BS)
    assert_same_selection(got, lightning_indexer(*step.args, 8, BS), step.scores())


def test_indexer_detects_a_wrong_selection():
    """The comparison itself must fail when a kernel picks a non-tied key."""
    step = Paged([[19]], HI=8, DI=16, seed=3)
    expected = lightning_indexer(*step.args, 8, BS)
    scores = step.scores()
    wrong = expected.clone()
    wrong[0, 0] = int(scores[0].masked_fill(scores[0] == float("-inf"), float("inf")).argmin())
    with pytest.raises(AssertionError):
        assert_same_selection(wrong, expected, scores)


# ---- the split over keys and the merge (small split constants, so tiny contexts split) ---------------------------
# chunks of at least 32 keys, at most 6 per token, about 12 programs: a decode token over 200 keys gets 6 chunks
SMALL_SPLIT = IndexerSplit(split_rows=12, max_splits=6, min_chunk=32)


def split_candidates(step, topk, split=SMALL_SPLIT):
    """The chunk kernel's candidates for `step` as the plugin launches it (grid: SPLIT_ROWS programs)."""
    N, HI, DI = step.q.shape
    constants = indexer_constexprs(HI, DI, topk, step.block_size, step.q.dtype, None, split)
    candidates = torch.full((N + split.split_rows, topk), 7, dtype=torch.int64)  # 7: never a key
    indexer_chunks_kernel[(split.split_rows,)](*step.args[:3], step.positions, step.sequence, step.tables,
                                               N, step.tables.shape[1], candidates, **constants)
    return candidates


@pytest.mark.parametrize("positions", [
    [[199]],  # one decode token: 6 chunks of 208/6 → 48 keys (whole tiles), the last ones shorter
    [[150], [90, 91], [40]],  # 4 tokens: 12 // 4 = 3 chunks each at most; 41 keys → 2 chunks
    [[60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72]],  # 13 tokens >= SPLIT_ROWS: one chunk each
    [[3], [170]],  # a token that keeps all its keys beside one that splits
])
@pytest.mark.parametrize("capability", [None, 100])
def test_split_indexer_and_merge_equal_the_selection(positions, capability):
    step = Paged(positions, HI=4, DI=16, seed=4)
    expected = step.contiguous_indexer(24)
    scores = step.scores()
    got = run_indexer_kernel(*step.args, 24, capability=capability, split=SMALL_SPLIT)
    assert_same_selection(got, expected, scores)
    if capability is None:  # the launcher's smaller grid (the chunk programs that have work) gives the same
        assert torch.equal(got, lightning_indexer_triton(*step.args, topk=24, block_size=BS, split=SMALL_SPLIT))


def test_split_indexer_chunks_and_merge_each_equal_their_torch_reference():
    """The chunk kernel writes each chunk's top keys sorted (the same positions as the torch reference, in the
    layout of IndexerSplit), nothing in rows no chunk uses; the merge of the reference's candidates is exact."""
    step = Paged([[199], [191]], HI=4, DI=16, seed=5)  # 2 tokens: 6 chunks each (200 and 192 keys)
    got = split_candidates(step, 24)
    expected = indexer_chunks_reference(*step.args, 24, BS, SMALL_SPLIT)
    used = [SMALL_SPLIT.candidate_row(2, n, c) for n in range(2) for c in range(6)]
    assert sorted(used) == list(range(12))  # rows 0, 1: the tokens' first chunks; 2..6 token 0's, 7..11 token 1's
    assert (got[12:] == 7).all()  # the rows no chunk uses are not written
    for row in used:
        keys = got[row][got[row] != EMPTY_KEY]
        assert torch.equal(keys, keys.sort(descending=True).values)  # sorted, best first
        assert torch.equal(key_positions(keys), key_positions(expected[row][expected[row] != EMPTY_KEY])), row
    # 200 keys in 6 chunks of whole 16-key tiles: 48, 48, 48, 48, 8 keys and an empty chunk
    assert [int((got[SMALL_SPLIT.candidate_row(2, 0, c)] != EMPTY_KEY).sum()) for c in range(6)] == \
        [24, 24, 24, 24, 8, 0]
    # the merge alone, on the reference's candidates
    merge = torch.empty(2, 24, dtype=torch.int32)
    indexer_merge_kernel[(2,)](expected, step.positions, step.sequence, step.tables, 2, step.tables.shape[1], merge,
                               **merge_constexprs(24, BS, SMALL_SPLIT))
    reference = indexer_merge_reference(expected, step.positions, step.sequence, step.tables, 24, BS, SMALL_SPLIT)
    assert torch.equal(merge.sort(-1).values, reference.sort(-1).values)
    assert_same_selection(merge, step.contiguous_indexer(24), step.scores())


def test_split_indexer_ties_across_chunks_go_to_the_lower_position():
    # every score 0: the lowest 24 positions win, though they lie in different chunks than most of the rest
    step = Paged([[199]], HI=2, DI=16, seed=6)
    step.q = torch.zeros_like(step.q)
    got = run_indexer_kernel(*step.args, 24, capability=None, split=SMALL_SPLIT)
    assert sorted(got[0].tolist()) == sorted(step.rows(torch.zeros(24, dtype=torch.int32), torch.arange(24)).tolist())


def test_split_rule_fills_the_gpu_at_decode_and_bounds_the_candidates():
    """The engine's constants: one decode token at 128K keys has 128 chunks (128 programs), 8 tokens 64 each (512);
    a prefill chunk of 8192 tokens one chunk each; the used candidate rows never exceed N + split_rows."""
    split = IndexerSplit()
    assert split.chunks(1, 131072, 2048) == 128 and split.chunks(8, 131072, 2048) == 64
    assert split.chunks(8192, 131072, 2048) == 1 and split.chunks(1, 8192, 2048) == 8
    assert split.chunks(1, 2048, 2048) == 0  # keeps all its keys: nothing to score
    for tokens in (1, 3, 8, 100, 511, 512, 8192):
        last = split.candidate_row(tokens, tokens - 1, split.splits(tokens) - 1)
        assert last < tokens + split.split_rows


def test_indexer_block_size_must_hold_whole_tiles():
    assert indexer_constexprs(8, 16, 8, BLOCK_SIZE, torch.float32)["BLOCK_SIZE"] == BLOCK_SIZE
    with pytest.raises(ValueError, match="block size 24 must be a multiple of 16"):
        indexer_constexprs(8, 16, 8, 24, torch.float32)


# ---- sparse MLA ------------------------------------------------------------------------------------------------------
def mla_inputs(N, H, ROWS, DK, K, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, H, DK, generator=gen).to(dtype)
    kv = torch.randn(ROWS, DK, generator=gen).to(dtype)
    indices = torch.randint(0, ROWS, (N, K), generator=gen, dtype=torch.int32)
    indices[0, 5:] = -1  # a short row
    indices[1] = -1  # an empty row: zeros
    indices[-1, ::3] = -1  # holes
    return q, kv, indices


TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [4, 20])  # 20 heads: several head blocks, the last one partly masked
def test_sparse_mla_matches_reference(dtype, H):
    # DK = 32 + 8 (the tiny preset's latent row: both parts padded to 16+), K = 24 slots = 1.5 tiles
    q, kv, indices = mla_inputs(N=6, H=H, ROWS=30, DK=40, K=24, dtype=dtype)
    got = sparse_mla_triton(q, kv, indices, scale=0.3, dv=32)
    expected = sparse_mla(q, kv, indices, scale=0.3, dv=32)
    assert got.dtype == dtype and got.shape == (6, H, 32)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_sparse_mla_reads_only_the_selected_rows():
    """The rows moved to the odd rows of a twice as large pool whose every other row (row 0, which the −1 slots
    would point at if clamped, included) is NaN: the same output, without a NaN."""
    q, kv, indices = mla_inputs(N=6, H=4, ROWS=30, DK=40, K=24, dtype=torch.float32, seed=1)
    expected = sparse_mla_triton(q, kv, indices, scale=0.3, dv=32)
    pool = torch.full((60, 40), float("nan"))
    pool[1::2] = kv
    moved = torch.where(indices >= 0, 2 * indices + 1, -1)
    got = sparse_mla_triton(q, pool, moved, scale=0.3, dv=32)
    assert torch.equal(got, expected) and not got.isnan().any()
    torch.testing.assert_close(got, sparse_mla(q, kv, indices, 0.3, 32), **TOLERANCE[torch.float32])
    # a slot beyond the pool (a corrupt index) is an empty slot, never a read outside the buffer
    corrupt = torch.where(torch.arange(24) % 5 == 0, 60 + torch.arange(24), moved)
    emptied = torch.where(torch.arange(24) % 5 == 0, -1, indices)
    got = sparse_mla_triton(q, pool, corrupt, scale=0.3, dv=32)
    assert not got.isnan().any()
    torch.testing.assert_close(got, sparse_mla(q, kv, emptied, 0.3, 32), **TOLERANCE[torch.float32])
    torch.testing.assert_close(sparse_mla(q, pool, corrupt, 0.3, 32), got, **TOLERANCE[torch.float32])


def test_kernels_chain_over_scattered_blocks_on_the_tiny_model_shapes():
    """Indexer → sparse MLA with the dims, topk, softmax scale and pool block size that the AOT build compiles for
    `tiny`, over scattered blocks (a chunk crossing a block boundary, a decode token, a fresh prompt) with NaN in
    every other row: the attention over the contiguous caches."""
    config = get_preset("tiny")
    dk = config.kv_lora_rank + config.qk_rope_head_dim
    step = Paged([[63, 64, 65], [9], [0, 1]], HI=config.index_n_heads, DI=config.index_head_dim, seed=4, spare=1,
                 block_size=BLOCK_SIZE)
    gen = torch.Generator().manual_seed(5)
    latent = step.contiguous(lambda n: torch.randn(n, dk, generator=gen))  # the same blocks hold the latent rows
    indices = lightning_indexer_triton(*step.args, config.index_topk, BLOCK_SIZE)
    assert_same_selection(indices, step.contiguous_indexer(config.index_topk), step.scores())
    q = torch.randn(len(indices), config.num_attention_heads, dk, generator=gen)
    got = sparse_mla_triton(q, step.pool_of(latent), indices, config.softmax_scale, config.kv_lora_rank)
    expected = sparse_mla(q, latent.flatten(0, 1), step.to_contiguous(indices), config.softmax_scale,
                          config.kv_lora_rank)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])


# ---- write cache -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_cache_matches_reference_in_place(dtype):
    gen = torch.Generator().manual_seed(6)
    cache = torch.randn(40, 24, generator=gen).to(dtype)  # 24 wide: a masked tail in the 32-wide row tile
    rows = torch.randn(5, 24, generator=gen)  # fp32 rows: the launcher converts them to the pool's dtype
    slots = torch.tensor([33, 0, 17, 39, 8])
    before, storage = cache.clone(), cache.data_ptr()
    out = write_cache_triton(cache, rows, slots)
    assert out is cache and cache.data_ptr() == storage  # in place: the output is the pool
    assert torch.equal(cache, write_cache(before.clone(), rows, slots))
    assert torch.equal(cache[slots], rows.to(dtype))
    untouched = [r for r in range(40) if r not in slots.tolist()]
    assert torch.equal(cache[untouched], before[untouched])


def test_write_cache_kernel_writes_only_the_slots_and_never_reads_the_cache():
    """The kernel as TensorRT launches it, out separate from cache here: it writes the rows at their slots and
    nothing else (not even the padding of a narrower pool than its row tile, nor a slot outside the pool), and
    never reads `cache` (NaN)."""
    gen = torch.Generator().manual_seed(7)
    D, ROWS = 16, 10  # the index-key pool through the kernel compiled for the 40-wide latent rows too
    constexprs = write_cache_constexprs(40, D)
    assert constexprs == {"BLOCK_D": 64}
    cache = torch.full((ROWS, D), float("nan"))
    out = torch.full((ROWS, D), 7.0)
    rows = torch.randn(4, D, generator=gen)
    slots = torch.tensor([2, -1, ROWS, 5])
    write_cache_kernel[(4,)](cache, rows, slots, ROWS, D, out, **constexprs)
    assert torch.equal(out[[2, 5]], rows[[0, 3]])
    assert (out[[0, 1, 3, 4, 6, 7, 8, 9]] == 7.0).all()
    assert cache.isnan().all()


# ---- the kernels as the AOT build specifies their launch -------------------------------------------------------------
@pytest.mark.parametrize("target", ["h100", "b200"])  # b200: the indexer without tile skipping
def test_kernels_launched_from_their_aot_specs_match_the_reference(target):
    """Each paged kernel launched exactly as kernels/launch.py reads its AOT metadata (argument order, int32 scalars,
    grid) on tensors named by the contract: the reference's results."""
    config = get_preset("tiny")
    specs = {(s.contract, s.selector[1]): s for s in aot.kernel_specs(TARGETS[target], aot.kernel_dims(config))}

    def run(contract, tensors, selector="float32"):
        spec = specs[(contract, selector)]
        meta = {"arguments": [asdict(a) for a in spec.arguments], "grid": spec.grid}
        grid = launch.grid(meta, {name: tuple(t.shape) for name, t in tensors.items()})
        spec.kernel[grid](*launch.arguments(meta, tensors), **spec.constexprs, num_warps=spec.num_warps)

    dk = config.kv_lora_rank + config.qk_rope_head_dim
    step = Paged([[64, 65], [3]], HI=config.index_n_heads, DI=config.index_head_dim, seed=8, spare=1,
                 block_size=BLOCK_SIZE)
    indices = torch.empty(3, config.index_topk, dtype=torch.int32)
    paging = dict(zip(["positions", "sequence", "block_tables"], step.args[3:]))
    candidates = torch.empty(3 + specs[("IndexerChunks", "float32")].constexprs["SPLIT_ROWS"], config.index_topk,
                             dtype=torch.int64)
    run("IndexerChunks", dict(zip(["q", "k", "w"], step.args[:3]), **paging, candidates=candidates))
    run("IndexerMerge", dict(candidates=candidates, **paging, indices=indices), selector="int64")
    assert_same_selection(indices, step.contiguous_indexer(config.index_topk), step.scores())

    gen = torch.Generator().manual_seed(9)
    pool = torch.randn(step.k.shape[0], dk, generator=gen)
    q = torch.randn(3, config.num_attention_heads, dk, generator=gen)
    out = torch.empty(3, config.num_attention_heads, config.kv_lora_rank)
    run("SparseMLA", dict(q=q, kv=pool, indices=indices, out=out))
    torch.testing.assert_close(out, sparse_mla(q, pool, indices, config.softmax_scale, config.kv_lora_rank),
                               **TOLERANCE[torch.float32])

    for width in (dk, config.index_head_dim):  # one kernel for both pools
        cache = torch.randn(step.k.shape[0], width, generator=gen)
        rows = torch.randn(3, width, generator=gen)
        slots = step.rows(step.sequence, step.positions)
        expected = write_cache(cache.clone(), rows, slots)
        run("WriteCache", dict(cache=cache, rows=rows, slots=slots, out=cache))  # out aliases cache
        assert torch.equal(cache, expected)


# ---- routed experts --------------------------------------------------------------------------------------------------
def moe_inputs(N, H, I, E, k, dtype, seed=0):
    """x, experts, weights, gate_up, down, base. Experts E-2 and E-1 are never chosen; expert 0 gets more than
    BLOCK_M rows (two blocks); token 3 chooses expert 1 in every slot."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=gen).to(dtype)
    experts = torch.randint(0, E - 2, (N, k), generator=gen, dtype=torch.int32)
    experts[:BLOCK_M + 4, 0] = 0
    experts[3] = 1
    weights = torch.rand(N, k, generator=gen)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    return x, experts, weights, gate_up, down, torch.randn(N, H, generator=gen)


def quantize_experts(gate_up, down, block):
    """FP8 codes (int8) and block scales in the contract's layout: gate and up quantised as separate projections."""
    inter = down.shape[-1]
    gate_up_q, gate_up_scale, down_q, down_scale = [], [], [], []
    for e in range(gate_up.shape[0]):
        (gate, gate_s), (up, up_s) = (quantize_weight(w, block) for w in gate_up[e].split(inter))
        gate_up_q.append(torch.cat([gate, up]))
        gate_up_scale.append(torch.cat([gate_s, up_s]))
        w, s = quantize_weight(down[e], block)
        down_q.append(w)
        down_scale.append(s)
    return (torch.stack(gate_up_q).view(torch.int8), torch.stack(gate_up_scale), torch.stack(down_q).view(torch.int8),
            torch.stack(down_scale))


# The kernel rounds g, u and h to x's dtype where the reference does, so bf16 differs only by fp32 summation order
# (and a rare rounding flip): tighter than TOLERANCE, which would miss a truncating instead of rounding bf16 cast.
MOE_TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-3, rtol=5e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_experts_matches_reference(dtype):
    # H 48: masked K and output tiles; I 80: two I-slices of 64, the second partly masked
    x, experts, weights, gate_up, down, base = moe_inputs(N=40, H=48, I=80, E=6, k=2, dtype=dtype)
    got = routed_experts_triton(x, experts, weights, gate_up, down, base)
    assert got.dtype == torch.float32 and got.shape == (40, 48)
    torch.testing.assert_close(got, routed_experts_reference(x, experts, weights, gate_up, down, base),
                               **MOE_TOLERANCE[dtype])
    torch.testing.assert_close(got, routed_experts(x, experts, weights, gate_up, down, base), **MOE_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_experts_fp8_matches_reference(dtype):
    # 16×16 scale blocks: I 40 → 3 row blocks per projection (the last one partial), 3 I-slices of 16
    x, experts, weights, gate_up, down, base = moe_inputs(N=40, H=48, I=40, E=6, k=2, dtype=torch.float32, seed=1)
    gate_up_q, gate_up_scale, down_q, down_scale = quantize_experts(gate_up, down, (16, 16))
    assert gate_up_scale.shape == (6, 6, 3) and down_scale.shape == (6, 3, 3)
    x = x.to(dtype)
    got = routed_experts_triton(x, experts, weights, gate_up_q, down_q, base, (gate_up_scale, down_scale, 16, 16))
    expected = routed_experts_fp8(x, experts, weights, gate_up_q, gate_up_scale, down_q, down_scale, base, 16, 16)
    torch.testing.assert_close(got, expected, **MOE_TOLERANCE[dtype])
    torch.testing.assert_close(got, routed_experts_reference(x, experts, weights, gate_up_q, down_q, base,
                                                             (gate_up_scale, down_scale, 16, 16)),
                               **MOE_TOLERANCE[dtype])


def test_routed_experts_reads_neither_base_nor_unchosen_experts_and_adds_onto_out():
    """The kernel adds onto out as given (TensorRT: out aliases base) and must not touch base or unused experts."""
    x, experts, weights, gate_up, down, base = moe_inputs(N=20, H=32, I=32, E=5, k=2, dtype=torch.float32, seed=2)
    expected = routed_experts_reference(x, experts, weights, gate_up, down, base)
    gate_up[3:], down[3:] = float("nan"), float("nan")  # experts 3 and 4: nobody's choice
    out = base.clone()
    constexprs = routed_experts_constexprs(32, 32, x.dtype)
    routed_experts_kernel[(5, 1, 1)](x, experts, weights, gate_up, down, torch.full_like(base, float("nan")), 20, 2,
                                     out, **constexprs)
    torch.testing.assert_close(out, expected, **MOE_TOLERANCE[torch.float32])


def test_routed_experts_comparison_detects_one_wrong_weight():
    """One perturbed down-projection weight of a chosen expert must fail the comparison."""
    x, experts, weights, gate_up, down, base = moe_inputs(N=20, H=32, I=32, E=5, k=2, dtype=torch.bfloat16, seed=3)
    got = routed_experts_triton(x, experts, weights, gate_up, down, base)
    down[0, 5, 7] += 0.25
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, routed_experts_reference(x, experts, weights, gate_up, down, base),
                                   **MOE_TOLERANCE[torch.bfloat16])


def test_routed_experts_fp8_tiles_must_fit_the_scale_blocks():
    assert routed_experts_constexprs(7168, 2048, torch.bfloat16, (128, 128))["BLOCK_I"] == 64
    assert routed_experts_constexprs(64, 48, torch.bfloat16, (48, 128))["BLOCK_I"] == 16  # 16 divides 48
    with pytest.raises(ValueError, match="multiples of 16"):
        routed_experts_constexprs(64, 64, torch.float32, (8, 128))
