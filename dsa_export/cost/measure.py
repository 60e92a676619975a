"""Decode steps timed on this machine: the eager model (dense MLA and DSA) beside every backend of the export."""

from __future__ import annotations

import time

import torch

from dsa_export.models.cache import cache_layout
from dsa_export.runtime import EagerBackend


MEASURE_CONTEXTS = (512, 2048, 8192)


def random_cache_contents(config, context: int, seed: int = 0) -> list[torch.Tensor]:
    """Cache contents (layout order, batch 1: [1, context, width] each), as if `context` tokens had been seen."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, context, t.width, generator=gen) for t in cache_layout(config)]


def measure_decode(model, graph_backends: list | None = None, contexts=MEASURE_CONTEXTS, repeat: int = 5,
                   label: str = "model", threads: int | None = None) -> dict:
    """Seconds per decode step (batch 1) on top of `context` cached tokens: eager dense, eager DSA, and each backend
    of the export given (runtime.available_backends: ONNX Runtime, TensorRT engines), torch on `threads` threads
    (None: as it is; the sessions were made with theirs)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # two threads on shared cores swung eager steps from 5 to 500 ms
    try:
        return _measure(model, graph_backends, contexts, repeat, label)
    finally:
        torch.set_num_threads(before)


def _measure(model, graph_backends, contexts, repeat, label) -> dict:
    backends = {"eager dense": EagerBackend(model, attention="dense"), "eager DSA": EagerBackend(model)}
    backends.update((f"{b.name} DSA", b) for b in graph_backends or [])
    capacity = min(b.capacity for b in backends.values())
    contexts = [c for c in contexts if c < capacity]
    rows = {name: [] for name in backends}
    for context in contexts:
        contents = random_cache_contents(model.config, context)
        caches = {name: b.new_caches(1, [c.to(b.cache_dtype) for c in contents]) for name, b in backends.items()}
        ids, positions = torch.tensor([[3]]), torch.tensor([[context]])
        best = dict.fromkeys(backends, float("inf"))
        for _ in range(repeat + 1):  # round-robin; the first round warms up (and counts only if it is the best)
            for name, backend in backends.items():
                start = time.perf_counter()
                backend.step(ids, positions, caches[name])
                best[name] = min(best[name], time.perf_counter() - start)
        for name in backends:
            rows[name].append({"context": context, "seconds": best[name]})
    return {"preset": label, "threads": torch.get_num_threads(), "batch": 1, "backends": rows}
