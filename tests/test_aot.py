"""Ahead-of-time compilation of the DSA kernels for every GPU target, on this CPU-only machine (tiny model dims).

Nothing here imports triton at collection time (dsa_export.kernels.aot imports it lazily): test_triton_kernels.py
needs to be the first to import it, with TRITON_INTERPRET=1. When it did, compile_kernels compiles in a child
process; run alone, this file compiles in-process. Either way the triton cache goes to a tmp dir.
"""

import dataclasses
import json
import re

import pytest

from dsa_export.contracts import BY_ONNX_NAME, INDEXER_SPLIT_ROWS
from dsa_export.errors import DSAExportError
from dsa_export.kernels import aot
from dsa_export.models.cache import BLOCK_SIZE
from dsa_export.models.presets import get_preset
from dsa_export.targets import TARGETS

TINY = aot.kernel_dims(get_preset("tiny"))
CONTRACTS = BY_ONNX_NAME
JSON_FIELDS = {"kernel", "contract", "selector", "symbol", "target", "arch", "compute_capability", "ptx_version", "num_warps",
               "num_stages", "threads_per_block", "grid", "shared_bytes", "registers", "signature", "constexprs",
               "arguments", "ptx_params", "hidden_params", "global_scratch_size", "profile_scratch_size"}


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("triton-cache")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, triton_cache):
    """target name → (out_dir, metadata list), for every target."""
    out_dirs = {name: tmp_path_factory.mktemp(f"kernels-{name}") for name in TARGETS}
    metas = aot.compile_targets(out_dirs, TINY, cache_dir=triton_cache, progress=False)
    return {name: (out_dirs[name], metas[name]) for name in TARGETS}


def test_kernel_dims_from_the_tiny_config():
    config = get_preset("tiny")
    assert TINY == aot.KernelDims(HI=8, DI=16, topk=8, H=4, DK=40, dv=32, scale=config.softmax_scale, hidden=64,
                                  moe_inter=32, block_out=128, block_in=128)  # not quantised: DeepSeek's FP8 blocks
    assert TINY.block_size == BLOCK_SIZE == 64  # the pools' block size is compiled into the indexer
    fp8 = aot.kernel_dims(config.replace(quantization_config={"quant_method": "fp8", "weight_block_size": [64, 32]}))
    assert (fp8.block_out, fp8.block_in) == (64, 32)


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_gets_ptx_cubin_and_launch_metadata(compiled, name):
    target = TARGETS[name]
    out_dir, metas = compiled[name]
    fp8 = ["indexer_chunks_fp8e4m3"] if target.fp8 else []
    fp8_experts = ["routed_experts_fp8_fp32", "routed_experts_fp8_bf16"] if target.fp8 else []
    expected = ["indexer_chunks_fp32", "indexer_chunks_bf16", *fp8, "indexer_merge", "sparse_mla_fp32", "write_cache_fp32",
                "sparse_mla_bf16", "write_cache_bf16", "routed_experts_fp32", "routed_experts_bf16", *fp8_experts]
    assert [m["kernel"] for m in metas] == expected
    limits = aot.ARCH_LIMITS[target.compute_capability]
    for meta in metas:
        ptx = (out_dir / f"{meta['kernel']}.ptx").read_text()
        assert re.search(rf"^\.target {target.kernel_arch}$", ptx, re.M)
        assert (out_dir / f"{meta['kernel']}.cubin").read_bytes()[:4] == b"\x7fELF"
        on_disk = json.loads((out_dir / f"{meta['kernel']}.json").read_text())
        assert on_disk == meta and JSON_FIELDS <= meta.keys()
        assert meta["arch"] == target.kernel_arch and meta["target"] == name
        assert meta["symbol"] in ptx and meta["threads_per_block"] == meta["num_warps"] * 32
        if meta["contract"] == "WriteCache":  # a row copy: no dot, no reduction, nothing staged
            assert meta["shared_bytes"] == 0
        elif meta["contract"] == "IndexerMerge":  # no dot: tiny's 16-key sorts stay within a warp's registers
            assert meta["shared_bytes"] <= aot.DEFAULT_SHARED_BYTES
        else:
            assert 0 < meta["shared_bytes"] <= aot.DEFAULT_SHARED_BYTES <= limits.max_shared_bytes
        assert 0 < meta["registers"] <= limits.max_registers_per_thread
        assert meta["ptx_version"] == re.search(r"^\.version (\S+)$", ptx, re.M).group(1) == f"{target.ptx_isa / 10:.1f}"
        assert meta["min_cuda_driver"] == "{}.{}".format(*target.min_cuda_driver)  # what that ISA needs
        constexprs = meta["constexprs"]
        params = aot.ptx_entry_params(ptx)
        chunk_constexprs = next(m["constexprs"] for m in metas if m["contract"] == "IndexerChunks")
        if meta["contract"] == "IndexerChunks":
            assert meta["grid"] == [[constexprs["SPLIT_ROWS"]], [1], [1]]  # a fixed set of programs over the chunks
            assert constexprs["SPLIT_ROWS"] == INDEXER_SPLIT_ROWS
            assert constexprs["SKIP_TILES"] == (target.compute_capability < (10, 0))
            assert constexprs["BLOCK_SIZE"] == TINY.block_size and constexprs["TOPK"] == TINY.topk
            assert list(meta["signature"].items())[3:9] == [("pos_ptr", "*i64"), ("seq_ptr", "*i32"),
                                                            ("bt_ptr", "*i32"), ("N", "i32"), ("M", "i32"),
                                                            ("out_ptr", "*i64")]
        elif meta["contract"] == "IndexerMerge":  # int64 keys in, int32 pool rows out: one kernel for every dtype
            assert meta["grid"] == [[["positions", 0]], [1], [1]]  # one program per packed token
            assert meta["selector"] == {"tensor": "candidates", "dtype": "int64"}
            assert meta["signature"] == {"cand_ptr": "*i64", "pos_ptr": "*i64", "seq_ptr": "*i32", "bt_ptr": "*i32",
                                         "N": "i32", "M": "i32", "out_ptr": "*i32"}
            assert {k: constexprs[k] for k in ("SPLIT_ROWS", "MAX_SPLITS", "MIN_CHUNK")} == \
                {k: chunk_constexprs[k] for k in ("SPLIT_ROWS", "MAX_SPLITS", "MIN_CHUNK")}  # one split rule
        elif meta["contract"] == "SparseMLA":
            assert meta["grid"][0] == [["q", 0]] and constexprs["SCALE"] == TINY.scale
            assert [a["name"] for a in meta["arguments"] if a["kind"] == "scalar"] == ["ROWS", "K"]
        elif meta["contract"] == "WriteCache":  # one kernel for the latent and the index-key pools
            assert meta["grid"] == [[["rows", 0]], [1], [1]]  # one program per packed token
            assert constexprs == {"BLOCK_D": 64}  # the widest row: the 40-wide latent row (DI is 16)
            dtype = meta["selector"]["dtype"]
            assert meta["selector"]["tensor"] == "cache" and dtype in ("float32", "bfloat16")
            t = "fp32" if dtype == "float32" else "bf16"
            assert meta["signature"] == {"cache_ptr": f"*{t}", "rows_ptr": f"*{t}", "slots_ptr": "*i64", "ROWS": "i32",
                                         "D": "i32", "out_ptr": f"*{t}"}
            # never reads the pool it writes (TensorRT aliases out to cache): the cache pointer is not even loaded
            assert f"[{params[0]}]" not in ptx and all(f"[{p}]" in ptx for p in params[1:6])
        else:  # routed experts: one I-slice of 32 for tiny; the FP8 ones read e4m3 codes and the block sizes
            assert meta["grid"] == [[["gate_up", 0]], [1], [1]]  # E experts × I-slices
            assert (constexprs["H"], constexprs["I"]) == (TINY.hidden, TINY.moe_inter)
            fp8 = meta["contract"] == "RoutedExpertsFP8"
            assert (meta["signature"]["down_ptr"] == "*fp8e4nv") == fp8 == ("down_scale_ptr" in meta["signature"])
            assert list(meta["signature"])[-4:] == ["base_ptr", "N", "K", "out_ptr"]
            assert not fp8 or (constexprs["BLOCK_OUT"], constexprs["BLOCK_IN"]) == (128, 128)
        # TensorRT's AOT argument order: input pointers, then int32 scalars (dims of inputs), then outputs, then
        # Triton's hidden scratch pointers, which the PTX must never read
        kinds = [a["kind"] for a in meta["arguments"]]
        assert kinds == sorted(kinds, key=["input", "scalar", "output", "hidden"].index)
        contract = CONTRACTS[meta["contract"]]
        assert [a["tensor"] for a in meta["arguments"] if a["kind"] == "input"] == [t.name for t in contract.inputs]
        assert [a["tensor"] for a in meta["arguments"] if a["kind"] == "output"] == [t.name for t in contract.outputs]
        # each int32 scalar is the dim of that name of its input tensor in the contract
        inputs = {t.name: t for t in contract.inputs}
        assert all(inputs[a["tensor"]].dims[a["dim"]].lower() == a["name"].lower()
                   for a in meta["arguments"] if a["kind"] == "scalar")
        declared = params[:kinds.index("hidden")]
        hidden = params[kinds.index("hidden"):]
        read = declared[1:2] if meta["contract"] == "WriteCache" else declared[:2]
        assert all(f"[{p}]" in ptx for p in read) and hidden
        assert not any(f"[{p}]" in ptx for p in hidden)
        # hidden trailing params: what the PTX .entry really has, beyond the kernel's own runtime arguments
        entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
        assert entry.group(1) == meta["symbol"]
        params = entry.group(2).count(".param")
        assert meta["ptx_params"] == params == len(meta["arguments"])
        assert meta["hidden_params"] == params - len(meta["signature"]) == 2  # global_scratch, profile_scratch
        assert [a["name"] for a in meta["arguments"][-2:]] == ["global_scratch", "profile_scratch"]
        assert meta["global_scratch_size"] == meta["profile_scratch_size"] == 0  # a launcher may pass null there
    assert not list(out_dir.glob(".*"))  # no temp files left behind


def test_h100_and_h200_share_kernels(compiled):
    for h100, h200 in zip(compiled["h100"][1], compiled["h200"][1]):
        ptx = [(compiled[name][0] / f"{meta['kernel']}.ptx").read_text() for name, meta in (("h100", h100),
                                                                                           ("h200", h200))]
        assert ptx[0] == ptx[1]


def test_real_model_kernels_launch_within_48_kib(tmp_path):
    """DeepSeek-V3.2's dims (671B) on Hopper and Blackwell: compile_kernels refuses anything above 48 KiB of dynamic
    shared memory, so compiling at all is the check (the other targets: measured in the kernel modules' docstrings)."""
    real = aot.kernel_dims(get_preset("v3.2-exp"))
    metas = aot.compile_targets({name: tmp_path / name for name in ("h100", "b200")}, real, progress=False)
    for target_metas in metas.values():
        assert len(target_metas) == 12 and all(m["stack_bytes"] == 0 for m in target_metas)  # no spills
        assert max(m["shared_bytes"] + m["static_shared_bytes"] for m in target_metas) <= aot.DEFAULT_SHARED_BYTES
        assert all(m["reserved_shared_bytes"] == 1024 for m in target_metas)  # sm_90a, sm_100a
        indexer = {m["kernel"]: m for m in target_metas if m["contract"] == "IndexerChunks"}
        assert indexer["indexer_chunks_bf16"]["constexprs"]["BF16_DOT"]  # bf16 operands: a 16 KiB q tile
        assert indexer["indexer_chunks_bf16"]["shared_bytes"] <= 32768 < indexer["indexer_chunks_fp32"][
            "shared_bytes"]
        mla = {m["kernel"]: m for m in target_metas if m["contract"] == "SparseMLA"}
        assert mla["sparse_mla_bf16"]["constexprs"]["BF16_DOT"] and not mla["sparse_mla_fp32"]["constexprs"]["BF16_DOT"]
        moe = {m["kernel"]: m["constexprs"]["BF16_DOT"] for m in target_metas if m["contract"].startswith("Routed")}
        hopper = target_metas[0]["arch"] == "sm_90a"  # bf16 expert dots on Hopper; tf32 on sm_100a (it spilled)
        assert moe == {"routed_experts_fp32": False, "routed_experts_bf16": hopper,
                       "routed_experts_fp8_fp32": False, "routed_experts_fp8_bf16": hopper}


def test_child_process_compilation_gives_the_same_kernels(compiled, triton_cache, tmp_path):
    metas = aot.compile_kernels("a100", tmp_path, TINY, cache_dir=triton_cache, progress=False, subprocess_=True)
    assert metas == compiled["a100"][1]
    for name in ("sparse_mla_bf16", "write_cache_bf16", "indexer_chunks_fp32", "indexer_merge"):
        assert (tmp_path / f"{name}.ptx").read_text() == (compiled["a100"][0] / f"{name}.ptx").read_text()


def test_the_pool_block_size_is_compiled_into_the_indexer():
    specs = {s.name: s for s in aot.kernel_specs(TARGETS["h100"], dataclasses.replace(TINY, block_size=128))}
    assert specs["indexer_chunks_bf16"].constexprs["BLOCK_SIZE"] == specs["indexer_merge"].constexprs["BLOCK_SIZE"] \
        == 128
    assert "BLOCK_SIZE" not in specs["sparse_mla_bf16"].constexprs  # it reads pool rows, whatever the blocks
    with pytest.raises(ValueError, match="block size 24 must be a multiple of 16"):
        aot.kernel_specs(TARGETS["h100"], dataclasses.replace(TINY, block_size=24))


def test_unknown_target_is_a_user_error(tmp_path):
    with pytest.raises(DSAExportError, match="unknown GPU 'v100'"):
        aot.compile_kernels("v100", tmp_path, TINY)


def test_too_much_shared_memory_is_refused_with_a_clear_message(triton_cache, tmp_path):
    # a 2048-wide latent value: the fp32 sparse-MLA tiles need ~162 KiB of shared memory, L40S has 99 KiB per block
    wide = dataclasses.replace(TINY, dv=2048, DK=2048 + 8)
    with pytest.raises(DSAExportError, match=r"^kernel sparse_mla_fp32 on l40s \(sm_89\) needs \d+ B of shared "
                                             r"memory per block, limit 101376 B$"):
        aot.compile_kernels("l40s", tmp_path, wide, cache_dir=triton_cache, progress=False)
    assert not list(tmp_path.glob("sparse_mla_fp32.*"))  # nothing written for the refused kernel


def test_more_than_48_kib_of_shared_memory_is_refused(triton_cache, tmp_path):
    # a 1024-wide latent value: ~82 KiB for the fp32 sparse-MLA tiles; H100 could opt in to that, TensorRT does not
    wide = dataclasses.replace(TINY, dv=1024, DK=1024 + 8)
    with pytest.raises(DSAExportError, match=r"^kernel sparse_mla_fp32 on h100 \(sm_90a\) needs \d+ B of shared "
                                             r"memory per block \(\d+ dynamic \+ 0 static\), limit 49152 B: "
                                             r"TensorRT's ahead-of-time "
                                             r"plugin launcher does not opt in to more than the default 48 KiB$"):
        aot.compile_kernels("h100", tmp_path, wide, cache_dir=triton_cache, progress=False)
    assert not list(tmp_path.glob("sparse_mla_fp32.*"))


def test_limit_check_messages():
    a100 = TARGETS["a100"]
    aot.check_limits("k", a100, shared_bytes=166912, registers=255, threads=256)  # exactly at the limits: fine
    with pytest.raises(DSAExportError, match="kernel k on a100 .sm_80. needs 166913 B of shared memory"):
        aot.check_limits("k", a100, shared_bytes=166913, registers=32, threads=128)
    with pytest.raises(DSAExportError, match="needs 256 registers per thread, limit 255"):
        aot.check_limits("k", a100, shared_bytes=0, registers=256, threads=128)
    with pytest.raises(DSAExportError, match=r"needs 131072 registers per block \(128 × 1024 threads\), limit 65536"):
        aot.check_limits("k", a100, shared_bytes=0, registers=128, threads=1024)


def test_the_oldest_ptx_each_target_allows_and_the_driver_it_needs():
    """PTX ISA 7.0 for sm_80 (a R450 driver loads it), 8.1 for sm_89's fp8 conversions, 8.0 for sm_90a's wgmma, 8.6
    for sm_100a: not Triton's default 8.7 / 9.1, which an R535 or R550 fleet cannot load. The engine build checks
    the driver against what the kernels' JSON records, with one line naming both."""
    from dsa_export.kernels.launch import check_driver

    assert {t.kernel_arch: t.ptx_isa for t in TARGETS.values()} == {"sm_80": 70, "sm_89": 81, "sm_90a": 80,
                                                                   "sm_100a": 86}
    assert TARGETS["h100"].min_cuda_driver == (12, 0) and TARGETS["b200"].min_cuda_driver == (12, 7)
    metas = [{"kernel": "k", "target": "h100", "ptx_version": "8.0", "min_cuda_driver": "12.0",
              "min_linux_driver": "R525"}]
    check_driver(metas, (12, 2))  # R535: fine
    check_driver(metas, None)  # no driver here: nothing to check
    with pytest.raises(DSAExportError, match=r"^this machine's CUDA driver supports CUDA 11.8; the h100 kernels "
                                             r"\(PTX ISA 8.0\) need 12.0 \(R525 or newer\): update the NVIDIA driver$"):
        check_driver(metas, (11, 8))
    with pytest.raises(DSAExportError, match="predate the driver check"):
        check_driver([{"kernel": "old"}], (12, 8))

