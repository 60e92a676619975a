"""ONNX export: dsa:: nodes + decompositions, caches written in place at a fixed capacity, graph checks, ONNX Runtime
vs eager, atomic output."""

import json

import numpy as np
import onnx
import pytest
import torch

from dsa_export.errors import DSAExportError
from dsa_export.exporter import checks, onnx_export
from dsa_export.exporter.graph_io import GraphIO, graph_io
from dsa_export.models.cache import CacheFullError, cache_layout
from dsa_export.plugins.onnx_ops import IMPL_DOMAIN
from dsa_export.runtime import EagerBackend, GraphBackend
from conftest import TINY_CAPACITY, random_ids


def attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_graph_has_one_plugin_node_per_layer_and_local_decompositions(tiny_onnx, tiny_config):
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    dsa = [n for n in model.graph.node if n.domain == "dsa"]
    assert sorted(n.op_type for n in dsa) == ["LightningIndexer"] * 3 + ["RoutedExperts"] * 2 + ["SparseMLA"] * 3
    for node in dsa:
        attrs = attributes(node)
        assert attrs["plugin_namespace"] == b"dsa" and attrs["aot"] == 1
        if node.op_type == "LightningIndexer":
            assert attrs["topk"] == tiny_config.index_topk
        elif node.op_type == "SparseMLA":
            assert attrs["dv"] == tiny_config.kv_lora_rank
            assert attrs["scale"] == pytest.approx(tiny_config.softmax_scale, rel=1e-6)
    functions = {(f.domain, f.name) for f in model.functions}
    assert {("dsa", "LightningIndexer"), ("dsa", "SparseMLA"), ("dsa", "RoutedExperts"),
            ("dsa", "RoutedExpertsFP8")} <= functions
    assert (IMPL_DOMAIN, "IndexerTile") in functions
    assert {o.domain: o.version for o in model.opset_import}[""] == 24
    assert (tiny_onnx / "model.onnx.data").stat().st_size > 100_000  # weights are external
    assert json.loads((tiny_onnx / "config.json").read_text())["n_routed_experts"] == tiny_config.n_routed_experts


def test_io_json_matches_the_graph_and_caches_are_written_in_place(tiny_onnx, tiny_config):
    io = GraphIO.load(tiny_onnx / "io.json")
    assert io == graph_io(tiny_config, capacity=TINY_CAPACITY)
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["latent_cache.0"] == ["batch", 1, TINY_CAPACITY, tiny_config.latent_dim]
    assert dims["index_key_cache_out.2"] == ["batch", 1, TINY_CAPACITY, tiny_config.index_head_dim]
    assert dims["logits"] == ["batch", "seq", tiny_config.vocab_size]
    scatters = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "TensorScatter"}
    assert scatters == {t.output_name: t.input_name for t in cache_layout(tiny_config)}
    assert not [n for n in model.graph.node if n.op_type == "Concat" and n.output[0] in scatters]


def test_onnxruntime_matches_eager_for_prefill_and_decode_on_a_past(tiny_onnx, tiny_model, tiny_config):
    ort_backend = GraphBackend.onnxruntime(tiny_onnx, record_indexer=True)
    eager = EagerBackend(tiny_model, capacity=TINY_CAPACITY, record_indexer=True)
    ids = random_ids(tiny_config, 2, 30, seed=7)
    caches = {"ort": ort_backend.new_caches(2), "eager": eager.new_caches(2)}
    for a, b in ((0, 20), (20, 21), (21, 30)):  # prefill from an empty cache, one decode step, a chunk on a past
        positions = torch.arange(a, b).expand(2, -1).contiguous()
        r_ort = ort_backend.step(ids[:, a:b], positions, caches["ort"])
        r_eager = eager.step(ids[:, a:b], positions, caches["eager"])
        assert (r_ort.logits - r_eager.logits).abs().max() < 1e-3
        for x, y in zip(r_ort.indexer_topk, r_eager.indexer_topk, strict=True):
            assert torch.equal(x.sort(-1).values, y.sort(-1).values)
    (ort_caches,) = caches["ort"]  # one graph: one stage's caches
    for ort_cache, eager_cache in zip(ort_caches.arrays, caches["eager"].tensors()):
        assert np.abs(ort_cache - eager_cache.numpy()).max() < 1e-4


def test_onnxruntime_writes_the_bound_cache_buffers_in_place(tiny_onnx, tiny_config):
    backend = GraphBackend.onnxruntime(tiny_onnx)
    stages = backend.new_caches(1)
    (caches,) = stages  # one graph: one stage's caches
    before = [a.copy() for a in caches.arrays]
    addresses = [v.data_ptr() for v in caches.values]
    backend.step(random_ids(tiny_config, 1, 5), torch.arange(5)[None], stages)
    backend.step(random_ids(tiny_config, 1, 1), torch.tensor([[5]]), stages)
    assert [v.data_ptr() for v in caches.values] == addresses
    for array, old in zip(caches.arrays, before):
        assert (array[0, 0, :6] != 0).any(axis=-1).all()  # rows 0..5 written into the very arrays we own
        assert np.array_equal(array[0, 0, 6:], old[0, 0, 6:])  # nothing beyond them
    with pytest.raises(CacheFullError, match=f"{TINY_CAPACITY + 1} tokens do not fit a cache of capacity"):
        backend.step(random_ids(tiny_config, 1, 2), torch.tensor([[TINY_CAPACITY - 1, TINY_CAPACITY]]), stages)


def test_graph_check_names_an_op_tensorrt_lacks(tiny_onnx, tiny_config):
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    first = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Unique", [first], ["unique_out"], name="bad_unique"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("unique_out", onnx.TensorProto.FLOAT, ["n"]))
    path = tiny_onnx / "broken.onnx"  # beside model.onnx.data, which it references
    onnx.save_model(model, path)
    try:
        with pytest.raises(checks.GraphCheckError, match="op ai.onnx::Unique .*not in TensorRT's supported"):
            checks.check_graph(path, graph_io(tiny_config, capacity=TINY_CAPACITY))
    finally:
        path.unlink()


def test_graph_check_names_a_tensorrt_restriction_the_graph_breaks(tiny_onnx):
    """TensorRT imports ScatterND without a reduction only, and TopK with K below 3840 (tensorrt_op_table)."""
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    checks.check_tensorrt_restrictions(model.graph)  # the export keeps to them
    logits = model.graph.output[0].name
    k = onnx.helper.make_node("Constant", [], ["big_k"], value=onnx.helper.make_tensor("k", onnx.TensorProto.INT64,
                                                                                        [1], [4096]))
    model.graph.node.extend([k, onnx.helper.make_node("TopK", [logits, "big_k"], ["v", "i"], name="wide_topk")])
    with pytest.raises(checks.GraphCheckError, match="TopK \\(node 'wide_topk'\\) breaks .*K must be less than 3840"):
        checks.check_tensorrt_restrictions(model.graph)
    model.graph.node.pop()
    model.graph.node.append(onnx.helper.make_node("ScatterND", [logits, "i", "v"], ["s"], name="summing",
                                                  reduction="add"))
    with pytest.raises(checks.GraphCheckError, match="ScatterND \\(node 'summing'\\) breaks .*reduction"):
        checks.check_tensorrt_restrictions(model.graph)


def test_graph_check_counts_dsa_nodes_and_requires_in_place_cache_writes(tiny_onnx, tiny_config):
    path = tiny_onnx / "model.onnx"
    with pytest.raises(checks.GraphCheckError, match="one dsa::LightningIndexer node per layer \\(4\\), found 3"):
        checks.check_graph(path, graph_io(tiny_config.replace(num_hidden_layers=4), capacity=TINY_CAPACITY))
    with pytest.raises(checks.GraphCheckError, match="one dsa::RoutedExperts node per MoE layer \\(3\\), found 2"):
        checks.check_graph(path, graph_io(tiny_config, capacity=TINY_CAPACITY), moe_layers=3)
    model = onnx.load(path, load_external_data=False)
    scatter = next(n for n in model.graph.node if n.op_type == "TensorScatter")
    scatter.op_type = "ScatterND"  # a copy, not the in-place write TensorRT needs
    with pytest.raises(checks.GraphCheckError, match=f"graph output '{scatter.output[0]}' is not one TensorScatter"):
        checks.check_cache_writes(model.graph, graph_io(tiny_config, capacity=TINY_CAPACITY))


def test_interrupted_export_leaves_no_model_file(tmp_path, tiny_model, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "check_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(tiny_model, tmp_path / "out", capacity=16)
    assert not (tmp_path / "out").exists()  # no model.onnx, no data, no temp directory: not even the new directory
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(tiny_model, tmp_path / "kept", capacity=16)
    assert list((tmp_path / "kept").iterdir()) == []  # a directory that was there stays, empty


def test_export_into_a_file_path_is_refused(tmp_path, tiny_model):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DSAExportError, match="not a directory"):
        onnx_export.export_onnx(tiny_model, tmp_path / "f")


def test_bf16_export_passes_the_graph_checks(tmp_path, tiny_model):
    stage = onnx_export.export_onnx(tiny_model, tmp_path / "bf16", dtype=torch.bfloat16, capacity=64)
    io = json.loads((tmp_path / "bf16" / "io.json").read_text())
    assert io["inputs"][2]["dtype"] == "bfloat16" and io["capacity"] == 64
    model = onnx.load(stage.model_path, load_external_data=False)
    assert model.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    with pytest.raises(DSAExportError, match="ONNX Runtime on CPU runs float32 exports only"):
        GraphBackend.onnxruntime(tmp_path / "bf16")
