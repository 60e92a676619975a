"""Memory plans: the pipeline stages across GPUs and each engine's memory.

Pipeline stages across GPUs: the model's layers cut into contiguous ranges, one per GPU, balanced by memory; the
stages go to nodes in order, `gpus_per_node` to a node (one Triton Inference Server each).

What one stage's GPU holds (`stage_memory`, also the engine build's memory check):
- weights: the tensors its graph reads, as the export stores them (FP8 routed experts one byte per parameter plus
  fp32 block scales, the fp32 parameters in fp32, the rest in the export dtype); the first stage also holds the
  embedding, the last the final norm and the LM head;
- caches: its layers' latent and index-key pools (models/cache.py), of `pool_tokens` rows (whole blocks) shared by all
  sequences (default: every sequence of a full step at the longest, max_batch × capacity);
- activations: a working budget for the largest step, plus the logits of its samples on the last stage;
- the TensorRT builder's workspace.
Weights are counted from the model's skeleton on the meta device (`weight_bytes`: no checkpoint is read, so the
671B model is planned in seconds); an export on disk is priced by its data files instead. The layers are split to
minimise the largest stage (an exact search over the cut points); the default number of GPUs is the fewest whose
largest stage fits the target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
import torch

from dsa_export.errors import DSAExportError
from dsa_export.exporter.artifacts import StageDir
from dsa_export.exporter.graph_io import GraphIO, graph_io
from dsa_export.formats import of
from dsa_export.models.cache import BLOCK_SIZE, blocks_for
from dsa_export.models.config import DSAConfig
from dsa_export.targets import GPUTarget


@dataclass(frozen=True)
class EngineShapes:
    """The largest step an engine serves (its optimisation profile, exporter/engine.py) and its pool."""
    max_batch: int = 8  # sequences in a step (and samples: next tokens wanted)
    max_tokens: int = 8192  # tokens in a step: the running sequences' next tokens plus chunks of prompts
    pool_tokens: int | None = None  # the pool's rows, all sequences together [default: max_batch × capacity]

    def pool_rows(self, capacity: int) -> int:
        """The pools' rows: whole blocks holding pool_tokens (or max_batch sequences at the capacity)."""
        tokens = self.pool_tokens or self.max_batch * blocks_for(capacity) * BLOCK_SIZE
        return blocks_for(tokens) * BLOCK_SIZE

    def step_tokens(self, capacity: int) -> int:
        return max(self.max_batch, min(self.max_tokens, self.pool_rows(capacity)))


ACTIVATION_BUDGET = 256 << 20  # a tile budget for the largest step's working set (a fused engine keeps most on chip)
MAX_GPUS = 64
GB = 1e9


@dataclass(frozen=True)
class StageMemory:
    layers: tuple[int, int]
    weights: int
    caches: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.caches + self.activations + self.workspace


def stage_memory(io: GraphIO, weights: int, shapes: EngineShapes, workspace_gb: float) -> StageMemory:
    """Bytes the engine of the graph `io` (holding `weights` bytes of weights) needs at its largest shapes."""
    rows = shapes.pool_rows(io.capacity)
    caches = sum(math.prod(io.cache_shape(t, rows)) for t in io.cache_inputs) * of(io.cache_dtype).itemsize
    logits = shapes.max_batch * io.vocab_size * 4 if io.last else 0
    return StageMemory(io.layers, weights, caches, ACTIVATION_BUDGET + logits, int(workspace_gb * 2**30))


def weight_bytes(config: DSAConfig, dtype: torch.dtype, fp8_experts: bool) -> tuple[int, list[int], int]:
    """(embedding, each layer, final norm + LM head) bytes, as the export stores the weights."""
    from dsa_export.models.checkpoint import model_skeleton

    model = model_skeleton(config).cast(dtype)
    if fp8_experts:
        for experts in model.routed_experts():
            experts.keep_fp8(config.weight_block)

    def size(module: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    return (size(model.model.embed_tokens), [size(layer) for layer in model.model.layers],
            size(model.model.norm) + size(model.lm_head))


@dataclass(frozen=True)
class PipelinePlan:
    target: str
    gpu_bytes: int
    stages: tuple[StageMemory, ...]
    pool_rows: int = 0  # every stage's pools hold this many tokens (all sequences together)
    capacity: int = 0  # the longest sequence
    gpus_per_node: int = 8  # the stages go to nodes in order, this many per node (one server each)

    @property
    def nodes(self) -> list[list[int]]:
        """Each node's stages (their indices), in order: node i holds stages i·gpus_per_node ...."""
        return [list(range(i, min(i + self.gpus_per_node, self.gpus)))
                for i in range(0, self.gpus, self.gpus_per_node)]

    @property
    def pool_sequences(self) -> int:
        """Sequences at the longest the pools hold together (more of shorter ones)."""
        return self.pool_rows // (blocks_for(self.capacity) * BLOCK_SIZE) if self.capacity else 0

    @property
    def gpus(self) -> int:
        return len(self.stages)

    @property
    def largest(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.largest.total <= self.gpu_bytes

    @property
    def shortfall(self) -> int:
        return max(0, self.largest.total - self.gpu_bytes)

    def to_json(self) -> dict:
        return {"target": self.target, "gpus": self.gpus, "gpu_gb": self.gpu_bytes / GB, "fits": self.fits,
                "shortfall_gb": self.shortfall / GB, "pool_tokens": self.pool_rows, "capacity": self.capacity,
                "pool_sequences_at_capacity": self.pool_sequences,
                "stages": [{**asdict(s), "layers": list(s.layers), "total": s.total,
                            "headroom_gb": (self.gpu_bytes - s.total) / GB} for s in self.stages],
                "gpus_per_node": self.gpus_per_node,
                "nodes": [{"node": n, "stages": stages, "gpus": len(stages),
                           "layers": [self.stages[stages[0]].layers[0], self.stages[stages[-1]].layers[1]],
                           "total_gb": sum(self.stages[i].total for i in stages) / GB}
                          for n, stages in enumerate(self.nodes)]}

    def table(self) -> str:
        """One row per stage (its node, layers, bytes by kind, its GPU's headroom); then one line per node when the
        stages span several."""
        node_of = {stage: n for n, stages in enumerate(self.nodes) for stage in stages}
        rows = [("stage", "node", "layers", "weights GB", "caches GB", "activations GB", "workspace GB", "total GB",
                 "GPU GB", "headroom GB")]
        for i, s in enumerate(self.stages):
            rows.append((str(i), str(node_of[i]), f"{s.layers[0]}-{s.layers[1] - 1}",
                         *(f"{b / GB:.2f}" for b in (s.weights, s.caches, s.activations, s.workspace, s.total)),
                         f"{self.gpu_bytes / GB:.0f}", f"{(self.gpu_bytes - s.total) / GB:.2f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if len(self.nodes) > 1:
            for n, stages in enumerate(self.nodes):
                first, last = self.stages[stages[0]], self.stages[stages[-1]]
                lines.append(f"node {n}: stages {stages[0]}-{stages[-1]} (layers {first.layers[0]}-"
                             f"{last.layers[1] - 1}) on {len(stages)} x {self.target}, "
                             f"{sum(self.stages[i].total for i in stages) / GB:.2f} GB of "
                             f"{len(stages) * self.gpu_bytes / GB:.0f} GB")
        return "\n".join(lines)


def split_layers(costs: list[int], first: int, last: int, parts: int) -> list[tuple[int, int]]:
    """Cut layers with these costs into `parts` contiguous ranges minimising the largest range's cost, where the
    first range also costs `first` and the last `last`."""
    n = len(costs)
    prefix = [0, *[sum(costs[:i + 1]) for i in range(n)]]

    def cost(a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (first if a == 0 else 0) + (last if b == n else 0)

    # best[k][j]: the smallest largest cost of splitting layers 0:j into k ranges; cut[k][j]: where the last starts
    best = [[math.inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    ranges, j = [], n
    for k in range(parts, 0, -1):
        ranges.append((cut[k][j], j))
        j = cut[k][j]
    return ranges[::-1]


def plan_pipeline(config: DSAConfig, target: GPUTarget, dtype: torch.dtype, fp8_experts: bool, capacity: int | None,
                  shapes: EngineShapes, workspace_gb: float, gpus: int | None = None,
                  gpus_per_node: int = 8) -> PipelinePlan:
    """The stages for `gpus` GPUs (default: the fewest that fit, up to MAX_GPUS), balanced by memory, on nodes of
    `gpus_per_node` GPUs. The plan may not fit (see `check_plan`)."""
    layers = config.num_hidden_layers
    if gpus is not None and not 1 <= gpus <= layers:
        raise DSAExportError(f"--gpus {gpus}: the model has {layers} layers, so 1 to {layers} stages")
    embed, per_layer, head = weight_bytes(config, dtype, fp8_experts)
    cache_dtype = of(dtype).name
    whole = graph_io(config, cache_dtype, capacity)
    per_layer_fixed = stage_memory(graph_io(config, cache_dtype, capacity, (0, 1)), 0, shapes, 0).caches
    fixed = stage_memory(whole, 0, shapes, workspace_gb)
    logits = fixed.activations - ACTIVATION_BUDGET  # carried by the last stage only

    def plan(n: int) -> PipelinePlan:
        ranges = split_layers([w + per_layer_fixed for w in per_layer], embed, head + logits, n)
        stages = []
        for start, stop in ranges:
            io = graph_io(config, cache_dtype, capacity, (start, stop))
            weights = sum(per_layer[start:stop]) + (embed if start == 0 else 0) + (head if stop == layers else 0)
            stages.append(stage_memory(io, weights, shapes, workspace_gb))
        return PipelinePlan(target.name, int(target.memory_gb * GB), tuple(stages), shapes.pool_rows(whole.capacity),
                            whole.capacity, gpus_per_node)

    if gpus is not None:
        return plan(gpus)
    for n in range(1, min(MAX_GPUS, layers) + 1):
        candidate = plan(n)
        if candidate.fits:
            return candidate
    return candidate


def check_plan(plan: PipelinePlan) -> None:
    """Refuse a plan whose largest stage does not fit its GPU, saying by how much."""
    if not plan.fits:
        s = plan.largest
        raise DSAExportError(
            f"{plan.gpus} x {plan.target}: stage {plan.stages.index(s)} (layers {s.layers[0]}-{s.layers[1] - 1}) needs "
            f"{s.total / GB:.1f} GB (weights {s.weights / GB:.1f}, caches {s.caches / GB:.1f}, activations "
            f"{s.activations / GB:.1f}, workspace {s.workspace / GB:.1f}) of the GPU's {plan.gpu_bytes / GB:.0f} GB: "
            f"{plan.shortfall / GB:.1f} GB short; use more GPUs (--gpus), FP8 experts, a smaller --pool-tokens, "
            f"--capacity or --max-batch")


def memory_plan(stage: StageDir, target: GPUTarget, shapes: EngineShapes, workspace_gb: float) -> dict:
    """Bytes the engine of an exported stage needs at its largest shapes (`stage_memory`, with the weights of the
    export's data files), and whether that fits the target."""
    weights = sum(p.stat().st_size for p in stage.data_files())
    memory = stage_memory(stage.io, weights, shapes, workspace_gb)
    have = target.memory_gb * 10**9
    return {"weights_gb": weights / 1e9, "caches_gb": memory.caches / 1e9,
            "activations_gb": memory.activations / 1e9, "workspace_gb": memory.workspace / 1e9,
            "total_gb": memory.total / 1e9, "gpu_gb": have / 1e9, "fits": memory.total <= have,
            "shortfall_gb": max(0.0, (memory.total - have) / 1e9)}


def check_fits(plan: dict, target: GPUTarget) -> None:
    if not plan["fits"]:
        raise DSAExportError(
            f"the engine needs {plan['total_gb']:.1f} GB on {target.name} (weights {plan['weights_gb']:.1f}, caches "
            f"{plan['caches_gb']:.1f}, activations {plan['activations_gb']:.1f}, workspace {plan['workspace_gb']:.1f})"
            f", which has {plan['gpu_gb']:.0f} GB: {plan['shortfall_gb']:.1f} GB short; lower --pool-tokens, "
            f"--max-batch or --max-tokens")


def check_precision(stage: StageDir, precision: str) -> None:
    """The precision asked of an engine is the export's (TensorRT takes precision from the graph): fp8 needs FP8
    routed experts in it, float32/bfloat16 its dtype; auto takes what it is."""
    if precision == "fp8":
        ops = {n.op_type for n in stage.graph.graph.node}
        if "RoutedExpertsFP8" not in ops and "RoutedExperts" in ops:
            raise DSAExportError("--precision fp8: the export holds no FP8 experts (an FP8 checkpoint, exported "
                                 "without --dequantize-experts, has them)")
    elif precision != "auto" and precision != stage.io.cache_dtype:
        raise DSAExportError(f"--precision {precision}: the export is {stage.io.cache_dtype} (export with --dtype "
                             f"{precision}; TensorRT takes precision from the graph)")


def engine_memory(export, target: GPUTarget, shapes: EngineShapes, workspace_gb: float,
                  precision: str = "auto") -> list[dict]:
    """The memory plan of each stage's engine (one per GPU) of an export on disk, refused if one cannot fit the
    target or the export does not have the precision asked for."""
    plans = []
    for stage in export.stages:
        check_precision(stage, precision)
        plan = memory_plan(stage, target, shapes, workspace_gb)
        check_fits(plan, target)
        plans.append({"stage": str(stage.path.relative_to(export.root)), **plan})
    return plans
