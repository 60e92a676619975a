"""Checks run after every export; a violation fails the export with one line naming the op or tensor."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnx.numpy_helper

from dsa_export.contracts import (BY_ONNX_NAME, LIGHTNING_INDEXER, ROUTED_EXPERTS, ROUTED_EXPERTS_FP8, SPARSE_MLA,
                                  WRITE_CACHE)
from dsa_export.errors import DSAExportError
from dsa_export.serving.io_spec import GraphIO
from dsa_export.exporter.tensorrt_op_table import RESTRICTIONS, SOURCE, SUPPORTED
from dsa_export.plugins.onnx_ops import DSA_DOMAIN, IMPL_DOMAIN, TRT_ATTRIBUTES, register_schemas


class GraphCheckError(DSAExportError):
    pass


def check_graph(path: Path, io: GraphIO, moe_layers: int | None = None, model: onnx.ModelProto | None = None) -> dict:
    """Every check below, on the file at `path` (external weights included; `model`: the same graph already in
    memory, without its weights). moe_layers: how many dsa::RoutedExperts[FP8] nodes to expect (default: skip that
    count). Returns a summary of what was checked."""
    register_schemas()
    model = checked_model(path, model)
    graph = model.graph
    counts = check_dsa_nodes(graph, io.num_layers, moe_layers)
    check_cache_writes(graph, io)
    check_tensorrt_ops(graph)
    check_tensorrt_restrictions(graph)
    check_decomposition_ops(model)
    check_io(graph, io)
    return {"nodes": len(graph.node), "dsa_nodes": dict(counts)}


def checked_model(path: Path, model: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """onnx.checker (full) and strict shape inference; the model with inferred shapes."""
    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: external weights are checked too
        model = model if model is not None else onnx.load(path, load_external_data=False)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphCheckError(f"ONNX check failed: {str(e).splitlines()[0]}") from None


def check_dsa_nodes(graph: onnx.GraphProto, num_layers: int, moe_layers: int | None) -> Counter:
    """One LightningIndexer and one SparseMLA per layer, a WriteCache per pool, one RoutedExperts[FP8] per MoE
    layer; every node carries each attribute its contract (and so its TensorRT plugin) declares, plus the TensorRT
    import hints."""
    nodes = [n for n in graph.node if n.domain == DSA_DOMAIN]
    counts = Counter(n.op_type for n in nodes)
    expected = {LIGHTNING_INDEXER.onnx_name: (num_layers, "one per layer"),
                SPARSE_MLA.onnx_name: (num_layers, "one per layer"),
                WRITE_CACHE.onnx_name: (2 * num_layers, "one per pool: two per layer")}
    for name, (count, rule) in expected.items():
        if counts[name] != count:
            raise GraphCheckError(f"expected {count} dsa::{name} nodes ({rule}), found {counts[name]}")
    experts = counts[ROUTED_EXPERTS.onnx_name] + counts[ROUTED_EXPERTS_FP8.onnx_name]
    if moe_layers is not None and experts != moe_layers:
        raise GraphCheckError(f"expected {moe_layers} dsa::RoutedExperts nodes (one per MoE layer), found {experts}")
    for node in nodes:
        if node.op_type not in BY_ONNX_NAME:
            raise GraphCheckError(f"dsa::{node.op_type} (node '{node.name}') is not a dsa op")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for attribute in BY_ONNX_NAME[node.op_type].attributes:
            if attribute.name not in attrs:
                raise GraphCheckError(f"dsa::{node.op_type} node '{node.name}' lacks attribute '{attribute.name}'")
        for name, value in TRT_ATTRIBUTES.items():
            got = attrs.get(name)
            if (got.decode() if isinstance(got, bytes) else got) != value:
                raise GraphCheckError(f"dsa::{node.op_type} node '{node.name}' lacks {name}={value!r}")
    return counts


def check_cache_writes(graph: onnx.GraphProto, io: GraphIO) -> None:
    """Each pool is written in place: one dsa::WriteCache (whose output aliases its cache input in TensorRT, and is
    the same buffer in ONNX Runtime) whose cache operand is the graph input itself and whose result is the graph
    output, nothing else writing either."""
    writers = {n.output[0]: n for n in graph.node}
    for cache_in, cache_out in zip(io.cache_inputs, io.cache_outputs):
        node = writers.get(cache_out.name)
        if node is None or (node.domain, node.op_type) != (DSA_DOMAIN, WRITE_CACHE.onnx_name) or \
                node.input[0] != cache_in.name:
            raise GraphCheckError(f"graph output '{cache_out.name}' is not one dsa::WriteCache of input "
                                  f"'{cache_in.name}' (the in-place pool write)")


def _all_nodes(nodes):
    """Nodes, and the nodes of their subgraphs (Loop bodies), recursively."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g.node)


def _elem_type_names(graph: onnx.GraphProto) -> dict[str, str]:
    infos = list(graph.value_info) + list(graph.input) + list(graph.output)
    types = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in infos
             if v.type.HasField("tensor_type")}
    types.update((t.name, onnx.TensorProto.DataType.Name(t.data_type)) for t in graph.initializer)
    return types


def check_tensorrt_ops(graph: onnx.GraphProto) -> None:
    """Every standard op TensorRT-importable for its tensor type (the dsa ops become plugins); the decompositions'
    ops, by name, too (the file stays runnable by a consumer without our plugins)."""
    types = _elem_type_names(graph)
    for node in graph.node:
        if node.domain == DSA_DOMAIN:
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED:
            raise GraphCheckError(f"op {node.domain or 'ai.onnx'}::{node.op_type} (node '{node.name}') is not in "
                                  f"TensorRT's supported ONNX operators ({SOURCE})")
        # The operator table lists the data type an op works on: its first input's (an output's when it has none).
        tensor = node.input[0] if node.input and node.input[0] else node.output[0]
        dtype = types.get(tensor)
        if dtype is not None and dtype not in SUPPORTED[node.op_type]:
            raise GraphCheckError(f"op {node.op_type} (node '{node.name}') on {dtype} is not supported by TensorRT "
                                  f"(only {'/'.join(SUPPORTED[node.op_type])}; {SOURCE})")


def check_tensorrt_restrictions(graph: onnx.GraphProto) -> None:
    """The restrictions of TensorRT's importer (tensorrt_op_table.RESTRICTIONS) that a graph can break: ScatterND
    without a reduction, a TopK K below 3840, CumSum's and ReduceSum's axes known at build time (initializers or
    Constant nodes)."""
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer  # small constants, not the weights
              if t.data_location != onnx.TensorProto.EXTERNAL}
    values.update((n.output[0], onnx.numpy_helper.to_array(n.attribute[0].t)) for n in graph.node
                  if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR)

    def broken(node: onnx.NodeProto) -> bool:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "ScatterND":
            return attrs.get("reduction", b"none") not in (b"none", "none")
        if node.op_type == "TopK":
            k = values.get(node.input[1])
            return k is not None and int(k.max()) >= 3840
        if node.op_type in ("CumSum", "ReduceSum") and len(node.input) > 1 and node.input[1]:
            return node.input[1] not in constants
        return False

    for node in graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in RESTRICTIONS and broken(node):
            raise GraphCheckError(f"op {node.op_type} (node '{node.name}') breaks TensorRT's restriction: "
                                  f"{RESTRICTIONS[node.op_type]} ({SOURCE})")


def check_decomposition_ops(model: onnx.ModelProto) -> None:
    for function in model.functions:
        for node in _all_nodes(function.node):
            if node.domain in (DSA_DOMAIN, IMPL_DOMAIN):
                continue
            if node.op_type not in SUPPORTED:
                raise GraphCheckError(f"op {node.op_type} in the {function.domain}::{function.name} decomposition is "
                                      f"not in TensorRT's supported ONNX operators ({SOURCE})")


def check_io(graph: onnx.GraphProto, io: GraphIO) -> None:
    """Graph inputs and outputs exactly as io.json says: names, order, dtypes, dims."""
    for kind, values, want in (("input", graph.input, io.inputs), ("output", graph.output, io.outputs)):
        got = [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
        if [g[0] for g in got] != [t.name for t in want]:
            raise GraphCheckError(f"graph {kind}s {[g[0] for g in got]} differ from io.json's {[t.name for t in want]}")
        for (name, dtype, dims), spec in zip(got, want):
            if dtype != spec.dtype and not (spec.dtype == "bfloat16" and "bfloat16" in dtype):
                raise GraphCheckError(f"graph {kind} '{name}' is {dtype}, io.json says {spec.dtype}")
            if dims != list(spec.dims):
                raise GraphCheckError(f"graph {kind} '{name}' has dims {dims}, io.json says {list(spec.dims)}")
