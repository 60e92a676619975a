"""Backends: one interface (`Backend`) over the eager model and ONNX Runtime sessions of the exported graph (and
TensorRT engines, where present).

A backend owns nothing per sequence: `new_caches(batch)` hands out zeroed caches at the backend's capacity (layout:
models/cache.py), `step(input_ids, positions, caches)` writes the step's rows into them in place and returns the
logits (and, if asked for, each layer's indexer selection for parity checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dsa_export.contracts import LIGHTNING_INDEXER
from dsa_export.errors import DSAExportError
from dsa_export.kernels import CUSTOM_OPS
from dsa_export.models import inputs
from dsa_export.models.cache import KVCache, cache_order, check_room, default_capacity
from dsa_export.models.model import DSAForCausalLM
from dsa_export.plugins.onnx_ops import DSA_DOMAIN, register_schemas


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

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: Any) -> StepResult:
        """One forward over S tokens per row at consecutive `positions`; writes their cache rows in place."""


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


class OnnxRuntimeBackend:
    """An ONNX Runtime session over `model.onnx` (CPU; CUDA when onnxruntime-gpu and a GPU are present), through
    runtime/ort_graph.py: each cache bound once, as the input and the output of its TensorScatter, so no step copies
    a cache. A build cut into pipeline stages (stage-*/) runs as a chain, each stage's hidden state feeding the next,
    each with its own caches. record_indexer exposes the indexer nodes' outputs as extra graph outputs (a modified
    copy of the graph, in memory; the export directory is never written)."""

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None, record_indexer: bool = False):
        from dsa_export.exporter.checks import check_export_dir
        from dsa_export.exporter.graph_io import stage_dirs
        from dsa_export.runtime.ort_graph import OrtGraph

        self.graphs, self.ios = [], []
        for stage_dir in stage_dirs(Path(onnx_dir)):
            io = check_export_dir(stage_dir)
            register_schemas()
            model_bytes, extra = None, []
            if record_indexer:
                import onnx

                graph = onnx.load(stage_dir / "model.onnx", load_external_data=False)
                extra = [n.output[0] for n in graph.graph.node
                         if n.domain == DSA_DOMAIN and n.op_type == LIGHTNING_INDEXER.onnx_name]
                graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in extra)
                model_bytes = graph.SerializeToString()
            try:
                self.graphs.append(OrtGraph(stage_dir, providers, model_bytes, extra))
            except ValueError as e:  # OrtGraph's own refusal
                raise DSAExportError(f"{stage_dir}: {e}") from None
            except Exception as e:  # ONNX Runtime raises its own types for unreadable or mismatched files
                raise DSAExportError(f"{stage_dir}: ONNX Runtime cannot load model.onnx "
                                     f"({str(e).splitlines()[0][:300]})") from None
            self.ios.append(io)
        self.io = self.ios[0]
        self.providers = self.graphs[0].providers
        self.capacity = self.io.capacity
        self.cache_dtype = torch.float32
        self.vocab_size = self.graphs[0].vocab_size

    def new_caches(self, batch: int, contents: list[torch.Tensor] | None = None) -> list:
        """One OrtCaches per stage; contents: every layer's caches in the model's layout order (models/cache.py)."""
        names = [t.name for io in self.ios for t in io.cache_inputs]
        shapes = [io.cache_shape(t, batch) for io in self.ios for t in io.cache_inputs]
        order = sorted(range(len(names)), key=lambda i: cache_order(names[i]))
        check_contents(contents, [shapes[i] for i in order])
        by_name = {names[i]: c for i, c in zip(order, contents)} if contents else {}
        return [graph.new_caches(batch, [by_name[t.name].numpy() for t in io.cache_inputs] if contents else None)
                for graph, io in zip(self.graphs, self.ios)]

    def step(self, input_ids, positions, caches) -> StepResult:
        input_ids, positions = check_step(self, input_ids, positions, caches[0].arrays[0].shape[0])
        out, selections = input_ids.numpy(), []
        for graph, stage_caches in zip(self.graphs, caches):
            out, *stage_selections = graph.run(out, positions.numpy(), stage_caches)
            selections += stage_selections
        return StepResult(torch.from_numpy(out), [torch.from_numpy(s) for s in selections])
