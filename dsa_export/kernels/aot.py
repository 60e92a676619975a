"""Ahead-of-time compilation of the DSA Triton kernels for one GPU target, on a machine without a GPU.

`compile_kernels("h100", out_dir, kernel_dims(config))` writes, for every kernel specialisation the engine needs
(op × input dtype, model shapes compiled in; `kernel_specs`), `<name>.ptx`, `<name>.cubin` and `<name>.json` (launch
metadata) into out_dir, and checks shared memory and registers against the architecture's limits, and dynamic + static
shared memory against the 48 KiB a TensorRT plugin launch gets (DSAExportError if exceeded). The PTX is written in the
oldest ISA the architecture accepts (targets.py), so that the oldest possible driver loads it; each JSON records
the CUDA driver version it needs (`min_cuda_driver`), which the engine build checks. `compile_targets({"a100": dir1,
"h100": dir2}, dims)` does several targets in one go.

How: `triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32), options)` cross-compiles
with the ptxas bundled in the triton wheel (toolchain.md §3.2); `cuobjdump --dump-resource-usage` from the same wheel
reads the registers out of the cubin.

What we found about TRITON_INTERPRET (triton 3.7.1, checked on this CPU machine):
- The mode is fixed when modules are imported, not at launch: `@triton.jit` returns an `InterpretedFunction` instead of
  a `JITFunction` if TRITON_INTERPRET=1 is set *at decoration time* (runtime/jit.py `jit`). That includes triton's own
  `tl.sum`, `tl.max`, `tl.sort`, ... (triton/language/standard.py), which are decorated when triton is imported.
- So one process can do only one of the two. With triton imported under TRITON_INTERPRET=1, `triton.compile` of our
  kernels fails ("'ir.value' object has no attribute 'data'": the code generator walks into interpreted `tl.sum`);
  with triton imported without it, the interpreter fails ("Cannot call @triton.jit'd outside of the scope of a
  kernel"), even when our own kernel is re-wrapped as an `InterpretedFunction`.
- Unsetting TRITON_INTERPRET later changes nothing for functions already decorated. Therefore, when this process's
  triton or our kernels were imported in interpreter mode (e.g. a pytest session that runs the interpreter tests),
  `compile_kernels` compiles in a child process (`python -m dsa_export.kernels.aot`) without TRITON_INTERPRET:
  same files, same checks, same errors. Otherwise it compiles in-process.

Hidden parameters: triton 3.7 appends two pointer parameters, `global_scratch` and `profile_scratch`, after the
kernel's own arguments. Each JSON records `ptx_params` (counted from the PTX `.entry`) and `hidden_params`; both scratch
sizes are 0 for these kernels, so a launcher may pass null pointers there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch

from dsa_export.errors import DSAExportError
from dsa_export.files import ensure_output_dir, write_atomic
from dsa_export.formats import name_of, of
from dsa_export.models.cache import BLOCK_SIZE
from dsa_export.targets import PTX_DRIVERS, GPUTarget, get_target

# triton and the kernel modules are imported inside the functions: importing this module must not fix triton's
# interpreter-or-compiler mode for the process (module docstring).


@dataclass(frozen=True)
class ArchLimits:
    max_shared_bytes: int  # max shared memory per block (dynamic, opted in, + static)
    max_registers_per_thread: int = 255
    max_registers_per_block: int = 65536


# Keyed by compute capability. Source: CUDA C Programming Guide, "Compute Capabilities", table "Technical
# Specifications per Compute Capability" (maximum amount of shared memory per thread block; registers per thread
# and per thread block).
ARCH_LIMITS: dict[tuple[int, int], ArchLimits] = {
    (8, 0): ArchLimits(max_shared_bytes=166912),  # 163 KiB
    (8, 9): ArchLimits(max_shared_bytes=101376),  # 99 KiB
    (9, 0): ArchLimits(max_shared_bytes=232448),  # 227 KiB
    (10, 0): ArchLimits(max_shared_bytes=232448),  # 227 KiB
}
# Shared memory a launch gets without opting in: dynamic + the function's static must stay within it (CUDA's rule for
# cudaFuncAttributeMaxDynamicSharedMemorySize). TensorRT's AOT plugins launch with shared_mem = metadata.shared and
# never opt in, so compile_spec refuses kernels above it.
DEFAULT_SHARED_BYTES = 49152
# From sm_90 on, ptxas records the 1 KiB of shared memory the system reserves per block
# (cudaDevAttrReservedSharedMemoryPerBlock) in every cubin, as if it were static: cuobjdump shows SHARED:1024 for a
# kernel with no static shared memory at all. The driver leaves it out of the function's static size
# (CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, what the launch rule adds), or every 48 KiB launch on Hopper would fail;
# scripts/gpu_check.py reads that attribute on a GPU and launches at the limit.
RESERVED_SHARED_BYTES = {(9, 0): 1024, (10, 0): 1024}
POSITIONS_TYPE = "*i64"  # positions arrive as torch's default int64


@dataclass(frozen=True)
class KernelDims:
    """The model dimensions that are compiled into the kernels."""
    HI: int  # indexer heads
    DI: int  # indexer head dim
    topk: int
    H: int  # attention heads
    DK: int  # latent row = kv_lora_rank + qk_rope_head_dim
    dv: int  # value width = kv_lora_rank
    scale: float  # softmax scale (with YaRN mscale)
    hidden: int  # hidden size (the routed experts' H)
    moe_inter: int  # moe_intermediate_size (the routed experts' I)
    block_out: int  # FP8 weight scale blocks: rows
    block_in: int  # and columns
    block_size: int = BLOCK_SIZE  # rows per block of the paged cache pools


def kernel_dims(config) -> KernelDims:
    """KernelDims of a `dsa_export.models.config.DSAConfig`. The number of experts and of slots per token are not
    compiled in: the grid and a runtime scalar carry them."""
    block_out, block_in = config.weight_block
    return KernelDims(HI=config.index_n_heads, DI=config.index_head_dim, topk=config.index_topk,
                      H=config.num_attention_heads, DK=config.kv_lora_rank + config.qk_rope_head_dim,
                      dv=config.kv_lora_rank, scale=config.softmax_scale, hidden=config.hidden_size,
                      moe_inter=config.moe_intermediate_size, block_out=block_out, block_in=block_in)


@dataclass(frozen=True)
class Argument:
    """One runtime argument of a kernel, in TensorRT's AOT plugin order: input pointers, int32 scalars (each a dim of
    an input), output pointers."""
    name: str  # the kernel's parameter
    type: str  # its Triton type, e.g. "*bf16", "i32"
    kind: str  # "input", "scalar" or "output"
    tensor: str  # the contract's tensor it is (a scalar: the tensor whose dim it is)
    dim: int | None = None  # a scalar: which dim


def inp(name: str, type_: str, tensor: str) -> Argument:
    return Argument(name, type_, "input", tensor)


def scalar(name: str, tensor: str, dim: int) -> Argument:
    return Argument(name, "i32", "scalar", tensor, dim)


def out(name: str, type_: str, tensor: str) -> Argument:
    return Argument(name, type_, "output", tensor)


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation to compile, and how a plugin launches it (kernels/launch.py evaluates that)."""
    name: str  # file stem, e.g. "indexer_chunks_bf16"
    contract: str  # the op's TensorRT plugin name, e.g. "IndexerChunks"
    kernel: object  # the @triton.jit function
    arguments: tuple[Argument, ...]  # runtime arguments, in the kernel's order
    selector: tuple[str, str]  # (input tensor, dtype) that picks this specialisation at build time
    constexprs: dict
    # grid (x, y, z): each a product of factors, a factor an int or (input tensor, dim)
    grid: tuple[tuple, tuple, tuple]
    num_warps: int
    num_stages: int

    @property
    def signature(self) -> dict[str, str]:
        return {a.name: a.type for a in self.arguments}


def kernel_specs(target: GPUTarget, dims: KernelDims) -> list[KernelSpec]:
    """Every specialisation the engine needs on `target`: fp32 and bf16 for every op, fp8 indexer inputs and FP8
    expert weights where the target has fp8."""
    from dsa_export.kernels import triton_indexer, triton_sparse_mla, triton_write_cache

    capability = target.compute_capability[0] * 10 + target.compute_capability[1]
    indexer_dtypes = [torch.float32, torch.bfloat16] + ([torch.float8_e4m3fn] if target.fp8 else [])
    specs = []
    paging = (inp("pos_ptr", POSITIONS_TYPE, "positions"), inp("seq_ptr", "*i32", "sequence"),
              inp("bt_ptr", "*i32", "block_tables"))
    for dtype in indexer_dtypes:
        t = of(dtype).triton
        constexprs = triton_indexer.indexer_constexprs(dims.HI, dims.DI, dims.topk, dims.block_size, dtype,
                                                       capability)
        specs.append(KernelSpec(
            name=f"indexer_chunks_{of(dtype).tag}", contract="IndexerChunks",
            kernel=triton_indexer.indexer_chunks_kernel,
            arguments=(inp("q_ptr", f"*{t}", "q"), inp("k_ptr", f"*{t}", "k"), inp("w_ptr", "*fp32", "w"), *paging,
                       scalar("N", "q", 0), scalar("M", "block_tables", 1), out("out_ptr", "*i64", "candidates")),
            selector=("q", name_of(dtype)), constexprs=constexprs,
            grid=((constexprs["SPLIT_ROWS"],), (1,), (1,)),  # a fixed set of programs going over the candidate rows
            num_warps=triton_indexer.NUM_WARPS, num_stages=triton_indexer.NUM_STAGES))
    specs.append(KernelSpec(
        name="indexer_merge", contract="IndexerMerge", kernel=triton_indexer.indexer_merge_kernel,
        arguments=(inp("cand_ptr", "*i64", "candidates"), *paging, scalar("N", "positions", 0),
                   scalar("M", "block_tables", 1), out("out_ptr", "*i32", "indices")),
        selector=("candidates", "int64"), constexprs=triton_indexer.merge_constexprs(dims.topk, dims.block_size),
        grid=((("positions", 0),), (1,), (1,)),  # one program per token
        num_warps=triton_indexer.NUM_WARPS, num_stages=1))
    for dtype in (torch.float32, torch.bfloat16):
        t = of(dtype).triton
        constexprs = triton_sparse_mla.sparse_mla_constexprs(dims.H, dims.DK, dims.dv, dims.scale, dtype)
        head_blocks = triton_sparse_mla.sparse_mla_grid(1, constexprs)[1]
        specs.append(KernelSpec(
            name=f"sparse_mla_{of(dtype).tag}", contract="SparseMLA", kernel=triton_sparse_mla.sparse_mla_kernel,
            arguments=(inp("q_ptr", f"*{t}", "q"), inp("kv_ptr", f"*{t}", "kv"), inp("idx_ptr", "*i32", "indices"),
                       scalar("ROWS", "kv", 0), scalar("K", "indices", 1), out("out_ptr", f"*{t}", "out")),
            selector=("q", name_of(dtype)), constexprs=constexprs,
            grid=((("q", 0),), (head_blocks,), (1,)),  # tokens × blocks of heads
            num_warps=triton_sparse_mla.NUM_WARPS, num_stages=triton_sparse_mla.NUM_STAGES))
        specs.append(KernelSpec(
            name=f"write_cache_{of(dtype).tag}", contract="WriteCache", kernel=triton_write_cache.write_cache_kernel,
            arguments=(inp("cache_ptr", f"*{t}", "cache"), inp("rows_ptr", f"*{t}", "rows"),
                       inp("slots_ptr", "*i64", "slots"), scalar("ROWS", "cache", 0), scalar("D", "cache", 1),
                       out("out_ptr", f"*{t}", "out")),
            selector=("cache", name_of(dtype)), constexprs=triton_write_cache.write_cache_constexprs(dims.DK, dims.DI),
            grid=((("rows", 0),), (1,), (1,)),  # one program per token
            num_warps=triton_write_cache.NUM_WARPS, num_stages=triton_write_cache.NUM_STAGES))
    for fp8 in (False, True) if target.fp8 else (False,):
        for dtype in (torch.float32, torch.bfloat16):
            specs.append(_routed_experts_spec(dims, dtype, fp8, capability))
    return specs


def _routed_experts_spec(dims: KernelDims, dtype: torch.dtype, fp8: bool, capability: int) -> KernelSpec:
    from dsa_export.kernels import triton_moe

    t = of(dtype).triton
    w = of("float8_e4m3fn").triton if fp8 else t  # FP8 weights: the int8 codes, read as e4m3
    arguments = [inp("x_ptr", f"*{t}", "x"), inp("experts_ptr", "*i32", "experts"),
                 inp("weights_ptr", "*fp32", "weights"), inp("gate_up_ptr", f"*{w}", "gate_up")]
    arguments += [inp("gate_up_scale_ptr", "*fp32", "gate_up_scale")] if fp8 else []
    arguments += [inp("down_ptr", f"*{w}", "down")]
    arguments += [inp("down_scale_ptr", "*fp32", "down_scale")] if fp8 else []
    arguments += [inp("base_ptr", "*fp32", "base"),  # never read: the output aliases it and holds it at launch
                  scalar("N", "x", 0), scalar("K", "experts", 1), out("out_ptr", "*fp32", "out")]
    constexprs = triton_moe.routed_experts_constexprs(dims.hidden, dims.moe_inter, dtype,
                                                      (dims.block_out, dims.block_in) if fp8 else None, capability)
    slices = triton_moe.routed_experts_grid(1, constexprs)[1]
    return KernelSpec(
        name=f"routed_experts{'_fp8' if fp8 else ''}_{of(dtype).tag}",
        contract="RoutedExpertsFP8" if fp8 else "RoutedExperts",
        kernel=triton_moe.routed_experts_fp8_kernel if fp8 else triton_moe.routed_experts_kernel,
        arguments=tuple(arguments), selector=("x", name_of(dtype)), constexprs=constexprs,
        grid=((("gate_up", 0),), (slices,), (1,)),  # experts × I-slices
        num_warps=triton_moe.NUM_WARPS, num_stages=triton_moe.NUM_STAGES)


# ---- checks ----------------------------------------------------------------------------------------------------------
def check_limits(kernel: str, target: GPUTarget, shared_bytes: int, registers: int | None, threads: int) -> None:
    """Raise DSAExportError if the compiled kernel cannot launch on the target's architecture."""
    limits = ARCH_LIMITS[target.compute_capability]
    where = f"kernel {kernel} on {target.name} ({target.kernel_arch})"
    if shared_bytes > limits.max_shared_bytes:
        raise DSAExportError(f"{where} needs {shared_bytes} B of shared memory per block, "
                             f"limit {limits.max_shared_bytes} B")
    if registers is not None:
        if registers > limits.max_registers_per_thread:
            raise DSAExportError(f"{where} needs {registers} registers per thread, "
                                 f"limit {limits.max_registers_per_thread}")
        if registers * threads > limits.max_registers_per_block:
            raise DSAExportError(f"{where} needs {registers * threads} registers per block "
                                 f"({registers} × {threads} threads), limit {limits.max_registers_per_block}")


def check_hidden_params(kernel: str, ptx: str, params: list[str], declared: int, meta) -> None:
    """Triton appends scratch pointers (global, profile) after the kernel's own arguments; TensorRT's AOT launcher
    knows only the declared ones and pads the rest. Safe exactly when Triton needs no scratch (both sizes 0) and the
    PTX never reads those parameters, whatever value they get: checked here, for every target."""
    if meta.global_scratch_size or meta.profile_scratch_size:
        raise DSAExportError(f"kernel {kernel} needs Triton scratch memory ({meta.global_scratch_size} + "
                             f"{meta.profile_scratch_size} B), which a TensorRT AOT plugin launch cannot provide")
    read = [p for p in params[declared:] if re.search(rf"ld\.param\.\w+\s+%\w+,\s*\[{re.escape(p)}\]", ptx)]
    if read:
        raise DSAExportError(f"kernel {kernel}: the PTX reads Triton's hidden parameters {read}")


def ptx_entry_params(ptx: str) -> list[str]:
    """The parameter names of the PTX `.entry`, in order."""
    match = re.search(r"\.entry\s+\S+\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise RuntimeError("no .entry in the PTX")
    return [param.split()[-1] for param in match.group(1).split(",") if param.strip()]


def resource_usage(cubin: bytes) -> dict:
    """REG/STACK/SHARED/LOCAL of the cubin's kernel, from the triton wheel's cuobjdump ({} if it is unavailable)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        return {}
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", result.stdout)}


# ---- compilation -----------------------------------------------------------------------------------------------------
def can_compile_here() -> bool:
    """False if triton or our kernels were imported with TRITON_INTERPRET=1: then only a fresh process can compile
    them (module docstring)."""
    import triton.language as tl
    from triton.runtime import JITFunction

    from dsa_export.kernels import triton_indexer, triton_moe, triton_sparse_mla, triton_write_cache

    functions = (tl.sum, triton_indexer.indexer_chunks_kernel, triton_indexer.indexer_merge_kernel,
                 triton_sparse_mla.sparse_mla_kernel,
                 triton_write_cache.write_cache_kernel, triton_moe.routed_experts_kernel,
                 triton_moe.routed_experts_fp8_kernel)
    return all(isinstance(f, JITFunction) for f in functions)


def compile_spec(spec: KernelSpec, target: GPUTarget, out_dir: Path) -> dict:
    """Compile one specialisation, write .ptx/.cubin/.json, check the limits; return the metadata."""
    import triton
    from triton.backends.compiler import GPUTarget as TritonTarget
    from triton.compiler import ASTSource

    major, minor = target.compute_capability
    signature = {**spec.signature, **{name: "constexpr" for name in spec.constexprs}}
    source = ASTSource(fn=spec.kernel, signature=signature, constexprs=spec.constexprs)
    compiled = triton.compile(source, target=TritonTarget("cuda", major * 10 + minor, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                       "ptx_version": target.ptx_isa})  # the oldest ISA: the most drivers
    meta, ptx = compiled.metadata, compiled.asm["ptx"]

    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    if arch != target.kernel_arch:  # targets.py and triton disagree: the table needs fixing
        raise DSAExportError(f"kernel {spec.name}: triton compiled for {arch}, targets.py says {target.kernel_arch} "
                             f"for {target.name}")
    usage = resource_usage(compiled.asm["cubin"])
    threads = meta.num_warps * 32
    reserved = RESERVED_SHARED_BYTES.get(target.compute_capability, 0)
    static = max(usage.get("shared", 0) - reserved, 0)  # the function's own
    shared = meta.shared + static  # dynamic (launch) + static
    check_limits(spec.name, target, shared, usage.get("reg"), threads)  # before writing anything
    if shared > DEFAULT_SHARED_BYTES:
        raise DSAExportError(f"kernel {spec.name} on {target.name} ({target.kernel_arch}) needs {shared} B of "
                             f"shared memory per block ({meta.shared} dynamic + {static} static), "
                             f"limit {DEFAULT_SHARED_BYTES} B: TensorRT's ahead-of-time plugin launcher does not opt "
                             f"in to more than the default 48 KiB")
    ptx_isa = re.search(r"^\.version\s+(\d+)\.(\d)", ptx, re.M)
    if int(ptx_isa.group(1)) * 10 + int(ptx_isa.group(2)) != target.ptx_isa:
        raise DSAExportError(f"kernel {spec.name}: triton wrote PTX ISA {ptx_isa.group(1)}.{ptx_isa.group(2)}, "
                             f"targets.py asks {target.ptx_isa / 10:.1f} for {target.name}")

    params = ptx_entry_params(ptx)
    hidden = params[len(spec.arguments):]
    check_hidden_params(spec.name, ptx, params, len(spec.arguments), meta)

    arguments = [{k: v for k, v in asdict(a).items() if v is not None} for a in spec.arguments]
    arguments += [{"name": name, "type": "*i8", "kind": "hidden"}
                  for name in (["global_scratch", "profile_scratch"] + [f"hidden_{i}" for i in range(2, 9)])
                  [:len(hidden)]]
    metadata = {
        "kernel": spec.name, "contract": spec.contract, "symbol": meta.name,
        "selector": {"tensor": spec.selector[0], "dtype": spec.selector[1]},
        "target": target.name, "arch": arch, "compute_capability": target.cc,
        "ptx_version": re.search(r"^\.version\s+([\d.]+)", ptx, re.M).group(1), "triton_version": triton.__version__,
        "min_cuda_driver": "{}.{}".format(*target.min_cuda_driver), "min_linux_driver": PTX_DRIVERS[target.ptx_isa][1],
        "num_warps": meta.num_warps, "num_stages": spec.num_stages, "threads_per_block": threads,
        "block": [threads, 1, 1], "grid": [[list(f) if isinstance(f, tuple) else f for f in axis] for axis in spec.grid],
        "shared_bytes": meta.shared, "static_shared_bytes": static if usage else None,
        "reserved_shared_bytes": reserved,
        "registers": usage.get("reg"), "local_bytes": usage.get("local"), "stack_bytes": usage.get("stack"),
        "global_scratch_size": meta.global_scratch_size, "profile_scratch_size": meta.profile_scratch_size,
        "signature": spec.signature, "constexprs": spec.constexprs, "arguments": arguments,
        "ptx_params": len(params), "hidden_params": len(hidden),
        "files": {"ptx": f"{spec.name}.ptx", "cubin": f"{spec.name}.cubin"},
    }
    write_atomic(out_dir / f"{spec.name}.ptx", ptx)
    write_atomic(out_dir / f"{spec.name}.cubin", compiled.asm["cubin"])
    write_atomic(out_dir / f"{spec.name}.json", json.dumps(metadata, indent=2) + "\n")  # last: marks it complete
    return metadata


def compile_kernels(target_name: str, out_dir: str | Path, dims: KernelDims | dict, cache_dir: str | Path | None = None,
                    progress: bool = True, subprocess_: bool | None = None) -> list[dict]:
    """Compile every specialisation for `target_name` into out_dir; return the metadata dicts written as JSON.

    cache_dir: triton's cache during compilation (default: a temporary directory, removed afterwards; ~/.triton is
    never touched). subprocess_: compile in a child process (default: only if this process cannot, see
    can_compile_here).
    """
    return compile_targets({target_name: out_dir}, dims, cache_dir, progress, subprocess_)[target_name]


def compile_targets(out_dirs: dict[str, str | Path], dims: KernelDims | dict, cache_dir: str | Path | None = None,
                    progress: bool = True, subprocess_: bool | None = None) -> dict[str, list[dict]]:
    """compile_kernels for several targets at once ({target name: out_dir}); one child process at most."""
    jobs = {name: (get_target(name), Path(out_dir)) for name, out_dir in out_dirs.items()}
    dims = dims if isinstance(dims, KernelDims) else KernelDims(**dims)
    for _, out_dir in jobs.values():
        ensure_output_dir(out_dir)
    if subprocess_ is None:
        subprocess_ = not can_compile_here()
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dsa-triton-cache-"))
        if subprocess_:
            _compile_in_child(jobs, dims, Path(cache_dir), progress)
            return {name: [json.loads((out_dir / f"{spec.name}.json").read_text())
                           for spec in kernel_specs(target, dims)] for name, (target, out_dir) in jobs.items()}
        from dsa_export.progress import bar as progress_bar

        work = [(name, target, out_dir, spec) for name, (target, out_dir) in jobs.items()
                for spec in kernel_specs(target, dims)]
        written: dict[str, list[dict]] = {name: [] for name in jobs}
        with mock.patch.dict(os.environ, TRITON_CACHE_DIR=str(cache_dir)):  # restored afterwards, whatever happens
            os.environ.pop("TRITON_INTERPRET", None)
            bar = progress_bar(work, enabled=progress, desc=f"kernels {','.join(t.name for t, _ in jobs.values())}",
                               unit="kernel")
            for name, target, out_dir, spec in bar:
                written[name].append(compile_spec(spec, target, out_dir))
        return written


def _compile_in_child(jobs: dict, dims: KernelDims, cache_dir: Path, progress: bool) -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "dsa_export.kernels.aot", json.dumps(asdict(dims)), "--cache-dir", str(cache_dir)]
    for target, out_dir in jobs.values():
        command += ["--job", target.name, str(out_dir)]
    if not progress:
        command.append("--quiet")
    # stderr stays live (progress bar, tracebacks); stdout carries a DSAExportError's one-line message
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if result.returncode == 2:
        raise DSAExportError(result.stdout.strip().splitlines()[-1])
    if result.returncode != 0:
        raise RuntimeError(f"kernel compilation failed in a child process (exit code {result.returncode}); "
                           f"its traceback is above")


def main(argv: list[str] | None = None) -> int:
    """`python -m dsa_export.kernels.aot DIMS_JSON --job TARGET OUT_DIR [--job ...] [--cache-dir D] [--quiet]`
    (the child process of compile_targets)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dims", help="JSON object with the KernelDims fields")
    parser.add_argument("--job", nargs=2, action="append", required=True, metavar=("TARGET", "OUT_DIR"))
    parser.add_argument("--cache-dir")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        compile_targets(dict(args.job), json.loads(args.dims), cache_dir=args.cache_dir, progress=not args.quiet,
                        subprocess_=False)
    except DSAExportError as e:
        print(e)  # to stdout: the parent re-raises it
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
