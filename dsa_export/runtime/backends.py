"""Backends: one `step` over the eager model and over ONNX Runtime sessions of the exported graph.

`step(input_ids, positions, caches) -> StepResult`: logits for every position, the new caches (2 per layer, the
order of io.json: all latent caches, then all index-key caches) and each layer's indexer selection.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsa_export.errors import DSAExportError
from dsa_export.exporter.graph_io import GraphIO
from dsa_export.kernels import CUSTOM_OPS
from dsa_export.models.model import DSAForCausalLM, DSAOps
from dsa_export.plugins.contracts import LIGHTNING_INDEXER
from dsa_export.plugins.onnx_ops import DSA_DOMAIN, register_schemas


@dataclass
class StepResult:
    logits: torch.Tensor  # [B,S,V] fp32
    caches: list[torch.Tensor]  # 2 per layer
    indexer_topk: list[torch.Tensor]  # per layer [B,S,topk] int32


class EagerBackend:
    name = "eager"

    def __init__(self, model: DSAForCausalLM, attention: str = "sparse"):
        """attention: "sparse" (DSA through the dsa:: ops), or "dense" (plain dense MLA, the cost baseline)."""
        self.model = model.eval()
        self.config = model.config
        self.attention = attention
        self.cache_dtype = next(model.parameters()).dtype

    def empty_caches(self, batch: int) -> list[torch.Tensor]:
        c = self.config
        widths = [c.latent_dim] * c.num_hidden_layers + [c.index_head_dim] * c.num_hidden_layers
        return [torch.zeros(batch, 0, w, dtype=self.cache_dtype) for w in widths]

    def step(self, input_ids, positions, caches) -> StepResult:
        L = self.config.num_hidden_layers
        selections = []

        def indexer(*args):
            selections.append(CUSTOM_OPS.lightning_indexer(*args))
            return selections[-1]

        saved = self.model.ops, self.model.attention
        self.model.ops, self.model.attention = DSAOps(indexer, CUSTOM_OPS.sparse_mla), self.attention
        try:
            with torch.no_grad():
                logits, latents, keys = self.model.forward_with_cache(input_ids, positions, caches[:L], caches[L:])
        finally:
            self.model.ops, self.model.attention = saved
        return StepResult(logits, latents + keys, selections)


class OnnxRuntimeBackend:
    """An ONNX Runtime session over `model.onnx` (CPU; CUDA when onnxruntime-gpu and a GPU are present). The indexer
    nodes' outputs are exposed as extra graph outputs of the very same file, so selections can be compared."""

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None):
        import onnx
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        model_path = onnx_dir / "model.onnx"
        if not model_path.exists() or not (onnx_dir / "io.json").exists():
            raise DSAExportError(f"{onnx_dir}: no exported model (model.onnx + io.json); run `dsa-export export` first")
        self.io = GraphIO.load(onnx_dir / "io.json")
        register_schemas()
        graph = onnx.load(model_path, load_external_data=False)
        indexers = [n for n in graph.graph.node if n.domain == DSA_DOMAIN and n.op_type == LIGHTNING_INDEXER.onnx_name]
        self.topk_names = [n.output[0] for n in indexers]
        for name in self.topk_names:
            graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        available = ort.get_available_providers()
        self.providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        # The modified graph sits beside model.onnx.data (relative external-data paths) only until the session is built.
        fd, tmp = tempfile.mkstemp(prefix=".parity.", suffix=".onnx", dir=onnx_dir)
        os.close(fd)
        try:
            onnx.save_model(graph, tmp)
            self.session = ort.InferenceSession(tmp, providers=self.providers)
        finally:
            os.unlink(tmp)
        self.input_names = [t.name for t in self.io.inputs]
        self.output_names = [t.name for t in self.io.outputs] + self.topk_names
        self.cache_dtype = getattr(torch, self.io.inputs[2].dtype)

    def empty_caches(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, 0, t.dims[-1], dtype=self.cache_dtype) for t in self.io.inputs[2:]]

    def step(self, input_ids, positions, caches) -> StepResult:
        feeds = dict(zip(self.input_names, [input_ids.long(), positions.long(), *caches]))
        results = self.session.run(self.output_names, {k: np.ascontiguousarray(v.numpy()) for k, v in feeds.items()})
        tensors = [torch.from_numpy(r) for r in results]
        n_cache = 2 * self.io.num_layers
        return StepResult(tensors[0], tensors[1:1 + n_cache], tensors[1 + n_cache:])
