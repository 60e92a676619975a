"""The cost report: modelled curves, calibration against the paper, decode steps measured on this machine
(cost/measure.py), the export's own cost (cost/graph.py), written as cost.json (every point of every curve), cost.md
and PNG plots."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from dsa_export.cost.assumptions import Assumptions
from dsa_export.cost.model import PAPER_POINTS, calibration, cost_curves, crossover, positions_grid
from dsa_export.errors import signals_deferred
from dsa_export.files import ensure_output_dir, write_atomic, write_json_atomic
from dsa_export.models.config import DSAConfig
from dsa_export.targets import GPUTarget

def _plot(curves: dict, gpu: GPUTarget, price: float, paper: bool, measured: dict | None, out_dir: Path) -> list[str]:
    with signals_deferred():  # whole or not at all: a signal is delivered once matplotlib is imported
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
                      graph: dict | None = None, modelled: str | None = None) -> dict:
    """cost.json + cost.md + plots. measured: cost/measure.py `measure_decode`; graph: cost/graph.py `audit`;
    modelled: which model's shapes the curves use, and why (the report says so)."""
    out_dir = ensure_output_dir(out_dir)
    curves = cost_curves(config, gpu, assumptions, price, positions_grid())
    # DeepSeek's figure is for the 671B model on H800 (prices scale with the GPU-hour price): nothing to compare else
    paper = gpu.name == "h800" and is_paper_model(config)
    report = {"gpu": asdict(gpu), "price_per_gpu_hour": price, "assumptions": asdict(assumptions),
              "config": config.to_hf_dict(), "curves": curves,
              "crossovers": {phase: crossover(config, gpu, assumptions, price, phase) for phase in ("prefill", "decode")},
              "modelled": modelled,
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
    if report.get("modelled"):
        lines[1:1] = ["", f"Modelled shapes: {report['modelled']}."]
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
        from dsa_export.cost.graph import markdown

        lines += [""] + markdown(report["graph"])
    lines += ["", "Plots: " + ", ".join(report["plots"]) + "."]
    return "\n".join(lines) + "\n"


def modelled_config(config: DSAConfig) -> DSAConfig:
    """The shapes whose $ per token the report models: the build's own for the real model's shapes; a small build
    models DeepSeek-V3.2-Exp (dollars per token of a tiny model mean nothing)."""
    from dsa_export.models.presets import get_preset

    return config if is_paper_model(config) else get_preset("v3.2-exp")


def build_cost(config: DSAConfig, gpu: GPUTarget, out_dir: Path, price: float, assumptions: Assumptions,
               export=None, model=None, backends: list | None = None, label: str = "model",
               log=print, threads: int | None = None) -> dict:
    """The build's cost step: the modelled curves; with an export, its own cost read off the graph
    (cost/graph.py); with the eager model, decode steps measured here beside `backends`. Returns the manifest
    record (crossovers, plots, calibration, the graph's deviation from the closed form, a note)."""
    from dsa_export.cost.graph import audit, markdown
    from dsa_export.cost.measure import measure_decode

    graph = audit(export) if export is not None else None
    measured = measure_decode(model, backends, label=label, threads=threads) if model is not None else None
    modelled = modelled_config(config)
    shapes = ("the build's own model (DeepSeek-V3.2-Exp's dimensions)" if modelled is config else
              f"DeepSeek-V3.2-Exp (671B): the build's model ({label}, {config.num_hidden_layers} layers of hidden size "
              f"{config.hidden_size}) is too small for dollars per token to mean anything; the measured steps and the "
              f"graph's own cost below are the build's model")
    report = write_cost_report(modelled, gpu, out_dir, price, assumptions, measured, graph, shapes)
    for r in (report["calibration"] or {}).get("points", []):
        log(f"{r['phase']:<8} {r['variant']:<6} at {r['position'] // 1024}K: model ${r['model_usd']:.3f}  "
            f"paper ${r['paper_usd']:.2f}  ({r['relative_error']:+.1%})")
    if graph:
        for line in markdown(graph)[4:]:
            log(line)
    crossovers = report["crossovers"]
    note = "DSA cheaper from " + ", ".join(f"{crossovers[p]:,} ({p})" if crossovers[p] else f"never ({p})"
                                           for p in ("prefill", "decode")) + " tokens"
    if graph:
        note += f"; graph vs closed form {graph['worst_deviation']:.1%}"
    return {"path": str(out_dir), "crossovers": crossovers, "plots": report["plots"],
            "calibration": report["calibration"], "graph_vs_closed_form": graph and graph["worst_deviation"],
            "note": note}
