"""Shared by the benchmark scripts: round-robin timing and writing results (benchmarks/<name>.json and .md)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

OUT_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def best_times(fns: dict[str, Callable[[], object]], repeat: int, block: int = 1,
               block_mean: bool = False) -> dict[str, float]:
    """Min seconds of one call of each function, timed round-robin (`block` calls of each in a row per round) so
    that all see the same machine state: on a shared VM the load drifts by tens of percent within seconds. A block
    of several calls times each with its data warm in the caches, as a loop of decode steps runs (one call per round
    times it after the others evicted it). block_mean: the best round's mean call instead of the fastest call (as
    llama-bench reports a run of tokens after a warm-up), the round's first call warming up, untimed. One warm-up
    call each first."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            if block_mean:
                fn()
                start = time.perf_counter()
                for _ in range(block):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / block)
                continue
            for _ in range(block):
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def machine() -> str:
    return (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def write_results(name: str, results: dict, markdown: list[str]) -> None:
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT_DIR / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print(f"wrote {OUT_DIR / name}.json and {OUT_DIR / name}.md")
