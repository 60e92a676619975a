"""The exported graph's own cost, read off model.onnx, against the closed form (cost/graph.py)."""

import onnx
import pytest

import dsa_export
from dsa_export.exporter.graph_io import GraphIO
from dsa_export.exporter.onnx_export import export_onnx
from dsa_export.models import get_preset
from dsa_export.cost import graph as graph_cost
from dsa_export.cost.model import step_cost, token_components


@pytest.fixture(scope="module")
def moe64_onnx(tmp_path_factory):
    """tiny-64e: 64 routed experts, 8 active per token."""
    out = tmp_path_factory.mktemp("moe64")
    export_onnx(dsa_export.load_model("tiny-64e"), out, capacity=8192)
    return out


def test_graph_cost_matches_the_closed_form_for_tiny(tiny_onnx):
    report = graph_cost.audit(tiny_onnx)
    assert {p["phase"] for p in report["points"]} == {"decode", "prefill"}
    assert report["within_goal"], report["worst_deviation"]
    assert "Largest deviation" in "\n".join(graph_cost.markdown(report))


def test_graph_cost_matches_the_closed_form_with_64_experts(moe64_onnx):
    points = [graph_cost.Point("decode", 1, 1, past) for past in (1024, 4096, 8191)]
    points += [graph_cost.Point("decode", 4, 1, 2048), graph_cost.Point("prefill", 1, 1024, 0)]
    report = graph_cost.audit(moe64_onnx, points)
    assert report["within_goal"], [(p["phase"], p["past"], p["ratio"]) for p in report["points"]]


def test_decode_flops_of_the_graph_equal_routed_only_moe(moe64_onnx):
    config = get_preset("tiny-64e")
    model = onnx.load(moe64_onnx / "model.onnx", load_external_data=False)
    io = GraphIO.load(moe64_onnx / "io.json")
    past = 1000
    graph = graph_cost.graph_step_cost(model, io, graph_cost.Point("decode", 1, 1, past))
    # closed form: every GEMM of the model, the MoE as the 8 chosen experts + the shared one + the gate
    assert graph["flops"] == sum(p.flops for p in token_components(config, past + 1, "decode", "dsa"))
    c = config
    moe = next(p.flops for p in token_components(config, past + 1, "decode", "dsa") if p.name == "moe")
    routed_only = (c.num_hidden_layers - c.first_k_dense_replace) * (
        2 * 3 * c.hidden_size * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)
        + 2 * c.hidden_size * c.n_routed_experts)
    assert moe == routed_only
    every_expert = routed_only / (c.num_experts_per_tok + 1) * (c.n_routed_experts + 1)  # the old graph's MoE
    assert graph["flops"] < every_expert


def test_a_node_that_copies_a_cache_shows_as_cache_traffic(tiny_onnx):
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    io = GraphIO.load(tiny_onnx / "io.json")
    point = graph_cost.Point("decode", 1, 1, 100)
    before = graph_cost.graph_step_cost(model, io, point)
    cache = io.cache_inputs[0]
    model.graph.node.append(onnx.helper.make_node("Neg", [cache.name], ["copied"]))  # reads the whole cache
    model.graph.output.append(onnx.helper.make_tensor_value_info("copied", onnx.TensorProto.FLOAT, None))
    after = graph_cost.graph_step_cost(model, io, point)
    assert (io.blocks, io.block_size) == (4, 64)
    whole = 1 * 4 * 64 * cache.dims[-1] * 4  # the pool at this point: one sequence's 4 blocks of 64 rows, fp32
    assert after["cache_bytes"] - before["cache_bytes"] == whole
    assert after["flops"] == before["flops"]


@pytest.mark.parametrize("point, per_layer", [
    # decode, 2 sequences after 100 tokens: the indexer reads each sequence's 101 keys (16 fp32), sparse MLA its
    # top-8 latent rows (40 fp32), WriteCache writes each token's latent and key rows
    (graph_cost.Point("decode", 2, 1, 100), 2 * 101 * 16 * 4 + 2 * 8 * 40 * 4 + 2 * (40 + 16) * 4),
    # prefill of 20 tokens: keys 0..19 read once; token s attends min(8, s + 1) rows; 20 rows written per pool
    (graph_cost.Point("prefill", 1, 20, 0), 20 * 16 * 4 + (36 + 12 * 8) * 40 * 4 + 20 * (40 + 16) * 4),
], ids=["decode", "prefill"])
def test_cache_traffic_is_the_rows_read_and_written_only(tiny_onnx, point, per_layer):
    """The pools are never copied: cache traffic is what the dsa ops read and the new rows WriteCache writes."""
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    io = GraphIO.load(tiny_onnx / "io.json")
    assert graph_cost.graph_step_cost(model, io, point)["cache_bytes"] == 3 * per_layer


def test_step_cost_counts_only_the_chosen_experts_weights():
    config = get_preset("tiny-64e")
    one_token = step_cost(config, 1, 1, 100, 4, 4)
    many = step_cost(config, 1, 64, 0, 4, 4)  # 64 tokens × 8 experts: all 64 experts read, once
    expert = 3 * config.hidden_size * config.moe_intermediate_size * 4
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    assert many.weight_bytes - one_token.weight_bytes == pytest.approx(
        moe_layers * (64 - 8) * expert + 63 * config.hidden_size * 4)  # + 63 more embedding rows


def test_no_indexer_work_at_or_below_index_topk_keys(tiny_onnx, tiny_config):
    """A token that sees at most index_topk keys keeps them all: the indexer scores nothing and reads no key (the
    kernels skip it), so DSA never costs more than dense attention at short context; past it, every key is scored."""
    from dsa_export.contracts import LIGHTNING_INDEXER

    topk = tiny_config.index_topk
    shapes = {"q": (2, 8, 16), "k": (256, 16), "w": (2, 8), "positions": (2,), "sequence": (2,),
              "block_tables": (2, 4)}
    itemsize = dict.fromkeys(shapes, 4)

    def indexer(past):
        return LIGHTNING_INDEXER.cost(shapes, {"topk": topk, "block_size": 64}, itemsize, past=past, sequences=2)

    assert indexer(topk - 1).flops == indexer(topk - 1).cache_bytes == 0  # topk keys each
    assert indexer(topk).flops == 2 * (topk + 1) * (2 * 8 * 16 + 2 * 8) and indexer(topk).cache_bytes > 0
    report = graph_cost.audit(tiny_onnx, [graph_cost.Point("decode", 1, 1, past) for past in (2, topk - 1, topk)]
                              + [graph_cost.Point("prefill", 1, topk, 0)])
    assert report["within_goal"], report["worst_deviation"]  # the closed form skips the same tokens
    short, long = (token_components(tiny_config, keys, "decode", "dsa") for keys in (topk, topk + 1))
    assert [p.flops for p in short if p.name == "indexer_scoring"] == [0]
    assert [p.flops for p in long if p.name == "indexer_scoring"][0] > 0
