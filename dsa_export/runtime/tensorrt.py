"""A TensorRT engine (`engine/model.plan` of a build) under the runtime Backend interface (runtime/backends.py),
through runtime/trt_graph.py (the caches CUDA tensors bound in place, a profile per step kind). GPU-only: TensorRT
and torch's CUDA are imported when the backend is created.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsa_export.errors import DSAExportError
from dsa_export.exporter.engine import ENGINE_JSON, PLAN
from dsa_export.exporter.graph_io import GraphIO
from dsa_export.runtime.backends import StepResult, check_contents, check_step


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, build_dir: str | Path):
        from dsa_export.runtime.trt_graph import TrtGraph

        build_dir = Path(build_dir)
        plan = build_dir / "engine" / PLAN
        if not plan.is_file() or not (build_dir / "engine" / ENGINE_JSON).is_file():
            raise DSAExportError(f"{build_dir}: no TensorRT engine (engine/model.plan); run `dsa-export engine`")
        self.io = GraphIO.load(build_dir / "io.json")
        try:
            self.graph = TrtGraph(build_dir)
        except RuntimeError as e:
            raise DSAExportError(str(e)) from None
        self.capacity = self.io.capacity
        self.vocab_size = self.graph.vocab_size
        self.cache_dtype = self.graph.cache_dtype

    def new_caches(self, batch: int, contents: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        check_contents(contents, [self.io.cache_shape(t, batch) for t in self.io.cache_inputs])
        return self.graph.new_caches(batch, contents)

    def step(self, input_ids, positions, caches: list[torch.Tensor]) -> StepResult:
        ids, positions = check_step(self, input_ids, positions, caches[0].shape[0])
        (logits,) = self.graph.run(ids.numpy(), positions.numpy(), caches)
        return StepResult(torch.from_numpy(logits))
