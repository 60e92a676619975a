"""The Triton kernels against the torch reference (`dsa_export.models.dsa_ops`), run by the Triton interpreter on CPU.

TRITON_INTERPRET=1 has to be set before triton is first imported in the process: triton chooses interpreter or
compiler when `@triton.jit` runs (for its own tl.sum/tl.sort too, at `import triton`), not at launch. So it is set
here, above every import, and nothing in tests/ may import triton at collection time before this module (pytest
collects test_aot.py first; it and dsa_export.kernels.aot import triton only inside functions). The fixture below
fails with the fix if that ever breaks. Shapes are tiny: the interpreter runs every program in numpy.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see above)

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from dsa_export.kernels.triton_indexer import (  # noqa: E402
    NUM_WARPS, indexer_constexprs, lightning_indexer_kernel, lightning_indexer_triton)
from dsa_export.kernels.triton_sparse_mla import sparse_mla_triton  # noqa: E402
from dsa_export.models.dsa_ops import lightning_indexer, sparse_mla, visible_keys  # noqa: E402
from dsa_export.models.presets import get_preset  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreted():
    if not isinstance(tl.sum, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU: "
                    "add `os.environ.setdefault('TRITON_INTERPRET', '1')` at the top of tests/conftest.py")


def indexer_inputs(B, S, T, HI, DI, past, dtype=torch.float32, seed=0):
    """Random q, k, w and positions = past[b] + arange(S) (S new queries on top of a cache of past[b] tokens)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, HI, DI, generator=gen).to(dtype)
    k = torch.randn(B, T, DI, generator=gen).to(dtype)
    w = torch.randn(B, S, HI, generator=gen)
    positions = torch.tensor(past)[:, None] + torch.arange(S)
    return q, k, w, positions


def reference_scores(q, k, w, positions):
    """I[b,s,t] in fp32 (−inf where invisible), computed like the reference op."""
    scores = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu()
    scores = torch.einsum("bsht,bsh->bst", scores, w.float())
    return scores.masked_fill(~visible_keys(positions, k.shape[1]), float("-inf"))


def assert_same_selection(got, expected, scores, rel_tol=1e-5):
    """Per row: the same number of −1 slots, no duplicates, and the same key set, except that keys whose scores tie
    with the row's cut-off (up to fp32 rounding of the head sum) may be swapped."""
    assert got.shape == expected.shape and got.dtype == torch.int32
    for (b, s), row in zip(torch.cartesian_prod(*map(torch.arange, got.shape[:2])).tolist(), got.flatten(0, 1)):
        row, ref = row.tolist(), expected[b, s].tolist()
        chosen, wanted = {t for t in row if t >= 0}, {t for t in ref if t >= 0}
        assert row.count(-1) == ref.count(-1), (b, s, row, ref)
        assert len(chosen) == len(row) - row.count(-1), f"duplicate keys in row {(b, s)}: {row}"
        if chosen != wanted:
            cut = min(scores[b, s, t].item() for t in wanted)
            for t in chosen ^ wanted:
                assert abs(scores[b, s, t].item() - cut) <= rel_tol * max(1.0, abs(cut)), \
                    f"row {(b, s)}: key {t} (score {scores[b, s, t].item()}) is no tie with the cut-off {cut}"


def run_indexer_kernel(q, k, w, positions, topk, capability):
    """Launch the kernel directly with the constants the AOT build uses for `capability` (e.g. 100: no tile skip)."""
    B, S, HI, DI = q.shape
    out = torch.empty((B, S, topk), dtype=torch.int32)
    lightning_indexer_kernel[(B * S,)](q.contiguous(), k.contiguous(), w.contiguous(), positions.contiguous(), S,
                                       k.shape[1], out, **indexer_constexprs(HI, DI, topk, q.dtype, capability),
                                       num_warps=NUM_WARPS)
    return out


# ---- lightning indexer -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_matches_reference_with_past_batches_and_short_rows(dtype):
    # batch 0: 3 queries after 30 cached tokens (several key tiles); batch 1: a fresh prompt, rows see 1..3 keys
    q, k, w, positions = indexer_inputs(B=2, S=3, T=34, HI=8, DI=16, past=[30, 0], dtype=dtype)
    got = lightning_indexer_triton(q, k, w, positions, topk=8)
    expected = lightning_indexer(q, k, w, positions, topk=8)
    assert_same_selection(got, expected, reference_scores(q, k, w, positions))
    assert (got[1, 0, 1:] == -1).all() and got[1, 0, 0] == 0
    assert (got[1, 2] >= 0).sum() == 3


def test_indexer_topk_larger_than_a_tile_and_without_tile_skipping():
    # topk 70 → a 128-key running top-k fed by 64-key tiles; capability 100 compiles the variant that merges every tile
    q, k, w, positions = indexer_inputs(B=1, S=2, T=150, HI=4, DI=16, past=[100], seed=1)
    expected = lightning_indexer(q, k, w, positions, topk=70)
    scores = reference_scores(q, k, w, positions)
    assert_same_selection(lightning_indexer_triton(q, k, w, positions, topk=70), expected, scores)
    assert_same_selection(run_indexer_kernel(q, k, w, positions, 70, capability=100), expected, scores)


def test_indexer_ties_go_to_the_lower_key_and_topk_beyond_the_cache_is_padded():
    q = torch.zeros(1, 1, 2, 16)  # every score is 0 (−0.0 with the negative weights): all keys tie
    k = torch.randn(1, 6, 16)
    w = -torch.ones(1, 1, 2)
    got = lightning_indexer_triton(q, k, w, torch.tensor([[5]]), topk=8)
    assert got.tolist() == [[[0, 1, 2, 3, 4, 5, -1, -1]]]
    q[..., 0], k[..., 0] = 1.0, torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0, -1.0])  # exact ties at 2.0 among 1, 2, 4
    got = lightning_indexer_triton(q, k, torch.ones(1, 1, 2), torch.tensor([[5]]), topk=2)
    assert got.tolist() == [[[1, 2]]]


def test_indexer_fp8_inputs():
    q, k, w, positions = indexer_inputs(B=1, S=2, T=20, HI=8, DI=16, past=[15], seed=2)
    q, k = q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn)
    got = lightning_indexer_triton(q, k, w, positions, topk=8)
    assert_same_selection(got, lightning_indexer(q, k, w, positions, topk=8), reference_scores(q, k, w, positions))


def test_indexer_detects_a_wrong_selection():
    """The comparison itself must fail when a kernel picks a non-tied key."""
    q, k, w, positions = indexer_inputs(B=1, S=1, T=20, HI=8, DI=16, past=[19], seed=3)
    expected = lightning_indexer(q, k, w, positions, topk=8)
    scores = reference_scores(q, k, w, positions)
    wrong = expected.clone()
    wrong[0, 0, 0] = int(scores[0, 0].argmin())
    with pytest.raises(AssertionError):
        assert_same_selection(wrong, expected, scores)


# ---- sparse MLA ------------------------------------------------------------------------------------------------------
def mla_inputs(B, S, H, T, DK, K, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, DK, generator=gen).to(dtype)
    kv = torch.randn(B, T, DK, generator=gen).to(dtype)
    indices = torch.randint(0, T, (B, S, K), generator=gen, dtype=torch.int32)
    indices[0, 0, 5:] = -1  # a short row
    indices[0, 1] = -1  # an empty row: zeros
    indices[-1, -1, ::3] = -1  # holes
    return q, kv, indices


TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [4, 20])  # 20 heads: two head blocks of 16, the second one partly masked
def test_sparse_mla_matches_reference(dtype, H):
    # DK = 32 + 8 (the tiny preset's latent row: both parts padded to 16+), K = 24 slots = 1.5 tiles
    q, kv, indices = mla_inputs(B=2, S=3, H=H, T=30, DK=40, K=24, dtype=dtype)
    got = sparse_mla_triton(q, kv, indices, scale=0.3, dv=32)
    expected = sparse_mla(q, kv, indices, scale=0.3, dv=32)
    assert got.dtype == dtype and got.shape == (2, 3, H, 32)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    assert torch.equal(got[0, 1], torch.zeros_like(got[0, 1]))


def test_kernels_chain_on_the_tiny_model_shapes():
    """Indexer → sparse MLA with the dims, topk and softmax scale that the AOT build compiles for `tiny`."""
    config = get_preset("tiny")
    q, k, w, positions = indexer_inputs(B=2, S=3, T=12, HI=config.index_n_heads, DI=config.index_head_dim,
                                        past=[9, 2], seed=4)
    indices = lightning_indexer_triton(q, k, w, positions, config.index_topk)
    assert_same_selection(indices, lightning_indexer(q, k, w, positions, config.index_topk),
                          reference_scores(q, k, w, positions))
    dk = config.kv_lora_rank + config.qk_rope_head_dim
    gen = torch.Generator().manual_seed(5)
    q_mla = torch.randn(2, 3, config.num_attention_heads, dk, generator=gen)
    kv = torch.randn(2, 12, dk, generator=gen)
    got = sparse_mla_triton(q_mla, kv, indices, config.softmax_scale, config.kv_lora_rank)
    torch.testing.assert_close(got, sparse_mla(q_mla, kv, indices, config.softmax_scale, config.kv_lora_rank),
                               **TOLERANCE[torch.float32])
