"""scripts/gpu_check.py, the device check, in its dry run: every launch of the v3.2 kernels built from their JSON
alone, as the TensorRT plugins build it, and checked (argument order and types against the PTX, grid, block, shared
memory, ISA); nothing launched. And a planted mistake is caught."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


def test_the_dry_run_builds_and_checks_every_launch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles the kernels
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--gpu", "h200",
                             "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert report["dry_run"] and report["failed"] == 0 and report["kernels"] == 12
    launches = {(r["kernel"], r["case"]): r for r in report["launches"]}
    assert len(launches) == 34
    # decode at batch 1: the indexer's chunk kernel runs its 512 programs over 128 chunks, not one program
    assert launches["indexer_chunks_bf16", "decode, 131072 keys"]["grid"] == [512, 1, 1]
    assert launches["indexer_merge", "decode, 131072 keys"]["grid"] == [1, 1, 1]
    for r in report["launches"]:  # inputs, scalars, outputs and Triton's two hidden pointers: the PTX's count
        assert r["problems"] == [] and r["block"] in (32, 128, 256)
    assert "**PASSED**" in (tmp_path / "gpu_check_dry_run.md").read_text()


def test_a_wrong_argument_type_or_grid_is_caught():
    meta = {"kernel": "sparse_mla_bf16", "contract": "SparseMLA", "arch": "sm_90a", "ptx_version": "8.0",
            "symbol": "sparse_mla_kernel", "block": [128, 1, 1], "num_warps": 4, "shared_bytes": 1024,
            "static_shared_bytes": 0, "ptx_params": 8, "grid": [[["q", 0]], [16], [1]],
            "arguments": [{"name": "q_ptr", "type": "*bf16", "kind": "input", "tensor": "q"},
                          {"name": "kv_ptr", "type": "*fp32", "kind": "input", "tensor": "kv"},  # planted: bf16
                          {"name": "idx_ptr", "type": "*i32", "kind": "input", "tensor": "indices"},
                          {"name": "ROWS", "type": "i32", "kind": "scalar", "tensor": "kv", "dim": 0},
                          {"name": "K", "type": "i32", "kind": "scalar", "tensor": "indices", "dim": 1},
                          {"name": "out_ptr", "type": "*bf16", "kind": "output", "tensor": "out"},
                          {"name": "global_scratch", "type": "*i8", "kind": "hidden"},
                          {"name": "profile_scratch", "type": "*i8", "kind": "hidden"}]}
    ptx = ".version 8.0\n.target sm_90a\n.entry sparse_mla_kernel("
    case = gpu_check.Case("sparse_mla_bf16", "planted", {
        "q": torch.empty(4, 128, 576, dtype=torch.bfloat16, device="meta"),
        "kv": torch.empty(4096, 576, dtype=torch.bfloat16, device="meta"),
        "indices": torch.empty(4, 2048, dtype=torch.int32, device="meta")}, {"scale": 0.1, "dv": 512})
    arguments, grid, problems = gpu_check.check_launch(meta, case, ptx)
    assert grid == (4, 16, 1) and len(arguments) == 8
    assert problems == ["argument kv_ptr is *fp32, its tensor kv is torch.bfloat16"]
    meta["grid"] = [[["q", 0]], [70000], [1]]
    assert "grid y = 70000 outside 1..65535" in gpu_check.check_launch(meta, case, ptx)[2]
