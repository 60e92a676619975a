"""ONNX side of the `dsa::` ops: schemas (from the contracts), torch.onnx translations, standard-op decompositions.

Each op becomes one `dsa::<Name>` node carrying its attributes, `plugin_namespace="dsa"` (TensorRT imports it as our
plugin) and `aot=1` (its ahead-of-time implementation). The decomposition is appended to the model as a local
function with the same domain and name, so ONNX Runtime (or any consumer without the plugin) runs the file as is
(toolchain.md §1.6). The exporter always inlines script functions, hence: a plain translation that emits the bare
node (needs the registered schema, §1.2 style 2), and the functions added after export.

The decompositions have the costs of a real implementation, not of the readable semantics:
- LightningIndexer and SparseMLA run over tiles of tokens (a Loop whose scan output collects the tiles; a step whose
  tokens fit one tile, every decode step, runs the tile directly), the tile height chosen in the graph so that one
  tile's gathered keys and scores stay within TILE_BYTES: a prefill never holds the [S, HI, T] score tensor; each
  token gathers its own sequence's keys a whole block at a time through the block table, only up to the tile's last
  position (a single token whose keys fill at least four fifths of the pool scores the pool in place instead: no copy of
  a long context's keys); WriteCache is one ScatterND of the rows at their slots.
- RoutedExperts loops over the experts some token chose (at most min(E, N·k)), running each once on its tokens; a
  step of few tokens (N·k <= E: decode) runs every (token, slot) pair as one batched MatMul instead.
ONNX Runtime on the CPU runs a copy of the graph (onnxruntime_cpu_graph, as TensorRT builds split_indexer's) in which a
few tokens' RoutedExperts is its fused MoE kernel and the indexer's TopK leaves its k keys unsorted.
Helper functions live in the `dsa.impl` domain. Everything is opset 24.
"""

from __future__ import annotations

import onnx
import onnx.numpy_helper
import onnxscript
from onnx import TensorProto
from onnx import helper as oh
from onnx.defs import OpSchema
from onnxscript import FLOAT, INT32, INT64
from onnxscript.values import Opset

from dsa_export.contracts import (CONTRACTS, INDEXER_CHUNKS, INDEXER_MERGE, INDEXER_SPLIT_ROWS, LIGHTNING_INDEXER,
                                  ROUTED_EXPERTS, ROUTED_EXPERTS_FP8, SPARSE_MLA, WRITE_CACHE, OpContract)
from dsa_export.formats import of

OPSET = 24
DSA_DOMAIN = "dsa"
IMPL_DOMAIN = "dsa.impl"  # helper functions of the decompositions
PLUGIN_NAMESPACE = "dsa"
op = Opset("", OPSET)
DSA = Opset(DSA_DOMAIN, 1)
IMPL = Opset(IMPL_DOMAIN, 1)
MASKED = -1e30  # finite "−inf" for masked scores: keeps Softmax free of NaN on empty rows
TILE_BYTES = 256 << 20  # fp32 scores of one query tile in the tiled decompositions



def _e4m3_table() -> onnx.TensorProto:
    """The value of each of the 256 FP8 e4m3fn codes (contracts.FP8_BYTES: int8), in the order of the codes as int8
    (-128 first), to decode gathered expert weights: value of code c = table[c + 128]."""
    import ml_dtypes
    import numpy as np

    values = np.arange(-128, 128, dtype=np.int8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return onnx.numpy_helper.from_array(values, "e4m3_values")


E4M3_VALUES = _e4m3_table()
ATTR_TYPES = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}
# Node attributes for TensorRT's importer: the plugin namespace, and the AOT (not JIT) implementation. Not plugin fields.
TRT_ATTRIBUTES = {"plugin_namespace": PLUGIN_NAMESPACE, "aot": 1}
TRT_ATTRIBUTE_TYPES = {"plugin_namespace": OpSchema.AttrType.STRING, "aot": OpSchema.AttrType.INT}


# ---- schemas ----------------------------------------------------------------------------------------------------------
def _shape_inference(contract: OpContract):
    """Output types from the contract: named dims copied from the inputs (or int attributes), dtype by its rule."""

    def infer(ctx) -> None:
        shapes, elem = {}, {}
        for i, spec in enumerate(contract.inputs):
            tensor_type = ctx.get_input_type(i).tensor_type
            elem[spec.name] = tensor_type.elem_type
            if tensor_type.HasField("shape"):
                shapes[spec.name] = list(tensor_type.shape.dim)
        attributes = {a.name: onnx.TensorShapeProto.Dimension(dim_value=ctx.get_attribute(a.name).i)
                      for a in contract.attributes if a.type == "int" and ctx.get_attribute(a.name) is not None}
        dims = contract.named_dims(shapes, attributes)
        for i, spec in enumerate(contract.outputs):
            dtype = contract.output_dtype(elem, i)
            out = onnx.TypeProto()
            out.tensor_type.elem_type = dtype if isinstance(dtype, int) else of(dtype).onnx
            if all(d in dims for d in spec.dims):
                out.tensor_type.shape.dim.extend(contract.output_dims(dims, i))
            ctx.set_output_type(i, out)

    return infer


def onnx_schema(contract: OpContract) -> OpSchema:
    constraints, inputs, outputs = [], [], []
    for arg, params in ((contract.inputs, inputs), (contract.outputs, outputs)):
        for t in arg:
            kind, value = t.dtype_rule
            if kind == "like":
                type_var = f"T_{value}"
            else:
                type_var = f"T_{t.name}"
                constraints.append((type_var, [of(d).onnx_type for d in t.dtypes], t.doc))
            params.append(OpSchema.FormalParameter(t.name, type_var, t.doc))
    attributes = [OpSchema.Attribute(a.name, ATTR_TYPES[a.type], a.doc) for a in contract.attributes]
    attributes += [OpSchema.Attribute(name, kind, "TensorRT import hint", required=False)
                   for name, kind in TRT_ATTRIBUTE_TYPES.items()]
    schema = OpSchema(contract.onnx_name, contract.domain, contract.version, contract.doc, inputs=inputs,
                      outputs=outputs, type_constraints=constraints, attributes=attributes)
    schema.set_type_and_shape_inference_function(_shape_inference(contract))
    return schema


def register_schemas() -> None:
    """Make `dsa::*` known to onnx (checker, shape inference) and to onnxscript's op builders; idempotent."""
    for contract in CONTRACTS:
        if not onnx.defs.has(contract.onnx_name, contract.domain):
            onnx.defs.register_schema(onnx_schema(contract))


# ---- translations: torch.ops.dsa.* → one custom node -------------------------------------------------------------
def _lightning_indexer_node(q, k, w, positions, sequence, block_tables, topk: int, block_size: int):
    return DSA.LightningIndexer(q, k, w, positions, sequence, block_tables, topk=topk, block_size=block_size,
                                **TRT_ATTRIBUTES)


def _sparse_mla_node(q, kv, indices, scale: float, dv: int):
    return DSA.SparseMLA(q, kv, indices, scale=scale, dv=dv, **TRT_ATTRIBUTES)


def _routed_experts_node(x, experts, weights, gate_up, down, base):
    return DSA.RoutedExperts(x, experts, weights, gate_up, down, base, **TRT_ATTRIBUTES)


def _routed_experts_fp8_node(x, experts, weights, gate_up, gate_up_scale, down, down_scale, base, block_out: int,
                             block_in: int):
    return DSA.RoutedExpertsFP8(x, experts, weights, gate_up, gate_up_scale, down, down_scale, base,
                                block_out=block_out, block_in=block_in, **TRT_ATTRIBUTES)


def _write_cache_node(cache, rows, slots):
    return DSA.WriteCache(cache, rows, slots, **TRT_ATTRIBUTES)


def translation_table() -> dict:
    import torch

    import dsa_export.kernels.registration  # noqa: F401  (registers torch.ops.dsa.*)

    register_schemas()
    return {torch.ops.dsa.lightning_indexer.default: _lightning_indexer_node,
            torch.ops.dsa.sparse_mla.default: _sparse_mla_node,
            torch.ops.dsa.routed_experts.default: _routed_experts_node,
            torch.ops.dsa.routed_experts_fp8.default: _routed_experts_fp8_node,
            torch.ops.dsa.write_cache.default: _write_cache_node}


def split_indexer(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` as TensorRT builds it: every dsa::LightningIndexer node replaced by dsa::IndexerChunks (the
    top-k of each chunk of a token's keys) and dsa::IndexerMerge (the token's top-k from its chunks' lists), the two
    kernels a TensorRT plugin cannot launch as one (contracts.py). Same inputs, same output name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.domain != DSA_DOMAIN or node.op_type != LIGHTNING_INDEXER.onnx_name:
            nodes.append(node)
            continue
        attributes = {a.name: oh.get_attribute_value(a) for a in node.attribute}
        attributes = {k: v.decode() if isinstance(v, bytes) else v for k, v in attributes.items()}
        attributes["split_rows"] = INDEXER_SPLIT_ROWS
        candidates = f"{node.output[0]}/candidates"
        paging = list(node.input[3:6])  # positions, sequence, block_tables
        nodes.append(oh.make_node(INDEXER_CHUNKS.onnx_name, list(node.input), [candidates], f"{node.name}/chunks",
                                  domain=DSA_DOMAIN, **attributes))
        nodes.append(oh.make_node(INDEXER_MERGE.onnx_name, [candidates, *paging], list(node.output),
                                  f"{node.name}/merge", domain=DSA_DOMAIN, **attributes))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _int64_constant(name: str, values: list[int]) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [name], value=oh.make_tensor(name, TensorProto.INT64, [len(values)], values))


ORT_DOMAIN = "com.microsoft"  # ONNX Runtime's own (contrib) ops
FUSED_EXPERTS_PAIRS = 4  # (token, expert) pairs per expert up to which ONNX Runtime's MoE kernel beats the loop


def onnxruntime_cpu_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` as ONNX Runtime runs it on the CPU: every float32 dsa::RoutedExperts whose k is known runs
    a step of few tokens (N·k <= FUSED_EXPERTS_PAIRS·E: decode) as ONNX Runtime's fused CPU kernel,
    com.microsoft::MoE, one node where the decomposition runs dozens; more tokens keep the decomposition's loop over
    experts, which that kernel does not beat (E=32, k=4, H=256, I=128, one thread: 115 -> 60 µs for 1 token,
    1,844 -> 987 µs for 32, 3,561 -> 3,772 µs for 128). The exported file keeps the portable decomposition; this
    copy lives in memory (or in the model repository, without the weights).
    MoE takes its top-k from softmax(router_probs) and weights each expert by it: fed log(weight) at the chosen
    experts and −inf elsewhere, it weights by w/Σw, so its output times Σw is ours whatever the weights sum to. Its
    SwiGLU wants each expert's gate and up rows interleaved: a Reshape/Transpose of the weight initializer, which
    ONNX Runtime folds once when the session starts.
    The indexer's TopK returns its k keys unsorted (sorted=0: TensorRT's TopK wants 1, hence only in this copy):
    the contract leaves the order open, and ONNX Runtime then skips sorting them (a 1K prefill's [1024, 1024] top-256:
    22 -> 11 ms)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    shapes = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input]}
    nodes = []
    for node in graph.node:
        x, experts, weights, gate_up, down, base = (list(node.input) + [""] * 6)[:6]
        k = shapes[experts].shape.dim[1].dim_value if experts in shapes and len(shapes[experts].shape.dim) == 2 else 0
        if (node.domain != DSA_DOMAIN or node.op_type != ROUTED_EXPERTS.onnx_name or gate_up not in initializers
                or initializers[gate_up].data_type != TensorProto.FLOAT or not k):
            nodes.append(node)
            continue
        num_experts, rows, hidden = initializers[gate_up].dims
        name = node.name or node.output[0]

        def const(suffix: str, values: list, into: list) -> str:
            into.append(_int64_constant(f"{name}/{suffix}", values))
            return f"{name}/{suffix}"

        def add(op_type: str, inputs: list[str], suffix: str, into: list, domain: str = "", **attributes) -> str:
            into.append(oh.make_node(op_type, inputs, [f"{name}/{suffix}"], f"{name}/{suffix}", domain=domain,
                                     **attributes))
            return f"{name}/{suffix}"

        split = add("Reshape", [gate_up, const("split_shape", [num_experts, 2, rows // 2, hidden], nodes)], "split",
                    nodes)  # in the graph, not the branch: folded once
        pairs = add("Transpose", [split], "pairs", nodes, perm=[0, 2, 1, 3])  # [E, I, 2, H]: gate row i, up row i
        interleaved = add("Reshape", [pairs, const("gate_up_shape", [num_experts, rows, hidden], nodes)],
                          "interleaved", nodes)
        fused = []
        probs_shape = add("Concat", [add("Shape", [x], "tokens", fused, end=1),
                                     const("experts", [num_experts], fused)], "probs_shape", fused, axis=0)
        unchosen = add("ConstantOfShape", [probs_shape], "unchosen", fused,
                       value=oh.make_tensor("minus_inf", TensorProto.FLOAT, [1], [float("-inf")]))
        probs = add("ScatterElements", [unchosen, experts, add("Log", [weights], "log_weights", fused)], "probs",
                    fused, axis=1)
        mixed = add("MoE", [x, probs, interleaved, "", down], "moe", fused, domain=ORT_DOMAIN, k=k,
                    activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                    normalize_routing_weights=0)
        total = add("ReduceSum", [weights, const("slots", [1], fused)], "total", fused, keepdims=1)
        fused.append(oh.make_node("Add", [base, add("Mul", [mixed, total], "scaled", fused)], [f"{name}/fused_out"]))
        looped = oh.make_node(node.op_type, list(node.input), [f"{name}/looped_out"], f"{name}/looped",
                              domain=node.domain)
        few = add("LessOrEqual", [add("Size", [experts], "pairs_count", nodes),
                                  const("most_pairs", [FUSED_EXPERTS_PAIRS * num_experts], nodes)], "few", nodes)
        nodes.append(oh.make_node(
            "If", [add("Squeeze", [few], "few_scalar", nodes)], list(node.output), name,
            then_branch=oh.make_graph(fused, f"{name}/fused", [], [onnx.ValueInfoProto(name=f"{name}/fused_out")]),
            else_branch=oh.make_graph([looped], f"{name}/loop", [],
                                      [onnx.ValueInfoProto(name=f"{name}/looped_out")])))
    del graph.node[:]
    graph.node.extend(nodes)
    for function in out.functions:  # the indexer's top-k in any order (its contract): TopK skips sorting the k
        if function.domain == IMPL_DOMAIN and function.name == IndexerTokens.name:
            for topk in (n for n in function.node if n.op_type == "TopK"):
                kept = [a for a in topk.attribute if a.name != "sorted"]
                del topk.attribute[:]
                topk.attribute.extend([*kept, oh.make_attribute("sorted", 0)])
    if not any(o.domain == ORT_DOMAIN for o in out.opset_import):
        out.opset_import.append(oh.make_opsetid(ORT_DOMAIN, 1))
    return out


# ---- decompositions, part 1: one tile of tokens (dsa.impl helpers) -------------------------------------------------
@onnxscript.script(IMPL, default_opset=op)
def TileRows(per_row_bytes: INT64, num_rows: INT64, budget: int) -> INT64:
    """Tokens per tile: as many as fit `budget` bytes, at least 1, at most all ([1] int64)."""
    rows = op.Div(op.Reshape(op.Constant(value_int=budget), op.Constant(value_ints=[1])), per_row_bytes)
    return op.Max(op.Min(rows, num_rows), op.Constant(value_ints=[1]))


@onnxscript.script(IMPL, default_opset=op)
def RowSlice(x: FLOAT, index: INT64, rows: INT64) -> FLOAT:
    """Rows [index·rows, index·rows + rows) of x along axis 0 (fewer at the end)."""
    start = op.Mul(op.Unsqueeze(index, op.Constant(value_ints=[0])), rows)
    return op.Slice(x, start, op.Add(start, rows), op.Constant(value_ints=[0]))


@onnxscript.script(IMPL, default_opset=op)
def PadRows(x: FLOAT, rows: INT64, value: float) -> FLOAT:
    """Pad axis 0 of a tensor to `rows` (the last tile is shorter; every scan output must match)."""
    rank = op.Shape(op.Shape(x))  # [1]
    missing = op.Sub(rows, op.Shape(x, start=0, end=1))
    pads = op.ConstantOfShape(op.Mul(rank, op.Constant(value_ints=[2])),
                              value=onnx.helper.make_tensor("zero", TensorProto.INT64, [1], [0]))
    pads = op.ScatterElements(pads, rank, missing)  # end of axis 0
    return op.Pad(x, pads, op.CastLike(op.Constant(value_float=value), x))


@onnxscript.script(IMPL, default_opset=op)
def KeyBlocks(sequence: INT32, block_tables: INT32, num_keys: INT64, block_size: int) -> INT64:
    """[R, ceil(num_keys / block_size)]: the pool blocks holding keys t < num_keys of each token's sequence
    (models/cache.py); key t sits at row blocks[t // block_size]·block_size + t % block_size."""
    bs = op.Constant(value_int=block_size)
    used = op.Reshape(op.Div(op.Sub(op.Add(num_keys, bs), op.Constant(value_int=1)), bs), op.Constant(value_ints=[1]))
    tables = op.Gather(block_tables, op.Cast(sequence, to=TensorProto.INT64), axis=0)  # [R, M]
    return op.Cast(op.Slice(tables, op.Constant(value_ints=[0]), used, op.Constant(value_ints=[1])),
                   to=TensorProto.INT64)


@onnxscript.script(IMPL, default_opset=op)
def IndexScores(q: FLOAT, k: FLOAT, w: FLOAT, sequence: INT32, blocks: INT64, block_size: int) -> FLOAT:
    """Σ_h w·ReLU(q·k) [R, T] of each token against its sequence's keys, gathered whole blocks at a time (T =
    B·block_size >= the keys seen; the caller masks the tail). Several tokens of one sequence (a prefill) gather
    its keys once and score all their R·HI heads in one GEMM. Else (a decode step) each token gathers its own keys,
    and they are the GEMM's left operand, streamed once, q the small packed one: with q on the left, ONNX Runtime
    packs all T keys for each token's 8 heads (a decode step at 32K ran at a third of the speed). One token whose
    keys fill at least four fifths of the pool (one long sequence) scores the whole pool in place and keeps its keys'
    scores:
    the gather copied every key once more (a 32K decode step, one thread: 7.36 -> 6.03 ms); the other rows' scores
    are dropped."""
    bs = op.Reshape(op.Constant(value_int=block_size), op.Constant(value_ints=[1]))
    width = op.Shape(k, start=1, end=2)
    tokens = op.Squeeze(op.Shape(q, start=0, end=1))
    seen_rows = op.Squeeze(op.Mul(op.Shape(blocks, start=1, end=2), bs))
    pool_rows = op.Squeeze(op.Shape(k, start=0, end=1))
    if op.And(op.Equal(tokens, op.Constant(value_int=1)),  # 4·pool <= 5·keys: pays at 32K (1.0x), not at 16K (2x)
              op.LessOrEqual(op.Mul(pool_rows, op.Constant(value_int=4)), op.Mul(seen_rows, op.Constant(value_int=5)))):
        per_head = op.Relu(op.MatMul(op.Cast(k, to=TensorProto.FLOAT),
                                     op.Transpose(op.Squeeze(q, op.Constant(value_ints=[0])), perm=[1, 0])))
        per_row = op.MatMul(per_head, op.Reshape(w, op.Constant(value_ints=[-1, 1])))  # [P, 1]
        per_block = op.Reshape(per_row, op.Concat(op.Constant(value_ints=[-1]), bs, axis=0))  # [pool blocks, bs]
        scores = op.Reshape(op.Gather(per_block, blocks, axis=0), op.Constant(value_ints=[1, -1]))  # whole blocks
    else:
        by_block = op.Reshape(k, op.Concat(op.Constant(value_ints=[-1]), bs, width, axis=0))  # [pool blocks, bs, DI]
        one_sequence = op.Equal(op.ReduceMin(sequence, keepdims=0), op.ReduceMax(sequence, keepdims=0))
        if op.And(one_sequence, op.Greater(tokens, op.Constant(value_int=1))):
            keys = op.Gather(by_block, op.Gather(blocks, op.Constant(value_int=0), axis=0), axis=0)  # [B, bs, DI]
            keys = op.Cast(op.Reshape(keys, op.Concat(op.Constant(value_ints=[-1]), width, axis=0)),
                           to=TensorProto.FLOAT)
            per_head = op.Relu(op.MatMul(q, op.Transpose(keys, perm=[1, 0])))  # [R, HI, T]
            scores = op.Squeeze(op.MatMul(op.Unsqueeze(w, op.Constant(value_ints=[1])), per_head),
                                op.Constant(value_ints=[1]))
        else:
            keys = op.Gather(by_block, blocks, axis=0)  # [R, B, bs, DI]
            keys = op.Cast(op.Reshape(keys, op.Concat(op.Shape(blocks, start=0, end=1), op.Constant(value_ints=[-1]),
                                                       width, axis=0)), to=TensorProto.FLOAT)
            per_head = op.Relu(op.MatMul(keys, op.Transpose(q, perm=[0, 2, 1])))  # [R, T, HI]
            scores = op.Squeeze(op.MatMul(per_head, op.Unsqueeze(w, op.Constant(value_ints=[-1]))),
                                op.Constant(value_ints=[-1]))
    return scores


@onnxscript.script(IMPL, default_opset=op)
def IndexerTokens(q: FLOAT, k: FLOAT, w: FLOAT, positions: INT64, sequence: INT32, block_tables: INT32, topk: int,
                  block_size: int) -> INT32:
    """The indexer over all the tokens given ([R, topk] pool rows, -1 = none): a tile, or a whole decode step."""
    pos = op.Cast(positions, to=TensorProto.INT64)  # [R]
    num_keys = op.Add(op.ReduceMax(pos, keepdims=0), op.Constant(value_int=1))  # keys this tile can see
    seen = op.Reshape(num_keys, op.Constant(value_ints=[1]))
    bs = op.Constant(value_int=block_size)
    blocks = IMPL.KeyBlocks(sequence, block_tables, num_keys, block_size=block_size)  # [R, B]
    scores = IMPL.IndexScores(op.Cast(q, to=TensorProto.FLOAT), k, op.Cast(w, to=TensorProto.FLOAT), sequence,
                              blocks, block_size=block_size)  # Σ_h w·ReLU(q·k): [R, T]
    key_ids = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(scores, start=1, end=2)),
                       op.Constant(value_int=1))
    visible = op.LessOrEqual(key_ids, op.Unsqueeze(pos, op.Constant(value_ints=[-1])))
    neg_inf = op.Constant(value_float=float("-inf"))
    masked = op.Where(visible, scores, neg_inf)
    want = op.Reshape(op.Constant(value_int=topk), op.Constant(value_ints=[1]))
    kept = op.Min(want, seen)
    top_scores, top_keys = op.TopK(masked, kept, axis=-1)  # ONNX TopK: ties → lower index first
    key_rows = op.Add(op.Mul(op.GatherElements(blocks, op.Div(top_keys, bs), axis=1), bs), op.Mod(top_keys, bs))
    chosen = op.Where(op.Equal(top_scores, neg_inf), op.Constant(value_int=-1), key_rows)  # the keys' pool rows
    padded = op.Pad(chosen, op.Concat(op.Constant(value_ints=[0, 0, 0]), op.Sub(want, kept), axis=0),
                    op.Constant(value_int=-1))
    return op.Cast(padded, to=TensorProto.INT32)


@onnxscript.script(IMPL, default_opset=op)
def IndexerTile(q: FLOAT, k: FLOAT, w: FLOAT, positions: INT64, sequence: INT32, block_tables: INT32, index: INT64,
                rows: INT64, topk: int, block_size: int) -> INT32:
    """Tile `index` of `rows` tokens, padded to `rows` (a Loop's scan outputs all have one shape)."""
    chosen = IMPL.IndexerTokens(IMPL.RowSlice(q, index, rows), k, IMPL.RowSlice(w, index, rows),
                                IMPL.RowSlice(positions, index, rows), IMPL.RowSlice(sequence, index, rows),
                                block_tables, topk=topk, block_size=block_size)
    return IMPL.PadRows(chosen, rows, value=-1.0)


@onnxscript.script(IMPL, default_opset=op)
def IndexerRows(q: FLOAT, positions: INT64, budget: int) -> INT64:
    """Each token gathers its sequence's keys and scores them per head: fp32 [T, DI + HI] and int64 rows [T]."""
    seen = op.Add(op.ReduceMax(op.Cast(positions, to=TensorProto.INT64), keepdims=1), op.Constant(value_int=1))
    per_key = op.Add(op.Mul(op.Add(op.Shape(q, start=1, end=2), op.Shape(q, start=2, end=3)),
                            op.Constant(value_ints=[4])), op.Constant(value_ints=[8]))
    per_row = op.Mul(op.Reshape(seen, op.Constant(value_ints=[1])), per_key)
    return IMPL.TileRows(per_row, op.Shape(q, start=0, end=1), budget=budget)


@onnxscript.script(IMPL, default_opset=op)
def SparseMLATokens(q: FLOAT, kv: FLOAT, indices: INT32, scale: float, dv: int) -> FLOAT:
    """Sparse MLA over all the tokens given ([R, H, dv]): a tile, or a whole decode step."""
    q_tile = op.Cast(q, to=TensorProto.FLOAT)  # [R, H, DK]
    idx = indices  # [R, K] pool rows
    zero = op.CastLike(op.Constant(value_int=0), idx)
    pool_rows = op.CastLike(op.Shape(kv, start=0, end=1), idx)
    valid = op.And(op.GreaterOrEqual(idx, zero), op.Less(idx, pool_rows))  # a row outside the pool: an empty slot
    # an empty slot reads a row the token owns (its first valid slot's), never another sequence's or a free block's:
    # its weight is 0, and 0·x leaks nothing of a finite row but NaN of a non-finite one. Cheaper than zeroing the
    # gathered rows, [R, K, DK] (a fifth of a prefill's time).
    own = op.GatherElements(idx, op.ArgMax(op.Cast(valid, to=TensorProto.INT32), axis=1, keepdims=1), axis=1)
    last = op.Sub(pool_rows, op.CastLike(op.Constant(value_int=1), idx))
    rows = op.Min(op.Max(op.Where(valid, idx, own), zero), last)
    selected = op.Cast(op.Gather(kv, op.Cast(rows, to=TensorProto.INT64), axis=0), to=TensorProto.FLOAT)  # [R, K, DK]
    logits = op.Mul(op.MatMul(q_tile, op.Transpose(selected, perm=[0, 2, 1])), op.Constant(value_float=scale))
    valid_heads = op.Unsqueeze(valid, op.Constant(value_ints=[1]))  # [R, 1, K]
    probs = op.Softmax(op.Where(valid_heads, logits, op.Constant(value_float=MASKED)), axis=-1)
    probs = op.Mul(probs, op.Cast(valid_heads, to=TensorProto.FLOAT))  # an empty row stays all zeros
    value_end = op.Reshape(op.Constant(value_int=dv), op.Constant(value_ints=[1]))
    out = op.MatMul(probs, selected)  # [R, H, DK]: cutting the [R, H] result costs less than the [R, K] values
    # a token without a valid slot read row 0 in all of them: its output is zeros, whatever that row holds
    any_valid = op.Unsqueeze(op.ReduceMax(op.Cast(valid, to=TensorProto.INT32), op.Constant(value_ints=[1]),
                                          keepdims=1), op.Constant(value_ints=[2]))  # [R, 1, 1]
    out = op.Where(op.Cast(any_valid, to=TensorProto.BOOL), out, op.Constant(value_float=0.0))
    return op.CastLike(op.Slice(out, op.Constant(value_ints=[0]), value_end, op.Constant(value_ints=[-1])), q)


@onnxscript.script(IMPL, default_opset=op)
def SparseMLATile(q: FLOAT, kv: FLOAT, indices: INT32, index: INT64, rows: INT64, scale: float, dv: int) -> FLOAT:
    """Tile `index` of `rows` tokens, padded to `rows`."""
    out = IMPL.SparseMLATokens(IMPL.RowSlice(q, index, rows), kv, IMPL.RowSlice(indices, index, rows), scale=scale,
                               dv=dv)
    return IMPL.PadRows(out, rows, value=0.0)


@onnxscript.script(IMPL, default_opset=op)
def SparseMLARows(q: FLOAT, indices: INT32, budget: int) -> INT64:
    per_row = op.Mul(op.Shape(indices, start=1, end=2),
                     op.Mul(op.Add(op.Shape(q, start=2, end=3), op.Shape(q, start=1, end=2)),
                            op.Constant(value_ints=[12])))  # gathered rows + scores/probs, fp32
    return IMPL.TileRows(per_row, op.Shape(q, start=0, end=1), budget=budget)


@onnxscript.script(DSA, default_opset=op)
def WriteCache(cache: FLOAT, rows: FLOAT, slots: INT64) -> FLOAT:
    """ScatterND writes the rows at their slots: in place when ONNX Runtime is given one buffer as the cache and the
    output (IOBinding), as the runtimes here do."""
    return op.ScatterND(cache, op.Unsqueeze(slots, op.Constant(value_ints=[-1])), op.CastLike(rows, cache))


# ---- decompositions, part 2: the routed experts ---------------------------------------------------------------------
@onnxscript.script(IMPL, default_opset=op)
def ExpertMLP(x: FLOAT, gate_up: FLOAT, down: FLOAT) -> FLOAT:
    """SwiGLU of one expert on its tokens: projections rounded to x's dtype, activation in fp32, fp32 result."""
    gu = op.MatMul(x, op.Transpose(gate_up, perm=[1, 0]))  # [m, 2I]
    gate, up = op.Split(op.Cast(gu, to=TensorProto.FLOAT), num_outputs=2, axis=-1)
    h = op.CastLike(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), x)
    return op.MatMul(op.Cast(h, to=TensorProto.FLOAT), op.Transpose(op.Cast(down, to=TensorProto.FLOAT), perm=[1, 0]))


@onnxscript.script(IMPL, default_opset=op)
def Dequantize(weight: FLOAT, scale: FLOAT, like: FLOAT, rows: INT64, block_out: int, block_in: int) -> FLOAT:
    """[P·rows, cols] FP8 e4m3 codes (int8) → like's dtype: W8·scale per block, each of the P projections with its
    own row blocks (contracts.fp8_scale_shape)."""
    bo = op.Constant(value_int=block_out)
    bi = op.Constant(value_int=block_in)
    total = op.Squeeze(op.Shape(weight, start=0, end=1))
    r = op.Range(op.Constant(value_int=0), total, op.Constant(value_int=1))
    per_projection = op.Div(op.Sub(op.Add(op.Squeeze(rows), bo), op.Constant(value_int=1)), bo)
    row_block = op.Add(op.Mul(op.Div(r, op.Squeeze(rows)), per_projection), op.Div(op.Mod(r, op.Squeeze(rows)), bo))
    c = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(weight, start=1, end=2)), op.Constant(value_int=1))
    full_scale = op.Gather(op.Gather(scale, row_block, axis=0), op.Div(c, bi), axis=1)
    codes = op.Cast(weight, to=TensorProto.INT32)
    codes = op.Add(codes, op.CastLike(op.Constant(value_int=128), codes))  # -128..127 → 0..255
    values = op.Gather(op.Constant(value=E4M3_VALUES), codes, axis=0)
    return op.CastLike(op.Mul(values, full_scale), like)


@onnxscript.script(IMPL, default_opset=op)
def ExpertsPerPair(x: FLOAT, experts: INT32, weights: FLOAT, gate_up: FLOAT, down: FLOAT, base: FLOAT) -> FLOAT:
    """A few tokens (N·k <= E, a decode step): every (token, slot) pair gathers its expert's weights and all pairs
    run as two batched MatMuls, a dozen nodes whatever k is. The weights gathered, N·k experts' worth, are no more
    than the loop over experts would read (at most E)."""
    slots = op.Shape(experts, start=1, end=2)
    flat = op.Reshape(op.Cast(experts, to=TensorProto.INT64), op.Constant(value_ints=[-1]))  # [P = N·k]
    pair_shape = op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=1, end=2), op.Constant(value_ints=[1]),
                           axis=0)
    xs = op.Reshape(op.Expand(op.Unsqueeze(x, op.Constant(value_ints=[1])), op.Concat(
        op.Shape(x, start=0, end=1), slots, op.Shape(x, start=1, end=2), axis=0)), pair_shape)  # [P, H, 1]
    gu = op.Cast(op.MatMul(op.Gather(gate_up, flat, axis=0), xs), to=TensorProto.FLOAT)  # [P, 2I, 1]
    gate, up = op.Split(gu, num_outputs=2, axis=1)
    h = op.Cast(op.CastLike(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), x), to=TensorProto.FLOAT)
    y = op.MatMul(op.Cast(op.Gather(down, flat, axis=0), to=TensorProto.FLOAT), h)  # [P, H, 1]
    weighted = op.Mul(y, op.Reshape(weights, op.Constant(value_ints=[-1, 1, 1])))
    per_token = op.Reshape(weighted, op.Concat(op.Shape(experts), op.Shape(x, start=1, end=2), axis=0))  # [N, k, H]
    return op.Add(op.Cast(base, to=TensorProto.FLOAT), op.ReduceSum(per_token, op.Constant(value_ints=[1]),
                                                                      keepdims=0))


@onnxscript.script(IMPL, default_opset=op)
def ExpertsByExpert(x: FLOAT, experts: INT32, weights: FLOAT, gate_up: FLOAT, down: FLOAT, base: FLOAT) -> FLOAT:
    """Many tokens: a loop over the experts some token chose, each run once on its tokens."""
    slots = op.Shape(experts, start=1, end=2)
    flat = op.Reshape(op.Cast(experts, to=TensorProto.INT64), op.Constant(value_ints=[-1]))  # (token, slot) pairs
    flat_weights = op.Reshape(weights, op.Constant(value_ints=[-1]))
    routed = op.ScatterElements(op.ConstantOfShape(op.Shape(gate_up, start=0, end=1)), flat,
                                op.Expand(op.Constant(value_float=1.0), op.Shape(flat)), reduction="add")
    active = op.Reshape(op.NonZero(routed), op.Constant(value_ints=[-1]))  # experts some token chose
    out = op.Cast(base, to=TensorProto.FLOAT)
    for i in range(op.Squeeze(op.Shape(active))):
        expert = op.Gather(active, i)
        pairs = op.Reshape(op.NonZero(op.Equal(flat, expert)), op.Constant(value_ints=[-1]))
        tokens = op.Div(pairs, slots)
        y = IMPL.ExpertMLP(op.Gather(x, tokens, axis=0), op.Gather(gate_up, expert, axis=0),
                           op.Gather(down, expert, axis=0))
        weighted = op.Mul(y, op.Unsqueeze(op.Gather(flat_weights, pairs), op.Constant(value_ints=[-1])))
        out = op.ScatterND(out, op.Unsqueeze(tokens, op.Constant(value_ints=[-1])), weighted, reduction="add")
    return out


@onnxscript.script(DSA, default_opset=op)
def RoutedExperts(x: FLOAT, experts: INT32, weights: FLOAT, gate_up: FLOAT, down: FLOAT, base: FLOAT) -> FLOAT:
    if op.LessOrEqual(op.Size(experts), op.Squeeze(op.Shape(gate_up, start=0, end=1))):
        out = IMPL.ExpertsPerPair(x, experts, weights, gate_up, down, base)
    else:
        out = IMPL.ExpertsByExpert(x, experts, weights, gate_up, down, base)
    return out


@onnxscript.script(DSA, default_opset=op)
def RoutedExpertsFP8(x: FLOAT, experts: INT32, weights: FLOAT, gate_up: FLOAT, gate_up_scale: FLOAT, down: FLOAT,
                     down_scale: FLOAT, base: FLOAT, block_out: int, block_in: int) -> FLOAT:
    inter = op.Shape(down, start=2, end=3)
    hidden = op.Shape(down, start=1, end=2)
    slots = op.Shape(experts, start=1, end=2)
    flat = op.Reshape(op.Cast(experts, to=TensorProto.INT64), op.Constant(value_ints=[-1]))
    flat_weights = op.Reshape(weights, op.Constant(value_ints=[-1]))
    routed = op.ScatterElements(op.ConstantOfShape(op.Shape(gate_up, start=0, end=1)), flat,
                                op.Expand(op.Constant(value_float=1.0), op.Shape(flat)), reduction="add")
    active = op.Reshape(op.NonZero(routed), op.Constant(value_ints=[-1]))
    out = op.Cast(base, to=TensorProto.FLOAT)
    for i in range(op.Squeeze(op.Shape(active))):
        expert = op.Gather(active, i)
        pairs = op.Reshape(op.NonZero(op.Equal(flat, expert)), op.Constant(value_ints=[-1]))
        tokens = op.Div(pairs, slots)
        w_gate_up = IMPL.Dequantize(op.Gather(gate_up, expert, axis=0), op.Gather(gate_up_scale, expert, axis=0), x,
                                    inter, block_out=block_out, block_in=block_in)
        w_down = IMPL.Dequantize(op.Gather(down, expert, axis=0), op.Gather(down_scale, expert, axis=0), x, hidden,
                                 block_out=block_out, block_in=block_in)
        y = IMPL.ExpertMLP(op.Gather(x, tokens, axis=0), w_gate_up, w_down)
        weighted = op.Mul(y, op.Unsqueeze(op.Gather(flat_weights, pairs), op.Constant(value_ints=[-1])))
        out = op.ScatterND(out, op.Unsqueeze(tokens, op.Constant(value_ints=[-1])), weighted, reduction="add")
    return out


# ---- decompositions, part 3: the query-tiled functions, built with a Loop whose scan output collects the tiles ------
def _attribute_ref(name: str, kind: int) -> onnx.AttributeProto:
    attr = onnx.AttributeProto(name=name, ref_attr_name=name, type=kind)
    return attr


def _tiled_function(contract: OpContract, tile: str, rows_fn: str, rows_inputs: list[str],
                    budget: int = TILE_BYTES) -> onnx.FunctionProto:
    """`contract`'s op as: rows = dsa.impl.<rows_fn>(...); if all N tokens fit one tile (a decode step), one call of
    dsa.impl.<Op>Tokens (the tile's body: no slicing, no padding); else a Loop over ceil(N / rows) tiles of tokens
    whose body computes one tile with dsa.impl.<tile> (rows padded to `rows`), the scan output [tiles, rows, ...]
    reshaped to [tiles·rows, ...] and cut to N rows."""
    names = [t.name for t in contract.inputs]
    output = contract.outputs[0].name
    attr_kinds = {"int": onnx.AttributeProto.INT, "float": onnx.AttributeProto.FLOAT}

    def impl_node(op_type: str, inputs: list[str], out: str) -> onnx.NodeProto:
        """A dsa.impl call passing on the op's attributes."""
        node = oh.make_node(op_type, inputs, [out], domain=IMPL_DOMAIN)
        node.attribute.extend(_attribute_ref(a.name, attr_kinds[a.type]) for a in contract.attributes)
        return node

    body = oh.make_graph(
        [impl_node(tile, [*names, "tile_index", "tile_rows"], "tile_out"),
         oh.make_node("Identity", ["cond_in"], ["cond_out"])],
        f"{contract.onnx_name}_tile",
        [oh.make_tensor_value_info("tile_index", TensorProto.INT64, []),
         oh.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         onnx.ValueInfoProto(name="tile_out")])  # typed by the tile function
    one_tile = oh.make_graph([impl_node(tile.removesuffix("Tile") + "Tokens", names, "one_tile_out")],
                             f"{contract.onnx_name}_one_tile", [], [onnx.ValueInfoProto(name="one_tile_out")])
    tiles = oh.make_graph([
        oh.make_node("Squeeze", ["num_tiles_1d"], ["num_tiles"]),
        oh.make_node("Loop", ["num_tiles", ""], ["tiles"], body=body),
        oh.make_node("Shape", ["tiles"], ["trailing_dims"], start=2),
        oh.make_node("Concat", ["minus_one", "trailing_dims"], ["joined_shape"], axis=0),
        oh.make_node("Reshape", ["tiles", "joined_shape"], ["joined"]),
        oh.make_node("Slice", ["joined", "zero", "num_rows", "zero"], ["tiles_out"]),
    ], f"{contract.onnx_name}_tiles", [], [onnx.ValueInfoProto(name="tiles_out")])
    nodes = [
        oh.make_node(rows_fn, rows_inputs, ["tile_rows"], domain=IMPL_DOMAIN, budget=budget),
        _int64_constant("one", [1]), _int64_constant("zero", [0]), _int64_constant("minus_one", [-1]),
        oh.make_node("Shape", [names[0]], ["num_rows"], start=0, end=1),
        oh.make_node("Add", ["num_rows", "tile_rows"], ["rows_plus"]),
        oh.make_node("Sub", ["rows_plus", "one"], ["rows_ceil"]),
        oh.make_node("Div", ["rows_ceil", "tile_rows"], ["num_tiles_1d"]),
        oh.make_node("LessOrEqual", ["num_tiles_1d", "one"], ["fits_1d"]),
        oh.make_node("Squeeze", ["fits_1d"], ["fits"]),
        oh.make_node("If", ["fits"], [output], then_branch=one_tile, else_branch=tiles),
    ]
    return oh.make_function(contract.domain, contract.onnx_name, names, [output], nodes,
                            [oh.make_opsetid("", OPSET), oh.make_opsetid(IMPL_DOMAIN, 1)],
                            attributes=[a.name for a in contract.attributes])


def _function_proto(script) -> onnx.FunctionProto:
    """The script's FunctionProto, importing every domain its nodes use (onnxscript leaves out those used only in
    loop bodies)."""
    function = script.to_function_proto()
    imported = {o.domain for o in function.opset_import}
    for domain in (IMPL_DOMAIN, DSA_DOMAIN):
        if domain not in imported:
            function.opset_import.append(oh.make_opsetid(domain, 1))
    return function


def decompositions() -> dict[str, onnx.FunctionProto]:
    """dsa op name → its decomposition; plus every dsa.impl helper under its own name."""
    functions = {
        LIGHTNING_INDEXER.onnx_name: _tiled_function(LIGHTNING_INDEXER, "IndexerTile", "IndexerRows",
                                                     ["q", "positions"]),
        SPARSE_MLA.onnx_name: _tiled_function(SPARSE_MLA, "SparseMLATile", "SparseMLARows", ["q", "indices"]),
        WRITE_CACHE.onnx_name: _function_proto(WriteCache),
        ROUTED_EXPERTS.onnx_name: _function_proto(RoutedExperts),
        ROUTED_EXPERTS_FP8.onnx_name: _function_proto(RoutedExpertsFP8),
    }
    for helper in (TileRows, RowSlice, PadRows, KeyBlocks, IndexScores, IndexerTokens, IndexerTile, IndexerRows,
                   SparseMLATokens, SparseMLATile, SparseMLARows, ExpertMLP, ExpertsPerPair, ExpertsByExpert,
                   Dequantize):
        functions[f"{IMPL_DOMAIN}.{helper.name}"] = _function_proto(helper)
    return functions


def add_decompositions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append each dsa op's decomposition (and the helpers) as model-local functions, once, so ONNX Runtime runs
    the file as is."""
    present = {(f.domain, f.name) for f in model.functions}
    for function in decompositions().values():
        if (function.domain, function.name) not in present:
            model.functions.append(function)
    imported = {o.domain for o in model.opset_import}
    for domain in (DSA_DOMAIN, IMPL_DOMAIN):
        if domain not in imported:
            model.opset_import.append(oh.make_opsetid(domain, 1))
    return model


__all__ = ["DSA_DOMAIN", "IMPL_DOMAIN", "OPSET", "PLUGIN_NAMESPACE", "TRT_ATTRIBUTES", "add_decompositions",
           "decompositions", "onnxruntime_cpu_graph", "register_schemas", "split_indexer", "translation_table"]
