"""The dsa:: custom ops: contract, tiled CPU reference vs the plain semantics, opcheck, export, use in the model."""

import pytest
import torch

import dsa_export.kernels.reference as reference
from dsa_export.kernels import CUSTOM_OPS, use_custom_ops
from dsa_export.models import semantics
from dsa_export.contracts import LIGHTNING_INDEXER, SPARSE_MLA
from conftest import random_ids


def indexer_inputs(B=2, S=5, T=23, HI=3, DI=8, past=18, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, HI, DI, generator=gen).to(dtype)
    k = torch.randn(B, T, DI, generator=gen).to(dtype)
    w = torch.randn(B, S, HI, generator=gen)
    positions = (past + torch.arange(S)).expand(B, S).clone()
    positions[1] = torch.arange(S)  # row 1: a fresh prompt, fewer visible keys than topk
    return q, k, w, positions


def mla_inputs(B=2, S=3, H=4, T=17, DK=12, K=6, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, DK, generator=gen).to(dtype)
    kv = torch.randn(B, T, DK, generator=gen).to(dtype)
    indices = torch.randint(0, T, (B, S, K), generator=gen, dtype=torch.int32)
    indices[0, 0, 2:] = -1
    indices[1, 2] = -1  # an empty row
    return q, kv, indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_reference_equals_semantics_and_contract(dtype, monkeypatch):
    monkeypatch.setattr(reference, "TILE_BYTES", 3 * 23 * 4 * 2)  # two query rows per tile: several tiles
    q, k, w, positions = indexer_inputs(dtype=dtype)
    got = CUSTOM_OPS.lightning_indexer(q, k, w, positions, 7)
    expected = semantics.lightning_indexer(q, k, w, positions, 7)
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)  # same sets; order is not in the contract
    LIGHTNING_INDEXER.check({"q": q, "k": k, "w": w, "positions": positions}, {"topk": 7}, {"indices": got})
    assert (got[1, 0, 1:] == -1).all()


def test_select_topk_breaks_ties_towards_lower_keys():
    scores = torch.tensor([[1.0, 3.0, 1.0, 1.0, float("-inf"), 3.0, 1.0]])
    assert reference.select_topk(scores, 4).tolist() == [[0, 1, 2, 5]]
    assert reference.select_topk(scores, 9).tolist() == [[0, 1, 2, 3, 5, 6, -1, -1, -1]]


def test_indexer_tiles_bound_the_score_block(monkeypatch):
    """Never the whole [S,T] matrix: each tile's score block stays within TILE_BYTES."""
    budget = 2 * 4 * (23 + 23 * 3)  # two query rows: their scores over T=23 keys + a 23-key chunk × 3 heads
    monkeypatch.setattr(reference, "TILE_BYTES", budget)
    blocks = []
    real = reference.select_topk
    monkeypatch.setattr(reference, "select_topk", lambda s, k: blocks.append(s.numel()) or real(s, k))
    q, k, w, positions = indexer_inputs(S=9)
    reference.lightning_indexer_reference(q, k, w, positions, 4)
    assert len(blocks) == 2 * 5 and max(blocks) == 2 * 23


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mla_reference_equals_semantics_and_contract(dtype, monkeypatch):
    monkeypatch.setattr(reference, "TILE_BYTES", 6 * 12 * 4)  # one query row per tile
    q, kv, indices = mla_inputs(dtype=dtype)
    got = CUSTOM_OPS.sparse_mla(q, kv, indices, 0.3, 8)
    torch.testing.assert_close(got, semantics.sparse_mla(q, kv, indices, 0.3, 8))
    SPARSE_MLA.check({"q": q, "kv": kv, "indices": indices}, {"scale": 0.3, "dv": 8}, {"out": got})
    assert torch.equal(got[1, 2], torch.zeros_like(got[1, 2]))


def test_contract_rejects_a_wrong_shape():
    q, kv, indices = mla_inputs()
    with pytest.raises(ValueError, match="'kv' dim DK=11 disagrees with DK=12"):
        SPARSE_MLA.check({"q": q, "kv": kv[..., :11], "indices": indices}, {"scale": 1.0, "dv": 8})
    with pytest.raises(ValueError, match="'indices' must be int32"):
        SPARSE_MLA.check({"q": q, "kv": kv, "indices": indices.long()}, {"scale": 1.0, "dv": 8})


def test_torch_schemas_come_from_the_contracts():
    assert LIGHTNING_INDEXER.torch_schema() == \
        "lightning_indexer(Tensor q, Tensor k, Tensor w, Tensor positions, int topk) -> Tensor"
    assert str(torch.ops.dsa.sparse_mla.default._schema) == \
        "dsa::sparse_mla(Tensor q, Tensor kv, Tensor indices, float scale, int dv) -> Tensor"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k, w, positions = indexer_inputs(dtype=dtype)
    torch.library.opcheck(torch.ops.dsa.lightning_indexer.default, (q, k, w, positions, 7))
    q, kv, indices = mla_inputs(dtype=dtype)
    torch.library.opcheck(torch.ops.dsa.sparse_mla.default, (q, kv, indices, 0.3, 8))


def test_torch_export_keeps_each_op_as_one_node():
    class Both(torch.nn.Module):
        def forward(self, q, k, w, positions, mq, kv):
            indices = CUSTOM_OPS.lightning_indexer(q, k, w, positions, 4)
            return CUSTOM_OPS.sparse_mla(mq, kv, indices, 0.5, 8)

    q, k, w, positions = indexer_inputs()
    mq, kv, _ = mla_inputs(S=5, T=23)
    graph = torch.export.export(Both(), (q, k, w, positions, mq, kv)).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert targets == ["dsa.lightning_indexer.default", "dsa.sparse_mla.default"]


def test_model_through_custom_ops_equals_masked_dense_reference(tiny_model, tiny_config):
    ids = random_ids(tiny_config, 2, 40, seed=6)
    with torch.no_grad():
        tiny_model.attention = "masked"
        masked = tiny_model(ids)
        use_custom_ops(tiny_model).attention = "sparse"
        through_ops = tiny_model(ids)
    assert tiny_model.ops is CUSTOM_OPS
    assert (through_ops - masked).abs().max() < 1e-4


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
    """FP8 codes (uint8) + block scales per projection, as the checkpoint loader keeps them."""
    from dsa_export.models.fp8 import quantize_weight

    E, two_i, _ = gate_up.shape
    inter = two_i // 2

    def one(w):
        q, s = quantize_weight(w.float(), block)
        return q.view(torch.uint8), s

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
