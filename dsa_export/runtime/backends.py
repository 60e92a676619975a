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

import numpy as np
import torch

from dsa_export.contracts import LIGHTNING_INDEXER
from dsa_export.errors import DSAExportError
from dsa_export.exporter.graph_io import GraphIO
from dsa_export.kernels import CUSTOM_OPS
from dsa_export.models import inputs
from dsa_export.models.cache import KVCache, check_room, default_capacity
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


def load_graph_io(onnx_dir: Path) -> GraphIO:
    if not (onnx_dir / "model.onnx").is_file() or not (onnx_dir / "io.json").is_file():
        raise DSAExportError(f"{onnx_dir}: no exported model (model.onnx + io.json); run `dsa-export export` first")
    return GraphIO.load(onnx_dir / "io.json")


@dataclass
class OrtCaches:
    """The cache buffers of one batch, bound to both the input and the output of each cache (written in place)."""
    arrays: list[np.ndarray]  # host memory the OrtValues share (CPU)
    values: list[Any]  # onnxruntime.OrtValue per cache, io.json order


class OnnxRuntimeBackend:
    """An ONNX Runtime session over `model.onnx` (CPU; CUDA when onnxruntime-gpu and a GPU are present). Each cache
    is bound once, as the input and the output of its TensorScatter (IOBinding), so no step copies a cache.
    record_indexer exposes the indexer nodes' outputs as extra graph outputs (a modified copy of the graph, in
    memory; the export directory is never written)."""

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None, record_indexer: bool = False):
        import onnx
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        self.io = load_graph_io(onnx_dir)
        if self.io.cache_dtype != "float32":
            raise DSAExportError(f"{onnx_dir}: a {self.io.cache_dtype} export; ONNX Runtime on CPU runs float32 "
                                 f"exports only (export with --dtype float32)")
        register_schemas()
        available = ort.get_available_providers()
        self.providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.topk_names: list[str] = []
        options = ort.SessionOptions()
        options.log_severity_level = 3  # no per-run warnings
        # ONNX Runtime's threads spin after each run by default, starving whatever runs next on a small machine
        # (an eager model between steps ran ~50x slower): let them sleep
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            if record_indexer:
                graph = onnx.load(onnx_dir / "model.onnx", load_external_data=False)
                indexers = [n for n in graph.graph.node
                            if n.domain == DSA_DOMAIN and n.op_type == LIGHTNING_INDEXER.onnx_name]
                self.topk_names = [n.output[0] for n in indexers]
                for name in self.topk_names:
                    graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                # the modified graph from memory, its external weights from the export directory
                options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                 str(onnx_dir.resolve()))
                self.session = ort.InferenceSession(graph.SerializeToString(), options, providers=self.providers)
            else:
                self.session = ort.InferenceSession(str(onnx_dir / "model.onnx"), options, providers=self.providers)
        except Exception as e:  # ONNX Runtime raises its own types for unreadable or mismatched files
            raise DSAExportError(f"{onnx_dir}: ONNX Runtime cannot load model.onnx "
                                 f"({str(e).splitlines()[0][:300]})") from None
        self.capacity = self.io.capacity
        self.cache_dtype = torch.float32
        self.vocab_size = self.io.outputs[0].dims[-1]

    def new_caches(self, batch: int, contents: list[torch.Tensor] | None = None) -> OrtCaches:
        import onnxruntime as ort

        shapes = [self.io.cache_shape(t, batch) for t in self.io.cache_inputs]
        check_contents(contents, shapes)
        arrays = [np.zeros(shape, dtype=np.float32) for shape in shapes]
        for array, value in zip(arrays, contents or []):
            array[...] = value.numpy()
        if self.device == "cpu":
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # shares the array's memory
        else:
            values = [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in arrays]
        return OrtCaches(arrays, values)

    def step(self, input_ids, positions, caches: OrtCaches) -> StepResult:
        input_ids, positions = check_step(self, input_ids, positions, caches.arrays[0].shape[0])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids.numpy(), dtype=np.int64))
        binding.bind_cpu_input("positions", np.ascontiguousarray(positions.numpy(), dtype=np.int64))
        binding.bind_output("logits", self.device)
        for cache_in, cache_out, value in zip(self.io.cache_inputs, self.io.cache_outputs, caches.values):
            binding.bind_ortvalue_input(cache_in.name, value)
            binding.bind_ortvalue_output(cache_out.name, value)  # the same buffer: TensorScatter writes in place
        for name in self.topk_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in binding order: logits, caches, indexer selections
        first = len(self.io.cache_outputs) + 1
        return StepResult(torch.from_numpy(outputs[0].numpy()), [torch.from_numpy(v.numpy()) for v in outputs[first:]])
