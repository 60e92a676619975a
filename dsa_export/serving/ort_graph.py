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


def providers_for(requested: list[str] | None = None) -> list[str]:
    """The execution providers a session runs on: those requested, else CUDA where onnxruntime-gpu has it, then CPU."""
    available = ort.get_available_providers()
    return requested or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options(threads: int | None = None, profile: bool = False) -> ort.SessionOptions:
    """The thread policy of every ONNX Runtime session here (Session and parity, the measured cost, the served step
    model). `threads` given: the session owns that many cores, and its intra-op threads spin while a step runs (a
    decode step is hundreds of small nodes: a sleeping thread woken for each parallel one costs more than it
    brings: two threads were slower than one) and stop as soon as the step returns (spinning between steps starved
    whatever ran next on a small machine: an eager model ran ~50x slower). None (the served step model, beside the
    server's own threads and the other stages' sessions): one thread per core, which sleep when idle.
    profile: ONNX Runtime's profiler on (Session.end_profiling gives its trace)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no per-run warnings
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if threads is None else "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
    if profile:
        import tempfile

        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "dsa-export-ort-profile")
    return options


def bind_pools(binding, io, pools: OrtPools) -> None:
    """Each pool bound as its WriteCache's input and output: the same buffer, written in place."""
    for cache_in, cache_out, value in zip(io.cache_inputs, io.cache_outputs, pools.values):
        binding.bind_ortvalue_input(cache_in.name, value)
        binding.bind_ortvalue_output(cache_out.name, value)


class BoundStep:
    """One step shape of one graph bound once (ONNX Runtime's IOBinding over numpy arrays): the caller writes the
    step's inputs into `inputs` in place, `run()`s, and reads `outputs`, which the next run overwrites. A Session's
    decode steps repeat one shape, so a step allocates and copies nothing on the Python side."""

    def __init__(self, session, io, pools: OrtPools, sizes: dict, shared: dict | None = None,
                 extra_outputs: list[str] | None = None):
        """sizes: the named dims (tokens, sequences, samples) → their sizes; shared: arrays to bind as some inputs
        (the previous stage's hidden_out as this stage's hidden_in: no copy between stages)."""
        self.session = session
        self.binding = session.io_binding()
        self.inputs = {}
        for spec in io.step_inputs:
            array = (shared or {}).get(spec.name)
            if array is None:
                array = np.zeros([sizes.get(d, d) for d in spec.dims], NUMPY.get(spec.dtype, np.float32))
            self.inputs[spec.name] = array
            self.binding.bind_ortvalue_input(spec.name, ort.OrtValue.ortvalue_from_numpy(array))
        bind_pools(self.binding, io, pools)
        self.outputs = {}
        for spec in io.step_outputs:
            self.outputs[spec.name] = np.zeros([sizes.get(d, d) for d in spec.dims], NUMPY.get(spec.dtype, np.float32))
            self.binding.bind_ortvalue_output(spec.name, ort.OrtValue.ortvalue_from_numpy(self.outputs[spec.name]))
        self.extra_outputs = list(extra_outputs or [])  # shapes known only after the run: ONNX Runtime allocates
        for name in self.extra_outputs:
            self.binding.bind_output(name, "cpu")

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)
        if self.extra_outputs:
            values = self.binding.get_outputs()[-len(self.extra_outputs):]
            self.outputs.update((name, value.numpy()) for name, value in zip(self.extra_outputs, values))


class OrtGraph:
    def __init__(self, model_path: str | Path, io, providers: list[str] | None = None,
                 model_bytes: bytes | None = None, extra_outputs: list[str] | None = None, threads: int | None = None,
                 profile: bool = False):
        """io: the graph's io_spec.GraphIO; model_bytes: a modified copy of the graph to run instead (its weights
        still read beside model_path); extra_outputs: more graph outputs it exposes (the indexers' selections);
        threads and profile: session_options'."""
        model_path = Path(model_path)
        self.io = io
        self.capacity, self.vocab_size = io.capacity, io.vocab_size
        self.extra_outputs = list(extra_outputs or [])
        self.providers = providers_for(providers)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        if self.device == "cpu" and io.cache_dtype != "float32":
            raise ValueError(f"a {io.cache_dtype} export; ONNX Runtime on CPU runs float32 exports only "
                             f"(export with --dtype float32)")
        options = session_options(threads, profile)
        if model_bytes is None:
            self.session = ort.InferenceSession(str(model_path), options, providers=self.providers)
        else:  # from memory, the external weights from the export directory; the path as given, unresolved (a
            # served build in a non-ASCII path is reached through an ASCII symlink: resolved, the Python backend's
            # ASCII filesystem encoding could not pass it on)
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(model_path.parent.absolute()))
            self.session = ort.InferenceSession(model_bytes, options, providers=self.providers)

    def new_pools(self, rows: int) -> OrtPools:
        """Zeroed pools of `rows` rows (a multiple of the block size), in io.json's order."""
        arrays = [np.zeros(self.io.cache_shape(t, rows), dtype=np.float32) for t in self.io.cache_inputs]
        if self.device == "cpu":
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # shares the array's memory
        else:
            values = [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in arrays]
        return OrtPools(arrays, values)

    def bind(self, pools: OrtPools, sizes: dict, shared: dict | None = None) -> BoundStep:
        """This graph's steps of one shape bound once over `pools` (BoundStep); CPU only."""
        return BoundStep(self.session, self.io, pools, sizes, shared, self.extra_outputs)

    def run(self, feeds: dict, pools: OrtPools, outputs: list[str] | None = None) -> dict:
        """The named step outputs (default: all, and the extra ones) of one step; `feeds` holds every step input by
        name (io.json: input_ids or hidden_in, positions, sequence, slots, block_tables, ...). The pools are written
        in place. The caller checks its inputs (ids in the vocabulary, positions within the capacity, slots and
        blocks the sequences own)."""
        binding = self.session.io_binding()
        for spec in self.io.step_inputs:
            binding.bind_cpu_input(spec.name, np.ascontiguousarray(feeds[spec.name], dtype=NUMPY.get(
                spec.dtype, np.float32)))
        bind_pools(binding, self.io, pools)
        wanted = outputs if outputs is not None else [t.name for t in self.io.step_outputs] + self.extra_outputs
        for name in wanted:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()  # in binding order: the pools, then what was asked for
        return {name: value.numpy() for name, value in zip(wanted, values[len(self.io.cache_outputs):])}
