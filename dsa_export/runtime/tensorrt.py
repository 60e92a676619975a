"""A TensorRT engine (`engine/model.plan` of a build) under the runtime Backend interface (runtime/backends.py).

The caches are CUDA tensors at the export's capacity, each bound as both the cache input and its output (the engine
aliases them: KVCacheUpdate writes in place); a step picks the prefill profile for S > 1 tokens and the decode profile
for one, sets the input shapes, binds the buffers and runs on its own stream. GPU-only: TensorRT and torch's CUDA are
imported when the backend is created.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsa_export.errors import DSAExportError
from dsa_export.exporter.engine import ENGINE_JSON, PLAN, PROFILES
from dsa_export.exporter.graph_io import GraphIO
from dsa_export.runtime.backends import StepResult, check_contents, check_step


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, build_dir: str | Path):
        import tensorrt as trt

        build_dir = Path(build_dir)
        plan = build_dir / "engine" / PLAN
        if not plan.is_file() or not (build_dir / "engine" / ENGINE_JSON).is_file():
            raise DSAExportError(f"{build_dir}: no TensorRT engine (engine/model.plan); run `dsa-export engine`")
        self.io = GraphIO.load(build_dir / "io.json")
        self.capacity = self.io.capacity
        self.vocab_size = self.io.outputs[0].dims[-1]
        self.cache_dtype = getattr(torch, self.io.cache_dtype)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise DSAExportError(f"{plan}: TensorRT cannot load this engine (another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.profile = -1

    def new_caches(self, batch: int, contents: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        shapes = [self.io.cache_shape(t, batch) for t in self.io.cache_inputs]
        check_contents(contents, shapes)
        caches = [torch.zeros(shape, dtype=self.cache_dtype, device="cuda") for shape in shapes]
        for cache, value in zip(caches, contents or []):
            cache.copy_(value)
        return caches

    def step(self, input_ids, positions, caches: list[torch.Tensor]) -> StepResult:
        ids, positions = check_step(self, input_ids, positions, caches[0].shape[0])
        profile = PROFILES.index("prefill" if ids.shape[1] > 1 else "decode")
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.profile = profile
        feeds = {"input_ids": ids.cuda(), "positions": positions.cuda()}
        feeds.update((t.name, cache) for t, cache in zip(self.io.cache_inputs, caches))
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        B, S = ids.shape
        logits = torch.empty(B, 1 if self.io.last_logits_only else S, self.vocab_size, device="cuda")
        self.context.set_tensor_address("logits", logits.data_ptr())
        for t in self.io.cache_outputs:  # each is its input's buffer, written in place
            source = self.engine.get_aliased_input_tensor(t.name)
            if source is None:
                raise DSAExportError(f"the engine's {t.name} does not alias its cache input: not written in place")
            self.context.set_tensor_address(t.name, feeds[source].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # the inputs copied above
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine")
        self.stream.synchronize()
        return StepResult(logits.float().cpu())
