"""Checks run after every export; a violation fails the export with one line naming the op or tensor."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from dsa_export.errors import DSAExportError
from dsa_export.exporter.graph_io import GraphIO
from dsa_export.exporter.tensorrt_onnx_ops import SOURCE, SUPPORTED
from dsa_export.plugins.contracts import CONTRACTS
from dsa_export.plugins.onnx_ops import DSA_DOMAIN, PLUGIN_NAMESPACE, register_schemas


class GraphCheckError(DSAExportError):
    pass


def _elem_type_names(graph: onnx.GraphProto) -> dict[str, str]:
    infos = list(graph.value_info) + list(graph.input) + list(graph.output)
    types = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in infos
             if v.type.HasField("tensor_type")}
    types.update((t.name, onnx.TensorProto.DataType.Name(t.data_type)) for t in graph.initializer)
    return types


def check_graph(path: Path, io: GraphIO) -> dict:
    """onnx.checker (full), strict shape inference, dsa nodes once per layer, every other op TensorRT-importable for
    its tensor type, graph I/O exactly as `io` says. Returns a summary of what was checked."""
    register_schemas()
    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: external weights are checked too
        inferred = onnx.shape_inference.infer_shapes(onnx.load(path), check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphCheckError(f"ONNX check failed: {str(e).splitlines()[0]}") from None
    graph = inferred.graph

    dsa_nodes = [n for n in graph.node if n.domain == DSA_DOMAIN]
    counts = Counter(n.op_type for n in dsa_nodes)
    for contract in CONTRACTS:
        if counts[contract.onnx_name] != io.num_layers:
            raise GraphCheckError(f"expected one dsa::{contract.onnx_name} node per layer ({io.num_layers}), "
                                  f"found {counts[contract.onnx_name]}")
    for node in dsa_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("plugin_namespace", b"").decode() != PLUGIN_NAMESPACE:
            raise GraphCheckError(f"dsa::{node.op_type} node '{node.name}' lacks plugin_namespace='{PLUGIN_NAMESPACE}'")

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
    for function in inferred.functions:
        for node in function.node:
            if node.op_type not in SUPPORTED:
                raise GraphCheckError(f"op {node.op_type} in the dsa::{function.name} decomposition is not in "
                                      f"TensorRT's supported ONNX operators ({SOURCE})")

    for kind in ("inputs", "outputs"):
        got = [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
               for v in getattr(graph, kind[:-1] if kind == "inputs" else "output")]
        want = getattr(io, kind)
        if [g[0] for g in got] != [t.name for t in want]:
            raise GraphCheckError(f"graph {kind} {[g[0] for g in got]} differ from io.json's {[t.name for t in want]}")
        for (name, dtype, dims), spec in zip(got, want):
            np_dtype = "bfloat16" if spec.dtype == "bfloat16" else spec.dtype
            if dtype != np_dtype and not (spec.dtype == "bfloat16" and "bfloat16" in dtype):
                raise GraphCheckError(f"graph {kind[:-1]} '{name}' is {dtype}, io.json says {spec.dtype}")
            if dims != list(spec.dims):
                raise GraphCheckError(f"graph {kind[:-1]} '{name}' has dims {dims}, io.json says {list(spec.dims)}")
    return {"nodes": len(graph.node), "dsa_nodes": dict(counts), "functions": [f.name for f in inferred.functions]}
