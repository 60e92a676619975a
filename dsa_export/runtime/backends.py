"""Backends: one interface (`Backend`) over the eager model and the exported graphs, run by ONNX Runtime or by
TensorRT engines (`GraphBackend`: one graph per pipeline stage, chained, stage i on device i).

A backend owns nothing per sequence: `new_caches(batch)` hands out zeroed caches at the backend's capacity (layout:
models/cache.py), `step(input_ids, positions, caches)` writes the step's rows into them in place and returns the
logits (and, if asked for, each layer's indexer selection for parity checks). Which graph backends a machine can run
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
from dsa_export.models.cache import KVCache, cache_order, check_room, default_capacity
from dsa_export.models.model import DSAForCausalLM
from dsa_export.plugins.onnx_ops import DSA_DOMAIN, register_schemas
from dsa_export.serving.io_spec import GraphIO
from dsa_export.targets import GPUTarget


@dataclass
class StepResult:
    logits: torch.Tensor  # [B,S,V] fp32 ([B,1,V] for an export with last_logits_only)
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


def check_contents(contents: list[torch.Tensor] | None, shapes: list[tuple[int, ...]]) -> None:
    if contents is not None and [tuple(c.shape) for c in contents] != shapes:
        raise DSAExportError(f"cache contents must be {len(shapes)} tensors of shapes {shapes[:1]}..., in layout order")


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
        cache = self.model.new_cache(batch, self.capacity)
        check_contents(contents, [tuple(t.shape) for t in cache.tensors()])
        for tensor, value in zip(cache.tensors(), contents or []):
            tensor.copy_(value)
        return cache

    def step(self, input_ids, positions, caches: KVCache) -> StepResult:
        input_ids, positions = check_step(self, input_ids, positions, caches.batch)
        selections: list[torch.Tensor] = []
        ops = CUSTOM_OPS
        if self.record_indexer:
            def indexer(*args):
                selections.append(CUSTOM_OPS.lightning_indexer(*args))
                return selections[-1]

            ops = CUSTOM_OPS._replace(lightning_indexer=indexer)
        with torch.no_grad():
            logits, _, _ = self.model.forward_with_cache(input_ids, positions, caches.latent, caches.index_keys, ops,
                                                         self.attention)
        return StepResult(logits, selections)


class StepGraph(Protocol):
    """One exported graph run step by step (serving/ort_graph.py, serving/trt_graph.py), its caches kept by the
    caller and written in place."""
    io: GraphIO

    def new_caches(self, batch: int, contents: list | None = None) -> Any:
        """Caches for `batch` sequences at the graph's capacity (zeroed, or holding `contents`, io.json order)."""
        ...

    def run(self, first: np.ndarray, positions: np.ndarray, caches: Any) -> list[np.ndarray]:
        """[logits or hidden_out, *extra outputs] of one step over input_ids (or hidden_in) at positions."""
        ...


class GraphBackend:
    """The exported graphs of an export (one per pipeline stage) as one model: each step runs the stages in layer
    order, each stage's hidden state feeding the next, each stage with its own caches. Built by `onnxruntime` (ONNX
    Runtime sessions) or `tensorrt` (the stages' engines, stage i on GPU i)."""

    def __init__(self, name: str, graphs: list[StepGraph], cache_dtype: torch.dtype,
                 to_torch: Callable | None = None):
        self.name = name
        self.graphs = graphs
        self.ios = [g.io for g in graphs]
        self.io = self.ios[0]
        self.capacity, self.vocab_size = self.io.capacity, self.io.vocab_size
        self.cache_dtype = cache_dtype
        self.to_caches = to_torch or (lambda c: c.numpy())  # a layout-order content tensor → what new_caches takes
        self.providers: list[str] = list(getattr(graphs[0], "providers", []))  # ONNX Runtime's, in order

    @classmethod
    def onnxruntime(cls, export: ExportDir | str | Path, providers: list[str] | None = None,
                    record_indexer: bool = False) -> "GraphBackend":
        """ONNX Runtime sessions over the export's graphs (CPU; CUDA when onnxruntime-gpu and a GPU are present), each
        cache bound once as the input and the output of its TensorScatter, so no step copies a cache.
        record_indexer exposes the indexer nodes' outputs as extra graph outputs (a modified copy of the graph, in
        memory; the export directory is never written)."""
        from dsa_export.serving.ort_graph import OrtGraph

        export = as_export(export)
        export.check()
        register_schemas()
        graphs = []
        for stage in export.stages:
            model_bytes, extra = None, []
            if record_indexer:
                import onnx

                graph = onnx.ModelProto()
                graph.CopyFrom(stage.graph)
                extra = [n.output[0] for n in graph.graph.node
                         if n.domain == DSA_DOMAIN and n.op_type == LIGHTNING_INDEXER.onnx_name]
                graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in extra)
                model_bytes = graph.SerializeToString()
            try:
                graphs.append(OrtGraph(stage.model_path, stage.io, providers, model_bytes, extra))
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
        return cls("tensorrt", graphs, graphs[0].cache_dtype, to_torch=lambda c: c)

    def new_caches(self, batch: int, contents: list[torch.Tensor] | None = None) -> list:
        """One set of caches per stage; contents: every layer's caches in the model's layout order (models/cache.py)."""
        names = [t.name for io in self.ios for t in io.cache_inputs]
        shapes = [io.cache_shape(t, batch) for io in self.ios for t in io.cache_inputs]
        order = sorted(range(len(names)), key=lambda i: cache_order(names[i]))
        check_contents(contents, [shapes[i] for i in order])
        by_name = {names[i]: c for i, c in zip(order, contents)} if contents else {}
        return [graph.new_caches(batch, [self.to_caches(by_name[t.name]) for t in io.cache_inputs] if contents else None)
                for graph, io in zip(self.graphs, self.ios)]

    def step(self, input_ids, positions, caches) -> StepResult:
        input_ids, positions = check_step(self, input_ids, positions, _batch(caches[0]))
        out, selections = input_ids.numpy(), []
        for graph, stage_caches in zip(self.graphs, caches):
            out, *stage_selections = graph.run(out, positions.numpy(), stage_caches)
            selections += stage_selections
        return StepResult(torch.from_numpy(out), [torch.from_numpy(s) for s in selections])


def _batch(caches) -> int:
    """The batch of one stage's caches (OrtCaches, or a list of CUDA tensors)."""
    first = caches.arrays[0] if hasattr(caches, "arrays") else caches[0]
    return first.shape[0]


def available_backends(export: ExportDir, target: GPUTarget | None = None, record_indexer: bool = False,
                       log: Callable[[str], None] = print) -> list[GraphBackend]:
    """The graph backends this machine can run the export with: ONNX Runtime (a float32 export on the CPU; any with
    onnxruntime-gpu on a GPU), and the TensorRT engines where every stage has one and TensorRT and a GPU of the
    target are here."""
    import onnxruntime

    backends = []
    gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if export.io.cache_dtype == "float32" or gpu:
        backends.append(GraphBackend.onnxruntime(export, record_indexer=record_indexer))
    if target is not None and export.has_engines:
        from dsa_export.exporter.engine import unavailable

        reason = unavailable(target)
        if reason is None:
            backends.append(GraphBackend.tensorrt(export))
        else:
            log(f"TensorRT engines in {export.root} are not run here: {reason}")
    return backends
