"""ONNX export: dsa:: nodes + decompositions, packed steps over paged pools written in place by dsa::WriteCache,
sampling in the graph, graph checks, ONNX Runtime vs eager, atomic output."""

import json

import numpy as np
import onnx
import pytest
import torch

from dsa_export.errors import DSAExportError
from dsa_export.exporter import checks, onnx_export
from dsa_export.exporter.artifacts import StageDir
from dsa_export.exporter.graph_io import GraphIO, graph_io
from dsa_export.models.cache import BLOCK_SIZE, CacheFullError, cache_layout
from dsa_export.models.sampling import sample
from dsa_export.plugins.onnx_ops import IMPL_DOMAIN
from dsa_export.runtime import EagerBackend, GraphBackend
from dsa_export.runtime.backends import greedy
from dsa_export.serving.ort_graph import OrtGraph
from conftest import TINY_CAPACITY, random_ids


def attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_graph_has_one_plugin_node_per_op_and_local_decompositions(tiny_onnx, tiny_config):
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    dsa = [n for n in model.graph.node if n.domain == "dsa"]
    assert sorted(n.op_type for n in dsa) == (["LightningIndexer"] * 3 + ["RoutedExperts"] * 2 + ["SparseMLA"] * 3
                                              + ["WriteCache"] * 6)  # a WriteCache per pool: 2 per layer
    for node in dsa:
        attrs = attributes(node)
        assert attrs["plugin_namespace"] == b"dsa" and attrs["aot"] == 1
        if node.op_type == "LightningIndexer":
            assert attrs["topk"] == tiny_config.index_topk and attrs["block_size"] == BLOCK_SIZE
        elif node.op_type == "SparseMLA":
            assert attrs["dv"] == tiny_config.kv_lora_rank
            assert attrs["scale"] == pytest.approx(tiny_config.softmax_scale, rel=1e-6)
        elif node.op_type == "WriteCache":
            assert set(attrs) == {"plugin_namespace", "aot"}  # no attribute of its own
    functions = {(f.domain, f.name): f for f in model.functions}
    assert {("dsa", "LightningIndexer"), ("dsa", "SparseMLA"), ("dsa", "WriteCache"), ("dsa", "RoutedExperts"),
            ("dsa", "RoutedExpertsFP8")} <= set(functions)
    assert {(IMPL_DOMAIN, "IndexerTile"), (IMPL_DOMAIN, "KeyBlocks")} <= set(functions)
    # WriteCache decomposes to one ScatterND (no reduction: TensorRT's restriction), nothing that copies the pool
    write = functions["dsa", "WriteCache"]
    assert [n.op_type for n in write.node if n.op_type not in ("Constant", "Unsqueeze", "CastLike")] == ["ScatterND"]
    assert not [a for n in write.node for a in n.attribute if a.name == "reduction"]
    assert {o.domain: o.version for o in model.opset_import}[""] == 24
    assert (tiny_onnx / "model.onnx.data").stat().st_size > 100_000  # weights are external
    assert json.loads((tiny_onnx / "config.json").read_text())["n_routed_experts"] == tiny_config.n_routed_experts


def test_io_json_matches_the_graph_a_packed_step_over_paged_pools(tiny_onnx, tiny_config):
    io = GraphIO.load(tiny_onnx / "io.json")
    assert io == graph_io(tiny_config, capacity=TINY_CAPACITY)
    assert io.block_size == BLOCK_SIZE and io.blocks == TINY_CAPACITY // BLOCK_SIZE == 4
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    assert [v.name for v in model.graph.input] == [t.name for t in io.inputs]
    assert [v.name for v in model.graph.output] == [t.name for t in io.outputs]
    values = {v.name: v.type.tensor_type for v in list(model.graph.input) + list(model.graph.output)}
    dims = {name: [d.dim_param or d.dim_value for d in t.shape.dim] for name, t in values.items()}
    T = onnx.TensorProto
    expected = {  # name: (dims, dtype)
        "input_ids": (["tokens"], T.INT64), "positions": (["tokens"], T.INT64), "sequence": (["tokens"], T.INT32),
        "slots": (["tokens"], T.INT64), "block_tables": (["sequences", 4], T.INT32),
        "logits_index": (["samples"], T.INT64), "temperature": (["samples"], T.FLOAT),
        "top_k": (["samples"], T.INT32), "top_p": (["samples"], T.FLOAT), "uniform": (["samples"], T.FLOAT),
        "latent_cache.0": (["pool_rows", tiny_config.latent_dim], T.FLOAT),
        "index_key_cache.2": (["pool_rows", tiny_config.index_head_dim], T.FLOAT),
        "next_tokens": (["samples"], T.INT64), "logprobs": (["samples"], T.FLOAT),
        "logits": (["samples", tiny_config.vocab_size], T.FLOAT),
        "latent_cache_out.1": (["pool_rows", tiny_config.latent_dim], T.FLOAT),
        "index_key_cache_out.2": (["pool_rows", tiny_config.index_head_dim], T.FLOAT),
    }
    assert {name: (dims[name], values[name].elem_type) for name in expected} == expected
    assert len(io.cache_inputs) == len(io.cache_outputs) == 2 * tiny_config.num_hidden_layers


def test_each_pool_is_written_once_in_place_and_read_after_the_write(tiny_onnx, tiny_config):
    graph = onnx.load(tiny_onnx / "model.onnx", load_external_data=False).graph
    layout = cache_layout(tiny_config)
    writes = {n.output[0]: n for n in graph.node if (n.domain, n.op_type) == ("dsa", "WriteCache")}
    assert {out: n.input[0] for out, n in writes.items()} == {t.output_name: t.input_name for t in layout}
    assert all(n.input[2] == "slots" for n in writes.values())
    for t in layout:  # nothing else reads a pool before its write (no copy of it, no read of stale rows)
        assert [n.op_type for n in graph.node if t.input_name in n.input] == ["WriteCache"]
    # the ops read the pools as written by this step (its own keys included), through the paging inputs
    indexers = [n for n in graph.node if n.op_type == "LightningIndexer"]
    assert sorted(n.input[1] for n in indexers) == sorted(t.output_name for t in layout if t.kind == "index_key")
    assert all(list(n.input[3:6]) == ["positions", "sequence", "block_tables"] for n in indexers)
    attentions = [n for n in graph.node if n.op_type == "SparseMLA"]
    assert sorted(n.input[1] for n in attentions) == sorted(t.output_name for t in layout if t.kind == "latent")
    assert not [n for n in graph.node if n.op_type in ("TensorScatter", "ScatterND", "Concat")
                and n.output[0] in writes]


def _eager_alone(model, ids):
    """(logits [S,V], cache rows per pool in layout order [S, width]) of `ids` run alone by the eager model."""
    cache = model.new_cache(1, 128)
    with torch.no_grad():
        logits = model(ids[None], cache=cache)[0]
    return logits, [t[:len(ids)].numpy() for t in cache.tensors()]


def test_onnxruntime_writes_the_pools_in_place_at_the_slots_only(tiny_onnx, tiny_model, tiny_config):
    """A packed step of two sequences whose blocks lie anywhere in the pools (one crossing a block boundary): the
    very arrays bound stay the pools, the rows land at the slots (equal to the eager model's rows), every other row
    keeps its bytes, and the logits and the sampled tokens are the eager model's. Then a mixed step: one sequence's
    next token with another's prompt chunk."""
    stage = StageDir(tiny_onnx)
    graph = OrtGraph(stage.model_path, stage.io)
    pools = graph.new_pools(6 * BLOCK_SIZE)
    assert [a.shape for a in pools.arrays] == [(6 * BLOCK_SIZE, t.width) for t in cache_layout(tiny_config)]
    rng = np.random.default_rng(0)
    for array in pools.arrays:  # a pattern no step writes: rows never written must keep it bit for bit
        array[...] = rng.standard_normal(array.shape, dtype=np.float32)
    before = [a.copy() for a in pools.arrays]
    addresses = [a.ctypes.data for a in pools.arrays]
    assert [v.data_ptr() for v in pools.values] == addresses  # the bound OrtValues are the arrays' memory

    prompts = [random_ids(tiny_config, 1, 5, seed=1)[0], random_ids(tiny_config, 1, 70, seed=2)[0]]
    tables = np.array([[4, 0, 0, 0], [2, 1, 0, 0]], np.int32)  # seq 0: block 4; seq 1: blocks 2 then 1
    slots = [4 * 64 + np.arange(5), np.concatenate([2 * 64 + np.arange(64), 1 * 64 + np.arange(6)])]
    # packed: sequence 1's tokens first, then sequence 0's; samples: each sequence's last token
    feeds = {"input_ids": torch.cat([prompts[1], prompts[0]]).numpy(),
             "positions": np.concatenate([np.arange(70), np.arange(5)]),
             "sequence": np.array([1] * 70 + [0] * 5, np.int32), "slots": np.concatenate([slots[1], slots[0]]),
             "block_tables": tables, "logits_index": np.array([74, 69]), **greedy(2)}
    out = graph.run(feeds, pools)

    assert [a.ctypes.data for a in pools.arrays] == addresses  # the same buffers, written in place
    assert [v.data_ptr() for v in pools.values] == addresses
    alone = [_eager_alone(tiny_model, p) for p in prompts]
    expected_logits = np.stack([alone[0][0][-1].numpy(), alone[1][0][-1].numpy()])
    assert np.abs(out["logits"] - expected_logits).max() < 1e-3
    assert np.array_equal(out["next_tokens"], out["logits"].argmax(-1))  # temperature 0: greedy
    assert np.array_equal(out["next_tokens"], expected_logits.argmax(-1))
    log_probs = torch.log_softmax(torch.from_numpy(out["logits"]), -1)
    assert np.allclose(out["logprobs"], log_probs[torch.arange(2), torch.from_numpy(out["next_tokens"])], atol=1e-5)
    written = np.concatenate(slots)
    untouched = np.setdiff1d(np.arange(6 * BLOCK_SIZE), written)
    for i, (array, old) in enumerate(zip(pools.arrays, before)):
        for (_, rows), where in zip(alone, slots):
            assert np.abs(array[where] - rows[i]).max() < 1e-4  # the step's rows, at their slots
        assert np.array_equal(array[untouched], old[untouched])  # every other row untouched, bit for bit

    # a mixed step: sequence 0's next token (position 5) and a 3-token chunk of sequence 1 (positions 70-72)
    step = [torch.tensor(out["next_tokens"][:1]), random_ids(tiny_config, 1, 3, seed=3)[0]]
    new_slots = [np.array([4 * 64 + 5]), 1 * 64 + np.arange(6, 9)]
    sampling = {"temperature": np.array([1.0, 0.7], np.float32), "top_k": np.array([0, 5], np.int32),
                "top_p": np.array([0.9, 1.0], np.float32), "uniform": np.array([0.3, 0.8], np.float32)}
    feeds = {"input_ids": torch.cat(step).numpy(), "positions": np.array([5, 70, 71, 72]),
             "sequence": np.array([0, 1, 1, 1], np.int32), "slots": np.concatenate(new_slots), "block_tables": tables,
             "logits_index": np.array([0, 3]), **sampling}
    out = graph.run(feeds, pools)
    assert [a.ctypes.data for a in pools.arrays] == addresses
    full = [_eager_alone(tiny_model, torch.cat([p, s])) for p, s in zip(prompts, step)]
    assert np.abs(out["logits"] - np.stack([full[0][0][-1].numpy(), full[1][0][-1].numpy()])).max() < 1e-3
    tokens, _ = sample(torch.from_numpy(out["logits"]), *(torch.from_numpy(sampling[k]) for k in sampling))
    assert np.array_equal(out["next_tokens"], tokens.numpy())  # the graph samples as models/sampling.py does
    written = np.concatenate([written, *new_slots])
    untouched = np.setdiff1d(np.arange(6 * BLOCK_SIZE), written)
    for i, (array, old) in enumerate(zip(pools.arrays, before)):
        for (_, rows), where, new in zip(full, slots, new_slots):
            assert np.abs(array[np.concatenate([where, new])] - rows[i]).max() < 1e-4
        assert np.array_equal(array[untouched], old[untouched])


def test_onnxruntime_matches_eager_for_a_batch_of_different_lengths_in_chunks(tiny_onnx, tiny_model, tiny_config):
    """GraphBackend steps [B, S] (packed over the identity paging) of two prompts of 21 and 13 tokens (the second
    right-padded): one prefill step, the same in two chunks, then a decode step at each row's own position."""
    ort = GraphBackend.onnxruntime(tiny_onnx, record_indexer=True)
    eager = EagerBackend(tiny_model, capacity=TINY_CAPACITY, record_indexer=True)
    lengths = torch.tensor([21, 13])
    ids = random_ids(tiny_config, 2, 21, seed=7)  # row 1's prompt: its first 13 tokens; the rest is padding
    positions = torch.arange(21).expand(2, -1).contiguous()

    def same(a, b, tol=1e-3):
        assert (a.logits - b.logits).abs().max() < tol
        assert len(a.indexer_topk) == len(b.indexer_topk) == tiny_config.num_hidden_layers
        for x, y in zip(a.indexer_topk, b.indexer_topk, strict=True):  # selections as positions, both
            assert x.shape == y.shape and torch.equal(x.sort(-1).values, y.sort(-1).values)

    caches = {"ort": ort.new_caches(2), "eager": eager.new_caches(2)}
    one = ort.step(ids, positions, caches["ort"])
    same(one, eager.step(ids, positions, caches["eager"]))
    assert one.logits.shape == (2, 21, tiny_config.vocab_size)

    chunked = ort.new_caches(2)
    first = ort.step(ids[:, :10], positions[:, :10], chunked)
    second = ort.step(ids[:, 10:], positions[:, 10:], chunked)
    assert (torch.cat([first.logits, second.logits], 1) - one.logits).abs().max() < 1e-4
    last = lengths - 1
    assert (second.logits[torch.arange(2), last - 10] - one.logits[torch.arange(2), last]).abs().max() < 1e-4
    (pools,), (chunked_pools,) = caches["ort"].pools, chunked.pools
    for a, b in zip(pools.arrays, chunked_pools.arrays):
        assert np.abs(a - b).max() < 1e-4

    # row 1 alone (no padding) gives the same logits at its last prompt token and after it
    nxt = one.logits[torch.arange(2), last].argmax(-1)
    with torch.no_grad():
        alone = tiny_model(torch.cat([ids[1, :13], nxt[1:]])[None])[0]
    assert (one.logits[1, 12] - alone[12]).abs().max() < 1e-3
    decode_positions = lengths[:, None].clone()  # each row at its own position: 21 and 13 (over its padding)
    decoded = ort.step(nxt[:, None], decode_positions, caches["ort"])
    same(decoded, eager.step(nxt[:, None], decode_positions, caches["eager"]))
    assert (decoded.logits[1, 0] - alone[13]).abs().max() < 1e-3
    for ort_pool, eager_pool in zip(pools.arrays, caches["eager"].tensors()):
        assert ort_pool.shape == tuple(eager_pool.shape) == (2 * TINY_CAPACITY, eager_pool.shape[-1])
        assert np.abs(ort_pool - eager_pool.numpy()).max() < 1e-4

    before = [a.copy() for a in pools.arrays]
    with pytest.raises(CacheFullError, match=f"{TINY_CAPACITY + 1} tokens do not fit a cache of capacity"):
        ort.step(ids[:, :2], torch.tensor([[TINY_CAPACITY - 1, TINY_CAPACITY]] * 2), caches["ort"])
    assert all(np.array_equal(a, b) for a, b in zip(pools.arrays, before))  # refused before any work


def test_graph_check_names_an_op_tensorrt_lacks(tiny_onnx, tiny_config):
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    model.graph.node.append(onnx.helper.make_node("Unique", ["logits"], ["unique_out"], name="bad_unique"))
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
    checks.check_tensorrt_restrictions(model.graph)  # the export keeps to them (sampling's TopK included)
    k = onnx.helper.make_node("Constant", [], ["big_k"], value=onnx.helper.make_tensor("k", onnx.TensorProto.INT64,
                                                                                        [1], [4096]))
    model.graph.node.extend([k, onnx.helper.make_node("TopK", ["logits", "big_k"], ["v", "i"], name="wide_topk")])
    with pytest.raises(checks.GraphCheckError, match="TopK \\(node 'wide_topk'\\) breaks .*K must be less than 3840"):
        checks.check_tensorrt_restrictions(model.graph)
    model.graph.node.pop()
    model.graph.node.append(onnx.helper.make_node("ScatterND", ["logits", "i", "v"], ["s"], name="summing",
                                                  reduction="add"))
    with pytest.raises(checks.GraphCheckError, match="ScatterND \\(node 'summing'\\) breaks .*reduction"):
        checks.check_tensorrt_restrictions(model.graph)


def test_graph_check_counts_dsa_nodes(tiny_onnx, tiny_config):
    path = tiny_onnx / "model.onnx"
    with pytest.raises(checks.GraphCheckError, match="expected 4 dsa::LightningIndexer nodes .*, found 3"):
        checks.check_graph(path, graph_io(tiny_config.replace(num_hidden_layers=4), capacity=TINY_CAPACITY))
    with pytest.raises(checks.GraphCheckError, match="expected 3 dsa::RoutedExperts nodes \\(one per MoE layer\\), f"):
        checks.check_graph(path, graph_io(tiny_config, capacity=TINY_CAPACITY), moe_layers=3)
    graph = onnx.load(path, load_external_data=False).graph
    checks.check_dsa_nodes(graph, tiny_config.num_hidden_layers, 2)  # the export has them all
    write = next(n for n in graph.node if n.op_type == "WriteCache")
    write.domain = ""  # a plain op of that name: no longer the dsa plugin
    with pytest.raises(checks.GraphCheckError, match="expected 6 dsa::WriteCache nodes .*, found 5"):
        checks.check_dsa_nodes(graph, tiny_config.num_hidden_layers, 2)


def _refused_cache_write(graph, io, output, input_):
    with pytest.raises(checks.GraphCheckError, match=f"graph output '{output}' is not one dsa::WriteCache of input "
                                                     f"'{input_}' \\(the in-place pool write\\)"):
        checks.check_cache_writes(graph, io)


def test_graph_check_requires_each_pool_output_to_be_its_pools_write_cache(tiny_onnx, tiny_config):
    io = graph_io(tiny_config, capacity=TINY_CAPACITY)
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    checks.check_cache_writes(model.graph, io)  # the export passes

    def copy():
        graph = onnx.GraphProto()
        graph.CopyFrom(model.graph)
        return graph, {n.output[0]: n for n in graph.node if n.op_type == "WriteCache"}

    # the write made a plain ScatterND (a copy of the pool, not the aliased in-place write)
    graph, writes = copy()
    node = writes["latent_cache_out.1"]
    node.domain, node.op_type = "", "ScatterND"
    _refused_cache_write(graph, io, "latent_cache_out.1", "latent_cache.1")
    # a WriteCache of another pool: index_key_cache_out.0 would not be index_key_cache.0's buffer
    graph, writes = copy()
    writes["index_key_cache_out.0"].input[0] = "index_key_cache.2"
    _refused_cache_write(graph, io, "index_key_cache_out.0", "index_key_cache.0")
    # the output produced by another node from the write's result (an Identity: a new buffer)
    graph, writes = copy()
    node = writes["latent_cache_out.2"]
    node.output[0] = "written"
    for reader in graph.node:
        reader.input[:] = ["written" if x == "latent_cache_out.2" else x for x in reader.input]
    graph.node.append(onnx.helper.make_node("Identity", ["written"], ["latent_cache_out.2"]))
    _refused_cache_write(graph, io, "latent_cache_out.2", "latent_cache.2")
    # no writer at all: the pool output passed through from the input
    graph, writes = copy()
    graph.node.remove(writes["index_key_cache_out.1"])
    _refused_cache_write(graph, io, "index_key_cache_out.1", "index_key_cache.1")


def test_interrupted_export_leaves_no_model_file(tmp_path, tiny_model, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    traced, trace = [], onnx_export.trace_graph

    def trace_once(*args):  # both exports trace the same graph: the second reuses the first's (tracing is slow)
        if not traced:
            traced.append(trace(*args))
        proto, specs = traced[0]
        graph = onnx.ModelProto()
        graph.CopyFrom(proto)
        return graph, specs

    monkeypatch.setattr(onnx_export, "trace_graph", trace_once)
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
    dtypes = {t["name"]: t["dtype"] for t in io["inputs"] + io["outputs"]}
    assert io["capacity"] == 64 and io["cache_dtype"] == "bfloat16"
    assert dtypes["latent_cache.0"] == dtypes["index_key_cache_out.2"] == "bfloat16"
    assert dtypes["logits"] == dtypes["logprobs"] == "float32" and dtypes["block_tables"] == "int32"
    model = onnx.load(stage.model_path, load_external_data=False)
    elem = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert elem["latent_cache.0"] == elem["latent_cache_out.0"] == onnx.TensorProto.BFLOAT16
    assert elem["logits"] == onnx.TensorProto.FLOAT
    with pytest.raises(DSAExportError, match="ONNX Runtime on CPU runs float32 exports only"):
        GraphBackend.onnxruntime(tmp_path / "bf16")
