"""The Triton kernels against the torch reference (`dsa_export.models.semantics`), run by the Triton interpreter on CPU.

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
from dsa_export.kernels.reference import routed_experts_reference  # noqa: E402
from dsa_export.kernels.triton_moe import (  # noqa: E402
    BLOCK_M, routed_experts_constexprs, routed_experts_kernel, routed_experts_triton)
from dsa_export.kernels.triton_sparse_mla import sparse_mla_triton  # noqa: E402
from dsa_export.models.semantics import (  # noqa: E402
    lightning_indexer, routed_experts, routed_experts_fp8, sparse_mla, visible_keys)
from dsa_export.models.fp8 import quantize_weight  # noqa: E402
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
    # topk 70 → a 128-key running top-k fed by 16-key tiles; capability 100 compiles the variant that merges every tile
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
@pytest.mark.parametrize("H", [4, 20])  # 20 heads: several head blocks, the last one partly masked
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
    """FP8 codes (uint8) and block scales in the contract's layout: gate and up quantised as separate projections."""
    inter = down.shape[-1]
    gate_up_q, gate_up_scale, down_q, down_scale = [], [], [], []
    for e in range(gate_up.shape[0]):
        (gate, gate_s), (up, up_s) = (quantize_weight(w, block) for w in gate_up[e].split(inter))
        gate_up_q.append(torch.cat([gate, up]))
        gate_up_scale.append(torch.cat([gate_s, up_s]))
        w, s = quantize_weight(down[e], block)
        down_q.append(w)
        down_scale.append(s)
    return (torch.stack(gate_up_q).view(torch.uint8), torch.stack(gate_up_scale), torch.stack(down_q).view(torch.uint8),
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
