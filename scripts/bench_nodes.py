#!/usr/bin/env python
"""Two servers against one: the tiny preset cut into 2 pipeline stages, served by one tritonserver (dsa_generate runs
both stages in process) and by two on loopback (deployed with --gpus-per-node 1: dsa_generate runs stage 0 and steps
stage 1, a model of the second server, over Triton's gRPC). Both setups up at once, each stream count run against
one then the other (the same machine state), with bench_server.py's chat workload and checks (every request's tokens
equal the eager model's; none lost or repeated). Reported per C streams: tokens/s of each and their ratio, TPOT and
TTFT p50, steps and their mean time, and the bytes one step sends to the second server per token fed. On one 2-core
VM both servers share the cores, so the ratio measures the cost of the gRPC hop (serialising, copying, the loopback),
not what a second machine adds. Results: benchmarks/nodes.json and nodes.md.

    python scripts/bench_nodes.py [--streams 1 4 16 32] [--requests 3]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from bench_server import CAPACITY, MAX_BATCH, WORKLOADS, build, load, references
from benchlib import machine, write_results

from dsa_export.deploy.repository import GENERATE, write_repository
from dsa_export.deploy.server import TritonServer, find_server
from dsa_export.exporter.artifacts import as_export
from dsa_export.serving.stages import stage_model, wire_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=3, help="per stream, one after the other")
    parser.add_argument("--prompts", type=int, default=24, help="distinct prompts, drawn at random")
    args = parser.parse_args()
    work = replace(WORKLOADS["chat"], requests=args.requests)
    results = {"machine": machine(), "server": "tritonserver 2.51 (nvidia-pytriton 0.7.0), ONNX Runtime on the CPU",
               "capacity": CAPACITY, "max_batch": MAX_BATCH, "workload": asdict(work), "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as tmp_name:
        tmp = Path(tmp_name)
        build_dir = build(tmp / "two", capacity=CAPACITY, max_tokens=work.max_tokens, max_batch=MAX_BATCH, gpus=2,
                          gpus_per_node=1)
        one = build_dir / "model_repository_one_server"
        write_repository(build_dir, one)  # the same export, both stages in one server
        rng = random.Random(0)
        prompts = [[rng.randrange(320) for _ in range(work.prompt_lengths[i % len(work.prompt_lengths)])]
                   for i in range(args.prompts)]
        print("eager references ...", flush=True)
        expected = references(build_dir, prompts, work.new_tokens)
        second_io = as_export(build_dir).stages[1].io
        blocks = -(-(max(work.prompt_lengths) + work.new_tokens) // second_io.block_size)  # the longest context's
        results["context_blocks"] = blocks
        results["decode_bytes_per_token"] = wire_bytes(second_io, 1, 1, 1, blocks)
        results["prefill_bytes_per_token"] = wire_bytes(second_io, work.max_tokens, 1, 1, blocks) / work.max_tokens
        with contextlib.ExitStack() as stack:
            install = find_server()
            node1 = stack.enter_context(TritonServer(build_dir / "model_repository", [stage_model(1)], install,
                                                     log_path=tmp / "node1.log"))
            servers = {
                "one server": stack.enter_context(TritonServer(one, [GENERATE], install, log_path=tmp / "one.log")),
                "two servers": stack.enter_context(TritonServer(build_dir / "model_repository", [GENERATE], install,
                                                                log_path=tmp / "node0.log",
                                                                node_addresses={1: node1.grpc_url}))}
            for count in args.streams:
                row = {"streams": count}
                for name, server in servers.items():
                    row[name] = load(server, count, work, prompts, expected, seed=count)
                    r = row[name]
                    print(f"{name}, {count} streams: {r['tokens_per_s']:.0f} tokens/s, TPOT p50 "
                          f"{r['tpot_ms']['p50']:.1f} ms, {r['steps']:.0f} steps of {r['step_ms']:.1f} ms, "
                          f"{r['lost']}/{r['duplicated']}/{r['wrong']} lost/duplicated/wrong", flush=True)
                row["ratio"] = row["two servers"]["tokens_per_s"] / row["one server"]["tokens_per_s"]
                results["rows"].append(row)
    lines = markdown(results, args)
    write_results("nodes", results, lines)
    print("\n".join(lines))
    bad = [r[name] for r in results["rows"] for name in ("one server", "two servers")
           if r[name]["lost"] or r[name]["duplicated"] or r[name]["wrong"]]
    if bad:
        raise SystemExit(f"lost, duplicated or wrong responses: {bad[0]}")


def markdown(results: dict, args) -> list[str]:
    work = results["workload"]
    lines = ["# Two servers (a build on two nodes) against one, on loopback", "",
             f"`python scripts/bench_nodes.py --streams {' '.join(map(str, args.streams))} --requests "
             f"{args.requests}` on {results['machine']}; {results['server']}; the tiny preset in 2 pipeline stages, "
             f"capacity {results['capacity']}, steps of up to {results['max_batch']} sequences and "
             f"{work['max_tokens']} tokens; chat workload (prompts of {', '.join(map(str, work['prompt_lengths']))} "
             f"tokens, {work['new_tokens']} new tokens). \"one server\": both stages in dsa_generate; \"two "
             f"servers\": stage 1 in a second tritonserver, stepped over gRPC. Both setups run at once and each "
             f"stream count is measured on one, then the other; every request's tokens are checked against the eager "
             f"model's. All three servers share this machine's cores.", "",
             "| streams | one server tokens/s | two servers tokens/s | two / one | TPOT p50 ms (one, two) "
             "| TTFT p50 ms (one, two) | step ms (one, two) | lost/duplicated/wrong |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        one, two = row["one server"], row["two servers"]
        lines.append(f"| {row['streams']} | {one['tokens_per_s']:.0f} | {two['tokens_per_s']:.0f} | "
                     f"{row['ratio']:.2f}x | {one['tpot_ms']['p50']:.1f}, {two['tpot_ms']['p50']:.1f} | "
                     f"{one['ttft_ms']['p50']:.0f}, {two['ttft_ms']['p50']:.0f} | {one['step_ms']:.1f}, "
                     f"{two['step_ms']:.1f} | {one['lost'] + two['lost']}/{one['duplicated'] + two['duplicated']}/"
                     f"{one['wrong'] + two['wrong']} |")
    lines += ["", f"Per token fed, a step sends the second server and gets back {results['decode_bytes_per_token']:,} "
                  f"bytes in a decode step of one sequence (the hidden state, its position, slot and row, its block "
                  f"table cut to the {results['context_blocks']} blocks the longest context reaches, sampling, the "
                  f"token and log-probability back) and {results['prefill_bytes_per_token']:,.0f} in a full prefill "
                  f"chunk (the block table shared by {work['max_tokens']} tokens). The README works this out for the "
                  f"671B on two 8 x H100 nodes."]
    return lines


if __name__ == "__main__":
    main()
