"""One TensorRT engine (a stage's model.plan) run step by step, with torch's CUDA tensors, tensorrt and numpy only
(shipped: see serving/__init__.py): runtime/backends.py's GraphBackend chains one per pipeline stage (stage i on
GPU i), and the GPU step model of the Triton repository runs it in process.

The caches are CUDA tensors at the export's capacity, each bound as both the cache input and its output: the engine
writes them in place (KVCacheUpdate, which requires the input and the output at one device address), so no step
copies a cache. A step picks the prefill profile for S > 1 tokens and the decode profile for one, sets the input
shapes, binds the buffers and runs on its own stream. GPU-only: TensorRT is imported when a graph is created.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TrtGraph:
    def __init__(self, plan_path: str | Path, io, profiles: list[str], device: int = 0):
        """io: the graph's io_spec.GraphIO; profiles: the optimisation profiles in the engine's order, as its build
        recorded them in engine.json ("prefill", "decode")."""
        import tensorrt as trt

        plan_path = Path(plan_path)
        self.io, self.profiles = io, list(profiles)
        self.capacity, self.vocab_size = io.capacity, io.vocab_size
        # input_ids → logits; a pipeline stage may take the previous stage's hidden_in and return hidden_out
        self.first_input, self.output = io.first_input.name, io.output.name
        self.cache_dtype = getattr(torch, io.cache_dtype)
        self.device = torch.device("cuda", device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: TensorRT cannot load this engine (built by another TensorRT version, "
                               f"or for another GPU?)")
        self.aliases = {}  # cache output -> its cache input: one buffer
        for name in (t.name for t in io.cache_outputs):
            source = self.engine.get_aliased_input_tensor(name)
            if source is None:
                raise RuntimeError(f"the engine's {name} does not alias its cache input: not written in place")
            self.aliases[name] = source
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.profile = -1

    def new_caches(self, batch: int, contents: list | None = None) -> list[torch.Tensor]:
        """Zeroed caches for `batch` sequences (or holding `contents`), in io.json's order."""
        shapes = [self.io.cache_shape(t, batch) for t in self.io.cache_inputs]
        caches = [torch.zeros(shape, dtype=self.cache_dtype, device=self.device) for shape in shapes]
        for cache, value in zip(caches, contents or []):
            cache.copy_(torch.as_tensor(value))
        return caches

    def run(self, first: np.ndarray, positions: np.ndarray, caches: list[torch.Tensor]) -> list[np.ndarray]:
        """[logits (or hidden_out)] (float32, on the host) of one step over input_ids (or hidden_in [B,S,H]) and
        positions [B,S] int64; the caches are written in place. The caller checks its inputs (ids in the
        vocabulary, consecutive positions within the capacity)."""
        batch, seq = positions.shape
        profile = self.profiles.index("prefill" if seq > 1 else "decode")
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.profile = profile
        first_dtype = getattr(torch, self.io.first_input.dtype)
        feeds = {self.first_input: torch.as_tensor(np.ascontiguousarray(first)).to(self.device, first_dtype),
                 self.io.inputs[1].name: torch.as_tensor(np.ascontiguousarray(positions, dtype=np.int64),
                                                         device=self.device)}
        feeds.update((t.name, cache) for t, cache in zip(self.io.cache_inputs, caches))
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        dims = self.io.output.dims  # [batch, seq | 1, vocab | hidden]
        out = torch.empty(batch, dims[1] if isinstance(dims[1], int) else seq, dims[2],
                          dtype=getattr(torch, self.io.output.dtype), device=self.device)
        self.context.set_tensor_address(self.output, out.data_ptr())
        for name, source in self.aliases.items():  # each cache output is its input's buffer, written in place
            self.context.set_tensor_address(name, feeds[source].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the input copies above
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine")
        self.stream.synchronize()
        return [out.float().cpu().numpy()]
