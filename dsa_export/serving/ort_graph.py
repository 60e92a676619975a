"""One exported graph run by ONNX Runtime, with numpy and onnxruntime only (shipped: see serving/__init__.py):
runtime/backends.py's GraphBackend chains one per pipeline stage, and the server's scheduler runs them.

The pools are allocated once (`new_pools`) and bound as both the input and the output of their dsa::WriteCache (its
decomposition is one ScatterND, which ONNX Runtime runs in place when the two are one buffer), so no step copies a
pool: a step's cost does not grow with the pool's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

NUMPY = {"int64": np.int64, "int32": np.int32, "float32": np.float32}


class OrtPools:
    """The pool buffers of one graph: host arrays (CPU) and the OrtValues bound to them, in io.json's order."""

    def __init__(self, arrays: list, values: list):
        self.arrays = arrays
        self.values = values

    @property
    def rows(self) -> int:
        return self.arrays[0].shape[0]


class OrtGraph:
    def __init__(self, model_path: str | Path, io, providers: list[str] | None = None,
                 model_bytes: bytes | None = None, extra_outputs: list[str] | None = None, threads: int | None = None):
        """io: the graph's io_spec.GraphIO; model_bytes: a modified copy of the graph to run instead (its weights
        still read beside model_path); extra_outputs: more graph outputs it exposes (the indexers' selections);
        threads: ONNX Runtime's intra-op threads (None: its default, one per core)."""
        model_path = Path(model_path)
        self.io = io
        self.capacity, self.vocab_size = io.capacity, io.vocab_size
        self.extra_outputs = list(extra_outputs or [])
        available = ort.get_available_providers()
        self.providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        if self.device == "cpu" and io.cache_dtype != "float32":
            raise ValueError(f"a {io.cache_dtype} export; ONNX Runtime on CPU runs float32 exports only "
                             f"(export with --dtype float32)")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # no per-run warnings
        # ONNX Runtime's threads spin after each run by default, starving whatever runs next on a small machine
        # (an eager model between steps ran ~50x slower): let them sleep
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
        if model_bytes is None:
            self.session = ort.InferenceSession(str(model_path), options, providers=self.providers)
        else:  # from memory, the external weights from the export directory
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(model_path.parent.resolve()))
            self.session = ort.InferenceSession(model_bytes, options, providers=self.providers)

    def new_pools(self, rows: int) -> OrtPools:
        """Zeroed pools of `rows` rows (a multiple of the block size), in io.json's order."""
        arrays = [np.zeros(self.io.cache_shape(t, rows), dtype=np.float32) for t in self.io.cache_inputs]
        if self.device == "cpu":
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # shares the array's memory
        else:
            values = [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in arrays]
        return OrtPools(arrays, values)

    def run(self, feeds: dict, pools: OrtPools, outputs: list[str] | None = None) -> dict:
        """The named step outputs (default: all, and the extra ones) of one step; `feeds` holds every step input by
        name (io.json: input_ids or hidden_in, positions, sequence, slots, block_tables, ...). The pools are written
        in place. The caller checks its inputs (ids in the vocabulary, positions within the capacity, slots and
        blocks the sequences own)."""
        binding = self.session.io_binding()
        for spec in self.io.step_inputs:
            binding.bind_cpu_input(spec.name, np.ascontiguousarray(feeds[spec.name], dtype=NUMPY.get(
                spec.dtype, np.float32)))
        for cache_in, cache_out, value in zip(self.io.cache_inputs, self.io.cache_outputs, pools.values):
            binding.bind_ortvalue_input(cache_in.name, value)
            binding.bind_ortvalue_output(cache_out.name, value)  # the same buffer: written in place
        wanted = outputs if outputs is not None else [t.name for t in self.io.step_outputs] + self.extra_outputs
        for name in wanted:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()  # in binding order: the pools, then what was asked for
        return {name: value.numpy() for name, value in zip(wanted, values[len(self.io.cache_outputs):])}
