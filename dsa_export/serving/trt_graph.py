"""One TensorRT engine (a stage's model.plan) run step by step, with torch's CUDA tensors, tensorrt and numpy only
(shipped: see serving/__init__.py): runtime/backends.py's GraphBackend chains one per pipeline stage (stage i on
GPU i), and the server's scheduler runs them in process.

The pools are CUDA tensors allocated once (`new_pools`) and bound as both the input and the output of their
dsa::WriteCache plugin (its output aliases its input), so no step copies a pool. The engine has one optimisation
profile (every step is a packed batch); every input shape and address is checked as it is set, and a step outside
the profile fails naming the shape and the profile's range. The GPU is made current before anything is created on
it and around every step (the Triton Python backend never does that for a model instance). GPU-only: TensorRT is
imported when a graph is created.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch


class TrtGraph:
    def __init__(self, plan_path: str | Path, io, profiles: list[str], device: int = 0):
        """io: the graph's io_spec.GraphIO; profiles: the optimisation profiles in the engine's order, as its build
        recorded them in engine.json."""
        import tensorrt as trt

        plan_path = Path(plan_path)
        self.io, self.profiles = io, list(profiles)
        self.capacity, self.vocab_size = io.capacity, io.vocab_size
        self.cache_dtype = getattr(torch, io.cache_dtype)
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)  # the engine, its context and its memory belong to the current device
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            with open(plan_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
                # mapped, not read: no second copy of a plan of tens of GB in this process's memory
                self.engine = self.runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise RuntimeError(f"{plan_path}: TensorRT cannot load this engine (built by another TensorRT "
                                   f"version, or for another GPU?)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        self.profile = -1

    def new_pools(self, rows: int) -> list[torch.Tensor]:
        """Zeroed pools of `rows` rows (a multiple of the block size), in io.json's order, on the engine's GPU."""
        return [torch.zeros(self.io.cache_shape(t, rows), dtype=self.cache_dtype, device=self.device)
                for t in self.io.cache_inputs]

    def _set(self, name: str, tensor: torch.Tensor, shape: bool = True) -> None:
        if shape and not self.context.set_input_shape(name, tuple(tensor.shape)):
            low, _, high = self.engine.get_tensor_profile_shape(name, self.profile)
            low, high = [low[i] for i in range(len(low))], [high[i] for i in range(len(high))]
            raise RuntimeError(f"TensorRT refuses {name} of shape {list(tensor.shape)}: the engine's profile "
                               f"'{self.profiles[self.profile]}' takes {low} to {high} (rebuild it with larger "
                               f"--max-batch, --max-tokens or --pool-tokens)")
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"TensorRT refuses the address of {name}")

    def run(self, feeds: dict, pools: list[torch.Tensor], outputs: list[str] | None = None) -> dict:
        """The named step outputs (default: all) of one step, on the host; `feeds` holds every step input by name
        (numpy arrays, or CUDA tensors already on this GPU). The pools are written in place."""
        with torch.cuda.device(self.device):
            if self.profile != 0:
                if not self.context.set_optimization_profile_async(0, self.stream.cuda_stream):
                    raise RuntimeError("TensorRT cannot select the engine's optimisation profile")
                self.profile = 0
            tensors = {}
            for spec in self.io.step_inputs:
                value = torch.as_tensor(np.ascontiguousarray(feeds[spec.name]) if isinstance(feeds[spec.name], np.ndarray)
                                        else feeds[spec.name])
                tensors[spec.name] = value.to(self.device, getattr(torch, spec.dtype)).contiguous()
                self._set(spec.name, tensors[spec.name])
            for cache_in, cache_out, pool in zip(self.io.cache_inputs, self.io.cache_outputs, pools):
                self._set(cache_in.name, pool)
                self._set(cache_out.name, pool, shape=False)  # the same buffer: written in place
            sizes = {"tokens": tensors[self.io.inputs[1].name].shape[0]}
            if self.io.last:
                sizes["samples"] = tensors["logits_index"].shape[0]
            results = {}
            for spec in self.io.step_outputs:  # TensorRT writes every output: each gets a buffer
                shape = [sizes.get(d, d) for d in spec.dims]
                results[spec.name] = torch.empty(shape, dtype=getattr(torch, spec.dtype), device=self.device)
                self._set(spec.name, results[spec.name], shape=False)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the input copies above
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT failed to run the engine")
            self.stream.synchronize()
            wanted = outputs if outputs is not None else list(results)
            return {name: results[name].float().cpu().numpy() if results[name].is_floating_point()
                    else results[name].cpu().numpy() for name in wanted}
