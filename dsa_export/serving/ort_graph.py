"""One exported graph run by ONNX Runtime, with numpy and onnxruntime only (shipped: see serving/__init__.py):
runtime/backends.py's GraphBackend chains one per pipeline stage, and the CPU step model of the Triton repository
runs it.

The caches of a batch are allocated once at the export's capacity (io.json) and bound as both the input and the
output of their TensorScatter (IOBinding), so ONNX Runtime writes the new rows in place and no step copies a cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class OrtCaches:
    """The cache buffers of one batch: host arrays (CPU) and the OrtValues bound to them, in io.json's order."""

    def __init__(self, arrays: list, values: list):
        self.arrays = arrays
        self.values = values


class OrtGraph:
    def __init__(self, model_path: str | Path, io, providers: list[str] | None = None,
                 model_bytes: bytes | None = None, extra_outputs: list[str] | None = None):
        """io: the graph's io_spec.GraphIO; model_bytes: a modified copy of the graph to run instead (its weights
        still read beside model_path); extra_outputs: more graph outputs it exposes (returned after the logits)."""
        model_path = Path(model_path)
        self.io = io
        self.capacity, self.vocab_size = io.capacity, io.vocab_size
        # input_ids → logits; a pipeline stage may take the previous stage's hidden_in and return hidden_out
        self.first_input, self.output = io.first_input.name, io.output.name
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
        if model_bytes is None:
            self.session = ort.InferenceSession(str(model_path), options, providers=self.providers)
        else:  # from memory, the external weights from the export directory
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(model_path.parent.resolve()))
            self.session = ort.InferenceSession(model_bytes, options, providers=self.providers)

    def new_caches(self, batch: int, contents: list | None = None) -> OrtCaches:
        """Zeroed caches for `batch` sequences (or holding `contents`, numpy arrays in io.json order)."""
        arrays = [np.zeros(self.io.cache_shape(t, batch), dtype=np.float32) for t in self.io.cache_inputs]
        for array, value in zip(arrays, contents or []):
            array[...] = value
        if self.device == "cpu":
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # shares the array's memory
        else:
            values = [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in arrays]
        return OrtCaches(arrays, values)

    def run(self, first: np.ndarray, positions: np.ndarray, caches: OrtCaches) -> list[np.ndarray]:
        """[logits (or hidden_out), *extra outputs] of one step over input_ids (or hidden_in [B,S,H]) and positions
        [B,S] int64; the caches are written in place. The caller checks its inputs (ids in the vocabulary,
        consecutive positions within the capacity)."""
        binding = self.session.io_binding()
        dtype = np.int64 if self.io.first else np.float32
        binding.bind_cpu_input(self.first_input, np.ascontiguousarray(first, dtype=dtype))
        binding.bind_cpu_input(self.io.inputs[1].name, np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_output(self.output, self.device)
        for cache_in, cache_out, value in zip(self.io.cache_inputs, self.io.cache_outputs, caches.values):
            binding.bind_ortvalue_input(cache_in.name, value)
            binding.bind_ortvalue_output(cache_out.name, value)  # the same buffer: TensorScatter writes in place
        for name in self.extra_outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in binding order: logits, caches, extra outputs
        first = len(self.io.cache_outputs) + 1
        return [outputs[0].numpy()] + [v.numpy() for v in outputs[first:]]
