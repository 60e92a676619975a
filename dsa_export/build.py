"""`dsa-export build --gpu TARGET`: run every stage this machine can run, record each in `manifest.json`.

Stages that a later version of the tool adds are listed as `not_available`, so the manifest always shows the whole
pipeline. The manifest is rewritten (atomically) after every stage: an interrupted build still says how far it got.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

import dsa_export
from dsa_export.errors import DSAExportError, CheckFailure
from dsa_export.files import ensure_output_dir, write_json_atomic
from dsa_export.kernels import use_custom_ops
from dsa_export.models import DSAForCausalLM, get_preset, init_checkpoint, load_checkpoint
from dsa_export.models.checkpoint import checkpoint_fingerprint
from dsa_export.targets import get_target

# Stages of the full pipeline (design.md) that this version cannot run yet, with what they will produce.
PLANNED_STAGES = {
    "engine": "TensorRT engine (needs TensorRT and a GPU of the target's architecture)",
    "deploy": "Triton Inference Server model repository",
}
# Max abs logit difference allowed between prefill + decode and one full forward, by weight dtype.
SMOKE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05}


def smoke_check(model: DSAForCausalLM, prompt_len: int = 24, decode_steps: int = 4, seed: int = 0) -> dict:
    """Prefill a batch of 2 prompts, decode greedily token by token, and compare every step's logits with one
    forward over the whole sequence."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, prompt_len), generator=gen)
    cache = model.new_cache(2, prompt_len + decode_steps)
    with torch.no_grad():
        step_logits = [model(ids, cache=cache)]
        for _ in range(decode_steps):
            next_ids = step_logits[-1][:, -1:].argmax(-1)
            ids = torch.cat([ids, next_ids], dim=1)
            step_logits.append(model(next_ids, cache=cache))
        full = model(ids)  # every token was fed exactly once above
    max_diff = (torch.cat(step_logits, dim=1) - full).abs().max().item()
    tolerance = SMOKE_TOLERANCE[model.lm_head.weight.dtype]
    passed = max_diff < tolerance
    return {"prompt_len": prompt_len, "decode_steps": decode_steps, "batch": 2, "max_abs_diff": max_diff,
            "tolerance": tolerance, "passed": passed,
            "failures": [] if passed else [f"prefill+decode vs full forward differ by {max_diff:.3g} > {tolerance:g}"]}


def run_build(gpu: str, out: str | Path | None = None, checkpoint: str | Path | None = None, preset: str = "tiny",
              seed: int = 0, dtype: torch.dtype = torch.float32, log: Callable[[str], None] = print) -> dict:
    target = get_target(gpu)
    out = ensure_output_dir(out or Path("build") / target.name)
    if checkpoint is None:
        get_preset(preset)  # fail fast on an unknown preset
    elif not Path(checkpoint).is_dir():
        raise DSAExportError(f"{checkpoint}: checkpoint directory not found")

    manifest = {
        "tool": {"dsa_export": dsa_export.__version__, "torch": torch.__version__, "python": platform.python_version(),
                 "platform": platform.platform()},
        "command": sys.argv,
        "target": asdict(target),
        "options": {"checkpoint": str(checkpoint) if checkpoint else None, "preset": None if checkpoint else preset,
                    "seed": seed, "dtype": str(dtype).removeprefix("torch.")},
        "stages": {},
    }
    manifest_path = out / "manifest.json"

    def stage(name: str, fn: Callable[[], dict | None]):
        log(f"[{name}] ...")
        start = time.perf_counter()
        record = {"status": "running"}
        manifest["stages"][name] = record
        try:
            record.update(fn() or {})
            record["status"] = "failed" if record.get("passed") is False else "ok"
        except BaseException as e:
            record.update(status="failed", error=str(e) or type(e).__name__)
            raise
        finally:
            record["seconds"] = round(time.perf_counter() - start, 3)
            write_json_atomic(manifest_path, manifest)
        log(f"[{name}] {record['status']} ({record['seconds']:.1f}s)")

    if checkpoint is None:
        checkpoint = out / "checkpoint"
        stage("checkpoint", lambda: {"path": str(init_checkpoint(get_preset(preset), checkpoint, seed=seed)),
                                     "source": f"preset '{preset}', seed {seed}"})
    model_box = {}

    def load():
        model_box["model"] = use_custom_ops(load_checkpoint(checkpoint, dtype=dtype))
        config = model_box["model"].config
        manifest["config"] = config.to_hf_dict()
        return {"path": str(checkpoint), "fingerprint": checkpoint_fingerprint(checkpoint)}

    stage("load", load)
    stage("smoke", lambda: smoke_check(model_box["model"]))

    def kernels():
        from dsa_export.kernels.aot import compile_kernels, kernel_dims

        kernel_dir = out / "kernels" / target.kernel_arch
        written = compile_kernels(target.name, kernel_dir, kernel_dims(model_box["model"].config))
        return {"path": str(kernel_dir), "kernels": {m["kernel"]: {k: m[k] for k in (
            "symbol", "shared_bytes", "registers", "num_warps", "grid")} for m in written}}

    stage("kernels", kernels)

    def export():
        from dsa_export.exporter.onnx_export import export_onnx

        return {"path": str(export_onnx(model_box["model"], out)), "io": str(out / "io.json")}

    def parity():
        from dsa_export.parity.accuracy import Thresholds
        from dsa_export.parity.run import run_parity

        # model.onnx is fp32 (ONNX Runtime on CPU has no bf16 MatMul): compare it with the fp32 eager model
        reference = model_box["model"]
        if dtype != torch.float32:
            reference = use_custom_ops(load_checkpoint(checkpoint, dtype=torch.float32))
        report = run_parity(reference, out, out / "parity", Thresholds(), raise_on_failure=False)
        return {"path": str(out / "parity"), "passed": report["passed"], "failures": report["failures"],
                "metrics": {b["backend"]: b["metrics"] for b in report["backends"]}}

    def cost():
        from dsa_export.parity.cost_report import measure_decode, write_cost_report

        model = model_box["model"]
        from dsa_export.parity import graph_cost

        # modelled for the 671B shapes on this target; measured with the built model and its ONNX export; the export's
        # own cost read off its graph
        report = write_cost_report(get_preset("v3.2-exp"), target, out / "cost",
                                   measured=measure_decode(model, out, label=str(checkpoint)),
                                   graph=graph_cost.compare(out))
        return {"path": str(out / "cost"), "crossovers": report["crossovers"], "plots": report["plots"],
                "graph_vs_closed_form": report["graph"]["worst_deviation"]}

    stage("export", export)
    stage("parity", parity)
    stage("cost", cost)
    for name, what in PLANNED_STAGES.items():
        manifest["stages"][name] = {"status": "not_available", "produces": what,
                                    "reason": "not implemented in this version of dsa-export"}
    write_json_atomic(manifest_path, manifest)
    failed = {name: r for name, r in manifest["stages"].items() if r["status"] == "failed"}
    if failed:
        raise CheckFailure("; ".join(f"{name}: {', '.join(r.get('failures', [])) or 'see the manifest'}"
                                     for name, r in failed.items()) + f" ({manifest_path})")
    log(f"wrote {manifest_path}")
    return manifest
