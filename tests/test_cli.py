"""The command line: what it prints, and one line + exit code 2 for every kind of bad input."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from dsa_export.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and "dsa-export, version" in out
    code, out, _ = run_cli(capsys, "build", "--help")
    assert code == 0 and "dsa-export build --gpu h100" in out


def test_inspect_preset_counts_671b(capsys):
    code, out, _ = run_cli(capsys, "inspect", "v3.2-exp")
    assert code == 0
    assert "parameters: 671,877,944,064 total" in out  # 671B main model, MTP layer excluded
    assert "61 (3 dense MLP, 58 MoE)" in out
    assert "85,888 B bf16" in out  # (576 + 128) × 2 B × 61 layers


def test_inspect_checkpoint_checks_tensors(capsys, tiny_checkpoint):
    code, out, _ = run_cli(capsys, "inspect", str(tiny_checkpoint))
    assert code == 0
    assert "all present with the expected shapes" in out and "(0 FP8 weights)" in out


def test_init_fp8_then_inspect(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "init", "--preset", "tiny", "--fp8", "--seed", "4", str(tmp_path / "f"))
    assert code == 0 and "FP8" in out
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "f"))
    assert code == 0 and "FP8 weights)" in out and "(0 FP8" not in out


def _break(kind, src, dst):
    shutil.copytree(src, dst)
    config = dst / "config.json"
    weights = dst / "model.safetensors"
    if kind == "malformed config":
        config.write_text('{"model_type": "deepseek_v32", ')
    elif kind == "missing field":
        raw = json.loads(config.read_text())
        del raw["index_topk"]
        config.write_text(json.dumps(raw))
    elif kind == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif kind in ("missing tensor", "wrong shape"):
        state = load_file(weights)
        if kind == "missing tensor":
            del state["model.layers.1.self_attn.indexer.wk.weight"]
        else:
            state["model.layers.1.self_attn.indexer.wk.weight"] = state["model.layers.1.self_attn.indexer.wk.weight"][:8]
        save_file(state, weights)
    return dst


BAD_INPUTS = {
    "malformed config": "not valid JSON",
    "missing field": "'index_topk' is missing",
    "truncated safetensors": "unreadable safetensors file",
    "missing tensor": "'model.layers.1.self_attn.indexer.wk.weight' is missing",
    "wrong shape": "'model.layers.1.self_attn.indexer.wk.weight' has shape [8, 64]",
}


@pytest.mark.parametrize("command", ["inspect", "build"])
@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_checkpoint_gives_one_line_and_exit_2(capsys, tmp_path, tiny_checkpoint, command, kind):
    bad = _break(kind, tiny_checkpoint, tmp_path / "bad")
    argv = ["inspect", str(bad)] if command == "inspect" else [
        "build", "--gpu", "h100", "--checkpoint", str(bad), "--out", str(tmp_path / "out")]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dsa-export: error:"), err
    assert BAD_INPUTS[kind] in err


@pytest.mark.parametrize("argv, message", [
    (["inspect", "huge"], "unknown preset 'huge'"),
    (["build", "--gpu", "h100", "--preset", "huge"], "unknown preset 'huge'"),
    (["build", "--gpu", "v100"], "unknown GPU 'v100'"),
    (["kernels", "--gpu", "v100", "--out", "k"], "unknown GPU 'v100'"),
    (["export", "--checkpoint", "/no/such/dir", "--out", "o"], "checkpoint directory not found"),
    (["export", "--out", "/proc/dsa-export-test"], "cannot create output directory"),
    (["parity", "--onnx", "/no/such/dir"], "no exported model"),
    (["kernels", "--gpu", "h100", "--out", "k", "--checkpoint", "/no/such/dir"], "checkpoint directory not found"),
    (["inspect", "./no/such/dir"], "checkpoint directory not found"),
    (["build", "--gpu", "h100", "--checkpoint", "/no/such/dir"], "checkpoint directory not found"),
])
def test_bad_names_give_one_line_and_exit_2(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, *argv, *(["--out", str(tmp_path / "o")] if argv[0] == "build" else []))
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("command", [["build", "--gpu", "h100"], ["export"], ["kernels", "--gpu", "h100"]])
def test_output_path_that_is_a_file(capsys, tmp_path, command):
    (tmp_path / "f").write_text("precious")
    code, _, err = run_cli(capsys, *command, "--out", str(tmp_path / "f"))
    assert code == 2 and err.count("\n") == 1 and "not a directory" in err
    assert (tmp_path / "f").read_text() == "precious"


def test_build_writes_manifest(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "build", "--gpu", "h200", "--out", str(tmp_path / "b"))
    assert code == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    stages = manifest["stages"]
    assert [stages[s]["status"] for s in ("checkpoint", "load", "smoke")] == ["ok"] * 3
    assert stages["smoke"]["max_abs_diff"] < 1e-4
    assert stages["kernels"]["status"] == "ok"
    kernel_dir = tmp_path / "b" / "kernels" / "sm_90a"
    for name in stages["kernels"]["kernels"]:
        assert (kernel_dir / f"{name}.ptx").read_text().count(".target sm_90a") == 1
        assert (kernel_dir / f"{name}.cubin").read_bytes()[:4] == b"\x7fELF"
    assert stages["export"]["status"] == "ok" and stages["parity"]["status"] == "ok"
    for name in ("model.onnx", "model.onnx.data", "io.json", "parity/parity.json", "parity/parity.md"):
        assert (tmp_path / "b" / name).stat().st_size > 0, name
    assert stages["parity"]["metrics"]["onnxruntime"]["greedy_match"] == 1.0
    assert stages["cost"]["status"] == "ok"
    for name in ("cost.json", "cost.md", "cost_by_position.png", "measured_decode.png"):
        assert (tmp_path / "b" / "cost" / name).stat().st_size > 0, name
    measured = json.loads((tmp_path / "b" / "cost" / "cost.json").read_text())["measured"]["backends"]
    assert set(measured) == {"eager dense", "eager DSA", "onnxruntime DSA"}
    assert stages["engine"]["status"] == "not_available"
    assert manifest["target"]["kernel_arch"] == "sm_90a"
    assert len(stages["load"]["fingerprint"]) == 64
    assert manifest["config"]["model_type"] == "deepseek_v32"


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dsa_export.cli", "build", "--gpu", "rtx9090"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "dsa-export: error: unknown GPU 'rtx9090' (known: a100, l40s, h100, h800, h200, b200)"


def test_export_then_parity_from_the_command_line(capsys, tmp_path, tiny_checkpoint):
    code, out, _ = run_cli(capsys, "export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x"))
    assert code == 0 and (tmp_path / "x" / "model.onnx").exists()
    code, out, _ = run_cli(capsys, "parity", "--checkpoint", str(tiny_checkpoint), "--onnx", str(tmp_path / "x"),
                           "--new-tokens", "4")
    assert code == 0 and "PASSED" in out
    code, _, err = run_cli(capsys, "parity", "--checkpoint", str(tiny_checkpoint), "--onnx", str(tmp_path / "x"),
                           "--new-tokens", "2", "--max-abs-logits", "0")
    assert code == 1 and err.startswith("dsa-export: check failed: onnxruntime: max_abs_logits")


def test_bf16_build_checks_parity_against_fp32_and_measures_bf16(capsys, tmp_path):
    code, _, err = run_cli(capsys, "build", "--gpu", "a100", "--dtype", "bfloat16", "--out", str(tmp_path / "b"))
    assert code == 0, err
    stages = json.loads((tmp_path / "b" / "manifest.json").read_text())["stages"]
    assert stages["parity"]["status"] == "ok" and stages["cost"]["status"] == "ok"
    assert stages["smoke"]["tolerance"] == 0.25  # bf16 prefill+decode vs full forward
    assert "sm_80" in stages["kernels"]["path"] and "lightning_indexer_fp8e4m3" not in stages["kernels"]["kernels"]
