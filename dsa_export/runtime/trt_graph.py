"""One TensorRT engine (`engine/model.plan` of a build) run step by step, with torch's CUDA tensors, tensorrt and
numpy only (nothing else of this package): runtime/tensorrt.py's TensorRTBackend wraps it, and the Triton model
repository ships this very file beside the GPU step model (deploy/), which runs the engine in process.

The caches are CUDA tensors at the export's capacity, each bound as both the cache input and its output: the engine
writes them in place (KVCacheUpdate, which requires the input and the output at one device address), so no step
copies a cache. A step picks the prefill profile for S > 1 tokens and the decode profile for one, sets the input
shapes, binds the buffers and runs on its own stream. GPU-only: TensorRT is imported when a graph is created.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class TrtGraph:
    def __init__(self, build_dir: str | Path, device: int = 0):
        import tensorrt as trt

        build_dir = Path(build_dir)
        self.io = json.loads((build_dir / "io.json").read_text(encoding="utf-8"))
        # the optimisation profiles in the engine's order, as its build recorded them ("prefill", "decode")
        self.profiles = json.loads((build_dir / "engine" / "engine.json").read_text(encoding="utf-8"))["profiles"]
        self.capacity = self.io["capacity"]
        self.vocab_size = json.loads((build_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"]
        # input_ids → logits; a pipeline stage may take the previous stage's hidden_in and return hidden_out
        self.first_spec, self.output_spec = self.io["inputs"][0], self.io["outputs"][0]
        self.first_input, self.output = self.first_spec["name"], self.output_spec["name"]
        self.cache_inputs = self.io["inputs"][2:]
        self.cache_outputs = [t["name"] for t in self.io["outputs"][1:]]
        self.cache_dtype = getattr(torch, self.io["cache_dtype"])
        self.device = torch.device("cuda", device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine((build_dir / "engine" / "model.plan").read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{build_dir / 'engine' / 'model.plan'}: TensorRT cannot load this engine (built by "
                               f"another TensorRT version, or for another GPU?)")
        self.aliases = {}  # cache output -> its cache input: one buffer
        for name in self.cache_outputs:
            source = self.engine.get_aliased_input_tensor(name)
            if source is None:
                raise RuntimeError(f"the engine's {name} does not alias its cache input: not written in place")
            self.aliases[name] = source
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.profile = -1

    def new_caches(self, batch: int, contents: list | None = None) -> list[torch.Tensor]:
        """Zeroed caches for `batch` sequences (or holding `contents`), in io.json's order."""
        shapes = [tuple(batch if d == "batch" else d for d in t["dims"]) for t in self.cache_inputs]
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
        first_dtype = getattr(torch, self.first_spec["dtype"])
        feeds = {self.first_input: torch.as_tensor(np.ascontiguousarray(first)).to(self.device, first_dtype),
                 "positions": torch.as_tensor(np.ascontiguousarray(positions, dtype=np.int64), device=self.device)}
        feeds.update((t["name"], cache) for t, cache in zip(self.cache_inputs, caches))
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        dims = self.output_spec["dims"]  # [batch, seq | 1, vocab | hidden]
        out = torch.empty(batch, dims[1] if isinstance(dims[1], int) else seq, dims[2],
                          dtype=getattr(torch, self.output_spec["dtype"]), device=self.device)
        self.context.set_tensor_address(self.output, out.data_ptr())
        for name, source in self.aliases.items():  # each cache output is its input's buffer, written in place
            self.context.set_tensor_address(name, feeds[source].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the input copies above
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine")
        self.stream.synchronize()
        return [out.float().cpu().numpy()]
