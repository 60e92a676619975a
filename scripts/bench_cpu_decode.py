#!/usr/bin/env python
"""CPU decode and prefill: the ONNX Runtime export beside HF transformers (and llama.cpp, when given), same
checkpoint, same run.

The checkpoint is a seeded random DeepSeek-V3.2 in the official HF layout (hidden 256, 4 layers, 32 experts / 4 active,
index_topk 256, indexer heads of 64 dims (llama.cpp's indexer needs >= 64), fp32), written to a temporary directory
unless --checkpoint names one. Each row is the minimum over round-robin rounds (benchlib.best_times, each round
--block steps in a row) of one decode step (batch B, one token per sequence on top of `context` cached tokens) or
of one prefill of `context` tokens, at each thread count; llama-bench runs just before ours at each context.
Results: benchmarks/cpu_decode.json and .md; --profile also writes ONNX Runtime's own profile of a decode step, per
node type and per layer (benchmarks/cpu_decode_profile.json and .md).

    python scripts/bench_cpu_decode.py [--contexts 1024 4096 16384 32768] [--threads 1 2] [--batches 1 8]
        [--prefill 1024 4096] [--repeat 4] [--block 8] [--profile] [--no-hf]
        [--checkpoint DIR] [--llama-bench PATH --gguf FILE]
    python scripts/bench_cpu_decode.py --save-checkpoint DIR      # the checkpoint, for llama.cpp's converter

llama.cpp (see the README): build `llama-bench`, convert the saved checkpoint with its convert_hf_to_gguf.py
(--outtype f32), and pass both; llama-bench runs batch 1 at each context (-d) and thread count.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchlib import best_times, machine, write_results
from dsa_export.cost.measure import random_cache_contents
from dsa_export.exporter.onnx_export import export_onnx
from dsa_export.models.init import random_state_dict, save_checkpoint
from dsa_export.models.presets import PRESETS
from dsa_export.models.tokenizer import small_tokenizer
from dsa_export.runtime import GraphBackend

# the checkpoint: the official layout at a size a CPU decodes in milliseconds
BENCH_CONFIG = PRESETS["tiny"].replace(
    vocab_size=512, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=512,
    moe_intermediate_size=128, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, index_n_heads=8, index_head_dim=64, index_topk=256, n_routed_experts=32,
    num_experts_per_tok=4, n_group=4, topk_group=2, quantization_config=None)


def save_bench_checkpoint(out: Path) -> Path:
    state = random_state_dict(BENCH_CONFIG, seed=1, dtype=torch.float32)
    return save_checkpoint(state, BENCH_CONFIG, out, extra_files=small_tokenizer(BENCH_CONFIG.vocab_size))


# ---- ONNX Runtime ---------------------------------------------------------------------------------------------------
def ort_decode(backend: GraphBackend, config, batch: int, context: int):
    contents = [c.expand(batch, -1, -1) for c in random_cache_contents(config, context)]
    caches = backend.new_caches(batch, contents)
    ids, positions = torch.full((batch, 1), 7), torch.full((batch, 1), context)
    return lambda: backend.step(ids, positions, caches)


def ort_prefill(backend: GraphBackend, config, batch: int, context: int):
    caches = backend.new_caches(batch)
    ids = torch.randint(0, config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(context).expand(batch, -1).contiguous()
    return lambda: backend.step(ids, positions, caches)


# ---- HF transformers ------------------------------------------------------------------------------------------------
def hf_decode(model, batch: int, context: int):
    """One decode step of HF's deepseek_v32 with `context` random tokens in its cache (its DynamicCache, grown by
    concatenation as HF does; a handful of timed steps add a handful of tokens)."""
    with torch.no_grad():
        cache = model(input_ids=torch.zeros(batch, 1, dtype=torch.long), use_cache=True).past_key_values
    gen = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        layer.keys = torch.randn(*layer.keys.shape[:2], context, layer.keys.shape[-1], generator=gen)
        layer.values = torch.randn(*layer.values.shape[:2], context, layer.values.shape[-1], generator=gen)
        layer.indexer_keys = torch.randn(batch, context, layer.indexer_keys.shape[-1], generator=gen)
    ids = torch.full((batch, 1), 7)

    def step():
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    return step


def with_torch_threads(threads: int, fn):
    """fn run with torch's intra-op threads set to `threads` (HF's thread count is torch's, process-wide)."""
    def run():
        torch.set_num_threads(threads)
        return fn()
    return run


# ---- llama.cpp ------------------------------------------------------------------------------------------------------
def llama_bench(args, contexts: list[int], prefills: list[int]) -> dict:
    """llama-bench's decode (a token after -d context tokens) and prefill, ms, keyed (kind, threads, tokens): its best
    repeat (as ours: the best round). Each test builds its context first (untimed, most of the wall time at 32K):
    contexts beyond 4K run once."""
    out = {}
    runs = [("decode", ["-p", "0", "-n", "16", "-d", str(c), "-r", "3" if c <= 4096 else "1"]) for c in contexts]
    if prefills:
        runs.append(("prefill", ["-p", ",".join(map(str, prefills)), "-n", "0", "-r", "2"]))
    for kind, options in runs:
        command = [args.llama_bench, "-m", args.gguf, "-t", ",".join(map(str, args.threads)), "-o", "json", *options]
        print("$", " ".join(command), flush=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"llama-bench failed: {getattr(e, 'stderr', '') or e}")
        for row in json.loads(done.stdout):  # samples_ts: tokens per second of each repeat's timed part
            best = max(row["samples_ts"])
            if kind == "decode":
                out[(kind, row["n_threads"], row["n_depth"])] = 1e3 / best
            else:
                out[(kind, row["n_threads"], row["n_prompt"])] = 1e3 * row["n_prompt"] / best
    return out


def best_of(*runs: dict) -> dict:
    return {key: min(run[key] for run in runs if key in run) for key in set().union(*runs)}


# ---- ONNX Runtime's profile of one decode step ----------------------------------------------------------------------
def profile_decode(export: Path, config, context: int, steps: int = 20) -> dict:
    """ONNX Runtime's own profiler over `steps` decode steps (batch 1, 1 thread): µs per step by node type and by
    layer (a node inlined from a function counts for the layer of the graph node run before it)."""
    import onnx

    backend = GraphBackend.onnxruntime(export, threads=1, profile=True)
    step = ort_decode(backend, config, 1, context)
    step()
    session = backend.graphs[0].session
    layer_of = {}
    for node in onnx.load(export / "model.onnx", load_external_data=False).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        found = re.search(r"layers\.(\d+)", scopes)
        layer_of[node.name] = f"layer {found.group(1)}" if found else "embedding, head, sampling"
    for _ in range(steps):
        step()
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    by_type, by_layer, counts = collections.Counter(), collections.Counter(), collections.Counter()
    current = "embedding, head, sampling"
    runs = 0
    for event in events:
        if event.get("cat") == "Session" and event["name"] == "model_run":
            runs += 1
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op_type, name = event["args"]["op_name"], event["name"].removesuffix("_kernel_time")
        if op_type in ("If", "Loop"):  # their bodies' nodes are reported on their own
            continue
        current = layer_of.get(name, current)
        by_type[op_type] += event["dur"]
        counts[op_type] += 1
        by_layer[current] += event["dur"]
    return {"context": context, "runs": runs,
            "by_type": [{"op": op, "us": t / runs, "nodes": counts[op] / runs} for op, t in by_type.most_common()],
            "by_layer": [{"layer": k, "us": t / runs} for k, t in sorted(by_layer.items())]}


# ---- the run --------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prefill", type=int, nargs="*", default=[1024, 4096], help="prefill lengths (batch 1)")
    parser.add_argument("--repeat", type=int, default=4, help="round-robin rounds")
    parser.add_argument("--block", type=int, default=8, help="decode steps in a row per round (warm caches)")
    parser.add_argument("--profile", action="store_true", help="also write ONNX Runtime's profile of a decode step")
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    parser.add_argument("--checkpoint", type=Path, help="the benchmark checkpoint (default: written to a temp dir)")
    parser.add_argument("--save-checkpoint", type=Path, help="write the benchmark checkpoint here and stop")
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary")
    parser.add_argument("--gguf", help="the checkpoint converted by llama.cpp's convert_hf_to_gguf.py (f32)")
    args = parser.parse_args()
    if args.save_checkpoint:
        print(f"wrote {save_bench_checkpoint(args.save_checkpoint)}")
        return
    if bool(args.llama_bench) != bool(args.gguf):
        parser.error("--llama-bench and --gguf go together")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or save_bench_checkpoint(Path(tmp) / "checkpoint")
        export = Path(tmp) / "onnx"
        capacity = max(args.contexts + args.prefill) + 16
        export_onnx(checkpoint, export, capacity=capacity)
        run(args, checkpoint, export)


def run(args, checkpoint: Path, export: Path) -> None:
    from dsa_export.models.config import load_config

    config = load_config(checkpoint)
    hf = None
    if not args.no_hf:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    sessions = {threads: GraphBackend.onnxruntime(export, threads=threads) for threads in args.threads}
    decode, prefill, llama = [], [], {}
    before = torch.get_num_threads()
    # context by context, llama.cpp just before and just after ours (its best of the two): this VM's speed drifts by
    # tens of percent over minutes; the thread counts (and HF) are timed round-robin in one call, so the more-threads
    # comparison sees one machine state
    for context in args.contexts:
        llama_before = llama_bench(args, [context], []) if args.llama_bench else {}
        times = {}
        for batch in args.batches:
            fns = {}
            for threads, ort in sessions.items():
                fns[f"onnxruntime {threads}"] = ort_decode(ort, config, batch, context)
                if hf is not None:
                    fns[f"hf {threads}"] = with_torch_threads(threads, hf_decode(hf, batch, context))
            times[batch] = best_times(fns, args.repeat, block=args.block, block_mean=True)
            del fns
        llama.update(best_of(llama_before, llama_bench(args, [context], []) if args.llama_bench else {}))
        for batch, threads in itertools.product(args.batches, args.threads):
            t = times[batch]
            row = {"threads": threads, "batch": batch, "context": context,
                   "onnxruntime_ms": 1e3 * t[f"onnxruntime {threads}"],
                   "hf_ms": 1e3 * t[f"hf {threads}"] if hf else None,
                   "llama_cpp_ms": llama.get(("decode", threads, context)) if batch == 1 else None}
            decode.append(row)
            print(f"decode t={threads} B={batch} ctx={context}: onnxruntime {row['onnxruntime_ms']:.2f} ms"
                  + (f", hf {row['hf_ms']:.2f} ms" if hf else "")
                  + (f", llama.cpp {row['llama_cpp_ms']:.2f} ms" if row["llama_cpp_ms"] else ""), flush=True)
    if args.prefill:
        llama_before = llama_bench(args, [], args.prefill) if args.llama_bench else {}
        times = {context: best_times({threads: ort_prefill(ort, config, 1, context)
                                      for threads, ort in sessions.items()}, 3) for context in args.prefill}
        llama.update(best_of(llama_before, llama_bench(args, [], args.prefill) if args.llama_bench else {}))
    for context, threads in itertools.product(args.prefill, args.threads):
        row = {"threads": threads, "context": context, "onnxruntime_ms": 1e3 * times[context][threads],
               "llama_cpp_ms": llama.get(("prefill", threads, context))}
        prefill.append(row)
        print(f"prefill t={threads} {context}: onnxruntime {row['onnxruntime_ms']:.0f} ms"
              + (f", llama.cpp {row['llama_cpp_ms']:.0f} ms" if row["llama_cpp_ms"] else ""), flush=True)
    torch.set_num_threads(before)
    report(args, config, decode, prefill, bool(llama))
    if args.profile:
        profile = profile_decode(export, config, 4096 if 4096 in args.contexts else args.contexts[0])
        write_profile(profile)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "—"


def report(args, config, decode: list[dict], prefill: list[dict], with_llama: bool) -> None:
    results = {"machine": machine(), "config": config.to_hf_dict(), "repeat": args.repeat, "decode": decode,
               "prefill": prefill}
    lines = ["# CPU decode and prefill: ONNX Runtime vs HF transformers and llama.cpp", "",
             f"`python scripts/bench_cpu_decode.py {' '.join(sys.argv[1:])}` — {machine()}; the checkpoint: hidden "
             f"{config.hidden_size}, {config.num_hidden_layers} layers, {config.n_routed_experts} experts / "
             f"{config.num_experts_per_tok} active, index_topk {config.index_topk}, fp32. ms per decode step (B "
             f"sequences, one token each, on top of `context` tokens): the best of {args.repeat} round-robin rounds "
             f"(ours and HF at each thread count in turn) of the mean of {args.block} steps in a row after one "
             "untimed (the caches the others evicted: llama-bench warms up too); prefill: the "
             "best of 3 rounds, both thread counts in turn. llama.cpp: `llama-bench` (batch 1, f16 KV cache as it "
             "defaults; decode the mean of 16 tokens), its best repeat, run just before and just after ours at each "
             "context (the VM drifts by tens of percent over minutes).", "",
             "| threads | batch | context | ONNX Runtime ms | HF ms | HF / ours | llama.cpp ms | llama.cpp / ours |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(decode, key=lambda r: (r["context"], r["threads"], r["batch"])):
        hf = f"{r['hf_ms']:.2f} | {_ratio(r['hf_ms'], r['onnxruntime_ms'])}" if r["hf_ms"] else "— | —"
        llama = (f"{r['llama_cpp_ms']:.2f} | {_ratio(r['llama_cpp_ms'], r['onnxruntime_ms'])}" if r["llama_cpp_ms"]
                 else "— | —")
        lines.append(f"| {r['threads']} | {r['batch']} | {r['context']:,} | {r['onnxruntime_ms']:.2f} | {hf} | {llama} |")
    if prefill:
        lines += ["", "## Prefill (batch 1)", "", "| threads | tokens | ONNX Runtime ms | llama.cpp ms | llama.cpp / ours |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['threads']} | {r['context']:,} | {r['onnxruntime_ms']:.0f} | "
                  + (f"{r['llama_cpp_ms']:.0f} | {_ratio(r['llama_cpp_ms'], r['onnxruntime_ms'])} |"
                     if r["llama_cpp_ms"] else "— | — |") for r in prefill]
    lines += ["", "## Goals", ""] + goals(decode, prefill, with_llama)
    write_results("cpu_decode", results, lines)


def goals(decode: list[dict], prefill: list[dict], with_llama: bool) -> list[str]:
    out = []
    hf = [r["hf_ms"] / r["onnxruntime_ms"] for r in decode if r["hf_ms"]]
    if hf:
        out.append(f"- decode >= 5x faster than HF transformers: worst {min(hf):.1f}x "
                   f"({'met' if min(hf) >= 5 else 'NOT met'})")
    slower = [(b, c) for b in {r["batch"] for r in decode} for c in {r["context"] for r in decode}
              if _not_monotonic([r["onnxruntime_ms"] for r in sorted(decode, key=lambda r: r["threads"])
                                 if r["batch"] == b and r["context"] == c])]
    verdict = "met" if not slower else f"NOT met at (batch, context) {sorted(slower)}"
    out.append(f"- decode never slower with more threads: {verdict}")
    if with_llama:
        for c in sorted({r["context"] for r in decode}):
            best = min((r["llama_cpp_ms"] for r in decode if r["context"] == c and r["llama_cpp_ms"]), default=None)
            ours = [r["onnxruntime_ms"] for r in decode if r["context"] == c and r["batch"] == 1]
            if best and ours:
                need = 3.0 if c >= 32768 else 1.5
                worst = best / max(ours)
                out.append(f"- decode at {c:,} vs llama.cpp's best setting ({best:.2f} ms), at every thread count: "
                           f"worst {worst:.2f}x (goal >= {need}x: {'met' if worst >= need else 'NOT met'})")
        for r in prefill:
            if r["llama_cpp_ms"]:
                ratio = r["llama_cpp_ms"] / r["onnxruntime_ms"]
                out.append(f"- prefill of {r['context']:,} at {r['threads']} thread(s): {ratio:.1f}x llama.cpp "
                           f"(goal >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
    else:
        out.append("- llama.cpp: not run (no --llama-bench / --gguf given)")
    return out


def _not_monotonic(times: list[float]) -> bool:
    """More threads slower: beyond 3% (the rounds' noise on a shared machine)."""
    return any(b > a * 1.03 for a, b in zip(times, times[1:]))


def write_profile(profile: dict) -> None:
    total = sum(r["us"] for r in profile["by_type"])
    lines = ["# ONNX Runtime's profile of one decode step", "",
             f"`python scripts/bench_cpu_decode.py --profile` — batch 1, context {profile['context']:,}, 1 thread, "
             f"{profile['runs']} steps; kernel time per step as ONNX Runtime's profiler reports it (the profiler adds "
             f"its own overhead per node: compare the shares, not the sum, with the timed steps). {machine()}.", "",
             f"Total {total:.0f} µs per step.", "", "## By node type", "",
             "| node type | nodes per step | µs per step | share |", "|---|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['nodes']:.0f} | {r['us']:.1f} | {r['us'] / total:.1%} |" for r in profile["by_type"]]
    lines += ["", "## By layer", "", "| layer | µs per step | share |", "|---|---:|---:|"]
    lines += [f"| {r['layer']} | {r['us']:.1f} | {r['us'] / total:.1%} |" for r in profile["by_layer"]]
    write_results("cpu_decode_profile", profile, lines)


if __name__ == "__main__":
    main()
