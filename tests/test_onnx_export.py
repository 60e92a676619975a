"""ONNX export: dsa:: nodes + decompositions, cache I/O, graph checks, ONNX Runtime vs eager, atomic output."""

import json

import onnx
import pytest
import torch

from dsa_export.errors import DSAExportError
from dsa_export.exporter import checks, onnx_export
from dsa_export.exporter.graph_io import GraphIO, graph_io
from dsa_export.runtime import EagerBackend, OnnxRuntimeBackend
from conftest import random_ids


def test_graph_has_one_plugin_node_per_layer_and_local_decompositions(tiny_onnx, tiny_config):
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    dsa = [n for n in model.graph.node if n.domain == "dsa"]
    assert sorted(n.op_type for n in dsa) == ["LightningIndexer"] * 3 + ["SparseMLA"] * 3
    for node in dsa:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"dsa"
        if node.op_type == "LightningIndexer":
            assert attrs["topk"] == tiny_config.index_topk
        else:
            assert attrs["dv"] == tiny_config.kv_lora_rank
            assert attrs["scale"] == pytest.approx(tiny_config.softmax_scale, rel=1e-6)
    assert sorted((f.domain, f.name) for f in model.functions) == [("dsa", "LightningIndexer"), ("dsa", "SparseMLA")]
    assert {o.domain: o.version for o in model.opset_import}["dsa"] == 1
    assert (tiny_onnx / "model.onnx.data").stat().st_size > 100_000  # weights are external


def test_io_json_matches_the_graph(tiny_onnx, tiny_config):
    io = GraphIO.load(tiny_onnx / "io.json")
    assert io == graph_io(tiny_config)
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["past_latent.0"] == ["batch", "past", tiny_config.latent_dim]
    assert dims["present_index_keys.2"] == ["batch", "past + seq", tiny_config.index_head_dim]
    assert dims["logits"] == ["batch", "seq", tiny_config.vocab_size]


def test_onnxruntime_matches_eager_for_prefill_and_decode_on_a_past(tiny_onnx, tiny_model, tiny_config):
    ort_backend, eager = OnnxRuntimeBackend(tiny_onnx), EagerBackend(tiny_model)
    ids = random_ids(tiny_config, 2, 30, seed=7)
    caches = {"ort": ort_backend.empty_caches(2), "eager": eager.empty_caches(2)}
    for a, b in ((0, 20), (20, 21), (21, 30)):  # prefill from an empty past, one decode step, a chunk on a past
        positions = torch.arange(a, b).expand(2, -1).contiguous()
        r_ort = ort_backend.step(ids[:, a:b], positions, caches["ort"])
        r_eager = eager.step(ids[:, a:b], positions, caches["eager"])
        caches = {"ort": r_ort.caches, "eager": r_eager.caches}
        assert (r_ort.logits - r_eager.logits).abs().max() < 1e-3
        for x, y in zip(r_ort.indexer_topk, r_eager.indexer_topk):
            assert torch.equal(x.sort(-1).values, y.sort(-1).values)


def test_graph_check_names_an_op_tensorrt_lacks(tiny_onnx, tmp_path, tiny_config):
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    first = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Unique", [first], ["unique_out"], name="bad_unique"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("unique_out", onnx.TensorProto.FLOAT, ["n"]))
    path = tiny_onnx / "broken.onnx"  # beside model.onnx.data, which it references
    onnx.save_model(model, path)
    try:
        with pytest.raises(checks.GraphCheckError, match="op ai.onnx::Unique .*not in TensorRT's supported"):
            checks.check_graph(path, graph_io(tiny_config))
    finally:
        path.unlink()


def test_graph_check_counts_dsa_nodes(tiny_onnx, tiny_config):
    with pytest.raises(checks.GraphCheckError, match="one dsa::LightningIndexer node per layer \\(4\\), found 3"):
        checks.check_graph(tiny_onnx / "model.onnx", graph_io(tiny_config.replace(num_hidden_layers=4)))


def test_interrupted_export_leaves_no_model_file(tmp_path, tiny_model, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "check_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(tiny_model, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no model.onnx, no data, no temp directory


def test_export_into_a_file_path_is_refused(tmp_path, tiny_model):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DSAExportError, match="not a directory"):
        onnx_export.export_onnx(tiny_model, tmp_path / "f")


def test_bf16_export_passes_the_graph_checks(tmp_path, tiny_model, tiny_config):
    path = onnx_export.export_onnx(tiny_model, tmp_path / "bf16", dtype=torch.bfloat16)
    io = json.loads((tmp_path / "bf16" / "io.json").read_text())
    assert io["inputs"][2]["dtype"] == "bfloat16"
    model = onnx.load(path, load_external_data=False)
    assert model.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
