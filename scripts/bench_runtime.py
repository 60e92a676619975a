#!/usr/bin/env python
"""Time per decode step: ONNX Runtime (CPU) on the exported graph vs the eager model, at several past lengths.

Both run the same tiny-preset checkpoint in fp32 with the same threads, one decode step (batch 1) on top of a cache of
`past` tokens, timed round-robin in one run (min of N). Results: benchmarks/runtime.json and runtime.md.

    python scripts/bench_runtime.py [--pasts 1024 4096 8192 16384] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import dsa_export
from dsa_export.exporter.onnx_export import export_onnx
from dsa_export.runtime import EagerBackend, OnnxRuntimeBackend

OUT_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def step_times(backends: dict, config, past: int, repeat: int, seed: int = 0) -> dict:
    """Min time of one decode step per backend, round-robin so both see the same machine state."""
    gen = torch.Generator().manual_seed(seed)
    L = config.num_hidden_layers
    caches = ([torch.randn(1, past, config.latent_dim, generator=gen) for _ in range(L)] +
              [torch.randn(1, past, config.index_head_dim, generator=gen) for _ in range(L)])
    ids, positions = torch.tensor([[7]]), torch.tensor([[past]])
    results = {name: b.step(ids, positions, caches) for name, b in backends.items()}  # warm-up, and a check:
    assert (results["onnxruntime"].logits - results["eager"].logits).abs().max() < 1e-3
    best = dict.fromkeys(backends, float("inf"))
    for _ in range(repeat):
        for name, backend in backends.items():
            start = time.perf_counter()
            backend.step(ids, positions, caches)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pasts", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    model = dsa_export.load_model(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, tmp)
        eager, ort = EagerBackend(model), OnnxRuntimeBackend(tmp)
        rows = []
        with torch.no_grad():
            for past in args.pasts:
                t = step_times({"eager": eager, "onnxruntime": ort}, model.config, past, args.repeat)
                rows.append({"past": past, "eager_ms": 1e3 * t["eager"], "onnxruntime_ms": 1e3 * t["onnxruntime"],
                             "ratio": t["onnxruntime"] / t["eager"]})
                print(f"past {past:>6}: eager {rows[-1]['eager_ms']:.2f} ms, onnxruntime {rows[-1]['onnxruntime_ms']:.2f} ms "
                      f"-> {rows[-1]['ratio']:.2f}x", flush=True)
    results = {"preset": args.preset, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "providers": ort.providers, "repeat": args.repeat, "decode": rows}
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "runtime.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Decode step: ONNX Runtime vs eager", "",
             f"`python scripts/bench_runtime.py` — preset `{args.preset}`, fp32, batch 1, {results['threads']} threads, "
             f"{', '.join(ort.providers)}, torch {torch.__version__}, min of {args.repeat} round-robin rounds.", "",
             "| past tokens | eager ms | ONNX Runtime ms | ONNX Runtime / eager |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['past']:,} | {r['eager_ms']:.2f} | {r['onnxruntime_ms']:.2f} | {r['ratio']:.2f}x |" for r in rows]
    at_8k = next((r for r in rows if r["past"] == 8192), None)
    if at_8k:
        lines += ["", f"Goal: ONNX Runtime <= 0.8x eager at 8K. Measured {at_8k['ratio']:.2f}x: "
                      f"{'met' if at_8k['ratio'] <= 0.8 else 'NOT met'}."]
    (OUT_DIR / "runtime.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT_DIR / 'runtime.json'} and {OUT_DIR / 'runtime.md'}")


if __name__ == "__main__":
    main()
