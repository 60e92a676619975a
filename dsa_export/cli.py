"""The `dsa-export` command. Thin: `build` runs every build step (dsa_export/build), each step command runs one,
with the options declared once in build/options.py; `init`, `inspect`, `plan`, `serve` and `generate` are utilities.
Registering the commands imports no torch (`--help` is instant); each command imports what it runs.
Bad input → one line on stderr and exit code 2; a failed check → one line and exit code 1; interrupted → 130/143."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from dsa_export._version import __version__
from dsa_export.build.options import (SEED, FiniteFloat, OutputPath, check_upstream, click_options, options_from,
                                      with_recorded)
from dsa_export.errors import (CheckFailure, DSAExportError, Interrupted, deferring, forget_signals, note_signal,
                               signal_received)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="dsa-export")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no step lines: errors and a one-line summary.")
@click.option("-v", "--verbose", is_flag=True, help="After a run, every step's full record (what manifest.json holds).")
@click.option("--json", "as_json", is_flag=True, help="A run's summary as JSON on stdout (nothing else there).")
@click.pass_context
def cli(ctx, quiet: bool, verbose: bool, as_json: bool):
    """DeepSeek-V3.2-Exp (DeepSeek Sparse Attention) from PyTorch to ONNX, TensorRT and Triton Inference Server.

    \b
    Example (built-in tiny model, everything this machine can run):
      dsa-export build --gpu h100
      dsa-export --json build --gpu h100     (the summary as JSON; -q: one line; -v: every step's record)
    """
    from dsa_export.progress import set_quiet

    ctx.obj = {"quiet": quiet or as_json, "verbose": verbose, "json": as_json}
    set_quiet(quiet or as_json)


def _run_build(options, only: list[str] | None = None) -> None:
    """Run the build (or `only` these steps); with --junit-xml, the parity verdicts go to that file too, whether
    they passed or not (not when the run was refused: then there are none of this run)."""
    from dsa_export.build import BuildDir, run_build
    from dsa_export.files import write_atomic

    junit = options.junit_xml
    if junit is not None and not junit.parent.is_dir():
        raise DSAExportError(f"--junit-xml {junit}: its directory does not exist")

    def write_junit() -> None:
        if junit is not None:
            source = BuildDir(options.build_root).parity / "junit.xml"
            if not source.is_file():
                raise DSAExportError("--junit-xml: parity did not run in this build (see the summary above)")
            write_atomic(junit, source.read_bytes())

    settings = click.get_current_context().find_root().obj or {}
    log = (lambda line: None) if settings.get("quiet") else click.echo
    try:
        run_build(options, only=only, log=log)
    except CheckFailure:
        write_junit()
        _report(options, settings)
        raise
    write_junit()
    _report(options, settings)


def _report(options, settings: dict) -> None:
    """The end of a run as asked: the JSON summary (--json), one line (-q), every step's record (-v)."""
    import json

    from dsa_export.build import BuildDir
    from dsa_export.build.runner import read_manifest

    manifest_path = BuildDir(options.build_root).manifest
    steps = read_manifest(manifest_path).get("steps", {})
    keys = ("status", "seconds", "outputs", "reason", "note", "error", "failures", "command")
    if settings.get("json"):
        click.echo(json.dumps({"build": str(manifest_path.parent), "manifest": str(manifest_path),
                               "passed": all(r.get("status") != "failed" for r in steps.values()),
                               "steps": {n: {k: r[k] for k in keys if k in r} for n, r in steps.items()}}, indent=2))
    elif settings.get("quiet"):
        counts = {}
        for record in steps.values():
            counts[record.get("status")] = counts.get(record.get("status"), 0) + 1
        click.echo(f"{manifest_path.parent}: " + ", ".join(f"{n} {status}" for status, n in counts.items())
                   + f" ({manifest_path})")
    if settings.get("verbose"):
        click.echo(json.dumps(steps, indent=2, default=str))


def _step_command(name: str, summary: str, example: str, defaults: dict | None = None):
    """A command that runs the build step `name` in the build directory --out, with that step's options."""

    def command(**values):
        from dsa_export.build import STEPS, BuildDir
        from dsa_export.build.runner import FINISHED, read_manifest

        step = next(s for s in STEPS if s.name == name)
        # the checkpoint step resolves (or writes, for a preset) the model the step reads: cheap, and reused
        only = ["checkpoint", name] if "checkpoint" in step.after else [name]
        # the values as given are valid together (one line naming the problem), first
        manifest = BuildDir(options_from(values).build_root).manifest
        ctx = click.get_current_context()
        given = {key for key in values if ctx.get_parameter_source(key) not in (ParameterSource.DEFAULT, None)}
        recorded = read_manifest(manifest)
        if isinstance(recorded.get("options"), dict):  # a build: its options, unless given
            values = with_recorded(values, given, recorded["options"])
        options = options_from(values)
        records = recorded.get("steps", {})

        def made(step: str) -> bool:  # its outputs are there (a skipped step made none, read nothing)
            return isinstance(records.get(step), dict) and records[step].get("status") in FINISHED

        reads = set()
        for other in reversed(STEPS):  # what this step reads, transitively, and does not run now
            if other.name == name or (other.name in reads and made(other.name)):
                reads.update(n for n in other.after + other.uses if n not in only)
        finished = {s.name: records[s.name] for s in STEPS if s.name in reads and made(s.name)}  # in build order
        check_upstream(options, given, finished, manifest)  # those outputs were made with other options: refused
        _run_build(options, only)

    command.__doc__ = f"{summary}\n\n    \\b\n    Example: {example}\n    "
    return cli.command(name)(click_options((name,), defaults)(command))


@cli.command()
@click.option("--preset", default="tiny", show_default=True, help="Built-in config to initialise.")
@click.option("--fp8", is_flag=True, help="Store linear weights as FP8 e4m3 with 128x128 block scales.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Random seed of the weights.")
@click.option("--max-shard-mb", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Split into shards of at most this size.")
@click.option("--force", is_flag=True, help="Replace a checkpoint already in OUT_DIR.")
@click.argument("out_dir", type=OutputPath(path_type=Path))
def init(preset: str, fp8: bool, seed: int, max_shard_mb: int, force: bool, out_dir: Path):
    """Write a seeded random checkpoint in HF layout to OUT_DIR.

    \b
    Example: dsa-export init --preset tiny --fp8 ckpt/tiny-fp8
    """
    from dsa_export.models.init import init_checkpoint
    from dsa_export.models.presets import check_fits_in_memory, get_preset

    config = get_preset(preset)
    check_fits_in_memory(config, 2 * 2, f"preset '{preset}'")  # the bf16 weights, and their copy being written
    init_checkpoint(config, out_dir, seed=seed, fp8=fp8, max_shard_bytes=max_shard_mb << 20, overwrite=force)
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
    from dsa_export.models.presets import resolve_source
    from dsa_export.models.summary import summarize

    config, path = resolve_source(source)
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


def _token_ids(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        ids = [int(t) for t in value.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"expected token ids separated by commas or spaces, got {value!r}") from None
    bad = [t for t in ids if not 0 <= t < 2**63]
    if bad:
        raise click.BadParameter(f"token id {bad[0]} is not an id (0 <= id < 2**63)")
    return ids


def _node_addresses(ctx, param, values: tuple[str, ...]) -> dict[int, str]:
    addresses = {}
    for value in values:
        node, _, address = value.partition("=")
        host, _, port = address.rpartition(":")
        if not (node.isdigit() and int(node) > 0 and host and port.isdigit() and 0 < int(port) < 65536):
            raise click.BadParameter(f"expected NODE=HOST:PORT with NODE >= 1 (that node's Triton gRPC), got {value!r}")
        if int(node) in addresses:
            raise click.BadParameter(f"node {node} is given twice")
        addresses[int(node)] = address
    return addresses


@cli.command()
@click.argument("source", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the OpenAI API listens on (0.0.0.0: every interface). Triton's HTTP and metrics ports "
                   "stay on 127.0.0.1.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="OpenAI-compatible API port (/v1/chat/completions, /v1/completions, /v1/models, /metrics, /health).")
@click.option("--served-model-name", help="The model's name in the API [default: SOURCE as given].")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535),
              help="Triton's gRPC port (dsa-export generate, tritonclient).")
@click.option("--http-port", default=8003, show_default=True, type=click.IntRange(1, 65535), help="Triton's HTTP port.")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535),
              help="Triton's Prometheus metrics port (pool blocks in use, requests running and waiting, tokens).")
@click.option("--tritonserver", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A tritonserver binary [default: `tritonserver` on PATH, else the one in the serving environment "
                   "the tool creates on first use].")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Where the server's log goes [default: a temporary file].")
@click.option("--verbose", is_flag=True, help="Log the server's info messages too.")
@click.option("--node", default=0, show_default=True, type=click.IntRange(min=0),
              help="A build on several nodes (deployed with --gpus-per-node): which one this is. Node 0 serves the "
                   "API and runs the first stages; node N > 0 serves its stages to node 0 (start those first).")
@click.option("--node-address", "node_addresses", multiple=True, callback=_node_addresses, metavar="NODE=HOST:PORT",
              help="On node 0: where node NODE's Triton gRPC listens (repeat for each later node).")
@click.option("--grpc-host", default="127.0.0.1", show_default=True,
              help="Address Triton's gRPC listens on (node N > 0: one node 0 reaches, e.g. 0.0.0.0).")
def serve(source: Path, host: str, port: int, served_model_name: str | None, grpc_port: int, http_port: int,
          metrics_port: int, tritonserver: Path | None, log_file: Path | None, verbose: bool, node: int,
          node_addresses: dict[int, str], grpc_host: str):
    """Serve SOURCE (a build directory, or a model repository) until Ctrl-C (running requests finish first):
    Triton Inference Server on 127.0.0.1 runs the generation model, batching every request into each step (the
    engines where the build has them, else ONNX Runtime on CPU), and an OpenAI-compatible API in front of it.

    \b
    Example: dsa-export serve build/h100   (then: curl 127.0.0.1:8000/v1/models)
    Two nodes: dsa-export serve build/h100 --node 1 --grpc-host 0.0.0.0   (on the second)
               dsa-export serve build/h100 --node-address 1=10.0.0.2:8001   (then on the first)
    """
    from dsa_export.deploy.server import serve_repository

    serve_repository(source, grpc_port, http_port, metrics_port, tritonserver, log_file, verbose, log=click.echo,
                     host=host, port=port, served_model_name=served_model_name, node=node,
                     node_addresses=node_addresses, grpc_host=grpc_host)


@cli.command()
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="The server's gRPC address.")
@click.option("--prompt-ids", callback=_token_ids, help="Prompt as token ids, e.g. 1,2,3.")
@click.option("--prompt", help="Prompt as text (the build needs a tokenizer); the reply is printed as text.")
@click.option("--chat", is_flag=True, help="Apply the model's chat template to --prompt.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True, type=FiniteFloat(min=0),
              help="0: greedy; else sampled.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="Sample from the top k "
              "(0: all).")
@click.option("--top-p", default=1.0, show_default=True, type=FiniteFloat(min=0, max=1, min_open=True),
              help="Sample from the smallest set of tokens whose probability reaches p.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Sampling seed.")
@click.option("--stop-ids", callback=_token_ids, help="Stop at any of these ids [default: the model's eos].")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at any id (generate --max-new-tokens).")
@click.option("--timeout", default=120.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="Seconds to wait for each token.")
@click.option("--wait", default=0.0, show_default=True, type=FiniteFloat(min=0),
              help="Seconds to wait for the server to be ready (one just started).")
def generate(url: str, prompt_ids: list[int] | None, prompt: str | None, chat: bool, max_new_tokens: int,
             temperature: float, top_k: int, top_p: float, seed: int, stop_ids: list[int] | None,
             ignore_eos: bool, timeout: float, wait: float):
    """Stream a generation from a running server (`dsa-export serve`): token ids printed as they arrive, or text
    for a --prompt.

    \b
    Example: dsa-export generate --prompt-ids 1,2,3 --max-new-tokens 16
    """
    import time

    from dsa_export.deploy import client

    if (prompt_ids is None) == (prompt is None):
        raise click.UsageError("give either --prompt-ids or --prompt")
    if chat and prompt is None:
        raise click.UsageError("--chat applies to --prompt")
    if ignore_eos and stop_ids is not None:
        raise click.UsageError("--ignore-eos and --stop-ids exclude each other")
    inputs = client.request_inputs(prompt_ids, prompt, chat, max_new_tokens, temperature, top_k, top_p, seed,
                                   [] if ignore_eos else stop_ids)
    start, first, count = time.perf_counter(), None, 0
    for chunk in client.stream(url, inputs, timeout=timeout, wait=wait):
        first = first or time.perf_counter() - start
        count += 1
        click.echo(chunk.text if prompt is not None else f"{chunk.token} ", nl=False)
    click.echo()
    seconds = time.perf_counter() - start
    click.echo(f"{count} tokens in {seconds:.2f} s (first after {first or 0:.2f} s)", err=True)


def _build(**values):
    """Run every step this machine can run for one GPU target and write <out>/manifest.json; steps that cannot run
    here are recorded as skipped with the command that finishes them; inputs unchanged since the last run are reused.

    \b
    Example: dsa-export build --gpu h100
    """
    _run_build(options_from(values))


def _plan(**values):
    """Print how the model is cut across the target's GPUs: pipeline stages of contiguous layers balanced by memory
    (weights as the export stores them, the cache pool (--pool-tokens), activations, TensorRT workspace),
    with each GPU's bytes and headroom. Reads no weight; exit 2 with the shortfall if a stage cannot fit.

    \b
    Example: dsa-export plan --preset v3.2-exp --gpu h200 --gpus 8 --dtype bf16
    """
    from dsa_export.build import BuildContext
    from dsa_export.exporter.plan import check_plan
    from dsa_export.models.cache import default_capacity

    ctx = BuildContext(options_from(values))
    plan = ctx.pipeline_plan()
    capacity = ctx.options.capacity or default_capacity(ctx.config)
    experts = "FP8" if ctx.experts_fp8() else ctx.options.dtype
    shapes = ctx.engine_shapes
    pool = shapes.pool_rows(capacity)
    click.echo(f"{ctx.options.source}: {ctx.config.num_hidden_layers} layers on {plan.gpus} x {plan.target} "
               f"({plan.gpu_bytes / 1e9:.0f} GB each); {ctx.options.dtype} weights and caches, {experts} routed "
               f"experts; steps of up to {shapes.max_batch} sequences and {shapes.step_tokens(capacity):,} tokens; a "
               f"cache pool of {pool:,} tokens per stage (the longest sequence {capacity:,}: "
               f"{pool / capacity:.3g} of them, or {pool // 1024:,} of 1K)")
    click.echo(plan.table())
    check_plan(plan)


def _register_commands() -> None:
    cli.command("build")(click_options(None)(_build))
    cli.command("plan")(click_options(("plan",))(_plan))
    _step_command("kernels", "Compile the DSA Triton kernels ahead of time for one GPU target (no GPU needed): per "
                   "kernel the PTX, the cubin and a JSON of launch metadata, into <out>/kernels/<arch>; fails if a "
                   "kernel exceeds the target's shared-memory or register limits.",
                   "dsa-export kernels --gpu h100 --out build/h100")
    _step_command("export", "Export ONNX into <out>: per layer one dsa::LightningIndexer and one dsa::SparseMLA node, "
                   "per MoE layer one dsa::RoutedExperts node (with standard-op decompositions as model-local "
                   "functions), per-layer paged cache pools written in place (dsa::WriteCache), packed tokens of any "
                   "mix of sequences with their block tables, sampling in the last stage; then check the graph.", "dsa-export export --preset tiny --out build/onnx")
    _step_command("engine", "Build the TensorRT engine <out>/engine/model.plan from <out>'s export and AOT kernels, the "
                   "dsa:: ops as ahead-of-time Triton plugins (needs TensorRT >= 10.15 and a GPU of the target's "
                   "architecture; elsewhere the step is skipped, or refused with --require-engine).",
                   "dsa-export engine --gpu h100 --out build/h100")
    _step_command("parity", "Compare the eager model with ONNX Runtime on <out>'s export (logits, KL, top-1, greedy "
                   "tokens, indexer selections); write <out>/parity/parity.json and parity.md; exit 1 naming the "
                   "metric if a threshold is missed.", "dsa-export parity --preset tiny --out build/onnx")
    _step_command("cost", "Model the cost per million tokens by token position, prefill and decode, dense MLA vs DSA; "
                   "calibrate against DeepSeek's H800 figure (for the 671B shapes); with an export in <out>, time its "
                   "decode steps here and read its own FLOPs and bytes off the graph. Writes <out>/cost/.",
                   "dsa-export cost --preset v3.2-exp --gpu h800 --price 2 --out build/cost",
                   defaults={"preset": "v3.2-exp", "gpu": "h800"})
    _step_command("deploy", "Write the Triton Inference Server model repository <out>/model_repository from "
                   "<out>'s export: dsa_generate (decoupled, streams tokens), which batches every request into each "
                   "step over the cache pools (the engines where the build has them, else ONNX Runtime on the CPU).",
                   "dsa-export deploy --out build/h100")


_register_commands()


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    """The command line; argv None: this process is the program (the console script, `python -m dsa_export.cli`), so
    a signal that comes once the command is over is ignored while the interpreter exits (its default handlers would
    print a KeyboardInterrupt from an atexit callback, or kill it with no word). With argv, as a library call, the
    caller's handlers are put back."""
    over = False

    def terminated(signum, frame):
        if over:
            return
        note_signal("SIGTERM")
        if not deferring():  # else errors.signals_deferred raises it when its body ends
            raise Interrupted("SIGTERM")

    def interrupted(signum, frame):  # not KeyboardInterrupt: click would print a line of its own for that
        if over:
            return
        note_signal("SIGINT")
        if not deferring():
            raise Interrupted("SIGINT")

    forget_signals()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, terminated),
                signal.SIGINT: signal.signal(signal.SIGINT, interrupted)}
    try:
        try:
            cli.main(args=argv, prog_name="dsa-export", standalone_mode=False)
        finally:
            over = True  # whatever ended the command: a signal from now on changes nothing
    except DSAExportError as e:
        click.echo(f"dsa-export: error: {_one_line(str(e))}", err=True)
        return 2
    except CheckFailure as e:
        click.echo(f"dsa-export: check failed: {_one_line(str(e))}", err=True)
        return 1
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("dsa-export: interrupted (SIGINT)", err=True)
        return 130
    except Interrupted as e:
        return _interrupted(e.signal_name)
    except click.UsageError as e:  # one line, not click's usage block
        command = e.ctx.command_path if e.ctx else "dsa-export"
        click.echo(f"dsa-export: error: {_one_line(e.format_message())} (see '{command} --help')", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"dsa-export: error: {_one_line(e.format_message())}", err=True)
        return e.exit_code
    except OSError as e:  # the disk is full, a file vanished: what the system said, in one line
        if signal_received():
            return _interrupted(signal_received())
        click.echo(f"dsa-export: error: {_one_line(str(e))}", err=True)
        return 2
    except BaseException:
        if signal_received():  # a library that failed half-way through a signal (torch's mode stack, ...)
            return _interrupted(signal_received())
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_IGN if argv is None else handler)
    return 0


def _interrupted(name: str) -> int:
    click.echo(f"dsa-export: interrupted ({name})", err=True)
    return 130 if name == "SIGINT" else 143


if __name__ == "__main__":
    sys.exit(main())
