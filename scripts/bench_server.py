#!/usr/bin/env python
"""Load on the local Triton Inference Server: N concurrent gRPC streams, each sending M generation requests one after
the other, against the tiny build's repository (dsa_generate stepping dsa_onnx, ONNX Runtime on the CPU).

Every response is checked: each request's tokens must equal the eager model's greedy tokens for its prompt (the
prompts cycle through a fixed set whose references are computed first), its INDEX values must run 0..n-1 with none
missing or repeated, and it must end with the final response. Reported: tokens/s and requests/s over the whole run,
time to first token and inter-token latency percentiles, and the count of lost, duplicated and wrong responses (which
must be 0). Results: benchmarks/server.json and server.md.

    python scripts/bench_server.py [--streams 16] [--requests 50] [--max-new-tokens 16] [--build DIR]
"""

from __future__ import annotations

import argparse
import queue
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchlib import machine, write_results
from dsa_export.deploy.client import request_inputs
from dsa_export.deploy.repository import GENERATE, step_models_of
from dsa_export.deploy.server import TritonServer, find_server


def references(build: Path, prompts: list[list[int]], max_new_tokens: int, capacity: int) -> list[list[int]]:
    from dsa_export.models import load_checkpoint
    from dsa_export.runtime import EagerBackend, Session

    session = Session(EagerBackend(load_checkpoint(build / "checkpoint", progress=False), capacity=capacity))
    return session.generate(prompts, max_new_tokens)  # right-padded batch: each row equals its prompt alone


def run_stream(url: str, requests: list[tuple[int, list[int]]], max_new_tokens: int, results: list) -> None:
    """One gRPC stream (one client connection) sending its requests one after the other."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((time.perf_counter(), result, error)))
    try:
        for number, (prompt_index, prompt) in enumerate(requests):
            record = {"prompt": prompt_index, "tokens": [], "indexes": [], "times": [], "error": None,
                      "final": False}
            record["sent"] = time.perf_counter()
            client.async_stream_infer(GENERATE, request_inputs(prompt, max_new_tokens=max_new_tokens, stop_ids=[]),
                                      request_id=str(number), enable_empty_final_response=True)
            while True:
                try:
                    arrived, result, error = responses.get(timeout=120)
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
                if token is not None:
                    record["tokens"].append(int(token[0]))
                    record["indexes"].append(int(result.as_numpy("INDEX")[0]))
                    record["times"].append(arrived)
                if result.get_response().parameters["triton_final_response"].bool_param:
                    record["final"] = True
                    break
            results.append(record)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def percentiles(values: list[float]) -> dict:
    array = np.array(values) * 1e3
    return {f"p{p}": float(np.percentile(array, p)) for p in (50, 90, 99)} | {"max": float(array.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="per stream, one after the other")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts (4 to 24 tokens), cycled")
    parser.add_argument("--capacity", type=int, default=128, help="cache rows of the export (when building)")
    parser.add_argument("--build", type=Path, help="a build directory with a model repository [default: the tiny "
                        "preset, built into a temporary directory]")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        build = args.build
        if build is None:
            from dsa_export.build import Options, run_build

            build = Path(tmp) / "build"
            print("building the tiny preset (checkpoint, export, model repository) ...")
            run_build(Options(out=build, capacity=args.capacity), only=["checkpoint", "export", "deploy"],
                      log=lambda line: None)
        import json

        capacity = json.loads((build / "io.json").read_text())["capacity"]
        rng = random.Random(0)
        vocab = json.loads((build / "io.json").read_text())["outputs"][0]["dims"][-1]
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(4, 24))] for _ in range(args.prompts)]
        expected = references(build, prompts, args.max_new_tokens, capacity)
        repository = build / "model_repository"
        step_models = step_models_of(repository)
        server = TritonServer(repository, [*step_models, GENERATE], find_server(),
                              log_path=Path(tmp) / "server.log")
        with server:
            results: list = []
            plans = [[((s * args.requests + r) % args.prompts, prompts[(s * args.requests + r) % args.prompts])
                      for r in range(args.requests)] for s in range(args.streams)]
            threads = [threading.Thread(target=run_stream, args=(server.grpc_url, plan, args.max_new_tokens, results))
                       for plan in plans]
            print(f"{args.streams} streams x {args.requests} requests x {args.max_new_tokens} tokens ...")
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start

    sent = args.streams * args.requests
    lost = sent - len(results) + sum(r["error"] is not None or not r["final"] or
                                     sorted(set(r["indexes"])) != list(range(args.max_new_tokens)) for r in results)
    duplicated = sum(len(r["indexes"]) - len(set(r["indexes"])) for r in results)
    wrong = sum(r["error"] is None and r["tokens"] != expected[r["prompt"]] for r in results)
    tokens = sum(len(r["tokens"]) for r in results)
    ttft = [r["times"][0] - r["sent"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    summary = {"machine": machine(), "server": "tritonserver 2.51 (nvidia-pytriton 0.7.0), CPU",
               "step_model": " -> ".join(step_models), "streams": args.streams, "requests_per_stream": args.requests,
               "max_new_tokens": args.max_new_tokens, "prompt_tokens": "4-24", "capacity": capacity,
               "requests": sent, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
               "requests_per_s": sent / wall, "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl),
               "lost": lost, "duplicated": duplicated, "wrong": wrong,
               "errors": sorted({r["error"] for r in results if r["error"]})[:5]}
    markdown = [
        "# Triton Inference Server under load (CPU)",
        "",
        f"`python scripts/bench_server.py --streams {args.streams} --requests {args.requests} --max-new-tokens "
        f"{args.max_new_tokens}` on {summary['machine']}; {summary['server']}; dsa_generate stepping "
        f"{summary['step_model']} (tiny preset, capacity {capacity}). {args.streams} gRPC streams send their "
        f"requests one after the other; every request's tokens are checked against the eager model's greedy tokens.",
        "",
        "| requests | tokens | seconds | tokens/s | requests/s | lost | duplicated | wrong |",
        "|---|---|---|---|---|---|---|---|",
        f"| {sent} | {tokens} | {wall:.1f} | {tokens / wall:.0f} | {sent / wall:.1f} | {lost} | {duplicated} | "
        f"{wrong} |",
        "",
        "| latency (ms) | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|",
        *(f"| {name} | " + " | ".join(f"{summary[key][p]:.1f}" for p in ("p50", "p90", "p99", "max")) + " |"
          for name, key in (("time to first token", "ttft_ms"), ("inter-token", "itl_ms"))),
        "",
        "The step model runs one sequence step at a time (one instance; ONNX Runtime uses both cores per step), so "
        "concurrent streams share it in turns: the inter-token latency of one stream grows with the number of "
        "streams, while tokens/s stays that of one step after another.",
    ]
    write_results("server", summary, markdown)
    print("\n".join(markdown))
    if lost or duplicated or wrong:
        raise SystemExit(f"{lost} lost, {duplicated} duplicated, {wrong} wrong responses")


if __name__ == "__main__":
    main()
