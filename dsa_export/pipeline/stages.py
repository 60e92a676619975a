"""The stages of `dsa-export build`, in order. Each is one short function of the build context; `PIPELINE` is the
data the runner executes (`dsa-export build` runs all, each other command one)."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from dsa_export.errors import DSAExportError
from dsa_export.pipeline.context import BuildContext, Layout
from dsa_export.pipeline.options import Options
from dsa_export.pipeline.runner import Stage

# ---- checkpoint: the one the build reads --------------------------------------------------------------------------


def checkpoint_inputs(ctx: BuildContext):
    """A given checkpoint's own fingerprint (a preset's weights follow from --preset and --seed). Its config and
    tensor list are checked here, before the build writes anything: bad input leaves no trace."""
    from dsa_export.models.checkpoint import check_tensors, checkpoint_fingerprint, read_headers

    if ctx.options.checkpoint is None:
        return None
    check_tensors(ctx.config, read_headers(ctx.options.checkpoint))
    return checkpoint_fingerprint(ctx.options.checkpoint)


def run_checkpoint(ctx: BuildContext) -> dict:
    from dsa_export.models import get_preset, init_checkpoint
    from dsa_export.models.checkpoint import check_tensors, checkpoint_fingerprint, read_headers

    if ctx.options.checkpoint is None:
        init_checkpoint(get_preset(ctx.options.preset), ctx.layout / Layout.checkpoint, seed=ctx.options.seed,
                        overwrite=True)  # the build's own directory
    stored = read_headers(ctx.checkpoint_dir)
    check_tensors(ctx.config, stored)  # every tensor present, with its shape, before anything loads it
    return {"path": str(ctx.checkpoint_dir), "checkpoint_fingerprint": checkpoint_fingerprint(ctx.checkpoint_dir),
            "tensors": len(stored), "note": ctx.inputs_json()["source"]}


CHECKPOINT = Stage("checkpoint", run_checkpoint,
                   lambda ctx: [Layout.checkpoint] if ctx.options.checkpoint is None else [],
                   inputs=checkpoint_inputs, doc="the checkpoint the build reads (a preset's is written first)")


# ---- smoke: the eager model is self-consistent ---------------------------------------------------------------------
def run_smoke(ctx: BuildContext) -> dict:
    from dsa_export.parity.smoke import smoke_check

    result = smoke_check(ctx.model())
    result["note"] = f"prefill+decode vs full forward: {result['max_abs_diff']:.2g}"
    return result


def eager_unavailable(ctx: BuildContext, dtype: torch.dtype | None = None) -> str | None:
    """Why the eager model cannot be loaded here (None: it fits this machine's memory)."""
    from dsa_export.models.presets import memory_shortfall

    dtype = dtype or ctx.dtype
    problem = memory_shortfall(ctx.config, dtype.itemsize, f"the eager model ({str(dtype).removeprefix('torch.')})")
    return problem and f"{problem} (the export streams its weights; the eager model runs where it fits)"


SMOKE = Stage("smoke", run_smoke, lambda ctx: [], after=("checkpoint",), unavailable=eager_unavailable,
              doc="load the eager model; prefill + decode equals one full forward")


# ---- kernels: AOT Triton for the target ---------------------------------------------------------------------------
def kernel_inputs(ctx: BuildContext) -> dict:
    from dsa_export.kernels.aot import kernel_dims

    return dataclasses.asdict(kernel_dims(ctx.config))


def run_kernels(ctx: BuildContext) -> dict:
    from dsa_export.kernels.aot import compile_kernels, kernel_dims

    path = ctx.layout / Layout.kernels(ctx.target.kernel_arch)
    written = compile_kernels(ctx.target.name, path, kernel_dims(ctx.config))
    return {"path": str(path), "note": f"{len(written)} kernels for {ctx.target.kernel_arch}",
            "kernels": {m["kernel"]: {k: m[k] for k in ("symbol", "shared_bytes", "registers", "num_warps", "grid")}
                        for m in written}}


KERNELS = Stage("kernels", run_kernels, lambda ctx: [Layout.kernels(ctx.target.kernel_arch)], after=("checkpoint",),
                inputs=kernel_inputs, doc="compile the Triton kernels ahead of time for the target")


# ---- export: ONNX ---------------------------------------------------------------------------------------------------
def run_export(ctx: BuildContext) -> dict:
    from dsa_export.exporter.graph_io import GraphIO, stage_dir
    from dsa_export.exporter.onnx_export import export_onnx, remove_other_exports
    from dsa_export.models.checkpoint import open_checkpoint
    from dsa_export.models.tokenizer import copy_tokenizer

    o, plan = ctx.options, ctx.plan
    if plan.gpus > 1:
        ctx.log(f"{plan.gpus} pipeline stages on {plan.gpus} x {plan.target}:\n{plan.table()}")
    remove_other_exports(ctx.layout.root, plan.gpus)
    checkpoint = open_checkpoint(ctx.checkpoint_dir)  # headers read and checked once for every stage
    for i, stage in enumerate(plan.stages):  # weights streamed from the checkpoint: the model is never loaded
        export_onnx(checkpoint, stage_dir(ctx.layout.root, i, plan.gpus), dtype=ctx.dtype,
                    last_logits_only=o.last_logits_only, capacity=o.capacity, dequantize_experts=o.dequantize_experts,
                    progress=True, max_data_file_bytes=int(o.data_file_gb * 1e9), layers=stage.layers)
    tokenizer = copy_tokenizer(ctx.checkpoint_dir, ctx.layout.root)  # serving reads the export only
    capacity = GraphIO.load(ctx.stage_dirs()[0] / "io.json").capacity
    stages = f", {plan.gpus} stages" if plan.gpus > 1 else ""
    return {"path": str(ctx.layout.root), "capacity": capacity, "tokenizer": tokenizer, "plan": plan.to_json(),
            "note": f"{o.dtype}, cache capacity {capacity:,}{stages}" + (", with tokenizer" if tokenizer else "")}


def export_outputs(ctx: BuildContext) -> list[Path]:
    from dsa_export.exporter.weights import DATA_FILE, data_files
    from dsa_export.models.tokenizer import tokenizer_files

    outputs = []
    for stage_dir in ctx.stage_dirs():  # every file of every stage: reuse needs them all
        relative = stage_dir.relative_to(ctx.layout.root)
        data = [p.name for p in data_files(stage_dir)] or [DATA_FILE]
        outputs += [relative / name for name in (*Layout.onnx, *data)]
    return outputs + [Path(p.name) for p in tokenizer_files(ctx.checkpoint_dir)]


EXPORT = Stage("export", run_export, export_outputs, after=("checkpoint",),
               inputs=lambda ctx: {"stages": [list(s.layers) for s in ctx.plan.stages]},
               doc="trace the graph and stream the weights into ONNX (one graph per pipeline stage), check it")


# ---- engine: TensorRT, where TensorRT and a GPU of the target's architecture are ----------------------------------
def engine_plan(ctx: BuildContext) -> list[dict]:
    """The memory plan of each stage's engine (one per GPU) for the build's export, refused if one cannot fit the
    target or the export does not have the precision asked for (needs the export on disk)."""
    import onnx

    from dsa_export.exporter.engine import check_fits, memory_plan
    from dsa_export.exporter.graph_io import GraphIO

    plans = []
    for stage_dir in ctx.stage_dirs():
        io = GraphIO.load(stage_dir / "io.json")
        precision = ctx.options.precision
        if precision == "fp8":
            graph = onnx.load(stage_dir / "model.onnx", load_external_data=False).graph
            if not any(n.op_type == "RoutedExpertsFP8" for n in graph.node) and any(
                    n.op_type == "RoutedExperts" for n in graph.node):
                raise DSAExportError("--precision fp8: the export holds no FP8 experts (an FP8 checkpoint, exported "
                                     "without --dequantize-experts, has them)")
        elif precision != "auto" and precision != io.cache_dtype:
            raise DSAExportError(f"--precision {precision}: the export is {io.cache_dtype} (export with --dtype "
                                 f"{precision}; TensorRT takes precision from the graph)")
        plan = memory_plan(stage_dir, io, ctx.target, ctx.engine_shapes, ctx.options.workspace_gb)
        check_fits(plan, ctx.target)
        plans.append({"stage": str(stage_dir.relative_to(ctx.layout.root)), **plan})
    return plans


def check_engine(ctx: BuildContext, produced: set[str]) -> None:
    from dsa_export.exporter.engine import check_gpu

    check_gpu(ctx.target)
    if "export" not in produced:
        check_export_if_present(ctx, produced)  # the engine is built from whatever model was exported
        engine_plan(ctx)


def engine_unavailable(ctx: BuildContext) -> str | None:
    from dsa_export.exporter.engine import unavailable

    return unavailable(ctx.target)


def engine_skipped(ctx: BuildContext) -> dict:
    """Even where no engine can be built, say whether it would fit the target (and refuse if it cannot)."""
    plans = engine_plan(ctx)
    largest = max(plans, key=lambda p: p["total_gb"])
    per_gpu = f" per GPU ({len(plans)} stages)" if len(plans) > 1 else ""
    return {"memory": plans, "note": f"would need {largest['total_gb']:.2f} of {largest['gpu_gb']:.0f} GB{per_gpu}"}


def engine_command(ctx: BuildContext) -> str:
    """The command that builds the engine from this build directory on a machine with TensorRT and the GPU."""
    o, defaults = ctx.options, Options()
    flags = [f"--{name.replace('_', '-')} {getattr(o, name)}" for name in
             ("precision", "max_batch", "prefill_batch", "max_prefill", "workspace_gb")
             if getattr(o, name) != getattr(defaults, name)]
    return (f"dsa-export engine --gpu {ctx.target.name} --out {ctx.layout.root} {' '.join(flags)}".rstrip()
            + f"   # with TensorRT >= 10.15 and a {ctx.target.name} ({ctx.target.kernel_arch}) GPU; copy "
              f"{ctx.layout.root} there")


def run_engine(ctx: BuildContext) -> dict:
    from dsa_export.exporter.engine import build_engine

    plans = engine_plan(ctx)
    records = [build_engine(d, ctx.layout / Layout.kernels(ctx.target.kernel_arch), d / Layout.engine, ctx.target,
                            ctx.engine_shapes, ctx.options.workspace_gb, ctx.log) for d in ctx.stage_dirs()]
    return {"engine": records, "memory": plans, "note": f"TensorRT {records[0]['tensorrt']}, {len(records)} "
                                                        f"engine(s), {records[0]['plugin_layers']} plugin layers"}


def engine_outputs(ctx: BuildContext) -> list[Path]:
    return [d.relative_to(ctx.layout.root) / Layout.engine for d in ctx.stage_dirs()]


ENGINE = Stage("engine", run_engine, engine_outputs, after=("kernels", "export"), check=check_engine,
               unavailable=engine_unavailable, skipped=engine_skipped, finish_command=engine_command,
               doc="TensorRT engine(s) with the dsa:: ops as AOT Triton plugins, one per pipeline stage")


def extra_backends(ctx: BuildContext) -> list:
    """The TensorRT engine as a backend, where there is one and this machine can run it."""
    from dsa_export.exporter.engine import unavailable

    if unavailable(ctx.target) is not None:
        return []
    if len(ctx.stage_dirs()) > 1:
        ctx.log("TensorRT: the engines of pipeline stages run chained in the Triton repository; parity and measured "
                "cost here compare ONNX Runtime only")
        return []
    if (ctx.layout / Layout.engine / "model.plan").exists():
        from dsa_export.runtime.tensorrt import TensorRTBackend

        return [TensorRTBackend(ctx.layout.root)]
    return []


# ---- parity: eager vs ONNX Runtime (and TensorRT) ------------------------------------------------------------------
def run_parity_stage(ctx: BuildContext) -> dict:
    from dsa_export.exporter.onnx_export import export_onnx
    from dsa_export.parity.run import run_parity

    o = ctx.options
    reference = ctx.model(torch.float32)  # ONNX Runtime on CPU runs float32: compare the float32 graph and model

    def compare(onnx_dir: Path) -> dict:
        return run_parity(reference, onnx_dir, ctx.layout / Layout.parity, o.thresholds, o.new_tokens, o.seed,
                          raise_on_failure=False, extra_backends=extra_backends(ctx))

    if ctx.dtype == torch.float32:
        report = compare(ctx.layout.root)
    else:  # a bfloat16 build: its float32 twin, in a temporary directory
        with tempfile.TemporaryDirectory(prefix="dsa-parity-") as tmp:
            export_onnx(reference, tmp, capacity=o.capacity, last_logits_only=o.last_logits_only,
                        dequantize_experts=o.dequantize_experts)
            report = compare(Path(tmp))
    metrics = report["backends"][0]["metrics"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    return {"path": str(ctx.layout / Layout.parity), "passed": report["passed"], "failures": report["failures"],
            "metrics": {b["backend"]: b["metrics"] for b in report["backends"]},
            "note": f"{verdict}: max abs logits {metrics['max_abs_logits']:.2g}, greedy match "
                    f"{metrics['greedy_match']:.0%}, indexer recall {metrics['min_indexer_recall']:.2f}"}


def check_export(ctx: BuildContext, produced: set[str]) -> None:
    """An export this run reads but does not produce is readable and of the build's model."""
    from dsa_export.exporter.checks import check_exports

    if "export" not in produced:
        check_exports(ctx.layout.root, ctx.config)


def check_export_if_present(ctx: BuildContext, produced: set[str]) -> None:
    from dsa_export.exporter.checks import check_exports

    if "export" not in produced and (ctx.stage_dirs()[0] / "model.onnx").exists():
        check_exports(ctx.layout.root)


PARITY = Stage("parity", run_parity_stage, lambda ctx: [Layout.parity], after=("export",), uses=("engine",),
               check=check_export, unavailable=lambda ctx: eager_unavailable(ctx, torch.float32),
               doc="eager vs ONNX Runtime: logits, greedy tokens, indexer selections")


# ---- cost: modelled, measured, and the export's own ---------------------------------------------------------------
def run_cost(ctx: BuildContext) -> dict:
    from dsa_export.exporter.graph_io import GraphIO
    from dsa_export.models import get_preset
    from dsa_export.parity import graph_cost
    from dsa_export.parity.cost_report import is_paper_model, measure_decode, write_cost_report

    o = ctx.options
    # $ per token means something for the real model's shapes: a small build models DeepSeek-V3.2-Exp on its target
    modelled = ctx.config if is_paper_model(ctx.config) else get_preset("v3.2-exp")
    measured = graph = None
    if (ctx.stage_dirs()[0] / "model.onnx").exists():  # the build's export: read its own cost off the graph, time it
        graph = graph_cost.compare(ctx.layout.root)
        if ctx.checkpoint_dir.is_dir() and eager_unavailable(ctx) is None:
            runnable = GraphIO.load(ctx.stage_dirs()[0] / "io.json").cache_dtype == "float32"  # ONNX Runtime, CPU
            measured = measure_decode(ctx.model(), ctx.layout.root if runnable else None, label=str(ctx.checkpoint_dir),
                                      extra_backends=extra_backends(ctx))
    report = write_cost_report(modelled, ctx.target, ctx.layout / Layout.cost, o.price, o.assumptions, measured, graph)
    for r in (report["calibration"] or {}).get("points", []):
        ctx.log(f"{r['phase']:<8} {r['variant']:<6} at {r['position'] // 1024}K: model ${r['model_usd']:.3f}  "
                f"paper ${r['paper_usd']:.2f}  ({r['relative_error']:+.1%})")
    if graph:
        for line in graph_cost.markdown(graph)[4:]:
            ctx.log(line)
    crossovers = report["crossovers"]
    note = "DSA cheaper from " + ", ".join(f"{crossovers[p]:,} ({p})" if crossovers[p] else f"never ({p})"
                                           for p in ("prefill", "decode")) + " tokens"
    if graph:
        note += f"; graph vs closed form {graph['worst_deviation']:.1%}"
    return {"path": str(ctx.layout / Layout.cost), "crossovers": crossovers, "plots": report["plots"],
            "calibration": report["calibration"], "graph_vs_closed_form": graph and graph["worst_deviation"],
            "note": note}


COST = Stage("cost", run_cost, lambda ctx: [Layout.cost], uses=("checkpoint", "export", "engine"),
             check=check_export_if_present,
             doc="cost model (and, with an export, measured decode steps and the export's own cost)")

# ---- deploy: the Triton Inference Server model repository ---------------------------------------------------------
def run_deploy(ctx: BuildContext) -> dict:
    from dsa_export.deploy.repository import write_repository

    from dsa_export.exporter.graph_io import GraphIO

    written = write_repository(ctx.layout.root, ctx.layout / Layout.model_repository)
    steps = " -> ".join(written["step_models"])
    note = f"dsa_generate steps by {steps}; serve: dsa-export serve {ctx.layout.root}"
    dtype = GraphIO.load(ctx.stage_dirs()[0] / "io.json").cache_dtype
    if not written["engine"] and dtype != "float32":
        note = (f"dsa_generate steps by {steps}, which runs float32 exports only: serve this {dtype} "
                f"build on a GPU once its engine is built (then deploy again)")
    return {**written, "note": note}


DEPLOY = Stage("deploy", run_deploy, lambda ctx: [Layout.model_repository], after=("export",), uses=("engine",),
               check=check_export_if_present,
               doc="Triton Inference Server model repository (generation, CPU and GPU step models)")

PIPELINE = (CHECKPOINT, SMOKE, KERNELS, EXPORT, ENGINE, PARITY, COST, DEPLOY)
