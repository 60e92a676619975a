#!/usr/bin/env python
"""Continuous batching on the local Triton Inference Server (CPU, the tiny preset): a concurrency sweep against the
batched server and, in the same run, the same server limited to one sequence per step (a repository written with
max_batch 1 beside the build's); two workloads (chat: short prompts, long answers; long prompts: fed in chunks); the
first also on the 2-stage build; and the pool's memory under 64 sequences of about 1K tokens at a 128K capacity.

At C streams, C gRPC streams start 0-0.5 s apart, each sending its requests one after the other, prompts drawn from
a fixed set of the workload's lengths. Every response is checked: each request's tokens must equal the eager model's
greedy tokens for its prompt alone, its INDEX values must run 0..n-1 with none missing or repeated, and it must end
with the final response. Reported per C: tokens/s over the run, time to first token, time per output token and
inter-token latency p50/p99, tokens per response, the most cache blocks in use (the server's metrics, sampled every
0.1 s), and lost / duplicated / wrong responses (which must be 0). Results: benchmarks/server.json and server.md.

    python scripts/bench_server.py [--streams 1 4 16 32 64] [--requests 3] [--workloads chat "long prompts"]
                                   [--skip-stages] [--skip-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from benchlib import machine, write_results
from dsa_export.deploy.client import request_inputs
from dsa_export.deploy.repository import GENERATE, write_repository
from dsa_export.deploy.server import TritonServer, find_server
from dsa_export.exporter.plan import EngineShapes

CAPACITY = 2048
MAX_BATCH = 64


@dataclass(frozen=True)
class Workload:
    name: str
    new_tokens: int
    prompt_lengths: tuple[int, ...]
    max_tokens: int = 256  # a step's token budget
    requests: int = 3  # per stream, one after the other


WORKLOADS = {  # chat: short prompts, long answers (decode-bound); long prompts: prefill-bound, chunked
    "chat": Workload("chat", 128, (8, 16, 32, 64)),
    "long prompts": Workload("long prompts", 64, (16, 256, 512, 1024)),
}


def build(out: Path, **options) -> Path:
    from dsa_export.build import Options, run_build

    run_build(Options(out=out, **options), only=["checkpoint", "export", "deploy"], log=lambda line: None)
    return out


def references(build_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from dsa_export.models import load_checkpoint
    from dsa_export.runtime import EagerBackend, Session

    model = load_checkpoint(build_dir / "checkpoint", progress=False)
    capacity = max(len(p) for p in prompts) + new_tokens
    return [Session(EagerBackend(model, capacity=capacity)).generate([p], new_tokens)[0] for p in prompts]


def run_stream(url: str, delay: float, requests: list[tuple[int, list[int]]], new_tokens: int, results: list) -> None:
    """One gRPC stream (one client connection) sending its requests one after the other, after `delay` seconds."""
    import tritonclient.grpc as grpcclient

    time.sleep(delay)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((time.perf_counter(), result, error)))
    try:
        for number, (prompt_index, prompt) in enumerate(requests):
            record = {"prompt": prompt_index, "tokens": [], "indexes": [], "times": [], "error": None, "final": False,
                      "sent": time.perf_counter()}
            client.async_stream_infer(GENERATE, request_inputs(prompt, max_new_tokens=new_tokens, stop_ids=[]),
                                      request_id=str(number), enable_empty_final_response=True)
            while True:
                try:
                    arrived, result, error = responses.get(timeout=300)
                except queue.Empty:
                    record["error"] = "timeout"
                    break
                if error is not None:
                    record["error"] = str(error)
                    break
                if result.get_response().id != str(number):
                    record["error"] = f"a response of request {result.get_response().id} during {number}"
                    break
                token = result.as_numpy("TOKEN")
                if token is not None:  # one or more new tokens
                    record["tokens"] += token.tolist()
                    record["indexes"] += result.as_numpy("INDEX").tolist()
                    record["times"] += [arrived] * len(token)
                if result.get_response().parameters["triton_final_response"].bool_param:
                    record["final"] = True
                    break
            results.append(record)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


class Sampler:
    """The server's metrics every 0.1 s while a load runs."""

    def __init__(self, server: TritonServer):
        self.server, self.samples, self.stop = server, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.1):
            try:
                self.samples.append(self.server.metrics())
            except OSError:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def percentile(values: list[float], p: int) -> float:
    return float(np.percentile(np.array(values) * 1e3, p)) if values else float("nan")


def load(server: TritonServer, streams: int, work: Workload, prompts: list, expected: list, seed: int) -> dict:
    rng = random.Random(seed)
    plans = [[(i, prompts[i]) for i in (rng.randrange(len(prompts)) for _ in range(work.requests))]
             for _ in range(streams)]
    delays = [rng.uniform(0, 0.5) if streams > 1 else 0.0 for _ in range(streams)]
    results: list = []
    threads = [threading.Thread(target=run_stream, args=(server.grpc_url, d, plan, work.new_tokens, results))
               for d, plan in zip(delays, plans)]
    before = server.metrics()
    with Sampler(server) as sampler:
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    time.sleep(0.5)  # the metrics catch up
    after = server.metrics()
    steps = after["dsa_steps_total"] - before["dsa_steps_total"]
    sent = streams * work.requests
    lost = sent - len(results) + sum(r["error"] is not None or not r["final"] or
                                     sorted(set(r["indexes"])) != list(range(work.new_tokens)) for r in results)
    tokens = sum(len(r["tokens"]) for r in results)
    ttft = [r["times"][0] - r["sent"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in results if len(r["times"]) > 1]
    return {"streams": streams, "requests": sent, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
            "itl_ms": {"p50": percentile(itl, 50), "p99": percentile(itl, 99)},
            "tpot_ms": {"p50": percentile(tpot, 50), "p99": percentile(tpot, 99)},
            "tokens_per_response": tokens / max(1, sum(len(set(r["times"])) for r in results)),
            "steps": steps, "step_ms": 1e3 * (after["dsa_step_seconds_total"] - before["dsa_step_seconds_total"])
            / max(1, steps), "tokens_per_step": (after["dsa_prompt_and_decode_tokens_total"]
                                                 - before["dsa_prompt_and_decode_tokens_total"]) / max(1, steps),
            "max_blocks_in_use": max((s.get("dsa_pool_blocks_in_use", 0) for s in sampler.samples), default=0),
            "max_running": max((s.get("dsa_requests_running", 0) for s in sampler.samples), default=0),
            "lost": lost, "duplicated": sum(len(r["indexes"]) - len(set(r["indexes"])) for r in results),
            "wrong": sum(r["error"] is None and r["tokens"] != expected[r["prompt"]] for r in results),
            "errors": sorted({r["error"] for r in results if r["error"]})[:3]}


def sweep(build_dir: Path, tmp: Path, label: str, streams: list[int], work: Workload, prompts: list,
          expected: list) -> dict:
    """The sweep against the build's repository (batched) and one written beside it with one sequence per step; both
    servers up at once, each stream count run against one then the other, so that both see the same machine state
    (on a shared 2-core VM the load drifts by tens of percent within minutes)."""
    one = build_dir / "model_repository_one_per_step"
    write_repository(build_dir, one, shapes=EngineShapes(max_batch=1, max_tokens=work.max_tokens))
    repositories = {"batched": build_dir / "model_repository", "one per step": one}
    rows: dict = {name: [] for name in repositories}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(TritonServer(repository, [GENERATE], find_server(),
                                                          log_path=tmp / f"{label}-{name}.log"))
                   for name, repository in repositories.items()}
        for count in streams:
            for name, server in servers.items():
                row = load(server, count, work, prompts, expected, seed=count)
                rows[name].append(row)
                print(f"{label}, {name}, {count} streams: {row['tokens_per_s']:.0f} tokens/s, TPOT p50 "
                      f"{row['tpot_ms']['p50']:.1f} ms, ITL p50 {row['itl_ms']['p50']:.1f} ms, TTFT p50 "
                      f"{row['ttft_ms']['p50']:.0f} ms, {row['tokens_per_response']:.2f} tokens/response, {row['steps']:.0f} steps "
                      f"of {row['step_ms']:.1f} ms and {row['tokens_per_step']:.0f} tokens, "
                      f"{row['lost']}/{row['duplicated']}/{row['wrong']} lost/duplicated/wrong", flush=True)
    return rows


def memory(tmp: Path) -> dict:
    """64 sequences of about 1K tokens (+ 32 new) on an export of capacity 128K whose pool holds 64 x 1.1K tokens."""
    from dsa_export.models import get_preset
    from dsa_export.models.cache import BLOCK_SIZE, cache_bytes_per_token

    capacity, sequences, pool_tokens = 131072, 64, 64 * 1100
    build_dir = build(tmp / "memory", capacity=capacity, max_batch=sequences, max_tokens=4096, pool_tokens=pool_tokens)
    rng = random.Random(5)
    prompts = [[rng.randrange(320) for _ in range(rng.randint(950, 1050))] for _ in range(sequences)]
    per_token = cache_bytes_per_token(get_preset("tiny"), "float32")
    with TritonServer(build_dir / "model_repository", [GENERATE], find_server(), log_path=tmp / "memory.log") as server:
        results: list = []
        threads = [threading.Thread(target=run_stream, args=(server.grpc_url, 0.0, [(i, p)], 32, results))
                   for i, p in enumerate(prompts)]
        with Sampler(server) as sampler:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        pool_blocks = sampler.samples[-1]["dsa_pool_blocks"]
    busy = [s for s in sampler.samples if s.get("dsa_requests_running", 0) > 0]
    slack = [(s["dsa_pool_blocks_in_use"] * BLOCK_SIZE - s["dsa_cache_tokens"]) / s["dsa_requests_running"]
             for s in busy]
    peak = max(busy, key=lambda s: s["dsa_pool_blocks_in_use"])
    return {"capacity": capacity, "sequences": sequences, "prompt_tokens": "950-1050", "new_tokens": 32,
            "pool_tokens": int(pool_blocks * BLOCK_SIZE), "pool_bytes": pool_blocks * BLOCK_SIZE * per_token,
            "per_sequence_at_capacity_bytes": sequences * capacity * per_token,
            "max_running": max(s["dsa_requests_running"] for s in busy),
            "peak_blocks_in_use": peak["dsa_pool_blocks_in_use"], "peak_cache_tokens": peak["dsa_cache_tokens"],
            "max_unused_rows_per_sequence": max(slack), "completed": sum(r["final"] and not r["error"] for r in results),
            "errors": sorted({r["error"] for r in results if r["error"]})[:3]}


def table(title: str, work: Workload, rows: dict, goals: bool) -> list[str]:
    """One sweep's table; `goals`: the sweep the serving goals are set for (chat, 1 stage), judged against them."""
    lines = [f"## {title}: prompts of {', '.join(map(str, work.prompt_lengths))} tokens, {work.new_tokens} new tokens",
             "", "| server | streams | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
             "| ITL p50 ms | ITL p99 ms | tokens per response | most blocks in use | lost | duplicated | wrong |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, sweep_rows in rows.items():
        for r in sweep_rows:
            lines.append(f"| {name} | {r['streams']} | {r['tokens_per_s']:.0f} | {r['ttft_ms']['p50']:.0f} | "
                         f"{r['ttft_ms']['p99']:.0f} | {r['tpot_ms']['p50']:.1f} | {r['tpot_ms']['p99']:.1f} | "
                         f"{r['itl_ms']['p50']:.1f} | {r['itl_ms']['p99']:.1f} | {r['tokens_per_response']:.2f} | "
                         f"{r['max_blocks_in_use']:.0f} | {r['lost']} | {r['duplicated']} | {r['wrong']} |")
    batched = {r["streams"]: r for r in rows["batched"]}
    one = {r["streams"]: r for r in rows["one per step"]}
    if 32 in batched and 1 in batched:
        speedup = batched[32]["tokens_per_s"] / one[32]["tokens_per_s"]
        tpot = batched[32]["tpot_ms"]["p50"] / batched[1]["tpot_ms"]["p50"]
        verdicts = (f" (goal >= 6x: {'met' if speedup >= 6 else 'NOT met'})",
                    f" (goal <= 4x: {'met' if tpot <= 4 else 'NOT met'})") if goals else ("", "")
        lines += ["", f"At 32 streams the batched server gives {speedup:.1f}x the tokens/s of one sequence per step"
                      f"{verdicts[0]}; its time per output token p50 at 32 streams is {tpot:.1f}x its own at 1 stream"
                      f"{verdicts[1]}. TPOT is a request's (last token - first token) / (tokens - 1): the inter-token "
                      "latency that does not flatter tokens sent together (ITL counts those as 0 ms apart)."]
        if not goals:
            lines.append("The goals are set for the chat workload on one stage; this table shows where batching "
                         "gains less on a CPU (prefill costs the same FLOPs batched or not; a 2-stage one-per-step "
                         "server already keeps both stages busy).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--requests", type=int, default=3, help="per stream, one after the other")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS),
                        help="the first is also run on the 2-stage build")
    parser.add_argument("--prompts", type=int, default=24, help="distinct prompts per workload, drawn at random")
    parser.add_argument("--skip-stages", action="store_true", help="no 2-stage sweep")
    parser.add_argument("--skip-memory", action="store_true", help="no 128K-capacity memory run")
    args = parser.parse_args()
    works = [replace(WORKLOADS[name], requests=args.requests) for name in args.workloads]
    results = {"machine": machine(), "server": "tritonserver 2.51 (nvidia-pytriton 0.7.0), ONNX Runtime on the CPU",
               "capacity": CAPACITY, "max_batch": MAX_BATCH, "workloads": [asdict(w) for w in works],
               "sweeps": []}
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp_name:
        tmp = Path(tmp_name)
        builds = {1: build(tmp / "one", capacity=CAPACITY, max_tokens=works[0].max_tokens, max_batch=MAX_BATCH)}
        if not args.skip_stages:
            builds[2] = build(tmp / "two", capacity=CAPACITY, max_tokens=works[0].max_tokens, max_batch=MAX_BATCH,
                              gpus=2)
        for n, work in enumerate(works):
            rng = random.Random(n)
            prompts = [[rng.randrange(320) for _ in range(work.prompt_lengths[i % len(work.prompt_lengths)])]
                       for i in range(args.prompts)]
            print(f"eager references ({work.name}) ...", flush=True)
            expected = references(builds[1], prompts, work.new_tokens)
            for stages, build_dir in builds.items():
                if stages > 1 and n > 0:
                    continue
                label = f"{work.name}, {stages} stage{'s' if stages > 1 else ''}"
                rows = sweep(build_dir, tmp, label, args.streams, work, prompts, expected)
                results["sweeps"].append({"workload": work.name, "stages": stages, "rows": rows})
        if not args.skip_memory:
            results["memory"] = memory(tmp)
    lines = markdown(results, args)
    write_results("server", results, lines)
    print("\n".join(lines))
    bad = [r for sweep_ in results["sweeps"] for rows in sweep_["rows"].values() for r in rows
           if r["lost"] or r["duplicated"] or r["wrong"]]
    if bad:
        raise SystemExit(f"lost, duplicated or wrong responses: {bad[0]}")


def markdown(results: dict, args) -> list[str]:
    works = [Workload(**w) for w in results["workloads"]]
    tables = []
    for sweep_ in results["sweeps"]:
        n = [w.name for w in works].index(sweep_["workload"])
        stages = sweep_["stages"]
        label = f"{sweep_['workload']}, {stages} stage{'s' if stages > 1 else ''}"
        tables += [""] + table(label, works[n], sweep_["rows"], goals=n == 0 and stages == 1)
    lines = ["# Continuous batching on Triton Inference Server (CPU)", "",
             f"`python scripts/bench_server.py --streams {' '.join(map(str, args.streams))} --requests "
             f"{args.requests}` on {results['machine']}; {results['server']}; tiny preset, capacity {CAPACITY}, "
             f"steps of up to {MAX_BATCH} sequences and {works[0].max_tokens} tokens. At C streams, C gRPC streams "
             f"start 0-0.5 s apart and send {args.requests} requests each, one after the other. \"one per step\": "
             "the same export served with --max-batch 1 (its repository written beside the build's); both servers "
             "run at once and each stream count is measured on one, then the other. Every "
             "request's tokens are checked against the eager model's greedy tokens for its prompt alone.", *tables]
    if "memory" in results:
        m = results["memory"]
        lines += ["", "## The pool under 64 sequences of about 1K tokens", "",
                  f"An export of capacity {m['capacity']:,} with a pool of {m['pool_tokens']:,} tokens "
                  f"({m['pool_bytes'] / 1e6:.1f} MB in fp32 for the tiny preset; caches at capacity for each of the "
                  f"{m['sequences']} sequences would take {m['per_sequence_at_capacity_bytes'] / 1e9:.2f} GB, "
                  f"{m['per_sequence_at_capacity_bytes'] / m['pool_bytes']:.0f}x more). {m['sequences']} requests of "
                  f"{m['prompt_tokens']} prompt tokens and {m['new_tokens']} new tokens at once: {m['completed']} "
                  f"completed, at most {m['max_running']:.0f} running together; at the peak {m['peak_blocks_in_use']:.0f}"
                  f" blocks held {m['peak_cache_tokens']:.0f} tokens; blocks in use never held more than "
                  f"{m['max_unused_rows_per_sequence']:.1f} unused rows per running sequence (at most one partly "
                  f"filled block: < 64)."]
    return lines


if __name__ == "__main__":
    main()
