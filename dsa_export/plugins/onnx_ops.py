"""ONNX side of the `dsa::` ops: schemas (from the contracts), torch.onnx translations, standard-op decompositions.

Each op becomes one `dsa::LightningIndexer` / `dsa::SparseMLA` node carrying its attributes and
`plugin_namespace="dsa"` (so TensorRT imports it as our plugin). The decomposition is appended to the model as a
local function with the same domain and name, so ONNX Runtime (or any consumer without the plugin) runs the file as
is (toolchain.md §1.6). The exporter always inlines script functions, hence: a plain translation that emits the bare
node (needs the registered schema, §1.2 style 2), and the function added after export.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnx.defs import OpSchema
from onnxscript import FLOAT, INT32, INT64
from onnxscript import opset20 as op
from onnxscript.values import Opset

from dsa_export.plugins.contracts import CONTRACTS, LIGHTNING_INDEXER, SPARSE_MLA, OpContract

DSA_DOMAIN = "dsa"
PLUGIN_NAMESPACE = "dsa"
DSA = Opset(DSA_DOMAIN, 1)
MASKED = -1e30  # finite "−inf" for masked scores: keeps Softmax free of NaN on empty rows

ONNX_TYPES = {"float32": "tensor(float)", "bfloat16": "tensor(bfloat16)", "float8_e4m3fn": "tensor(float8e4m3fn)",
              "int32": "tensor(int32)", "int64": "tensor(int64)"}
ATTR_TYPES = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}
# Node attributes for TensorRT's importer (plugin_namespace) and its AOT/JIT choice (aot); not plugin fields.
TRT_ATTRIBUTES = (("plugin_namespace", OpSchema.AttrType.STRING), ("aot", OpSchema.AttrType.INT))


def onnx_schema(contract: OpContract) -> OpSchema:
    constraints, inputs, outputs = [], [], []
    for arg, params in ((contract.inputs, inputs), (contract.outputs, outputs)):
        for t in arg:
            if t.dtypes[0].startswith("like:"):
                type_var = f"T_{t.dtypes[0][5:]}"
            else:
                type_var = f"T_{t.name}"
                constraints.append((type_var, [ONNX_TYPES[d] for d in t.dtypes], t.doc))
            params.append(OpSchema.FormalParameter(t.name, type_var, t.doc))
    attributes = [OpSchema.Attribute(a.name, ATTR_TYPES[a.type], a.doc) for a in contract.attributes]
    attributes += [OpSchema.Attribute(name, kind, "TensorRT import hint", required=False) for name, kind in TRT_ATTRIBUTES]
    return OpSchema(contract.onnx_name, contract.domain, contract.version, contract.doc, inputs=inputs,
                    outputs=outputs, type_constraints=constraints, attributes=attributes)


def register_schemas() -> None:
    """Make `dsa::*` known to onnx (checker, shape inference) and to onnxscript's op builders; idempotent."""
    for contract in CONTRACTS:
        if not onnx.defs.has(contract.onnx_name, contract.domain):
            onnx.defs.register_schema(onnx_schema(contract))


# ---- translations: torch.ops.dsa.* → one custom node ------------------------------------------------------------------
def _lightning_indexer_node(q, k, w, positions, topk: int):
    return DSA.LightningIndexer(q, k, w, positions, topk=topk, plugin_namespace=PLUGIN_NAMESPACE)


def _sparse_mla_node(q, kv, indices, scale: float, dv: int):
    return DSA.SparseMLA(q, kv, indices, scale=scale, dv=dv, plugin_namespace=PLUGIN_NAMESPACE)


def translation_table() -> dict:
    import torch

    import dsa_export.kernels.ops  # noqa: F401  (registers torch.ops.dsa.*)

    register_schemas()
    return {torch.ops.dsa.lightning_indexer.default: _lightning_indexer_node,
            torch.ops.dsa.sparse_mla.default: _sparse_mla_node}


# ---- decompositions: the same contracts in standard ONNX ops (opset 20) ----------------------------------------------
@onnxscript.script(DSA, default_opset=op)
def LightningIndexer(q: FLOAT, k: FLOAT, w: FLOAT, positions: INT64, topk: int) -> INT32:
    qf = op.Cast(q, to=onnx.TensorProto.FLOAT)
    kf = op.Cast(k, to=onnx.TensorProto.FLOAT)
    head_scores = op.Relu(op.Einsum(qf, kf, equation="bshd,btd->bsht"))
    scores = op.Einsum(head_scores, w, equation="bsht,bsh->bst")
    num_keys = op.Shape(k, start=1, end=2)
    key_ids = op.Range(op.Constant(value_int=0), op.Squeeze(num_keys), op.Constant(value_int=1))
    pos = op.Cast(op.Unsqueeze(positions, op.Constant(value_ints=[-1])), to=onnx.TensorProto.INT64)
    visible = op.LessOrEqual(key_ids, pos)
    neg_inf = op.Constant(value_float=float("-inf"))
    masked_scores = op.Where(visible, scores, neg_inf)
    want = op.Reshape(op.Constant(value_int=topk), op.Constant(value_ints=[1]))
    kept = op.Min(want, num_keys)
    top_scores, top_keys = op.TopK(masked_scores, kept, axis=-1)  # ONNX TopK: ties → lower index first
    chosen = op.Where(op.Equal(top_scores, neg_inf), op.Constant(value_int=-1), top_keys)
    no_pads = op.Constant(value_ints=[0, 0, 0, 0, 0])
    pads = op.Concat(no_pads, op.Sub(want, kept), axis=0)
    padded = op.Pad(chosen, pads, op.Constant(value_int=-1))
    return op.Cast(padded, to=onnx.TensorProto.INT32)


@onnxscript.script(DSA, default_opset=op)
def SparseMLA(q: FLOAT, kv: FLOAT, indices: INT32, scale: float, dv: int) -> FLOAT:
    zero = op.CastLike(op.Constant(value_int=0), indices)
    valid = op.GreaterOrEqual(indices, zero)
    rows_idx = op.Unsqueeze(op.Cast(op.Max(indices, zero), to=onnx.TensorProto.INT64), op.Constant(value_ints=[-1]))
    rows = op.Cast(op.GatherND(kv, rows_idx, batch_dims=1), to=onnx.TensorProto.FLOAT)  # [B,S,K,DK]
    qf = op.Cast(q, to=onnx.TensorProto.FLOAT)
    logits = op.Mul(op.Einsum(qf, rows, equation="bshd,bskd->bshk"), op.Constant(value_float=scale))
    valid_heads = op.Unsqueeze(valid, op.Constant(value_ints=[2]))  # [B,S,1,K]
    probs = op.Softmax(op.Where(valid_heads, logits, op.Constant(value_float=MASKED)), axis=-1)
    probs = op.Mul(probs, op.Cast(valid_heads, to=onnx.TensorProto.FLOAT))  # an empty row stays all zeros
    value_end = op.Reshape(op.Constant(value_int=dv), op.Constant(value_ints=[1]))
    values = op.Slice(rows, op.Constant(value_ints=[0]), value_end, op.Constant(value_ints=[-1]))
    out = op.Einsum(probs, values, equation="bshk,bskd->bshd")
    return op.CastLike(out, q)


DECOMPOSITIONS = {LIGHTNING_INDEXER.onnx_name: LightningIndexer, SPARSE_MLA.onnx_name: SparseMLA}


def add_decompositions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append each dsa op's decomposition as a model-local function (once), so ONNX Runtime runs the file as is."""
    present = {(f.domain, f.name) for f in model.functions}
    for name, script in DECOMPOSITIONS.items():
        if (DSA_DOMAIN, name) not in present:
            model.functions.append(script.to_function_proto())
    if not any(o.domain == DSA_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DSA_DOMAIN, 1))
    return model
