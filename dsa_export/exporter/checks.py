"""Checks run after every export; a violation fails the export with one line naming the op or tensor."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from dsa_export.contracts import CONTRACTS, LIGHTNING_INDEXER, ROUTED_EXPERTS, ROUTED_EXPERTS_FP8, SPARSE_MLA
from dsa_export.errors import DSAExportError
from dsa_export.exporter.graph_io import GraphIO
from dsa_export.exporter.tensorrt_onnx_ops import SOURCE, SUPPORTED
from dsa_export.plugins.onnx_ops import DSA_DOMAIN, IMPL_DOMAIN, TRT_ATTRIBUTES, register_schemas


class GraphCheckError(DSAExportError):
    pass


def check_graph(path: Path, io: GraphIO, moe_layers: int | None = None) -> dict:
    """Every check below, on the file at `path` (external weights included). moe_layers: how many
    dsa::RoutedExperts[FP8] nodes to expect (default: skip that count). Returns a summary of what was checked."""
    register_schemas()
    model = checked_model(path)
    graph = model.graph
    counts = check_dsa_nodes(graph, io.num_layers, moe_layers)
    check_cache_writes(graph, io)
    check_tensorrt_ops(graph)
    check_decomposition_ops(model)
    check_io(graph, io)
    return {"nodes": len(graph.node), "dsa_nodes": dict(counts)}


def checked_model(path: Path) -> onnx.ModelProto:
    """onnx.checker (full) and strict shape inference; the model with inferred shapes."""
    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: external weights are checked too
        return onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False), check_type=True,
                                                 strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphCheckError(f"ONNX check failed: {str(e).splitlines()[0]}") from None


def check_dsa_nodes(graph: onnx.GraphProto, num_layers: int, moe_layers: int | None) -> Counter:
    """One LightningIndexer and one SparseMLA per layer, one RoutedExperts[FP8] per MoE layer; every node carries
    each attribute its contract (and so its TensorRT plugin) declares, plus the TensorRT import hints."""
    nodes = [n for n in graph.node if n.domain == DSA_DOMAIN]
    counts = Counter(n.op_type for n in nodes)
    expected = {LIGHTNING_INDEXER.onnx_name: num_layers, SPARSE_MLA.onnx_name: num_layers}
    for name, count in expected.items():
        if counts[name] != count:
            raise GraphCheckError(f"expected one dsa::{name} node per layer ({count}), found {counts[name]}")
    experts = counts[ROUTED_EXPERTS.onnx_name] + counts[ROUTED_EXPERTS_FP8.onnx_name]
    if moe_layers is not None and experts != moe_layers:
        raise GraphCheckError(f"expected one dsa::RoutedExperts node per MoE layer ({moe_layers}), found {experts}")
    contracts = {c.onnx_name: c for c in CONTRACTS}
    for node in nodes:
        if node.op_type not in contracts:
            raise GraphCheckError(f"dsa::{node.op_type} (node '{node.name}') is not a dsa op")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for attribute in contracts[node.op_type].attributes:
            if attribute.name not in attrs:
                raise GraphCheckError(f"dsa::{node.op_type} node '{node.name}' lacks attribute '{attribute.name}'")
        for name, value in TRT_ATTRIBUTES.items():
            got = attrs.get(name)
            if (got.decode() if isinstance(got, bytes) else got) != value:
                raise GraphCheckError(f"dsa::{node.op_type} node '{node.name}' lacks {name}={value!r}")
    return counts


def check_cache_writes(graph: onnx.GraphProto, io: GraphIO) -> None:
    """Each cache is written in place: one TensorScatter (TensorRT's KVCacheUpdate) whose cache operand is the graph
    input itself and whose result is the graph output, nothing else writing either."""
    writers = {n.output[0]: n for n in graph.node}
    for cache_in, cache_out in zip(io.cache_inputs, io.cache_outputs):
        node = writers.get(cache_out.name)
        if node is None or node.op_type != "TensorScatter" or node.input[0] != cache_in.name:
            raise GraphCheckError(f"graph output '{cache_out.name}' is not one TensorScatter of input "
                                  f"'{cache_in.name}' (the in-place cache write TensorRT needs)")


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


def load_graph(onnx_dir: Path) -> onnx.ModelProto:
    """An export's model.onnx without its weights; one line naming the file if it does not parse."""
    try:
        return onnx.load(Path(onnx_dir) / "model.onnx", load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise DSAExportError(f"{Path(onnx_dir) / 'model.onnx'}: not a readable ONNX file ({type(e).__name__})") \
            from None


def check_export_dir(onnx_dir: Path, config=None) -> GraphIO:
    """A directory holding a readable export of dsa-export, checked without loading its weights: io.json and
    config.json parse (and match `config` if given), model.onnx parses, every external tensor lies inside its data
    file (a truncated model.onnx.data is caught here). One line naming the problem otherwise."""
    from dsa_export.models.config import load_config

    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / "model.onnx").is_file() or not (onnx_dir / "io.json").is_file():
        raise DSAExportError(f"{onnx_dir}: no exported model (model.onnx + io.json); run `dsa-export export` first")
    io = GraphIO.load(onnx_dir / "io.json")
    exported = load_config(onnx_dir / "config.json")
    if config is not None:
        ours, theirs = config.to_hf_dict(), exported.to_hf_dict()
        differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        if differ:
            raise DSAExportError(f"{onnx_dir} was exported from a different model: "
                                 + ", ".join(f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in differ[:3]))
    model = load_graph(onnx_dir)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in tensor.external_data}
        data = onnx_dir / where.get("location", "")
        end = int(where.get("offset", 0)) + int(where.get("length", 0))
        if not data.is_file() or data.stat().st_size < end:
            raise DSAExportError(f"{data}: missing or truncated (tensor '{tensor.name}' ends at byte {end:,}); "
                                 f"re-run the export")
    if [v.name for v in model.graph.input] != [t.name for t in io.inputs]:
        raise DSAExportError(f"{onnx_dir}: model.onnx and io.json disagree on the graph inputs; re-run the export")
    return io


def check_exports(build_dir: Path, config=None) -> list[GraphIO]:
    """`check_export_dir` for every export of a build (one graph, or its pipeline stages), and the stages run the
    model's layers in order, each once."""
    from dsa_export.exporter.graph_io import stage_dirs

    dirs = stage_dirs(Path(build_dir))
    ios = [check_export_dir(d, config) for d in dirs]
    start = 0
    for d, io in zip(dirs, ios):
        if io.layers[0] != start or io.capacity != ios[0].capacity or io.cache_dtype != ios[0].cache_dtype:
            raise DSAExportError(f"{d}: layers {io.layers[0]}:{io.layers[1]} (capacity {io.capacity}, "
                                 f"{io.cache_dtype}) do not continue the stages before it; re-run the export")
        start = io.layers[1]
    if start != ios[-1].model_layers:
        raise DSAExportError(f"{build_dir}: the stages end at layer {start} of {ios[-1].model_layers}; re-run the "
                             f"export")
    return ios
