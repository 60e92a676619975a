"""Backends: one interface (`Backend`) over the eager model and the exported graphs, run by ONNX Runtime or by
TensorRT engines (`GraphBackend`: one graph per pipeline stage, chained, stage i on device i).

A backend owns nothing per sequence: `new_caches(batch)` hands out zeroed caches for `batch` sequences of the
backend's capacity (paged pools: models/cache.py), `step(input_ids, positions, caches)` takes a [B, S] step, writes its
rows into them in place and returns the logits of every position (and, if asked for, each layer's indexer
selection, as positions in each sequence, for parity checks). Which graph backends a machine can run
is decided here too (`available_backends`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from dsa_export.contracts import LIGHTNING_INDEXER
from dsa_export.errors import DSAExportError
from dsa_export.exporter.artifacts import ExportDir, as_export
from dsa_export.kernels import CUSTOM_OPS
from dsa_export.models import inputs
from dsa_export.models.cache import KVCache, Paging, blocks_for, cache_order, check_room, default_capacity
from dsa_export.models.model import DSAForCausalLM
from dsa_export.plugins.onnx_ops import DSA_DOMAIN, onnxruntime_cpu_graph, register_schemas
from dsa_export.serving.io_spec import (BLOCK_TABLES, HIDDEN_IN, HIDDEN_OUT, INPUT_IDS, LOGITS, LOGITS_INDEX, POSITIONS,
                                        SAMPLES, SEQUENCE, SEQUENCES, SLOTS, TEMPERATURE, TOKENS, TOP_K, TOP_P,
                                        UNIFORM, GraphIO)
from dsa_export.targets import GPUTarget


@dataclass
class StepResult:
    logits: torch.Tensor  # [B,S,V] fp32
    indexer_topk: list[torch.Tensor] = field(default_factory=list)  # per layer [B,S,topk] int32, if recorded


class Backend(Protocol):
    name: str
    vocab_size: int
    capacity: int  # cache rows: a sequence's positions stay below it
    cache_dtype: torch.dtype

    def new_caches(self, batch: int, contents: list[torch.Tensor] | None = None) -> Any:
        """Caches for `batch` sequences at `capacity`: zeroed, or holding `contents` (layout order)."""
        ...

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: Any) -> StepResult:
        """One forward over S tokens per row at consecutive `positions`; writes their cache rows in place."""
        ...


def check_step(backend: Backend, input_ids, positions, cache_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same checks, and the same one-line errors, for every backend (models/inputs.py); before any work."""
    ids = inputs.token_ids(input_ids, backend.vocab_size)
    positions = inputs.step_positions(positions, ids)
    inputs.check_cache_batch(cache_batch, ids)
    check_room(backend.capacity, positions)
    return ids, positions


def check_contents(contents: list[torch.Tensor] | None, batch: int, widths: list[int], rows: int) -> None:
    """Cache contents are every layer's caches in layout order, each [batch, T <= rows, width]."""
    if contents is None:
        return
    if len(contents) != len(widths) or any(c.dim() != 3 or c.shape[0] != batch or c.shape[1] > rows or
                                           c.shape[2] != w for c, w in zip(contents, widths)):
        raise DSAExportError(f"cache contents must be {len(widths)} tensors [batch={batch}, positions <= {rows}, "
                             f"width], in layout order")


class EagerBackend:
    name = "eager"

    def __init__(self, model: DSAForCausalLM, attention: str = "sparse", capacity: int | None = None,
                 record_indexer: bool = False):
        """attention: "sparse" (DSA through the dsa:: ops), or "dense" (plain dense MLA, the cost baseline)."""
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self.attention = attention
        self.capacity = default_capacity(model.config) if capacity is None else capacity
        self.cache_dtype = model.lm_head.weight.dtype
        self.record_indexer = record_indexer

    def new_caches(self, batch: int, contents: list[torch.Tensor] | None = None) -> KVCache:
        """The model's own cache; contents: what each sequence holds at its first positions (layout order)."""
        cache = self.model.new_cache(batch, self.capacity)
        views = cache.sequences()
        check_contents(contents, batch, [v.shape[-1] for v in views], cache.rows)
        for view, value in zip(views, contents or []):
            view[:, :value.shape[1]] = value
        return cache

    def step(self, input_ids, positions, caches: KVCache) -> StepResult:
        input_ids, positions = check_step(self, input_ids, positions, caches.batch)
        selections: list[torch.Tensor] = []
        ops = CUSTOM_OPS
        paging = Paging.identity(positions, caches.rows)
        if self.record_indexer:  # each layer's selection, as positions in the sequence [B, S, topk]
            def indexer(*args):
                rows = CUSTOM_OPS.lightning_indexer(*args)
                selections.append(paging.logical(rows).view(*positions.shape, -1))
                return rows

            ops = CUSTOM_OPS._replace(lightning_indexer=indexer)
        with torch.no_grad():
            logits = self.model.step(input_ids, positions, caches, ops, self.attention)
        return StepResult(logits, selections)


class StepGraph(Protocol):
    """One exported graph run step by step (serving/ort_graph.py, serving/trt_graph.py), its pools kept by the
    caller and written in place."""
    io: GraphIO

    def new_pools(self, rows: int) -> Any:
        """Zeroed pools of `rows` rows, in io.json's order."""
        ...

    def run(self, feeds: dict, pools: Any, outputs: list[str] | None = None) -> dict:
        """The named outputs of one step (feeds: every step input by name)."""
        ...


@dataclass
class GraphCaches:
    """A batch's caches in the exported graphs: every stage's pools, each sequence b owning `rows` rows of them (its
    blocks b·rows/block ..., in order: models/cache.py's identity paging)."""
    pools: list
    batch: int
    rows: int
    bound: dict = field(default_factory=dict)  # decode step shape (B, 1) → each stage's BoundStep (ONNX Runtime, CPU)


class GraphBackend:
    """The exported graphs of an export (one per pipeline stage) as one model: each step packs the [B, S] tokens,
    runs the stages in layer order, each stage's hidden state feeding the next, each stage with its own pools. Built
    by `onnxruntime` (ONNX Runtime sessions) or `tensorrt` (the stages' engines, stage i on GPU i)."""

    def __init__(self, name: str, graphs: list[StepGraph], cache_dtype: torch.dtype):
        self.name = name
        self.graphs = graphs
        self.ios = [g.io for g in graphs]
        self.io = self.ios[0]
        self.capacity, self.vocab_size = self.io.capacity, self.io.vocab_size
        self.cache_dtype = cache_dtype
        self.providers: list[str] = list(getattr(graphs[0], "providers", []))  # ONNX Runtime's, in order

    @classmethod
    def onnxruntime(cls, export: ExportDir | str | Path, providers: list[str] | None = None,
                    record_indexer: bool = False, threads: int | None = None, profile: bool = False) -> "GraphBackend":
        """ONNX Runtime sessions over the export's graphs (CPU; CUDA when onnxruntime-gpu and a GPU are present), each
        pool bound once as the input and the output of its dsa::WriteCache, so no step copies a pool.
        record_indexer exposes the indexer nodes' outputs as extra graph outputs (a modified copy of the graph, in
        memory; the export directory is never written). threads, profile: serving/ort_graph.session_options."""
        from dsa_export.serving.ort_graph import OrtGraph, providers_for

        export = as_export(export)
        export.check()
        register_schemas()
        on_cpu = providers_for(providers)[0] == "CPUExecutionProvider"
        graphs = []
        for stage in export.stages:
            graph, extra = stage.graph, []
            if on_cpu or record_indexer:  # a modified copy, in memory: the export directory is never written
                import onnx

                graph = onnxruntime_cpu_graph(graph) if on_cpu else onnx.ModelProto.FromString(
                    graph.SerializeToString())
            if record_indexer:
                extra = [n.output[0] for n in graph.graph.node
                         if n.domain == DSA_DOMAIN and n.op_type == LIGHTNING_INDEXER.onnx_name]
                graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in extra)
            model_bytes = None if graph is stage.graph else graph.SerializeToString()
            try:
                graphs.append(OrtGraph(stage.model_path, stage.io, providers, model_bytes, extra, threads, profile))
            except ValueError as e:  # OrtGraph's own refusal
                raise DSAExportError(f"{stage.path}: {e}") from None
            except Exception as e:  # ONNX Runtime raises its own types for unreadable or mismatched files
                raise DSAExportError(f"{stage.path}: ONNX Runtime cannot load {stage.model_path.name} "
                                     f"({str(e).splitlines()[0][:300]})") from None
        return cls("onnxruntime", graphs, torch.float32)

    @classmethod
    def tensorrt(cls, export: ExportDir | str | Path) -> "GraphBackend":
        """The export's TensorRT engines (`dsa-export engine`), stage i on GPU i; GPU-only (TensorRT and torch's CUDA
        are imported here)."""
        from dsa_export.serving.trt_graph import TrtGraph

        export = as_export(export)
        if not export.has_engines:
            raise DSAExportError(f"{export.root}: no TensorRT engine for every stage; run `dsa-export engine`")
        graphs = []
        for device, stage in enumerate(export.stages):
            try:
                graphs.append(TrtGraph(stage.plan_path, stage.io, stage.engine_record["profiles"], device))
            except RuntimeError as e:
                raise DSAExportError(str(e)) from None
        return cls("tensorrt", graphs, graphs[0].cache_dtype)

    def new_caches(self, batch: int, contents: list[torch.Tensor] | None = None) -> GraphCaches:
        """Pools for `batch` sequences of `capacity` each; contents: what each sequence holds at its first positions,
        every layer's caches in the model's layout order (models/cache.py), [batch, T, width] each."""
        rows = blocks_for(self.capacity, self.io.block_size) * self.io.block_size
        pools = [graph.new_pools(batch * rows) for graph in self.graphs]
        names = [t.name for io in self.ios for t in io.cache_inputs]
        order = sorted(range(len(names)), key=lambda i: cache_order(names[i]))
        widths = [t.dims[-1] for io in self.ios for t in io.cache_inputs]
        check_contents(contents, batch, [widths[i] for i in order], rows)
        if contents:
            by_name = {names[i]: c for i, c in zip(order, contents)}
            for graph, stage_pools, io in zip(self.graphs, pools, self.ios):
                buffers = stage_pools.arrays if hasattr(stage_pools, "arrays") else stage_pools
                for spec, buffer in zip(io.cache_inputs, buffers):
                    value = by_name[spec.name]
                    target = buffer.reshape(batch, rows, -1)  # a view: the pool itself
                    target[:, :value.shape[1]] = value.numpy() if isinstance(target, np.ndarray) else value.to(target)
        return GraphCaches(pools, batch, rows)

    def step(self, input_ids, positions, caches: GraphCaches) -> StepResult:
        """The logits of every position; with ONNX Runtime on the CPU they live in buffers bound to these caches
        that the next decode step of the same batch overwrites (copy what you keep)."""
        input_ids, positions = check_step(self, input_ids, positions, caches.batch)
        shape = (positions.shape[0], positions.shape[1])
        bound = caches.bound.get(shape)
        if bound is not None and not bound[-1].extra_outputs:  # a decode step like the last: three inputs change
            first = bound[0].inputs
            np.copyto(first[INPUT_IDS], input_ids.view(-1).numpy())
            np.copyto(first[POSITIONS], positions.view(-1).numpy())
            np.add(first[SEQUENCE], 0, out=first[SLOTS])  # slot = sequence · rows + position (identity paging)
            first[SLOTS] *= caches.rows
            first[SLOTS] += first[POSITIONS]
            for stage in bound:
                stage.run()
            return StepResult(torch.from_numpy(bound[-1].outputs[LOGITS]).view(*shape, -1))
        paging = Paging.identity(positions, caches.rows, self.io.block_size)
        N = input_ids.numel()
        feeds = {INPUT_IDS: input_ids.reshape(-1).numpy(), POSITIONS: paging.positions.numpy(),
                 SEQUENCE: paging.sequence.numpy(), SLOTS: paging.slots.numpy(),
                 BLOCK_TABLES: paging.block_tables.numpy(), LOGITS_INDEX: np.arange(N, dtype=np.int64),
                 **greedy(N)}
        if all(getattr(graph, "device", None) == "cpu" for graph in self.graphs):  # ONNX Runtime on the CPU
            results = self._bound_step(feeds, caches, shape)
        else:
            results = []
            for graph, io, pools in zip(self.graphs, self.ios, caches.pools):
                if not io.first:
                    feeds[HIDDEN_IN] = results[-1][HIDDEN_OUT]
                results.append(graph.run(feeds, pools))
        selections = [paging.logical(torch.from_numpy(out[name])).view(*shape, -1)
                      for graph, out in zip(self.graphs, results) for name in getattr(graph, "extra_outputs", [])]
        return StepResult(torch.from_numpy(results[-1][LOGITS]).view(*shape, -1), selections)

    def _bound_step(self, feeds: dict, caches: GraphCaches, shape: tuple[int, int]) -> list[dict]:
        """One step through each stage's BoundStep for this shape (bound here; kept on the caches for decode steps,
        whose shape repeats): the later stages share the first stage's input arrays, each hidden_out is bound as the
        next stage's hidden_in, and the feeds are written into each stage's inputs."""
        sizes = {TOKENS: shape[0] * shape[1], SEQUENCES: shape[0], SAMPLES: shape[0] * shape[1]}
        bound = []
        for graph, pools in zip(self.graphs, caches.pools):
            shared = dict(bound[0].inputs) if bound else {}
            if bound:
                shared[HIDDEN_IN] = bound[-1].outputs[HIDDEN_OUT]
            bound.append(getattr(graph, "bind")(pools, sizes, shared))  # OrtGraph.bind
        if shape[1] == 1:  # a prefill's buffers are not kept
            caches.bound[shape] = bound
        for stage in bound:  # the inputs all stages have are one array, written by the first
            for name, array in stage.inputs.items():
                if name in feeds:
                    array[...] = feeds[name]
        for stage in bound:
            stage.run()
        return [stage.outputs for stage in bound]


def greedy(samples: int) -> dict:
    """The sampling inputs of a step whose rows are picked greedily (models/sampling.py)."""
    return {TEMPERATURE: np.zeros(samples, np.float32), TOP_K: np.zeros(samples, np.int32),
            TOP_P: np.ones(samples, np.float32), UNIFORM: np.zeros(samples, np.float32)}


def onnxruntime_module():
    """onnxruntime, or one line saying how to install it (it comes with an extra: [cpu] or [gpu])."""
    try:
        import onnxruntime
    except ImportError:
        raise DSAExportError("ONNX Runtime is not installed: pip install 'dsa-export[cpu]' (or [gpu] on a GPU "
                             "machine: onnxruntime-gpu, never both)") from None
    return onnxruntime


def available_backends(export: ExportDir, target: GPUTarget | None = None, record_indexer: bool = False,
                       log: Callable[[str], None] = print, threads: int | None = None) -> list[GraphBackend]:
    """The graph backends this machine can run the export with: ONNX Runtime (a float32 export on the CPU; any with
    onnxruntime-gpu on a GPU), and the TensorRT engines where every stage has one and TensorRT and a GPU of the
    target are here."""
    onnxruntime = onnxruntime_module()
    backends = []
    gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if export.io.cache_dtype == "float32" or gpu:
        backends.append(GraphBackend.onnxruntime(export, record_indexer=record_indexer, threads=threads))
    if target is not None and export.has_engines:
        from dsa_export.exporter.engine import unavailable

        reason = unavailable(target)
        if reason is None:
            backends.append(GraphBackend.tensorrt(export))
        else:
            log(f"TensorRT engines in {export.root} are not run here: {reason}")
    return backends
