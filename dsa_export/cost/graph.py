"""The exported graph's own cost: FLOPs and bytes per token read off the graph at concrete shapes, beside the
closed form (cost/model.py `step_cost`) for the same config.

How: the graph's inputs get concrete dims (a point's `batch` sequences of `seq` tokens each, packed; the logits of
each sequence's last token; pools of `batch` sequences at the export's capacity), onnx shape inference (with data propagation) gives every tensor's shape, then each node is priced:
- MatMul / Gemm: 2·M·N·K; a `dsa::` node: the cost its contract declares (contracts.py) at its input shapes;
- weight traffic: each initializer a node reads (a Gather from one reads only the rows it gathers); nodes computed
  from initializers only (a weight's transpose) are folded by TensorRT and ONNX Runtime when they load the graph: they
  cost nothing per step, and what they make is priced as a weight where it is read;
- cache traffic: the dsa ops' declared cache reads and writes (dsa::WriteCache: the new rows only), and any other
  node that reads a cache input or writes a cache output whole (what a graph that grows its caches by concatenation would do);
- elementwise and data-movement work is counted apart ("other"), as the closed form leaves it out; activations are
  not counted as traffic (a fused engine keeps most of them on chip).
This is the check that a graph really runs at DSA's cost: every expert on every token, or a cache copied per step,
shows up here as a ratio far from 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from dsa_export.contracts import BY_ONNX_NAME
from dsa_export.cost.model import step_cost
from dsa_export.errors import DSAExportError
from dsa_export.exporter.artifacts import ExportDir, as_export
from dsa_export.formats import of
from dsa_export.models.config import DSAConfig
from dsa_export.plugins.onnx_ops import DSA_DOMAIN, register_schemas
from dsa_export.serving.io_spec import POOL_ROWS, SAMPLES, SEQUENCES, TOKENS, GraphIO

VIEW_OPS = {"Squeeze", "Unsqueeze", "Reshape", "Identity", "Flatten"}  # no data moved
SHAPE_OPS = {"Shape", "Size"}  # read a tensor's dims only
CONTEXTS = (1024, 4096, 16384, 65536, 131071)  # decode steps after this many tokens; capped by the capacity
PREFILLS = (1024, 4096)  # prompt lengths of the prefill points
GOAL = 0.10  # graph / closed form within ±10%


@dataclass(frozen=True)
class Point:
    phase: str  # "decode" or "prefill"
    batch: int
    seq: int
    past: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def default_points(capacity: int, batch: int = 1) -> list[Point]:
    """Decode after each of CONTEXTS tokens and prefills of PREFILLS tokens, all capped by the capacity."""
    decode = sorted({min(c, capacity - 1) for c in CONTEXTS})
    prefill = sorted({min(s, capacity) for s in PREFILLS})
    return [Point("decode", batch, 1, past) for past in decode] + [Point("prefill", batch, s, 0) for s in prefill]


def _itemsize(elem_type: int) -> int:
    return of(elem_type).itemsize


def graph_step_cost(model: onnx.ModelProto, io: GraphIO, point: Point) -> dict:
    """{flops, weight_bytes, cache_bytes, other_flops} of one call of the graph at `point`."""
    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    sizes = {TOKENS: point.tokens, SEQUENCES: point.batch, SAMPLES: point.batch,
             POOL_ROWS: point.batch * io.blocks * io.block_size}
    for value in list(concrete.graph.input) + list(concrete.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
    graph = onnx.shape_inference.infer_shapes(concrete, data_prop=True).graph
    types = {v.name: v.type.tensor_type for v in (*graph.value_info, *graph.input, *graph.output)}
    initializers = {t.name: t for t in graph.initializer}

    def shape(name: str) -> list[int]:
        if name in initializers:
            return list(initializers[name].dims)
        dims = types[name].shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise DSAExportError(f"graph cost: the shape of '{name}' is not known at {point}")
        return [d.dim_value for d in dims]

    def nbytes(name: str) -> int:
        elem = initializers[name].data_type if name in initializers else types[name].elem_type
        return math.prod(shape(name)) * _itemsize(elem)

    caches = {t.name for t in (*io.cache_inputs, *io.cache_outputs)}
    flops = other = weight_bytes = cache_bytes = 0.0
    constants = set(initializers)  # initializers, and what is computed from them alone (folded at load)
    for node in graph.node:
        if node.op_type in SHAPE_OPS:
            continue
        if node.domain != DSA_DOMAIN and node.input and all(not name or name in constants for name in node.input):
            constants.update(node.output)
            continue
        if node.domain == DSA_DOMAIN:
            contract = BY_ONNX_NAME[node.op_type]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            names = dict(zip((t.name for t in contract.inputs), node.input))
            itemsize = {arg: nbytes(name) // max(math.prod(shape(name)), 1) for arg, name in names.items()}
            cost = contract.cost({arg: tuple(shape(name)) for arg, name in names.items()}, attrs, itemsize,
                                 past=point.past, sequences=point.batch)
            flops += cost.flops
            weight_bytes += cost.weight_bytes
            cache_bytes += cost.cache_bytes
            continue
        if node.op_type in VIEW_OPS:
            if node.input[0] in caches:
                caches.add(node.output[0])
            continue
        if node.op_type in ("MatMul", "Gemm"):
            a = shape(node.input[0])
            transposed = node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)
            flops += 2 * math.prod(shape(node.output[0])) * (a[0] if transposed else a[-1])
        else:
            other += math.prod(shape(node.output[0])) if node.output[0] in types else 0
        for name in node.input:
            if name in constants:
                weight_bytes += nbytes(node.output[0]) if node.op_type == "Gather" else nbytes(name)
            elif name in caches:
                cache_bytes += nbytes(name)
        cache_bytes += sum(nbytes(name) for name in node.output if name in caches)
    return {"flops": flops, "weight_bytes": weight_bytes, "cache_bytes": cache_bytes, "other_flops": other}


def _itemsizes(models: list[onnx.ModelProto], io: GraphIO) -> tuple[int, int, int]:
    """(weight, cache, routed-expert) bytes per element of this export (its stages' graphs)."""
    inits = {t.name: t.data_type for model in models for t in model.graph.initializer}
    cache = of(io.cache_dtype).itemsize
    lm_head = next((t for name, t in inits.items() if name.endswith("lm_head.weight")), onnx.TensorProto.FLOAT)
    experts = [t for name, t in inits.items() if name.endswith("experts.gate_up_proj")]
    weight = _itemsize(lm_head)
    return weight, cache, (_itemsize(experts[0]) if experts else weight)


def audit(export: ExportDir | str | Path, points: list[Point] | None = None, config: DSAConfig | None = None) -> dict:
    """Per point: the graph's cost per token, the closed form's, and their ratios (goal: within ±10%). A build cut
    into pipeline stages is priced as the sum of its stages' graphs."""
    export = as_export(export)
    stages = [(stage.path, stage.io, stage.graph) for stage in export.stages]
    config = config or export.first.config
    register_schemas()
    weight, cache, expert = _itemsizes([model for _, _, model in stages], stages[0][1])
    rows = []
    for point in points or default_points(stages[0][1].capacity):
        graph: dict[str, float] = {}
        for stage_dir, io, model in stages:
            try:
                for key, value in graph_step_cost(model, io, point).items():
                    graph[key] = graph.get(key, 0.0) + value
            except (KeyError, IndexError, onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
                raise DSAExportError(f"{stage_dir}: its graph cannot be read at concrete shapes ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else e!r}); is it an export of dsa-export?") \
                    from None
        closed = step_cost(config, point.batch, point.seq, point.past, weight, cache, expert).per_token(point.tokens)
        graph_per_token = {k: v / point.tokens for k, v in graph.items()}
        ratios = {k: graph_per_token[k] / getattr(closed, k) if getattr(closed, k) else float("nan")
                  for k in ("flops", "weight_bytes", "cache_bytes")}
        ratios["bytes"] = ((graph_per_token["weight_bytes"] + graph_per_token["cache_bytes"])
                           / (closed.weight_bytes + closed.cache_bytes))
        rows.append({**asdict(point), "graph": graph_per_token, "closed_form": asdict(closed), "ratio": ratios})
    worst = max(abs(r["ratio"][k] - 1) for r in rows for k in ("flops", "bytes"))
    return {"onnx": str(export.root), "stages": len(stages),
            "itemsize": {"weights": weight, "caches": cache, "routed_experts": expert},
            "points": rows, "worst_deviation": worst, "goal": GOAL, "within_goal": worst <= GOAL}


def markdown(report: dict) -> list[str]:
    lines = ["## The exported graph's own cost", "",
             f"`{report['onnx']}` read at concrete shapes (cost/graph.py), per token, beside the closed form for "
             f"the same config (cost/model.py `step_cost`; weights {report['itemsize']['weights']} B, caches "
             f"{report['itemsize']['caches']} B, routed experts {report['itemsize']['routed_experts']} B per element). "
             "Bytes = weights read + KV-cache rows read and written.", "",
             "| point | graph GFLOP | closed form GFLOP | ratio | graph MB | closed form MB | ratio | "
             "other (elementwise) MFLOP |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["points"]:
        g, c = r["graph"], r["closed_form"]
        where = (f"decode after {r['past']:,}" if r["phase"] == "decode" else f"prefill of {r['seq']:,}")
        lines.append(f"| {where} (batch {r['batch']}) | {g['flops'] / 1e9:.4g} | {c['flops'] / 1e9:.4g} | "
                     f"{r['ratio']['flops']:.3f} | {(g['weight_bytes'] + g['cache_bytes']) / 1e6:.4g} | "
                     f"{(c['weight_bytes'] + c['cache_bytes']) / 1e6:.4g} | {r['ratio']['bytes']:.3f} | "
                     f"{g['other_flops'] / 1e6:.3g} |")
    verdict = "within" if report["within_goal"] else "NOT within"
    lines += ["", f"Largest deviation {report['worst_deviation']:.1%}: {verdict} the ±{report['goal']:.0%} goal."]
    return lines

