"""`dsa-export cost` and the build's cost stage: modelled curves, calibration against the paper, measured time per
token on this machine, written as cost.json (every point of every curve), cost.md and PNG plots."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from dsa_export.files import ensure_output_dir, write_atomic, write_json_atomic
from dsa_export.models.cache import cache_layout, cache_shape
from dsa_export.models.config import DSAConfig
from dsa_export.parity.cost import (PAPER_POINTS, Assumptions, calibration, cost_curves, crossover, positions_grid)
from dsa_export.runtime import EagerBackend, OnnxRuntimeBackend
from dsa_export.targets import GPUTarget

MEASURE_CONTEXTS = (512, 2048, 8192)


def random_cache_contents(config, capacity: int, context: int, seed: int = 0) -> list[torch.Tensor]:
    """Cache contents (layout order, batch 1) with `context` random rows, as if that many tokens had been seen."""
    gen = torch.Generator().manual_seed(seed)
    contents = []
    for t in cache_layout(config):
        tensor = torch.zeros(cache_shape(t, 1, capacity))
        tensor[:, :, :context] = torch.randn(1, 1, context, t.width, generator=gen)
        contents.append(tensor)
    return contents


def measure_decode(model, onnx_dir: Path | None = None, contexts=MEASURE_CONTEXTS, repeat: int = 5,
                   label: str = "model", extra_backends: list | None = None) -> dict:
    """Seconds per decode step (batch 1) on top of `context` cached tokens: eager dense, eager DSA, ONNX Runtime (and
    any other backend given, e.g. a TensorRT engine)."""
    backends = {"eager dense": EagerBackend(model, attention="dense"), "eager DSA": EagerBackend(model)}
    if onnx_dir is not None:
        backends["onnxruntime DSA"] = OnnxRuntimeBackend(onnx_dir)
    backends.update((f"{b.name} DSA", b) for b in extra_backends or [])
    capacity = min(b.capacity for b in backends.values())
    contexts = [c for c in contexts if c < capacity]
    rows = {name: [] for name in backends}
    for context in contexts:
        contents = random_cache_contents(model.config, capacity, context)
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


def _plot(curves: dict, gpu: GPUTarget, price: float, paper: bool, measured: dict | None, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, phase in zip(axes, ("prefill", "decode")):
        for variant, label, color in (("dense", "dense MLA (V3.1-Terminus-like)", "tab:blue"),
                                      ("dsa", "DSA (V3.2-Exp)", "tab:orange")):
            points = curves[phase][variant]
            ax.plot([p["position"] / 1024 for p in points], [p["usd_per_mtok"] for p in points], label=label,
                    color=color)
            if paper:
                xs = [pos / 1024 for (ph, v, pos) in PAPER_POINTS if ph == phase and v == variant]
                ys = [usd for (ph, v, _), usd in PAPER_POINTS.items() if ph == phase and v == variant]
                ax.scatter(xs, ys, color=color, marker="x", zorder=3, label=f"paper, {variant}")
        ax.set_title(f"{phase}: cost per million tokens by token position ({gpu.name.upper()}, ${price:g}/GPU-h)")
        ax.set_xlabel("token position (K)")
        ax.set_ylabel("USD per million tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.title.set_fontsize(9)
    fig.tight_layout()
    files = ["cost_by_position.png"]
    _save(fig, out_dir / files[0])
    if measured:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in measured["backends"].items():
            ax.plot([r["context"] for r in rows], [1e3 * r["seconds"] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (cached tokens)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"measured on this machine ({measured['preset']}, {measured['threads']} threads)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append("measured_decode.png")
        _save(fig, out_dir / files[1])
    return files


def _save(fig, path: Path) -> None:
    """A PNG written atomically (a plot half-written by an interrupted run never looks complete)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def is_paper_model(config: DSAConfig) -> bool:
    """The shapes of DeepSeek-V3.2-Exp (the preset v3.2-exp), whatever the storage format."""
    from dsa_export.models.presets import get_preset

    return config.replace(quantization_config=None) == get_preset("v3.2-exp").replace(quantization_config=None)


def write_cost_report(config: DSAConfig, gpu: GPUTarget, out_dir: str | Path, price: float = 2.0,
                      assumptions: Assumptions = Assumptions(), measured: dict | None = None,
                      graph: dict | None = None) -> dict:
    """cost.json + cost.md + plots. measured: `measure_decode`; graph: parity/graph_cost.py `compare`."""
    out_dir = ensure_output_dir(out_dir)
    curves = cost_curves(config, gpu, assumptions, price, positions_grid())
    # DeepSeek's figure is for the 671B model on H800 (prices scale with the GPU-hour price): nothing to compare else
    paper = gpu.name == "h800" and is_paper_model(config)
    report = {"gpu": asdict(gpu), "price_per_gpu_hour": price, "assumptions": asdict(assumptions),
              "config": config.to_hf_dict(), "curves": curves,
              "crossovers": {phase: crossover(curves, phase) for phase in ("prefill", "decode")},
              "calibration": calibration(config, gpu, assumptions, price) if paper else None,
              "measured": measured, "graph": graph}
    report["plots"] = _plot(curves, gpu, price, paper, measured, out_dir)
    write_json_atomic(out_dir / "cost.json", report)
    write_atomic(out_dir / "cost.md", _markdown(report, config))
    return report


def _markdown(report: dict, config: DSAConfig) -> str:
    gpu, price, curves = report["gpu"], report["price_per_gpu_hour"], report["curves"]
    lines = [f"# Cost per million tokens by token position: dense MLA vs DSA on {gpu['name'].upper()} at "
             f"${price:g}/GPU-hour", "",
             f"Roofline per component (bf16 {gpu['bf16_tflops']:g} TFLOPS, fp8 {gpu['fp8_tflops'] or '-'} TFLOPS, "
             f"HBM {gpu['hbm_tbps']:g} TB/s) with these assumptions: "
             + ", ".join(f"{k} {v:g}" for k, v in report["assumptions"].items()) + ".", "",
             "| position | prefill dense | prefill DSA | decode dense | decode DSA |", "|---:|---:|---:|---:|---:|"]
    for i, point in enumerate(curves["prefill"]["dense"]):
        if point["position"] in (0, 1024, 4096, 8192, 16384, 32768, 65536, 131072):
            lines.append(f"| {point['position']:,} | " + " | ".join(
                f"${curves[ph][v][i]['usd_per_mtok']:.3f}" for ph in ("prefill", "decode") for v in ("dense", "dsa"))
                + " |")
    lines += ["", "DSA becomes cheaper from position " + ", ".join(
        f"{pos:,} in {ph}" if pos else f"never in {ph}" for ph, pos in report["crossovers"].items()) + "."]
    cal = report["calibration"]
    if cal:
        lines += ["", "## Calibration against DeepSeek's figure (V3.2-Exp paper Fig. 3, H800 at $2/GPU-hour)", "",
                  "| point | paper | model | error | assumptions that move it |", "|---|---:|---:|---:|---|"]
        for r in cal["points"]:
            lines.append(f"| {r['phase']} {r['variant']} at {r['position'] // 1024}K | ${r['paper_usd']:.2f} | "
                         f"${r['model_usd']:.3f} | {r['relative_error']:+.1%} | {r['moved_by']} |")
        for c in cal["crossovers"]:
            lines.append(f"| {c['phase']} crossover | ~{c['paper_position']:,} | {c['model_position'] or 'none':,} | "
                         f"{(c['model_position'] or 0) / c['paper_position'] - 1:+.0%} | all of the above |")
        lines += ["", "Paper values are read off the plot (about ±$0.01–0.02)."]
    m = report["measured"]
    if m:
        lines += ["", f"## Measured on this machine ({m['preset']}, decode, batch 1, {m['threads']} threads)", "",
                  "Seconds per decode step on top of `context` cached tokens, min of round-robin runs. eager dense is "
                  "the dense-MLA baseline (MHA reference path, no indexer); eager DSA and onnxruntime DSA run the "
                  "indexer and top-k sparse attention (CPU reference ops; the exported graph's decompositions).", "",
                  "| context | " + " | ".join(m["backends"]) + " |", "|---:|" + "---:|" * len(m["backends"])]
        contexts = [r["context"] for r in next(iter(m["backends"].values()))]
        for i, context in enumerate(contexts):
            lines.append(f"| {context:,} | " + " | ".join(f"{1e3 * rows[i]['seconds']:.2f} ms"
                                                         for rows in m["backends"].values()) + " |")
    if report["graph"]:
        from dsa_export.parity.graph_cost import markdown

        lines += [""] + markdown(report["graph"])
    lines += ["", "Plots: " + ", ".join(report["plots"]) + "."]
    return "\n".join(lines) + "\n"
