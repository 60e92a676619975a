"""The `dsa-export` command. Thin: parses options and calls the modules; bad input → one line on stderr, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import dsa_export
from dsa_export.errors import DSAExportError, CheckFailure

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _config_for(source: str):
    """(config, checkpoint dir or None) for a checkpoint path or a preset name."""
    from dsa_export.models import get_preset, load_config

    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise DSAExportError(f"{path}: not a checkpoint directory")
        return load_config(path), path
    if "/" in source or source.startswith("."):
        raise DSAExportError(f"{path}: checkpoint directory not found")
    return get_preset(source), None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(dsa_export.__version__, prog_name="dsa-export")
def cli():
    """DeepSeek-V3.2-Exp (DeepSeek Sparse Attention) from PyTorch to ONNX, TensorRT and Triton Inference Server.

    \b
    Example (built-in tiny model, everything this machine can run):
      dsa-export build --gpu h100
    """


@cli.command()
@click.option("--preset", default="tiny", show_default=True, help="Built-in config to initialise.")
@click.option("--fp8", is_flag=True, help="Store linear weights as FP8 e4m3 with 128x128 block scales.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the weights.")
@click.option("--max-shard-mb", default=2048, show_default=True, help="Split into shards of at most this size.")
@click.argument("out_dir", type=click.Path(path_type=Path))
def init(preset: str, fp8: bool, seed: int, max_shard_mb: int, out_dir: Path):
    """Write a seeded random checkpoint in HF layout to OUT_DIR.

    \b
    Example: dsa-export init --preset tiny --fp8 ckpt/tiny-fp8
    """
    from dsa_export.models import get_preset, init_checkpoint

    config = get_preset(preset)
    if preset != "tiny":
        raise DSAExportError(f"preset '{preset}' is too large to materialise; only 'tiny' can be initialised")
    init_checkpoint(config, out_dir, seed=seed, fp8=fp8, max_shard_bytes=max_shard_mb << 20)
    click.echo(f"wrote {'FP8' if fp8 else 'bf16'} checkpoint '{preset}' (seed {seed}) to {out_dir}")


@cli.command()
@click.argument("source")
def inspect(source: str):
    """Show config, layer plan, parameter counts and KV-cache size of SOURCE (a checkpoint directory or a preset);
    for a checkpoint, check every tensor's presence, dtype and shape from the safetensors headers.

    \b
    Example: dsa-export inspect v3.2-exp
    """
    from dsa_export.models.checkpoint import check_tensors, read_headers
    from dsa_export.models.summary import summarize

    config, path = _config_for(source)
    summary = summarize(config)
    click.echo(f"source: {path or f'preset {source}'}")
    click.echo("config:")
    for key, value in config.to_hf_dict().items():
        if key not in ("architectures", "model_type"):
            click.echo(f"  {key}: {value}")
    dense = summary.layer_plan.count("dense")
    click.echo(f"layers: {len(summary.layer_plan)} ({dense} dense MLP, {len(summary.layer_plan) - dense} MoE): "
               + " ".join("D" if kind == "dense" else "M" for kind in summary.layer_plan))
    click.echo(f"parameters: {summary.total_params:,} total, {summary.active_params:,} active per token")
    kv = summary.kv_bytes_per_token
    click.echo(f"KV cache per token (all layers, MLA latent + indexer keys): {kv['bf16']:,} B bf16, "
               f"{kv['fp8']:,} B fp8")
    if path is None:
        click.echo("tensors: (preset, no checkpoint to check)")
        return
    stored = read_headers(path)
    check_tensors(config, stored)
    fp8 = sum(t.dtype == "F8_E4M3" for t in stored.values())
    files = len({t.file for t in stored.values()})
    click.echo(f"tensors: {len(stored)} in {files} file(s), all present with the expected shapes "
               f"({fp8} FP8 weights)")


def _load_eager(checkpoint: Path | None, preset: str, seed: int = 0, dtype=None):
    import dsa_export

    if checkpoint is not None:
        if not checkpoint.is_dir():
            raise DSAExportError(f"{checkpoint}: checkpoint directory not found")
        return dsa_export.load_model(checkpoint, dtype=dtype)
    return dsa_export.load_model(preset, dtype=dtype, seed=seed)


def _dataclass_options(cls, what: str):
    """One --option per field of `cls`, named and defaulted from it (one source of truth)."""
    import dataclasses

    def decorate(command):
        for f in reversed(dataclasses.fields(cls)):
            command = click.option(f"--{f.name.replace('_', '-')}", f.name, type=float, default=f.default,
                                   show_default=True, help=what)(command)
        return command

    return decorate


def _threshold_options(command):
    from dsa_export.parity.accuracy import Thresholds

    return _dataclass_options(Thresholds, "Parity threshold.")(command)


def _assumption_options(command):
    from dsa_export.parity.cost import Assumptions

    return _dataclass_options(Assumptions, "Cost-model assumption.")(command)


def _checkpoint_or_preset_config(checkpoint: Path | None, preset: str):
    from dsa_export.models import get_preset, load_config

    if checkpoint is None:
        return get_preset(preset)
    if not checkpoint.is_dir():
        raise DSAExportError(f"{checkpoint}: checkpoint directory not found")
    return load_config(checkpoint)


@cli.command()
@click.option("--gpu", required=True, help="Target GPU: a100, l40s, h100, h800, h200 or b200.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the PTX, cubin and JSON.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint whose shapes are compiled in.")
@click.option("--preset", default="tiny", show_default=True, help="Built-in config when no --checkpoint is given.")
def kernels(gpu, out, checkpoint, preset):
    """Compile the DSA Triton kernels ahead of time for one GPU target (no GPU needed): per kernel the PTX, the
    cubin and a JSON of launch metadata; fails if a kernel exceeds the target's shared-memory or register limits.

    \b
    Example: dsa-export kernels --gpu h100 --out build/h100/kernels/sm_90a
    """
    from dsa_export.kernels.aot import compile_kernels, kernel_dims
    from dsa_export.targets import get_target

    target = get_target(gpu)
    config = _checkpoint_or_preset_config(checkpoint, preset)
    for meta in compile_kernels(target.name, out, kernel_dims(config)):
        click.echo(f"{meta['kernel']:<24} {meta['arch']:<8} {meta['num_warps']} warps  shared {meta['shared_bytes']:>6} B  "
                   f"registers {meta['registers']}  grid ({meta['grid']})")
    click.echo(f"wrote {out}")


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), help="HF-layout checkpoint directory.")
@click.option("--preset", default="tiny", show_default=True, help="Built-in config when no --checkpoint is given.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for model.onnx and io.json.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
              help="Weights and caches of the exported graph (ONNX Runtime on CPU runs float32 only).")
@click.option("--last-logits-only", is_flag=True, help="Return logits for the last position only.")
@click.option("--capacity", type=click.IntRange(min=4), help="Cache rows per sequence [default: min(max positions, "
              "128K)].")
@click.option("--dequantize-experts", is_flag=True,
              help="Store FP8 routed experts in --dtype instead of keeping them FP8 with their block scales.")
@click.option("--seed", default=0, show_default=True, help="Seed of the preset's random weights.")
def export(checkpoint, preset, out, dtype, last_logits_only, capacity, dequantize_experts, seed):
    """Export ONNX: per layer one dsa::LightningIndexer and one dsa::SparseMLA node, per MoE layer one
    dsa::RoutedExperts node (with standard-op decompositions as model-local functions), per-layer caches at a fixed
    capacity written in place (TensorScatter), dynamic batch and sequence; then check it.

    \b
    Example: dsa-export export --preset tiny --out build/onnx
    """
    from dsa_export.exporter.onnx_export import export_onnx

    model = _load_eager(checkpoint, preset, seed)
    path = export_onnx(model, out, dtype=_torch_dtype(dtype), last_logits_only=last_logits_only, capacity=capacity,
                       dequantize_experts=dequantize_experts)
    click.echo(f"wrote {path} (+ model.onnx.data, io.json, config.json)")


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), help="HF-layout checkpoint directory.")
@click.option("--preset", default="tiny", show_default=True, help="Built-in config when no --checkpoint is given.")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path),
              help="Directory holding model.onnx and io.json (from `dsa-export export`).")
@click.option("--out", type=click.Path(path_type=Path), help="Report directory [default: ONNX_DIR/parity].")
@click.option("--new-tokens", default=32, show_default=True, help="Greedy tokens generated per prompt.")
@click.option("--seed", default=0, show_default=True, help="Seed of the preset's weights and of the prompts.")
@_threshold_options
def parity(checkpoint, preset, onnx_dir, out, new_tokens, seed, **thresholds):
    """Compare the eager model with ONNX Runtime on the same prompts (logits, KL, top-1, greedy tokens, indexer
    selections); write parity.json and parity.md; exit 1 naming the metric if a threshold is missed.

    \b
    Example: dsa-export parity --preset tiny --onnx build/onnx
    """
    from dsa_export.parity.accuracy import Thresholds
    from dsa_export.parity.run import run_parity

    model = _load_eager(checkpoint, preset, seed)
    report = run_parity(model, onnx_dir, out or onnx_dir / "parity", Thresholds(**thresholds), new_tokens, seed)
    for backend in report["backends"]:
        click.echo(f"{backend['backend']}: " + ", ".join(f"{k} {v:.4g}" for k, v in backend["metrics"].items()))
    click.echo(f"wrote {out or onnx_dir / 'parity'}/parity.md: {'PASSED' if report['passed'] else 'FAILED'}")


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint whose config is costed.")
@click.option("--preset", default="v3.2-exp", show_default=True, help="Built-in config when no --checkpoint is given.")
@click.option("--gpu", default="h800", show_default=True, help="GPU whose peaks the roofline uses.")
@click.option("--price", default=2.0, show_default=True, help="USD per GPU-hour.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("build/cost"), show_default=True)
@click.option("--measure-preset", default="tiny", show_default=True,
              help="Model timed on this machine (eager dense, eager DSA); 'none' to skip measuring.")
@click.option("--onnx", "onnx_dir", type=click.Path(path_type=Path),
              help="Also read this export's own cost off its graph (beside the closed form) and time it in ONNX Runtime.")
@_assumption_options
def cost(checkpoint, preset, gpu, price, out, measure_preset, onnx_dir, **assumptions):
    """Model cost per million tokens by token position, prefill and decode, dense MLA vs DSA; calibrate against
    DeepSeek's H800 figure; time decode steps on this machine. Writes cost.json, cost.md and PNG plots.

    \b
    Example: dsa-export cost --preset v3.2-exp --gpu h800 --price 2
    """
    from dsa_export.parity.cost import Assumptions
    from dsa_export.parity.cost_report import measure_decode, write_cost_report
    from dsa_export.targets import get_target

    target = get_target(gpu)
    config = _checkpoint_or_preset_config(checkpoint, preset)
    measured = None
    if measure_preset != "none":
        model = _load_eager(None, measure_preset)
        measured = measure_decode(model, onnx_dir, label=f"preset {measure_preset}")
    graph = None
    if onnx_dir is not None:
        from dsa_export.parity import graph_cost

        graph = graph_cost.compare(onnx_dir)
        for line in graph_cost.markdown(graph)[4:]:
            click.echo(line)
    report = write_cost_report(config, target, out, price, Assumptions(**assumptions), measured, graph)
    if report["calibration"]:
        for r in report["calibration"]["points"]:
            click.echo(f"{r['phase']:<8} {r['variant']:<6} at {r['position'] // 1024}K: model ${r['model_usd']:.3f}  "
                       f"paper ${r['paper_usd']:.2f}  ({r['relative_error']:+.1%})")
        for c in report["calibration"]["crossovers"]:
            click.echo(f"{c['phase']:<8} crossover: model {c['model_position']}, paper ~{c['paper_position']}")
    click.echo(f"wrote {out}/cost.json, cost.md, " + ", ".join(report["plots"]))


@cli.command()
@click.option("--gpu", required=True, help="Target GPU: a100, l40s, h100, h800, h200 or b200.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="HF-layout checkpoint directory.")
@click.option("--preset", default="tiny", show_default=True, help="Built-in config when no --checkpoint is given.")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory [default: build/<gpu>].")
@click.option("--seed", default=0, show_default=True, help="Seed of the preset's random weights.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
              help="Dtype of the eager model.")
def build(gpu, checkpoint, preset, out, seed, dtype):
    """Run every stage this machine can run for one GPU target and write build/<gpu>/manifest.json.

    \b
    Example: dsa-export build --gpu h100
    """
    from dsa_export.build import run_build

    run_build(gpu, out=out, checkpoint=checkpoint, preset=preset, seed=seed, dtype=_torch_dtype(dtype),
              log=click.echo)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="dsa-export", standalone_mode=False)
    except DSAExportError as e:
        click.echo(f"dsa-export: error: {e}", err=True)
        return 2
    except CheckFailure as e:
        click.echo(f"dsa-export: check failed: {e}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("dsa-export: interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
