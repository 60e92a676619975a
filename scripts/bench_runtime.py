#!/usr/bin/env python
"""Time per decode step: ONNX Runtime (CPU) on the exported graph vs the eager model, at several past lengths; and
the graph's decode step over pools of several sizes (the pools are written in place: the time must not grow with them).

Both run the same tiny-preset checkpoint in fp32 with the same threads, one decode step (batch 1) on top of a cache of
`past` tokens, timed round-robin in one run (min of N). Results: benchmarks/runtime.json and runtime.md.

    python scripts/bench_runtime.py [--pasts 1024 4096 8192 16384] [--pools 1 8 32] [--repeat 20]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import dsa_export
from benchlib import best_times, machine, write_results
from dsa_export.exporter.onnx_export import export_onnx
from dsa_export.cost.measure import random_cache_contents
from dsa_export.runtime import EagerBackend, GraphBackend
from dsa_export.runtime.backends import greedy
from dsa_export.serving.io_spec import BLOCK_TABLES, INPUT_IDS, LOGITS_INDEX, NEXT_TOKENS, POSITIONS, SEQUENCE, SLOTS


def step_times(backends: dict, config, past: int, repeat: int) -> dict:
    """Min time of one decode step per backend on top of `past` random cached tokens, round-robin."""
    contents = random_cache_contents(config, past)
    caches = {name: b.new_caches(1, contents) for name, b in backends.items()}
    ids, positions = torch.tensor([[7]]), torch.tensor([[past]])
    results = {name: b.step(ids, positions, caches[name]) for name, b in backends.items()}  # a check first:
    assert (results["onnxruntime"].logits - results["eager"].logits).abs().max() < 1e-3
    return best_times({name: (lambda b=b, c=caches[name]: b.step(ids, positions, c)) for name, b in backends.items()},
                      repeat)


def pool_times(ort: GraphBackend, past: int, multiples: list[int], repeat: int) -> dict:
    """Min time of one decode step of one sequence (its blocks the pool's first) over pools of `multiples` × the
    capacity's rows, round-robin: ONNX Runtime binds each pool once and the step writes its rows in place."""
    import numpy as np

    graph, io = ort.graphs[0], ort.ios[0]
    blocks = -(-io.capacity // io.block_size)
    feeds = {INPUT_IDS: np.array([7]), POSITIONS: np.array([past]), SEQUENCE: np.zeros(1, np.int32),
             SLOTS: np.array([past]), BLOCK_TABLES: np.arange(blocks, dtype=np.int32)[None],
             LOGITS_INDEX: np.zeros(1, np.int64), **greedy(1)}
    pools = {m: graph.new_pools(m * blocks * io.block_size) for m in multiples}
    return best_times({m: (lambda p=pools[m]: graph.run(feeds, p, [NEXT_TOKENS])) for m in multiples}, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pasts", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--pools", type=int, nargs="+", default=[1, 8, 32],
                        help="pool sizes, in multiples of the capacity")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    model = dsa_export.load_model(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        capacity = max(args.pasts) + 1
        export_onnx(model, tmp, capacity=capacity)
        eager, ort = EagerBackend(model, capacity=capacity), GraphBackend.onnxruntime(tmp)
        rows = []
        for past in args.pasts:
            t = step_times({"eager": eager, "onnxruntime": ort}, model.config, past, args.repeat)
            rows.append({"past": past, "eager_ms": 1e3 * t["eager"], "onnxruntime_ms": 1e3 * t["onnxruntime"],
                         "ratio": t["onnxruntime"] / t["eager"]})
            print(f"past {past:>6}: eager {rows[-1]['eager_ms']:.2f} ms, onnxruntime {rows[-1]['onnxruntime_ms']:.2f} "
                  f"ms -> {rows[-1]['ratio']:.2f}x", flush=True)
        pool_past = min(args.pasts)
        t = pool_times(ort, pool_past, args.pools, args.repeat)
        block = ort.ios[0].block_size
        pool_rows = [{"pool_rows": m * -(-capacity // block) * block, "onnxruntime_ms": 1e3 * t[m], "ratio": t[m] / t[args.pools[0]]}
                     for m in args.pools]
        for r in pool_rows:
            print(f"pool of {r['pool_rows']:>8} rows: {r['onnxruntime_ms']:.2f} ms ({r['ratio']:.2f}x)", flush=True)
    results = {"preset": args.preset, "machine": machine(), "providers": ort.providers, "repeat": args.repeat,
               "decode": rows, "pool_past": pool_past, "pools": pool_rows}
    lines = ["# Decode step: ONNX Runtime vs eager", "",
             f"`python scripts/bench_runtime.py` — preset `{args.preset}`, fp32, batch 1, {machine()}, "
             f"{', '.join(ort.providers)}, min of {args.repeat} round-robin rounds.", "",
             "| past tokens | eager ms | ONNX Runtime ms | ONNX Runtime / eager |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['past']:,} | {r['eager_ms']:.2f} | {r['onnxruntime_ms']:.2f} | {r['ratio']:.2f}x |" for r in rows]
    at_8k = next((r for r in rows if r["past"] == 8192), None)
    if at_8k:
        lines += ["", f"Goal: ONNX Runtime <= 0.8x eager at 8K. Measured {at_8k['ratio']:.2f}x: "
                      f"{'met' if at_8k['ratio'] <= 0.8 else 'NOT met'}."]
    lines += ["", f"## Decode step over pools of several sizes (past {pool_past:,}, one sequence)", "",
              "| pool rows | ONNX Runtime ms | / smallest pool |", "|---:|---:|---:|"]
    lines += [f"| {r['pool_rows']:,} | {r['onnxruntime_ms']:.2f} | {r['ratio']:.2f}x |" for r in pool_rows]
    flat = max(r["ratio"] for r in pool_rows)
    lines += ["", f"The pools are bound once and written in place by dsa::WriteCache: a {args.pools[-1]}x larger pool "
                  f"costs {flat:.2f}x the step time ({'flat' if flat <= 1.2 else 'NOT flat'}: goal <= 1.2x)."]
    write_results("runtime", results, lines)


if __name__ == "__main__":
    main()
