"""The steps of `dsa-export build`, in order: each a short adapter that calls one room. `STEPS` is the data the
runner executes (`dsa-export build` runs all, each other command one). ("Pipeline stage" means only the cut of the
model across GPUs: exporter/plan.py.)"""

from __future__ import annotations

import dataclasses

from dsa_export.build.context import BuildContext
from dsa_export.build.options import Options
from dsa_export.build.runner import Step


# ---- checkpoint: the one the build reads --------------------------------------------------------------------------
def checkpoint_inputs(ctx: BuildContext):
    """A given checkpoint's own fingerprint (a preset's weights follow from --preset and --seed). Its config and
    tensor list are checked here, before the build writes anything: bad input leaves no trace."""
    return None if ctx.options.checkpoint is None else ctx.checkpoint.fingerprint


def run_checkpoint(ctx: BuildContext) -> dict:
    from dsa_export.models.init import init_checkpoint
    from dsa_export.models.presets import get_preset

    if ctx.options.checkpoint is None:
        init_checkpoint(get_preset(ctx.options.preset), ctx.build.checkpoint, seed=ctx.options.seed, overwrite=True)
        ctx.forget("checkpoint")  # written now: read it from here on
    checkpoint = ctx.checkpoint  # every tensor present, with its shape, before anything loads it
    return {"path": str(ctx.checkpoint_dir), "checkpoint_fingerprint": checkpoint.fingerprint,
            "tensors": len(checkpoint.stored), "note": ctx.inputs_json()["source"]}


CHECKPOINT = Step("checkpoint", run_checkpoint,
                  lambda ctx: [ctx.build.checkpoint] if ctx.options.checkpoint is None else [],
                  inputs=checkpoint_inputs, doc="the checkpoint the build reads (a preset's is written first)")


# ---- smoke: the eager model is self-consistent ---------------------------------------------------------------------
def run_smoke(ctx: BuildContext) -> dict:
    from dsa_export.parity.smoke import smoke_check

    result = smoke_check(ctx.model())
    result["note"] = f"prefill+decode vs full forward: {result['max_abs_diff']:.2g}"
    return result


def eager_unavailable(ctx: BuildContext, dtype=None) -> str | None:
    """Why the eager model cannot be loaded here (None: it fits this machine's memory)."""
    from dsa_export.formats import name_of
    from dsa_export.models.presets import memory_shortfall

    dtype = dtype or ctx.dtype
    problem = memory_shortfall(ctx.config, dtype.itemsize, f"the eager model ({name_of(dtype)})")
    return problem and f"{problem} (the export streams its weights; the eager model runs where it fits)"


SMOKE = Step("smoke", run_smoke, lambda ctx: [], after=("checkpoint",), unavailable=eager_unavailable,
             doc="load the eager model; prefill + decode equals one full forward")


# ---- kernels: AOT Triton for the target ---------------------------------------------------------------------------
def kernel_inputs(ctx: BuildContext) -> dict:
    from dsa_export.kernels.aot import kernel_dims

    return dataclasses.asdict(kernel_dims(ctx.config))


def run_kernels(ctx: BuildContext) -> dict:
    from dsa_export.kernels.aot import compile_kernels, kernel_dims

    path = ctx.build.kernels(ctx.target.kernel_arch)
    written = compile_kernels(ctx.target.name, path, kernel_dims(ctx.config))
    return {"path": str(path), "note": f"{len(written)} kernels for {ctx.target.kernel_arch}",
            "kernels": {m["kernel"]: {k: m[k] for k in ("symbol", "shared_bytes", "registers", "num_warps", "grid")}
                        for m in written}}


KERNELS = Step("kernels", run_kernels, lambda ctx: [ctx.build.kernels(ctx.target.kernel_arch)],
               after=("checkpoint",), inputs=kernel_inputs, doc="compile the Triton kernels ahead of time for the target")


# ---- export: ONNX ---------------------------------------------------------------------------------------------------
def run_export(ctx: BuildContext) -> dict:
    from dsa_export.exporter.onnx_export import export_stages
    from dsa_export.models.tokenizer import copy_tokenizer

    o, plan = ctx.options, ctx.plan
    if plan.gpus > 1:
        ctx.log(f"{plan.gpus} pipeline stages on {plan.gpus} x {plan.target}:\n{plan.table()}")
    ctx.export = export_stages(ctx.checkpoint, ctx.build.root, [s.layers for s in plan.stages], dtype=ctx.dtype,
                               last_logits_only=o.last_logits_only, capacity=o.capacity,
                               dequantize_experts=o.dequantize_experts, max_data_file_bytes=int(o.data_file_gb * 1e9))
    tokenizer = copy_tokenizer(ctx.checkpoint_dir, ctx.build.root)  # serving reads the export only
    capacity = ctx.export.io.capacity
    stages = f", {plan.gpus} stages" if plan.gpus > 1 else ""
    return {"path": str(ctx.build.root), "capacity": capacity, "tokenizer": tokenizer, "plan": plan.to_json(),
            "note": f"{o.dtype}, cache capacity {capacity:,}{stages}" + (", with tokenizer" if tokenizer else "")}


def export_outputs(ctx: BuildContext) -> list:
    from dsa_export.models.tokenizer import tokenizer_files

    return ctx.export.files() + [ctx.build.root / p.name for p in tokenizer_files(ctx.checkpoint_dir)]


EXPORT = Step("export", run_export, export_outputs, after=("checkpoint",),
              inputs=lambda ctx: {"stages": [list(s.layers) for s in ctx.plan.stages]},
              doc="trace the graph and stream the weights into ONNX (one graph per pipeline stage), check it")


# ---- engine: TensorRT, where TensorRT and a GPU of the target's architecture are ----------------------------------
def engine_memory(ctx: BuildContext) -> list[dict]:
    from dsa_export.exporter.plan import engine_memory

    return engine_memory(ctx.export, ctx.target, ctx.engine_shapes, ctx.options.workspace_gb, ctx.options.precision)


def check_engine(ctx: BuildContext, produced: set[str]) -> None:
    from dsa_export.exporter.engine import check_gpu

    check_gpu(ctx.target)
    if "export" not in produced:
        check_export_if_present(ctx, produced)  # the engine is built from whatever model was exported
        engine_memory(ctx)


def engine_unavailable(ctx: BuildContext) -> str | None:
    from dsa_export.exporter.engine import unavailable

    return unavailable(ctx.target)


def engine_skipped(ctx: BuildContext) -> dict:
    """Even where no engine can be built, say whether it would fit the target (and refuse if it cannot)."""
    plans = engine_memory(ctx)
    largest = max(plans, key=lambda p: p["total_gb"])
    per_gpu = f" per GPU ({len(plans)} stages)" if len(plans) > 1 else ""
    return {"memory": plans, "note": f"would need {largest['total_gb']:.2f} of {largest['gpu_gb']:.0f} GB{per_gpu}"}


def engine_command(ctx: BuildContext) -> str:
    """The command that builds the engine from this build directory on a machine with TensorRT and the GPU."""
    o, defaults = ctx.options, Options()
    flags = [f"--{name.replace('_', '-')} {getattr(o, name)}" for name in
             ("precision", "max_batch", "prefill_batch", "max_prefill", "workspace_gb")
             if getattr(o, name) != getattr(defaults, name)]
    return (f"dsa-export engine --gpu {ctx.target.name} --out {ctx.build.root} {' '.join(flags)}".rstrip()
            + f"   # with TensorRT >= 10.15 and a {ctx.target.name} ({ctx.target.kernel_arch}) GPU; copy "
              f"{ctx.build.root} there")


def run_engine(ctx: BuildContext) -> dict:
    from dsa_export.exporter.engine import build_engines

    plans = engine_memory(ctx)
    records = build_engines(ctx.export, ctx.build.kernels(ctx.target.kernel_arch), ctx.target, ctx.engine_shapes,
                            ctx.options.workspace_gb, ctx.log)
    return {"engine": records, "memory": plans, "note": f"TensorRT {records[0]['tensorrt']}, {len(records)} "
                                                        f"engine(s), {records[0]['plugin_layers']} plugin layers"}


ENGINE = Step("engine", run_engine, lambda ctx: [stage.engine_dir for stage in ctx.export.stages],
              after=("kernels", "export"), check=check_engine, unavailable=engine_unavailable,
              skipped=engine_skipped, finish_command=engine_command,
              doc="TensorRT engine(s) with the dsa:: ops as AOT Triton plugins, one per pipeline stage")


# ---- parity: eager vs every backend of the export this machine runs ------------------------------------------------
def run_parity(ctx: BuildContext) -> dict:
    import torch

    from dsa_export.parity.run import build_parity, summary

    o = ctx.options
    report = build_parity(ctx.model(torch.float32), ctx.export, ctx.build.parity, o.thresholds, o.new_tokens, o.seed,
                          ctx.backends, dict(capacity=o.capacity, last_logits_only=o.last_logits_only,
                                             dequantize_experts=o.dequantize_experts))
    return {"path": str(ctx.build.parity), "passed": report["passed"], "failures": report["failures"],
            "metrics": {b["backend"]: b["metrics"] for b in report["backends"]}, "note": summary(report)}


def check_export(ctx: BuildContext, produced: set[str]) -> None:
    """An export this run reads but does not produce is readable and of the build's model."""
    if "export" not in produced:
        ctx.export.check(ctx.config)


def check_export_if_present(ctx: BuildContext, produced: set[str]) -> None:
    if "export" not in produced and ctx.export.exists():
        ctx.export.check()


def parity_unavailable(ctx: BuildContext) -> str | None:
    import torch

    return eager_unavailable(ctx, torch.float32)


PARITY = Step("parity", run_parity, lambda ctx: [ctx.build.parity], after=("export",), uses=("engine",),
              check=check_export, unavailable=parity_unavailable,
              doc="eager vs ONNX Runtime (and TensorRT): logits, greedy tokens, indexer selections")


# ---- cost: modelled, measured, and the export's own ---------------------------------------------------------------
def run_cost(ctx: BuildContext) -> dict:
    from dsa_export.cost.report import build_cost

    o = ctx.options
    export = ctx.export if ctx.export.exists() else None
    measure = export is not None and ctx.checkpoint_dir.is_dir() and eager_unavailable(ctx) is None
    return build_cost(ctx.config, ctx.target, ctx.build.cost, o.price, o.assumptions, export,
                      ctx.model() if measure else None, ctx.backends if measure else None,
                      label=str(ctx.checkpoint_dir), log=ctx.log)


COST = Step("cost", run_cost, lambda ctx: [ctx.build.cost], uses=("checkpoint", "export", "engine"),
            check=check_export_if_present,
            doc="cost model (and, with an export, measured decode steps and the export's own cost)")


# ---- deploy: the Triton Inference Server model repository ---------------------------------------------------------
def run_deploy(ctx: BuildContext) -> dict:
    from dsa_export.deploy.repository import write_repository

    return write_repository(ctx.export, ctx.build.model_repository)


DEPLOY = Step("deploy", run_deploy, lambda ctx: [ctx.build.model_repository], after=("export",), uses=("engine",),
              check=check_export_if_present,
              doc="Triton Inference Server model repository (generation, CPU and GPU step models)")

STEPS = (CHECKPOINT, SMOKE, KERNELS, EXPORT, ENGINE, PARITY, COST, DEPLOY)
