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

    from dsa_export.models.checkpoint import open_checkpoint

    if ctx.options.checkpoint is None:
        path = init_checkpoint(get_preset(ctx.options.preset), ctx.out.checkpoint, seed=ctx.options.seed)
        checkpoint = open_checkpoint(path)  # as written: every tensor present, with its shape
    else:
        checkpoint = ctx.checkpoint  # checked when the run was planned (its fingerprint)
    return {"path": str(ctx.checkpoint_dir), "checkpoint_fingerprint": checkpoint.fingerprint,
            "tensors": len(checkpoint.stored), "note": ctx.inputs_json()["source"]}


def check_checkpoint(ctx: BuildContext, produced: set[str]) -> None:
    """A given checkpoint's tokenizer serves text (tried now, not on the GPU machine at `serve`); a preset's random
    checkpoint is written only if this machine can hold it (the 671B one cannot)."""
    from dsa_export.models.presets import check_fits_in_memory
    from dsa_export.models.tokenizer import check_text

    if ctx.options.checkpoint is not None:
        check_text(ctx.options.checkpoint)
    elif "checkpoint" in produced:
        check_fits_in_memory(ctx.config, 2 * 2, f"a random checkpoint of preset '{ctx.options.preset}' (build it from "
                             f"a real checkpoint with --checkpoint; kernels, plan and cost need only the config)")


CHECKPOINT = Step("checkpoint", run_checkpoint,
                  lambda ctx, out: [out.checkpoint] if ctx.options.checkpoint is None else [], owns=("checkpoint",),
                  writes=lambda ctx: ctx.options.checkpoint is None, inputs=checkpoint_inputs, check=check_checkpoint,
                  doc="the checkpoint the build reads (a preset's is written first)")


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


SMOKE = Step("smoke", run_smoke, lambda ctx, out: [], after=("checkpoint",), unavailable=eager_unavailable,
             doc="load the eager model; prefill + decode equals one full forward")


# ---- kernels: AOT Triton for the target ---------------------------------------------------------------------------
def kernel_inputs(ctx: BuildContext) -> dict:
    from dsa_export.kernels.aot import kernel_dims

    return dataclasses.asdict(kernel_dims(ctx.config))


def run_kernels(ctx: BuildContext) -> dict:
    from dsa_export.kernels.aot import compile_kernels, kernel_dims

    written = compile_kernels(ctx.target.name, ctx.out.kernels(ctx.target.kernel_arch), kernel_dims(ctx.config))
    return {"path": str(ctx.build.kernels(ctx.target.kernel_arch)), "note": f"{len(written)} kernels for "
                                                                            f"{ctx.target.kernel_arch}",
            "kernels": {m["kernel"]: {k: m[k] for k in ("symbol", "shared_bytes", "registers", "num_warps", "grid")}
                        for m in written}}


def check_kernels(ctx: BuildContext, produced: set[str]) -> None:
    """A checkpoint given is checked (its headers) even though the kernels need only its config."""
    if ctx.options.checkpoint is not None:
        ctx.checkpoint  # noqa: B018


KERNELS = Step("kernels", run_kernels, lambda ctx, out: [out.kernels(ctx.target.kernel_arch)], owns=("kernels/*",),
               inputs=kernel_inputs, check=check_kernels,
               doc="compile the Triton kernels ahead of time for the target (the config only)")


# ---- export: ONNX ---------------------------------------------------------------------------------------------------
def run_export(ctx: BuildContext) -> dict:
    from dsa_export.exporter.onnx_export import export_stages
    from dsa_export.models.tokenizer import copy_tokenizer

    o, plan = ctx.options, ctx.plan
    if plan.gpus > 1:
        ctx.log(f"{plan.gpus} pipeline stages on {plan.gpus} x {plan.target}:\n{plan.table()}")
    ctx.export = export_stages(ctx.checkpoint, ctx.out.root, [s.layers for s in plan.stages], dtype=ctx.dtype,
                               capacity=o.capacity, dequantize_experts=o.dequantize_experts,
                               max_data_file_bytes=int(o.data_file_gb * 1e9))
    tokenizer = copy_tokenizer(ctx.checkpoint_dir, ctx.out.root)  # serving reads the export only
    capacity = ctx.export.io.capacity
    stages = f", {plan.gpus} stages" if plan.gpus > 1 else ""
    return {"path": str(ctx.build.root), "capacity": capacity, "tokenizer": tokenizer, "plan": plan.to_json(),
            "note": f"{o.dtype}, cache capacity {capacity:,}{stages}" + (", with tokenizer" if tokenizer else "")}


def export_outputs(ctx: BuildContext, out) -> list:
    from dsa_export.models.tokenizer import tokenizer_files

    export = ctx.export
    graphs = export.files() if len(export.stages) == 1 else [stage.path for stage in export.stages]
    return graphs + [out.root / p.name for p in tokenizer_files(ctx.checkpoint_dir)]


EXPORT = Step("export", run_export, export_outputs, after=("checkpoint",),
              owns=("model.onnx", "model.onnx.data*", "io.json", "config.json", "stage-*", "tokenizer.json",
                    "tokenizer_config.json"),
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
             ("precision", "max_batch", "max_tokens", "pool_tokens", "workspace_gb")
             if getattr(o, name) != getattr(defaults, name)]
    return (f"dsa-export engine --gpu {ctx.target.name} --out {ctx.build.root} {' '.join(flags)}".rstrip()
            + f"   # with TensorRT >= 10.15 and a {ctx.target.name} ({ctx.target.kernel_arch}) GPU; copy "
              f"{ctx.build.root} there")


def run_engine(ctx: BuildContext) -> dict:
    from dsa_export.exporter.engine import build_engines

    plans = engine_memory(ctx)
    records = build_engines(ctx.export, ctx.build.kernels(ctx.target.kernel_arch), ctx.target, ctx.engine_shapes,
                            ctx.options.workspace_gb, ctx.out.root, ctx.log)
    return {"engine": records, "memory": plans, "note": f"TensorRT {records[0]['tensorrt']}, {len(records)} "
                                                        f"engine(s), {records[0]['plugin_layers']} plugin layers"}


ENGINE = Step("engine", run_engine,
              lambda ctx, out: [out.root / ctx.build.relative(stage.engine_dir) for stage in ctx.export.stages],
              owns=("engine", "stage-*/engine"), after=("kernels", "export"), check=check_engine, unavailable=engine_unavailable,
              skipped=engine_skipped, finish_command=engine_command,
              doc="TensorRT engine(s) with the dsa:: ops as AOT Triton plugins, one per pipeline stage")


# ---- parity: eager vs every backend of the export this machine runs ------------------------------------------------
def run_parity(ctx: BuildContext) -> dict:
    import torch

    from dsa_export.parity.run import build_parity, summary

    o = ctx.options
    report = build_parity(ctx.model(torch.float32), ctx.export, ctx.out.parity, o.thresholds, o.new_tokens, o.seed,
                          ctx.backends, dict(capacity=o.capacity, dequantize_experts=o.dequantize_experts))
    return {"path": str(ctx.build.parity), "passed": report["passed"], "failures": report["failures"],
            "metrics": {b["backend"]: b["metrics"] for b in report["backends"]}, "note": summary(report)}


def check_parity(ctx: BuildContext, produced: set[str]) -> None:
    """An export this run reads but does not produce is readable and of the build's model; the parity prompts and
    their new tokens fit its capacity."""
    from dsa_export.models.cache import default_capacity
    from dsa_export.parity.thresholds import check_room

    if "export" not in produced:
        ctx.export.check(ctx.config)
    capacity = ctx.export.io.capacity if "export" not in produced else ctx.options.capacity or default_capacity(
        ctx.config)
    check_room(ctx.options.new_tokens, capacity)


def check_export_if_present(ctx: BuildContext, produced: set[str]) -> None:
    if "export" not in produced and ctx.export.exists():
        ctx.export.check()


def parity_unavailable(ctx: BuildContext) -> str | None:
    import torch

    return eager_unavailable(ctx, torch.float32)


PARITY = Step("parity", run_parity, lambda ctx, out: [out.parity], owns=("parity",), after=("export",),
              uses=("engine",),
              check=check_parity, unavailable=parity_unavailable,
              doc="eager vs ONNX Runtime (and TensorRT): logits, greedy tokens, indexer selections")


# ---- cost: modelled, measured, and the export's own ---------------------------------------------------------------
def run_cost(ctx: BuildContext) -> dict:
    from dsa_export.cost.report import build_cost

    o = ctx.options
    export = ctx.export if ctx.export.exists() else None
    measure = export is not None and ctx.checkpoint_dir.is_dir() and eager_unavailable(ctx) is None
    record = build_cost(ctx.config, ctx.target, ctx.out.cost, o.price, o.assumptions, export,
                        ctx.model() if measure else None, ctx.backends if measure else None,
                        label=str(ctx.checkpoint_dir), log=ctx.log, threads=o.threads)
    return {**record, "path": str(ctx.build.cost)}


COST = Step("cost", run_cost, lambda ctx, out: [out.cost], owns=("cost",), uses=("checkpoint", "export", "engine"),
            check=check_export_if_present,
            doc="cost model (and, with an export, measured decode steps and the export's own cost)")


# ---- deploy: the Triton Inference Server model repository ---------------------------------------------------------
def run_deploy(ctx: BuildContext) -> dict:
    from dsa_export.deploy.repository import write_repository

    written = write_repository(ctx.export, ctx.out.model_repository, served_from=ctx.build.model_repository,
                               shapes=ctx.engine_shapes, gpus_per_node=ctx.options.gpus_per_node)
    return {**written, "path": str(ctx.build.model_repository)}


DEPLOY = Step("deploy", run_deploy, lambda ctx, out: [out.model_repository], owns=("model_repository",),
              after=("export",), uses=("engine",),
              check=check_export_if_present,
              doc="Triton Inference Server model repository (the batching generation model)")

STEPS = (CHECKPOINT, SMOKE, KERNELS, EXPORT, ENGINE, PARITY, COST, DEPLOY)
