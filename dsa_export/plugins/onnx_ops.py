"""ONNX side of the `dsa::` ops: schemas (from the contracts), torch.onnx translations, standard-op decompositions.

Each op becomes one `dsa::<Name>` node carrying its attributes, `plugin_namespace="dsa"` (TensorRT imports it as our
plugin) and `aot=1` (its ahead-of-time implementation). The decomposition is appended to the model as a local
function with the same domain and name, so ONNX Runtime (or any consumer without the plugin) runs the file as is
(toolchain.md §1.6). The exporter always inlines script functions, hence: a plain translation that emits the bare
node (needs the registered schema, §1.2 style 2), and the functions added after export.

The decompositions have the costs of a real implementation, not of the readable semantics:
- LightningIndexer and SparseMLA run over tiles of query rows (a Loop whose scan output collects the tiles), the
  tile height chosen in the graph so that one tile's scores stay within TILE_BYTES: a prefill never holds the
  [S, HI, T] score tensor; each tile reads only the keys up to its last position.
- RoutedExperts loops over the experts some token chose (at most min(E, N·k)), running each once on its tokens.
Helper functions live in the `dsa.impl` domain. Everything is opset 24 (TensorScatter writes the caches).
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

from dsa_export.contracts import CONTRACTS, LIGHTNING_INDEXER, ROUTED_EXPERTS, ROUTED_EXPERTS_FP8, SPARSE_MLA, OpContract
from dsa_export.formats import of

OPSET = 24  # TensorScatter (in-place cache writes) is opset 24
DSA_DOMAIN = "dsa"
IMPL_DOMAIN = "dsa.impl"  # helper functions of the decompositions
PLUGIN_NAMESPACE = "dsa"
op = Opset("", OPSET)
DSA = Opset(DSA_DOMAIN, 1)
IMPL = Opset(IMPL_DOMAIN, 1)
MASKED = -1e30  # finite "−inf" for masked scores: keeps Softmax free of NaN on empty rows
TILE_BYTES = 256 << 20  # fp32 scores of one query tile in the tiled decompositions



def _e4m3_table() -> onnx.TensorProto:
    """The value of each of the 256 FP8 e4m3fn codes (contracts.FP8_BYTES), to decode gathered expert weights."""
    import ml_dtypes
    import numpy as np

    values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
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


# ---- translations: torch.ops.dsa.* → one custom node (or TensorScatter) -------------------------------------------
def _lightning_indexer_node(q, k, w, positions, topk: int):
    return DSA.LightningIndexer(q, k, w, positions, topk=topk, **TRT_ATTRIBUTES)


def _sparse_mla_node(q, kv, indices, scale: float, dv: int):
    return DSA.SparseMLA(q, kv, indices, scale=scale, dv=dv, **TRT_ATTRIBUTES)


def _routed_experts_node(x, experts, weights, gate_up, down, base):
    return DSA.RoutedExperts(x, experts, weights, gate_up, down, base, **TRT_ATTRIBUTES)


def _routed_experts_fp8_node(x, experts, weights, gate_up, gate_up_scale, down, down_scale, base, block_out: int,
                             block_in: int):
    return DSA.RoutedExpertsFP8(x, experts, weights, gate_up, gate_up_scale, down, down_scale, base,
                                block_out=block_out, block_in=block_in, **TRT_ATTRIBUTES)


def _write_cache_node(cache, rows, positions):
    """The step's rows land at [positions[b,0], positions[b,0] + S) of row b: ONNX TensorScatter (in place in
    TensorRT, whose parser makes it a KVCacheUpdate layer, and in ONNX Runtime with IOBinding)."""
    start = op.Gather(positions, op.Constant(value_int=0), axis=1)
    update = op.Unsqueeze(op.CastLike(rows, cache), op.Constant(value_ints=[1]))  # [B, 1, S, D] like the cache
    return op.TensorScatter(cache, update, start, axis=-2)


def translation_table() -> dict:
    import torch

    import dsa_export.kernels.registration  # noqa: F401  (registers torch.ops.dsa.*)

    register_schemas()
    return {torch.ops.dsa.lightning_indexer.default: _lightning_indexer_node,
            torch.ops.dsa.sparse_mla.default: _sparse_mla_node,
            torch.ops.dsa.routed_experts.default: _routed_experts_node,
            torch.ops.dsa.routed_experts_fp8.default: _routed_experts_fp8_node,
            torch.ops.dsa.write_cache.default: _write_cache_node}


# ---- decompositions, part 1: one tile of query rows (dsa.impl helpers) ---------------------------------------------
@onnxscript.script(IMPL, default_opset=op)
def TileRows(per_row_bytes: INT64, num_rows: INT64, budget: int) -> INT64:
    """Query rows per tile: as many as fit `budget` bytes, at least 1, at most all ([1] int64)."""
    rows = op.Div(op.Reshape(op.Constant(value_int=budget), op.Constant(value_ints=[1])), per_row_bytes)
    return op.Max(op.Min(rows, num_rows), op.Constant(value_ints=[1]))


@onnxscript.script(IMPL, default_opset=op)
def RowSlice(x: FLOAT, index: INT64, rows: INT64) -> FLOAT:
    """Rows [index·rows, index·rows + rows) of x along axis 1 (fewer at the end)."""
    start = op.Mul(op.Unsqueeze(index, op.Constant(value_ints=[0])), rows)
    return op.Slice(x, start, op.Add(start, rows), op.Constant(value_ints=[1]))


@onnxscript.script(IMPL, default_opset=op)
def PadRows(x: FLOAT, rows: INT64, value: float) -> FLOAT:
    """Pad axis 1 of a rank-3/4 tensor to `rows` (the last tile is shorter; every scan output must match)."""
    rank = op.Shape(op.Shape(x))  # [1]
    missing = op.Sub(rows, op.Shape(x, start=1, end=2))
    pads = op.ConstantOfShape(op.Mul(rank, op.Constant(value_ints=[2])),
                              value=onnx.helper.make_tensor("zero", TensorProto.INT64, [1], [0]))
    pads = op.ScatterElements(pads, op.Add(rank, op.Constant(value_ints=[1])), missing)  # end of axis 1
    return op.Pad(x, pads, op.CastLike(op.Constant(value_float=value), x))


@onnxscript.script(IMPL, default_opset=op)
def IndexerTile(q: FLOAT, k: FLOAT, w: FLOAT, positions: INT64, index: INT64, rows: INT64, topk: int) -> INT32:
    q_tile = IMPL.RowSlice(q, index, rows)  # [B, R, HI, DI]
    w_tile = IMPL.RowSlice(w, index, rows)  # [B, R, HI]
    pos = op.Cast(IMPL.RowSlice(positions, index, rows), to=TensorProto.INT64)  # [B, R]
    num_keys = op.Min(op.Add(op.ReduceMax(pos, keepdims=0), op.Constant(value_int=1)),
                      op.Squeeze(op.Shape(k, start=1, end=2)))  # keys this tile can see (rows past it are unread)
    seen = op.Reshape(num_keys, op.Constant(value_ints=[1]))
    keys = op.Cast(op.Slice(k, op.Constant(value_ints=[0]), seen, op.Constant(value_ints=[1])),
                   to=TensorProto.FLOAT)  # [B, T, DI]
    B = op.Shape(q_tile, start=0, end=1)
    R = op.Shape(q_tile, start=1, end=2)
    HI = op.Shape(q_tile, start=2, end=3)
    flat_q = op.Reshape(op.Cast(q_tile, to=TensorProto.FLOAT), op.Concat(B, op.Constant(value_ints=[-1]),
                                                                         op.Shape(q_tile, start=3), axis=0))
    head_scores = op.Relu(op.MatMul(flat_q, op.Transpose(keys, perm=[0, 2, 1])))  # [B, R·HI, T]
    head_scores = op.Reshape(head_scores, op.Concat(B, R, HI, seen, axis=0))  # [B, R, HI, T]
    scores = op.Squeeze(op.MatMul(op.Unsqueeze(w_tile, op.Constant(value_ints=[2])), head_scores),
                        op.Constant(value_ints=[2]))  # Σ_h w·ReLU(q·k): [B, R, T]
    key_ids = op.Range(op.Constant(value_int=0), num_keys, op.Constant(value_int=1))
    visible = op.LessOrEqual(key_ids, op.Unsqueeze(pos, op.Constant(value_ints=[-1])))
    neg_inf = op.Constant(value_float=float("-inf"))
    masked = op.Where(visible, scores, neg_inf)
    want = op.Reshape(op.Constant(value_int=topk), op.Constant(value_ints=[1]))
    kept = op.Min(want, seen)
    top_scores, top_keys = op.TopK(masked, kept, axis=-1)  # ONNX TopK: ties → lower index first
    chosen = op.Where(op.Equal(top_scores, neg_inf), op.Constant(value_int=-1), top_keys)
    padded = op.Pad(chosen, op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0]), op.Sub(want, kept), axis=0),
                    op.Constant(value_int=-1))
    return IMPL.PadRows(op.Cast(padded, to=TensorProto.INT32), rows, value=-1.0)


@onnxscript.script(IMPL, default_opset=op)
def IndexerRows(q: FLOAT, k: FLOAT, positions: INT64, budget: int) -> INT64:
    seen = op.Min(op.Add(op.ReduceMax(op.Cast(positions, to=TensorProto.INT64), keepdims=1),
                         op.Constant(value_int=1)), op.Shape(k, start=1, end=2))
    per_row = op.Mul(op.Mul(op.Shape(q, start=0, end=1), op.Shape(q, start=2, end=3)),
                     op.Mul(op.Reshape(seen, op.Constant(value_ints=[1])), op.Constant(value_ints=[8])))
    return IMPL.TileRows(per_row, op.Shape(q, start=1, end=2), budget=budget)


@onnxscript.script(IMPL, default_opset=op)
def SparseMLATile(q: FLOAT, kv: FLOAT, indices: INT32, index: INT64, rows: INT64, scale: float, dv: int) -> FLOAT:
    q_tile = op.Cast(IMPL.RowSlice(q, index, rows), to=TensorProto.FLOAT)  # [B, R, H, DK]
    idx = IMPL.RowSlice(indices, index, rows)  # [B, R, K]
    zero = op.CastLike(op.Constant(value_int=0), idx)
    valid = op.GreaterOrEqual(idx, zero)
    rows_idx = op.Unsqueeze(op.Cast(op.Max(idx, zero), to=TensorProto.INT64), op.Constant(value_ints=[-1]))
    selected = op.Cast(op.GatherND(kv, rows_idx, batch_dims=1), to=TensorProto.FLOAT)  # [B, R, K, DK]
    logits = op.Mul(op.MatMul(q_tile, op.Transpose(selected, perm=[0, 1, 3, 2])), op.Constant(value_float=scale))
    valid_heads = op.Unsqueeze(valid, op.Constant(value_ints=[2]))  # [B, R, 1, K]
    probs = op.Softmax(op.Where(valid_heads, logits, op.Constant(value_float=MASKED)), axis=-1)
    probs = op.Mul(probs, op.Cast(valid_heads, to=TensorProto.FLOAT))  # an empty row stays all zeros
    value_end = op.Reshape(op.Constant(value_int=dv), op.Constant(value_ints=[1]))
    values = op.Slice(selected, op.Constant(value_ints=[0]), value_end, op.Constant(value_ints=[-1]))
    out = op.MatMul(probs, values)  # [B, R, H, dv]
    return IMPL.PadRows(op.CastLike(out, q), rows, value=0.0)


@onnxscript.script(IMPL, default_opset=op)
def SparseMLARows(q: FLOAT, indices: INT32, budget: int) -> INT64:
    per_row = op.Mul(op.Mul(op.Shape(q, start=0, end=1), op.Shape(indices, start=2, end=3)),
                     op.Mul(op.Add(op.Shape(q, start=3, end=4), op.Shape(q, start=2, end=3)),
                            op.Constant(value_ints=[12])))  # gathered rows + scores/probs, fp32
    return IMPL.TileRows(per_row, op.Shape(q, start=1, end=2), budget=budget)


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
    """[P·rows, cols] FP8 e4m3 codes (uint8) → like's dtype: W8·scale per block, each of the P projections with its
    own row blocks (contracts.fp8_scale_shape)."""
    bo = op.Constant(value_int=block_out)
    bi = op.Constant(value_int=block_in)
    total = op.Squeeze(op.Shape(weight, start=0, end=1))
    r = op.Range(op.Constant(value_int=0), total, op.Constant(value_int=1))
    per_projection = op.Div(op.Sub(op.Add(op.Squeeze(rows), bo), op.Constant(value_int=1)), bo)
    row_block = op.Add(op.Mul(op.Div(r, op.Squeeze(rows)), per_projection), op.Div(op.Mod(r, op.Squeeze(rows)), bo))
    c = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(weight, start=1, end=2)), op.Constant(value_int=1))
    full_scale = op.Gather(op.Gather(scale, row_block, axis=0), op.Div(c, bi), axis=1)
    values = op.Gather(op.Constant(value=E4M3_VALUES), op.Cast(weight, to=TensorProto.INT32), axis=0)
    return op.CastLike(op.Mul(values, full_scale), like)


@onnxscript.script(DSA, default_opset=op)
def RoutedExperts(x: FLOAT, experts: INT32, weights: FLOAT, gate_up: FLOAT, down: FLOAT, base: FLOAT) -> FLOAT:
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


def _tiled_function(contract: OpContract, tile: str, rows_fn: str, rows_inputs: list[str], out_rank: int,
                    budget: int = TILE_BYTES) -> onnx.FunctionProto:
    """`contract`'s op as: rows = dsa.impl.<rows_fn>(...); a Loop over ceil(S / rows) tiles whose body computes one
    tile with dsa.impl.<tile> (rows padded to `rows`); the scan output [tiles, B, rows, ...] reshaped to
    [B, tiles·rows, ...] and cut to S rows."""
    names = [t.name for t in contract.inputs]
    output = contract.outputs[0].name
    attr_kinds = {"int": onnx.AttributeProto.INT, "float": onnx.AttributeProto.FLOAT}
    tile_node = oh.make_node(tile, [*names, "tile_index", "tile_rows"], ["tile_out"], domain=IMPL_DOMAIN)
    tile_node.attribute.extend(_attribute_ref(a.name, attr_kinds[a.type]) for a in contract.attributes)
    body = oh.make_graph(
        [tile_node, oh.make_node("Identity", ["cond_in"], ["cond_out"])], f"{contract.onnx_name}_tile",
        [oh.make_tensor_value_info("tile_index", TensorProto.INT64, []),
         oh.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         onnx.ValueInfoProto(name="tile_out")])  # typed by the tile function

    def const(name, values):
        return oh.make_node("Constant", [], [name], value=oh.make_tensor(name, TensorProto.INT64, [len(values)], values))

    perm = [1, 0] + list(range(2, out_rank + 1))
    nodes = [
        oh.make_node(rows_fn, rows_inputs, ["tile_rows"], domain=IMPL_DOMAIN, budget=budget),
        const("one", [1]), const("zero", [0]), const("minus_one", [-1]),
        oh.make_node("Shape", [names[0]], ["num_rows"], start=1, end=2),
        oh.make_node("Add", ["num_rows", "tile_rows"], ["rows_plus"]),
        oh.make_node("Sub", ["rows_plus", "one"], ["rows_ceil"]),
        oh.make_node("Div", ["rows_ceil", "tile_rows"], ["num_tiles_1d"]),
        oh.make_node("Squeeze", ["num_tiles_1d"], ["num_tiles"]),
        oh.make_node("Loop", ["num_tiles", ""], ["tiles"], body=body),
        oh.make_node("Transpose", ["tiles"], ["tiles_by_batch"], perm=perm),
        oh.make_node("Shape", ["tiles_by_batch"], ["batch_dim"], start=0, end=1),
        oh.make_node("Shape", ["tiles_by_batch"], ["trailing_dims"], start=3),
        oh.make_node("Concat", ["batch_dim", "minus_one", "trailing_dims"], ["joined_shape"], axis=0),
        oh.make_node("Reshape", ["tiles_by_batch", "joined_shape"], ["joined"]),
        oh.make_node("Slice", ["joined", "zero", "num_rows", "one"], [output]),
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
                                                     ["q", "k", "positions"], out_rank=3),
        SPARSE_MLA.onnx_name: _tiled_function(SPARSE_MLA, "SparseMLATile", "SparseMLARows", ["q", "indices"],
                                              out_rank=4),
        ROUTED_EXPERTS.onnx_name: _function_proto(RoutedExperts),
        ROUTED_EXPERTS_FP8.onnx_name: _function_proto(RoutedExpertsFP8),
    }
    for helper in (TileRows, RowSlice, PadRows, IndexerTile, IndexerRows, SparseMLATile, SparseMLARows, ExpertMLP,
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
           "decompositions", "register_schemas", "translation_table"]
