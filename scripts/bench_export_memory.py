#!/usr/bin/env python
"""Peak resident memory of `dsa-export export` against the checkpoint's size: the export streams its weights.

A random checkpoint of DeepSeek-V3.2-Exp's real dimensions (hidden 7168, vocabulary 129,280, MLA and indexer as
released), cut to 2 layers (1 dense, 1 MoE) and 16 routed experts so that it fits this disk and machine: about 6.8
GB in bf16 (written once, by a child process, then reused). `dsa-export export` runs on it as a user would, in a
child process; its peak resident memory is what the runner records in the manifest (VmHWM: resident pages, not the
address space of the memory-mapped safetensors, and not the high-water mark that ru_maxrss would inherit from this
process across exec), beside the goal: peak <= 0.25 x checkpoint bytes + 1.5 GB. The export is then checked as every
consumer reads it (StageDir.check: io.json, config.json, every external tensor inside its data file). Results:
benchmarks/export_memory.json and .md.

    python scripts/bench_export_memory.py [--work DIR] [--dtype bf16] [--data-file-gb 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchlib import machine, write_results
from dsa_export.exporter.artifacts import StageDir

GOAL_RATIO, GOAL_BASE = 0.25, 1.5e9


def write_checkpoint(path: Path) -> None:
    """In a child process: generating 3.4B random parameters takes memory this process must not hold."""
    code = ("import sys; from dsa_export.models import get_preset, init_checkpoint; "
            "config = get_preset('v3.2-exp').replace(num_hidden_layers=2, first_k_dense_replace=1, "
            "n_routed_experts=16); init_checkpoint(config, sys.argv[1], max_shard_bytes=2 << 30)")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dsa-bench-export-memory"))
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--data-file-gb", type=float, default=2.0)
    args = parser.parse_args()
    checkpoint, out = args.work / "checkpoint", args.work / "export"
    if not (checkpoint / "config.json").exists():
        print(f"writing the checkpoint to {checkpoint} ...")
        write_checkpoint(checkpoint)
    ckpt_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    command = [str(Path(sys.executable).with_name("dsa-export")), "export", "--checkpoint", str(checkpoint),
               "--out", str(out), "--dtype", args.dtype, "--capacity", "4096", "--data-file-gb",
               str(args.data_file_gb)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    peak = int(json.loads((out / "manifest.json").read_text())["steps"]["export"]["peak_rss_gb"] * 1e9)
    StageDir(out).check()
    files = StageDir(out).data_files()
    goal = GOAL_RATIO * ckpt_bytes + GOAL_BASE
    results = {"machine": machine(), "config": "v3.2-exp dims, 2 layers (1 dense + 1 MoE), 16 routed experts",
               "command": " ".join(command), "checkpoint_bytes": ckpt_bytes, "peak_rss_bytes": peak,
               "peak_over_checkpoint": peak / ckpt_bytes, "goal_bytes": goal, "met": peak <= goal,
               "seconds": seconds, "data_files": [{"name": f.name, "bytes": f.stat().st_size} for f in files]}
    markdown = ["# Export memory", "", f"{machine()}; `{results['config']}`", "",
                "| checkpoint | peak RSS of `dsa-export export` | peak / checkpoint | goal (0.25 x ckpt + 1.5 GB) "
                "| met | seconds |", "|---|---|---|---|---|---|",
                f"| {ckpt_bytes / 1e9:.2f} GB | {peak / 1e9:.2f} GB | {peak / ckpt_bytes:.2f} | {goal / 1e9:.2f} GB | "
                f"{'yes' if results['met'] else 'NO'} | {seconds:.0f} |", "",
                f"External data: {len(files)} files of at most {args.data_file_gb} GB (largest "
                f"{max(f.stat().st_size for f in files) / 1e9:.2f} GB); command: `{results['command']}`"]
    write_results("export_memory", results, markdown)
    print("\n".join(markdown))


if __name__ == "__main__":
    main()
