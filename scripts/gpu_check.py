#!/usr/bin/env python
"""The device check: the AOT kernels launched exactly as the TensorRT plugins launch them, on a GPU, at DeepSeek-V3.2's
shapes. One script, under 10 minutes on one H200; runs wherever torch and the CUDA driver are (no TensorRT needed).

    python scripts/gpu_check.py [--gpu h200] [--dry-run] [--out benchmarks]

1. Compiles the kernels as `dsa-export kernels` does (v3.2 dims, the GPU's target), or reads them (--kernels DIR).
2. For each kernel and each case (decode and prefill shapes), builds the launch from the kernel's JSON alone, as
   plugins/tensorrt.py does: grid and int32 scalars from the input dims, block = num_warps·32, dynamic shared
   memory = shared_bytes, arguments in TensorRT's order (inputs, scalars, outputs) plus Triton's hidden scratch
   pointers (null). Checks it statically: argument count against the PTX `.entry`, each pointer's element type
   against its tensor's dtype (FP8 codes: int8 read as e4m3), scalars within int32, grid and block within CUDA's
   limits, shared memory within 48 KiB, the PTX's ISA and target as the JSON says.
3. Unless --dry-run (then nothing is launched and no GPU is needed): loads the PTX through the CUDA driver API
   (cuModuleLoadData: the driver JIT-compiles it, as for TensorRT), records the function's static shared memory as
   the driver counts it (CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: the 1 KiB question of kernels/aot.py), launches with
   cuLaunchKernel, compares with the torch reference (models/semantics.py), times it (CUDA events) and reports the
   achieved bandwidth and FLOP rate against the GPU's peak (targets.py), then the decode attention time per token
   (indexer + sparse MLA, every layer) at 8K, 32K and 128K keys.
4. Writes <out>/gpu_check.json and gpu_check.md (with --dry-run: gpu_check_dry_run.*) and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dsa_export.contracts import BY_ONNX_NAME, FP8_BYTES
from dsa_export.formats import FORMATS, of
from dsa_export.kernels import aot, launch
from dsa_export.kernels.common import IndexerSplit
from dsa_export.kernels.reference import (EMPTY_KEY, indexer_chunks_reference, indexer_merge_reference, key_positions,
                                          routed_experts_reference)
from dsa_export.models import semantics
from dsa_export.models.cache import BLOCK_SIZE
from dsa_export.models.presets import get_preset
from dsa_export.targets import TARGETS, get_target

OUT_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
CONTEXTS = (8192, 32768, 131072)  # keys per sequence for the decode cases
INT32_MAX = 2**31 - 1
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# a kernel pointer's element type → the tensor dtypes it may point at (formats.py); FP8 codes are read as e4m3
POINTER_TYPES = {f.triton: (getattr(torch, f.name),) for f in FORMATS.values() if f.triton}
POINTER_TYPES[of("float8_e4m3fn").triton] += (getattr(torch, FP8_BYTES),)


@dataclass
class Case:
    kernel: str  # the JSON's "kernel"
    name: str  # e.g. "decode, 131072 keys"
    tensors: dict  # the contract's tensors by name (meta tensors in a dry run)
    attributes: dict
    past: int = 0
    sequences: int = 1


def make(shape, dtype, device, fill="randn", gen=None):
    """A tensor for a case: on the meta device in a dry run (shapes and dtypes only), else filled."""
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if fill == "randn":
        return (torch.randn(shape, device=device, generator=gen) * 0.5).to(dtype)
    if fill == "codes":  # FP8 codes of values in [-2, 2]
        return (torch.rand(shape, device=device, generator=gen) * 4 - 2).to(torch.float8_e4m3fn).view(torch.int8)
    raise ValueError(fill)


def cases(meta: dict, config, device: str, gen) -> list[Case]:
    """The shapes each kernel is checked at: v3.2's dims, decode at each context and a prefill chunk."""
    c, contract, dtype = config, meta["contract"], torch.float32
    if meta["selector"]["dtype"] in ("bfloat16", "float8_e4m3fn"):
        dtype = getattr(torch, meta["selector"]["dtype"])
    dk = c.kv_lora_rank + c.qk_rope_head_dim
    out: list[Case] = []
    for keys, tokens in [(k, 1) for k in CONTEXTS] + [(4096, 512)]:
        rows = math.ceil(keys / BLOCK_SIZE) * BLOCK_SIZE
        paging = {"positions": torch.arange(keys - tokens, keys, device=device if device != "meta" else "cpu"),
                  "sequence": torch.zeros(tokens, dtype=torch.int32),
                  "block_tables": torch.randperm(rows // BLOCK_SIZE, generator=torch.Generator().manual_seed(keys))
                  .to(torch.int32)[None]}
        if device != "meta":
            paging = {k: v.to(device) for k, v in paging.items()}
        name = f"decode, {keys} keys" if tokens == 1 else f"prefill chunk of {tokens} at {keys} keys"
        if contract in ("IndexerChunks", "IndexerMerge"):
            split = split_of(meta)
            attributes = {"topk": c.index_topk, "block_size": BLOCK_SIZE, "split_rows": split.split_rows}
            scoring = {"q": make((tokens, c.index_n_heads, c.index_head_dim), dtype, device, gen=gen),
                       "k": make((rows, c.index_head_dim), dtype, device, gen=gen),
                       "w": make((tokens, c.index_n_heads), torch.float32, device, gen=gen), **paging}
            if contract == "IndexerChunks":
                out.append(Case(meta["kernel"], name, scoring, attributes, past=keys - tokens))
                continue
            # the merge's input: the chunks of bf16 scores, as the first half gives them (torch, on the GPU)
            candidates = make((tokens + split.split_rows, c.index_topk), torch.int64, device) if device == "meta" \
                else indexer_chunks_reference(*(scoring[n] for n in ("q", "k", "w", "positions", "sequence",
                                                                      "block_tables")), c.index_topk, BLOCK_SIZE, split)
            out.append(Case(meta["kernel"], name, {"candidates": candidates, **paging}, attributes, past=keys - tokens))
        elif contract == "SparseMLA":
            indices = torch.randperm(rows, generator=torch.Generator().manual_seed(keys))[:c.index_topk]
            indices = indices.to(torch.int32)[None].expand(tokens, -1).contiguous()
            out.append(Case(meta["kernel"], name, {
                "q": make((tokens, c.num_attention_heads, dk), dtype, device, gen=gen),
                "kv": make((rows, dk), dtype, device, gen=gen),
                "indices": indices.to(device) if device != "meta" else indices},
                {"scale": c.softmax_scale, "dv": c.kv_lora_rank}, past=keys - tokens))
        elif contract == "WriteCache" and tokens > 1:
            slots = torch.randperm(rows, generator=torch.Generator().manual_seed(1))[:tokens]
            out.append(Case(meta["kernel"], f"{tokens} rows into a pool of {rows}", {
                "cache": make((rows, dk), dtype, device, gen=gen), "rows": make((tokens, dk), dtype, device, gen=gen),
                "slots": slots.to(device) if device != "meta" else slots}, {}))
    if contract.startswith("RoutedExperts"):
        fp8 = contract == "RoutedExpertsFP8"
        # 64 of the experts: the kernels' grid is one program per expert (the count is not compiled in), and the
        # reference of 512 tokens over all 256 would need tens of GB
        E, H, inter, k = min(64, c.n_routed_experts), c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
        for tokens in (8, 512):
            experts = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:k]
                                   for t in range(tokens)]).to(torch.int32)
            tensors = {"x": make((tokens, H), dtype, device, gen=gen),
                       "experts": experts.to(device) if device != "meta" else experts,
                       "weights": make((tokens, k), torch.float32, device, gen=gen).abs()}
            bo, bi = c.weight_block
            if fp8:
                tensors |= {"gate_up": make((E, 2 * inter, H), torch.int8, device, "codes", gen),
                            "gate_up_scale": make((E, 2 * math.ceil(inter / bo), math.ceil(H / bi)), torch.float32,
                                                  device, gen=gen).abs() * 0.01,
                            "down": make((E, H, inter), torch.int8, device, "codes", gen),
                            "down_scale": make((E, math.ceil(H / bo), math.ceil(inter / bi)), torch.float32, device,
                                               gen=gen).abs() * 0.01}
            else:
                tensors |= {"gate_up": make((E, 2 * inter, H), dtype, device, gen=gen) * 0.05,
                            "down": make((E, H, inter), dtype, device, gen=gen) * 0.05}
            tensors["base"] = make((tokens, H), torch.float32, device, gen=gen)
            attrs = {"block_out": bo, "block_in": bi} if fp8 else {}
            out.append(Case(meta["kernel"], f"{tokens} tokens, {k} of {E} experts each", tensors, attrs))
    return out


def split_of(meta: dict) -> IndexerSplit:
    """The split rule compiled into an indexer kernel."""
    c = meta["constexprs"]
    return IndexerSplit(c["SPLIT_ROWS"], c["MAX_SPLITS"], c["MIN_CHUNK"])


def check_launch(meta: dict, case: Case, ptx: str) -> tuple[list, tuple, list[str]]:
    """The launch the plugin would make for this case, from the JSON alone: (kernel arguments with None for a hidden
    pointer, grid, problems found)."""
    problems = []
    contract = BY_ONNX_NAME[meta["contract"]]
    outputs = dict(contract.aliases)
    tensors = dict(case.tensors)
    dims = contract.input_dims({n: tuple(t.shape) for n, t in tensors.items()}, case.attributes)
    for spec in contract.outputs:  # a new buffer, or the input it aliases
        if spec.name in outputs:
            tensors[spec.name] = tensors[outputs[spec.name]]
            continue
        dtype = contract.output_dtype({n: t.dtype for n, t in case.tensors.items()})
        tensors[spec.name] = torch.empty(contract.output_shape(dims), dtype=getattr(torch, dtype)
                                         if isinstance(dtype, str) else dtype,
                                         device=next(iter(case.tensors.values())).device)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    arguments = []
    for a in meta["arguments"]:
        if a["kind"] == "hidden":
            arguments.append(None)
            continue
        if a["kind"] == "scalar":
            value = shapes[a["tensor"]][a["dim"]]
            if not 0 <= value <= INT32_MAX:
                problems.append(f"scalar {a['name']} = {value} outside int32")
            arguments.append(value)
            continue
        tensor = tensors[a["tensor"]]
        element = a["type"].lstrip("*")
        if tensor.dtype not in POINTER_TYPES.get(element, ()):
            problems.append(f"argument {a['name']} is *{element}, its tensor {a['tensor']} is {tensor.dtype}")
        arguments.append(tensor)
    if len(arguments) != meta["ptx_params"]:
        problems.append(f"{len(arguments)} arguments for {meta['ptx_params']} PTX parameters")
    grid = launch.grid(meta, shapes)
    problems += [f"grid {axis} = {size} outside 1..{limit}" for axis, size, limit in zip("xyz", grid, GRID_LIMITS)
                 if not 1 <= size <= limit]
    if not meta["block"][0] <= 1024 or meta["block"][0] != meta["num_warps"] * 32:
        problems.append(f"block {meta['block']}")
    if meta["shared_bytes"] + (meta.get("static_shared_bytes") or 0) > aot.DEFAULT_SHARED_BYTES:
        problems.append(f"{meta['shared_bytes']} B of dynamic shared memory")
    if f".version {meta['ptx_version']}" not in ptx or f".target {meta['arch']}" not in ptx or \
            f".entry {meta['symbol']}" not in ptx:
        problems.append("the PTX's .version/.target/.entry differ from the JSON")
    return arguments, grid, problems


def reference(meta: dict, case: Case) -> torch.Tensor:
    t, a = case.tensors, case.attributes
    name = meta["contract"]
    if name == "IndexerChunks":
        return indexer_chunks_reference(t["q"], t["k"], t["w"], t["positions"], t["sequence"], t["block_tables"],
                                        a["topk"], a["block_size"], split_of(meta))
    if name == "IndexerMerge":
        return indexer_merge_reference(t["candidates"], t["positions"], t["sequence"], t["block_tables"], a["topk"],
                                       a["block_size"], split_of(meta))
    if name == "SparseMLA":
        return semantics.sparse_mla(t["q"], t["kv"], t["indices"], a["scale"], a["dv"])
    if name == "WriteCache":
        return semantics.write_cache(t["cache"].clone(), t["rows"], t["slots"])
    scales = (t["gate_up_scale"], t["down_scale"], a["block_out"], a["block_in"]) if name == "RoutedExpertsFP8" \
        else None
    # grouped by expert (kernels/reference.py): semantics' one gathered expert per (token, slot) would not fit
    return routed_experts_reference(t["x"], t["experts"], t["weights"], t["gate_up"], t["down"], t["base"], scales)


class Driver:
    """The CUDA driver API (cuda-bindings), as TensorRT's AOT launcher uses it: load PTX, launch by symbol."""

    def __init__(self):
        from cuda.bindings import driver

        self.cu = driver
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the primary context, current on this thread
        self.modules: dict = {}
        self.load_ms: dict = {}  # kernel → seconds the driver took to JIT-compile and load its PTX (review S6)

    def call(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver: {err}")
        return rest[0] if len(rest) == 1 else rest

    def function(self, meta: dict, ptx: str):
        if meta["kernel"] not in self.modules:
            started = time.perf_counter()
            module = self.call(self.cu.cuModuleLoadData(ptx.encode() + b"\0"))
            self.load_ms[meta["kernel"]] = (time.perf_counter() - started) * 1e3
            self.modules[meta["kernel"]] = self.call(self.cu.cuModuleGetFunction(module, meta["symbol"].encode()))
        return self.modules[meta["kernel"]]

    def static_shared(self, function) -> int:
        attribute = self.cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
        return int(self.call(self.cu.cuFuncGetAttribute(attribute, function)))

    def launch(self, function, meta: dict, grid: tuple, arguments: list) -> None:
        values = tuple(0 if a is None else a.data_ptr() if isinstance(a, torch.Tensor) else a for a in arguments)
        types = tuple(ctypes.c_int32 if isinstance(a, int) else ctypes.c_void_p for a in arguments)
        stream = self.cu.CUstream(torch.cuda.current_stream().cuda_stream)
        self.call(self.cu.cuLaunchKernel(function, *grid, meta["block"][0], 1, 1, meta["shared_bytes"], stream,
                                         (values, types), 0))


def compare(meta: dict, got: torch.Tensor, expected: torch.Tensor) -> tuple[bool, str]:
    if meta["contract"] in ("IndexerChunks", "IndexerMerge"):  # the same keys per row (the order is free)
        if meta["contract"] == "IndexerChunks":  # positions of each chunk's keys, in the rows a chunk uses
            used = (expected != EMPTY_KEY).any(dim=1)
            got, expected = (torch.where(x[used] != EMPTY_KEY, key_positions(x[used]), -1) for x in (got, expected))
        hits = sum(len(set(g.tolist()) & set(e.tolist()) - {-1}) for g, e in zip(got, expected))
        total = int((expected >= 0).sum())
        recall = hits / max(total, 1)
        # the merge reads the same keys as its reference: exact; the chunks' bf16 scores may round differently
        return recall >= (1.0 if meta["contract"] == "IndexerMerge" else 0.99), f"recall {recall:.4f}"
    error = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item() or 1.0
    tolerance = 1e-3 if got.dtype == torch.float32 and "fp32" in meta["kernel"] else 3e-2
    return error <= tolerance * scale, f"max abs error {error:.3g} (of {scale:.3g})"


def timed(fn, repeat: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def run(args) -> dict:
    config = get_preset(args.preset)
    target = get_target(args.gpu)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        kernel_dir = Path(args.kernels) if args.kernels else Path(tmp)
        if not args.kernels:
            aot.compile_kernels(target.name, kernel_dir, aot.kernel_dims(config), progress=False)
        metas = launch.load_kernels(kernel_dir)
        driver = None if args.dry_run else Driver()
        device = "meta" if args.dry_run else "cuda"
        gen = None if args.dry_run else torch.Generator(device="cuda").manual_seed(0)
        rows, failed = [], 0
        for meta in metas:
            ptx = Path(meta["ptx_path"]).read_text()
            for case in cases(meta, config, device, gen):
                arguments, grid, problems = check_launch(meta, case, ptx)
                row = {"kernel": meta["kernel"], "case": case.name, "grid": list(grid), "block": meta["block"][0],
                       "shared_bytes": meta["shared_bytes"], "arguments": len(arguments), "problems": problems}
                if driver is not None and not problems:
                    function = driver.function(meta, ptx)
                    row["driver_static_shared_bytes"] = driver.static_shared(function)
                    output = arguments[[a["kind"] for a in meta["arguments"]].index("output")]
                    expected = reference(meta, case)
                    got = _launched(driver, function, meta, grid, arguments, output)
                    row["passed"], row["compare"] = compare(meta, got, expected)
                    seconds = timed(lambda: driver.launch(function, meta, grid, arguments))
                    contract = BY_ONNX_NAME[meta["contract"]]
                    cost = contract.cost({n: tuple(t.shape) for n, t in case.tensors.items()}, case.attributes,
                                         {n: t.element_size() for n, t in case.tensors.items()}, past=case.past,
                                         sequences=case.sequences)
                    row |= {"ms": seconds * 1e3, "tflops": cost.flops / seconds / 1e12,
                            "tbps": cost.bytes / seconds / 1e12,
                            "of_peak_flops": cost.flops / seconds / (target.bf16_tflops * 1e12),
                            "of_peak_bandwidth": cost.bytes / seconds / (target.hbm_tbps * 1e12)}
                    if not row["passed"]:
                        problems.append(row["compare"])
                failed += bool(problems)
                rows.append(row)
                print(f"{row['kernel']:28s} {row['case']:34s} grid {tuple(grid)} "
                      + ("ok" if not problems else "; ".join(problems))
                      + (f", {row['ms']:.3f} ms, {row['compare']}" if "ms" in row else ""), flush=True)
    per_token = {}
    if not args.dry_run:  # every layer's indexer + sparse MLA for one decode token, the kernels' own dtype: bf16
        for keys in CONTEXTS:
            ms = [r["ms"] for r in rows if r["case"] == f"decode, {keys} keys" and r["kernel"] in (
                "indexer_chunks_bf16", "indexer_merge", "sparse_mla_bf16")]
            per_token[keys] = sum(ms) * config.num_hidden_layers if len(ms) == 3 else None
    return {"gpu": args.gpu, "device": None if args.dry_run else torch.cuda.get_device_name(),
            "ptx_load_ms": {} if driver is None else driver.load_ms,
            "driver": launch.cuda_driver_version(), "dry_run": args.dry_run, "preset": args.preset,
            "torch": torch.__version__, "kernels": len(metas), "launches": rows, "failed": failed,
            "decode_attention_ms_per_token": per_token}


def _launched(driver: Driver, function, meta: dict, grid: tuple, arguments: list, output: torch.Tensor):
    driver.launch(function, meta, grid, arguments)
    torch.cuda.synchronize()
    return output.clone()


def markdown(report: dict) -> list[str]:
    what = "dry run: every launch built and checked, nothing launched" if report["dry_run"] else report["device"]
    lines = [f"# Device check ({what})", "", f"`python scripts/gpu_check.py --gpu {report['gpu']}{' --dry-run' if report['dry_run'] else ''}`; "
             f"{report['preset']} dims, {report['kernels']} kernels, torch {report['torch']}, CUDA driver "
             f"{report['driver']}.", "",
             "| kernel | case | grid | block | dynamic smem | driver static smem | ms | TFLOP/s | TB/s | of peak | result |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["launches"]:
        peak = max(r.get("of_peak_flops", 0), r.get("of_peak_bandwidth", 0))
        lines.append(f"| {r['kernel']} | {r['case']} | {tuple(r['grid'])} | {r['block']} | {r['shared_bytes']} | "
                     f"{r.get('driver_static_shared_bytes', '')} | {r.get('ms', float('nan')):.3f} | "
                     f"{r.get('tflops', float('nan')):.1f} | {r.get('tbps', float('nan')):.2f} | {peak:.0%} | "
                     f"{'; '.join(r['problems']) or r.get('compare', 'ok')} |")
    if report["decode_attention_ms_per_token"]:
        lines += ["", "Decode attention per token (indexer + sparse MLA, bf16, every layer): " + ", ".join(
            f"{k // 1024}K keys {v:.2f} ms" for k, v in report["decode_attention_ms_per_token"].items() if v)]
    if report["ptx_load_ms"]:  # an engine embeds the PTX once per plugin layer: the JIT at load if nothing caches it
        lines += ["", "PTX load (driver JIT) per kernel: " + ", ".join(
            f"{k} {v:.0f} ms" for k, v in report["ptx_load_ms"].items())]
    verdict = "PASSED" if not report["failed"] else f"{report['failed']} FAILED"
    lines += ["", f"**{verdict}**"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="h200", choices=sorted(TARGETS))
    parser.add_argument("--preset", default="v3.2-exp")
    parser.add_argument("--kernels", help="AOT kernels to check (default: compiled here for --gpu)")
    parser.add_argument("--dry-run", action="store_true", help="build and check every launch, launch nothing")
    parser.add_argument("--out", default=str(OUT_DIR))
    args = parser.parse_args(argv)
    started = time.monotonic()
    report = run(args)
    report["seconds"] = time.monotonic() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_dry_run" if args.dry_run else "gpu_check"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text("\n".join(markdown(report)) + "\n")
    print(f"{len(report['launches'])} launches, {report['failed']} failed, {report['seconds']:.0f} s: {out / stem}.json")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
