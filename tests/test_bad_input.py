"""Every kind of bad input, on every command and the Python API: exit code 2 and exactly one line on stderr naming the
problem (or the documented ValueError), no traceback, and nothing already on disk changed (hash before and after of
the whole sandbox: the build directories, the checkpoints, their siblings).

The sandbox holds a good tiny checkpoint, broken copies of it, build directories with a good export (one with a
parity report too), broken and tampered copies of them, a plain file and a foreign directory. A rejected run leaves
no trace: a fresh --out it created is removed again (a checkpoint whose weights are NaN is found only while the
export streams them)."""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsa_export
from dsa_export.cli import main
from dsa_export.exporter.onnx_export import export_onnx
from dsa_export.models import KVCache, get_preset, init_checkpoint, load_checkpoint
from dsa_export.parity.accuracy import Thresholds
from dsa_export.cost.model import Assumptions
from dsa_export.parity.run import run_parity
from dsa_export.build import Options, run_build
from dsa_export.runtime import EagerBackend, GraphBackend, Session

NEW = "new_out"  # a fresh output path inside the sandbox
LAYER = "model.layers.1.self_attn.indexer.wk.weight"


def _edit_weights(path: Path, edit) -> None:
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path: Path, edit) -> None:
    raw = json.loads((path / "config.json").read_text())
    edit(raw)
    (path / "config.json").write_text(json.dumps(raw))


BROKEN_CHECKPOINTS = {
    "bad_json": lambda p: (p / "config.json").write_text('{"model_type": "deepseek_v32", '),
    "no_field": lambda p: _edit_config(p, lambda c: c.pop("index_topk")),
    "wrong_type": lambda p: _edit_config(p, lambda c: c.update(model_type="llama")),
    "neg_layers": lambda p: _edit_config(p, lambda c: c.update(num_hidden_layers=-1)),
    "truncated": lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
    "no_tensor": lambda p: _edit_weights(p, lambda s: s.pop(LAYER)),
    "bad_shape": lambda p: _edit_weights(p, lambda s: s.update({LAYER: s[LAYER][:8]})),
    "extra_tensor": lambda p: _edit_weights(p, lambda s: s.update({"model.layers.0.extra.weight": torch.ones(2)})),
    "int_tensor": lambda p: _edit_weights(p, lambda s: s.update({"model.norm.weight": s["model.norm.weight"].int()})),
    "nan": lambda p: _edit_weights(p, lambda s: s[LAYER].__setitem__((0, 0), float("nan"))),
    "scaling_nan": lambda p: _edit_config(p, lambda c: c.update(routed_scaling_factor=float("nan"))),
    "factor_inf": lambda p: _edit_config(p, lambda c: c["rope_scaling"].update(factor=float("inf"))),
    "mscale_nan": lambda p: _edit_config(p, lambda c: c["rope_scaling"].update(mscale_all_dim=float("nan"))),
    "quant_string": lambda p: _edit_config(p, lambda c: c.update(quantization_config="fp8")),
    "rope_string": lambda p: _edit_config(p, lambda c: c.update(rope_scaling="yarn")),
    "vocab_float": lambda p: _edit_config(p, lambda c: c.update(vocab_size=1e30)),
    "theta_one": lambda p: _edit_config(p, lambda c: c.update(rope_theta=1.0)),
    "many_layers": lambda p: _edit_config(p, lambda c: c.update(num_hidden_layers=20000)),
    "deep_json": lambda p: (p / "config.json").write_text("[" * 100_000 + "]" * 100_000),
    "config_dir": lambda p: ((p / "config.json").unlink(), (p / "config.json").mkdir()),
    "garbage_tokenizer": lambda p: (p / "tokenizer.json").write_text("garbage"),
    "garbage_tokenizer_config": lambda p: (p / "tokenizer_config.json").write_text("[1, 2"),
    "broken_template": lambda p: _edit_tokenizer_config(p, chat_template="{% for x in %}"),
    "linked_tokenizer": lambda p: ((p / "tokenizer.json").unlink(), (p / "tokenizer.json").symlink_to(
        p.parent / "outside.json")),
    "fifo_shard": lambda p: os.mkfifo(p / "z.safetensors"),
    "dir_shard": lambda p: (p / "d.safetensors").mkdir(),
}


def _edit_tokenizer_config(path: Path, **changes) -> None:
    raw = json.loads((path / "tokenizer_config.json").read_text())
    raw.update(changes)
    (path / "tokenizer_config.json").write_text(json.dumps(raw))


def _sharded(path: Path, edit) -> None:
    """Two shards behind an index, the index edited."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    edit(index["weight_map"])
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


BROKEN_INDEXES = {
    "index_int": lambda m: m.update({LAYER: 7}),
    "index_list": lambda m: m.update({LAYER: ["a.safetensors"]}),
    "index_escape": lambda m: m.update({LAYER: "../outside.safetensors"}),
}
BROKEN_MANIFESTS = {  # a build directory with a good export, its manifest tampered with
    "manifest_escape": lambda m: m["steps"]["export"].update(outputs=["../afile"]),
    "manifest_absolute": lambda m: m["steps"]["export"].update(outputs=["/tmp"]),
    "manifest_string": lambda m: m["steps"]["export"].update(outputs="model.onnx"),
    "manifest_dot": lambda m: m["steps"]["export"].update(outputs=["."]),
    "manifest_record": lambda m: m["steps"].update(export="done"),
    "manifest_step": lambda m: m["steps"].update(install={"status": "ok", "outputs": ["/"]}),
}


def _break_export(path: Path, kind: str) -> None:
    if kind == "trunc_data":
        data = path / "model.onnx.data"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif kind == "random_onnx":
        (path / "model.onnx").write_bytes(bytes(range(256)) * 64)
    elif kind == "bad_io":
        (path / "io.json").write_text("{ not json")
    elif kind == "other_model":
        _edit_config(path, lambda c: c.update(vocab_size=321))
    elif kind == "no_config":
        (path / "config.json").unlink()
    elif kind == "flipped_data":  # 64 bytes changed, same size
        data = bytearray((path / "model.onnx.data").read_bytes())
        data[4096:4160] = bytes(b ^ 0xFF for b in data[4096:4160])
        (path / "model.onnx.data").write_bytes(bytes(data))
    elif kind == "bad_capacity":  # io.json tampered with: another capacity than the graph's
        io = json.loads((path / "io.json").read_text())
        io["capacity"] = 128
        for t in io["inputs"]:
            if t["name"] == "block_tables":  # blocks per sequence: capacity / block size
                t["dims"][1] = 2
        (path / "io.json").write_text(json.dumps(io))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("sandbox")
    shutil.copytree(tiny_checkpoint, root / "ckpt")
    for name, breaks in BROKEN_CHECKPOINTS.items():
        shutil.copytree(tiny_checkpoint, root / name)
        breaks(root / name)
    fp8 = init_checkpoint(get_preset("tiny"), root / "no_scale", seed=2, fp8=True)
    _edit_weights(fp8, lambda s: s.pop("model.layers.0.self_attn.q_a_proj.weight_scale_inv"))
    sharded = init_checkpoint(get_preset("tiny"), root / "no_shard", max_shard_bytes=100_000)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    run_build(Options(checkpoint=root / "ckpt", out=root / "export", capacity=64), only=["checkpoint", "export"],
              log=lambda line: None)
    for kind in ("trunc_data", "random_onnx", "bad_io", "other_model", "no_config", "flipped_data", "bad_capacity"):
        shutil.copytree(root / "export", root / kind)
        _break_export(root / kind, kind)
    for name, edit in BROKEN_INDEXES.items():
        _sharded(shutil.copytree(sharded, root / name, symlinks=True), edit)
    (root / "outside.json").write_text((root / "ckpt" / "tokenizer.json").read_text())
    nan_scale = init_checkpoint(get_preset("tiny"), root / "nan_scale", seed=2, fp8=True)
    _edit_weights(nan_scale, lambda s: s["model.layers.0.self_attn.q_a_proj.weight_scale_inv"].fill_(float("nan")))
    for name, edit in BROKEN_MANIFESTS.items():
        shutil.copytree(root / "export", root / name)
        manifest = json.loads((root / name / "manifest.json").read_text())
        edit(manifest)
        (root / name / "manifest.json").write_text(json.dumps(manifest))
    run_build(Options(checkpoint=root / "ckpt", out=root / "reported", capacity=64, new_tokens=2),
              only=["checkpoint", "export", "parity"], log=lambda line: None)
    (root / "afile").write_text("precious")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("keep me")
    return root


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 and mode of every file and directory under root, except the fresh output path."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == NEW:
            continue
        if path.is_symlink():
            digest = f"link to {os.readlink(path)}"
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:  # a directory, or the FIFO (never read: it would block)
            digest = "dir" if path.is_dir() else "other"
        out[str(rel)] = f"{digest} {path.lstat().st_mode:o}"
    return out


# (id, argv with {s} = the sandbox, expected exit code, what the one line must say)
CLI_CASES = [
    ("build-unknown-gpu", ["build", "--gpu", "v100"], r"Invalid value for '--gpu': 'v100' is not one of"),
    ("build-negative-seed", ["build", "--seed", "-1"], r"Invalid value for '--seed': -1 is not in the range 0<=x<="),
    ("build-zero-price", ["build", "--price", "0"], r"'--price': 0.0 is not in the range x>0"),
    ("build-negative-price", ["build", "--price", "-2"], r"'--price': -2.0 is not in the range x>0"),
    ("build-zero-new-tokens", ["build", "--new-tokens", "0"], r"'--new-tokens': 0 is not in the range x>=1"),
    ("build-tiny-capacity", ["build", "--capacity", "2"], r"'--capacity': 2 is not in the range x>=4"),
    ("build-negative-threshold", ["build", "--max-abs-logits", "-1"],
     r"parity threshold max_abs_logits must be a number >= 0, got -1"),
    ("build-cosine-above-one", ["build", "--min-cosine", "1.5"], r"min_cosine is a fraction in \[0, 1\], got 1.5"),
    ("build-zero-efficiency", ["build", "--memory", "0"], r"cost assumption memory is a fraction of peak"),
    ("build-fractional-tokens-per-step", ["build", "--decode-tokens-per-step", "0.5"],
     r"decode_tokens_per_step must be >= 1"),
    ("build-float16", ["build", "--dtype", "float16"], r"Invalid value for '--dtype': 'float16' is not one of"),
    ("build-unknown-preset", ["build", "--preset", "huge"], r"Invalid value for '--preset': 'huge'"),
    ("build-no-such-checkpoint", ["build", "--checkpoint", "/no/such/dir"], r"Directory '/no/such/dir' does not exist"),
    ("build-checkpoint-is-a-file", ["build", "--checkpoint", "{s}/afile"], r"afile' is a file"),
    ("build-out-is-a-file", ["build", "--out", "{s}/afile"], r"afile: output path exists and is not a directory"),
    ("build-out-not-creatable", ["build", "--out", "/proc/dsa-export-test"], r"cannot create output directory"),
    ("build-unknown-option", ["build", "--bogus"], r"No such option '--bogus'"),
    ("build-extra-argument", ["build", "extra"], r"Got unexpected extra argument \(extra\)"),
    ("build-not-a-number", ["build", "--price", "two"], r"'two' is not a valid float"),
    ("build-malformed-config", ["build", "--checkpoint", "{s}/bad_json", "--out", "{s}/" + NEW], r"not valid JSON"),
    ("build-missing-field", ["build", "--checkpoint", "{s}/no_field", "--out", "{s}/" + NEW],
     r"config field 'index_topk' is missing"),
    ("build-wrong-model-type", ["build", "--checkpoint", "{s}/wrong_type", "--out", "{s}/" + NEW],
     r"'model_type' must be 'deepseek_v32', got 'llama'"),
    ("build-negative-layers", ["build", "--checkpoint", "{s}/neg_layers", "--out", "{s}/" + NEW],
     r"config field 'num_hidden_layers' must not be negative"),
    ("build-truncated-safetensors", ["build", "--checkpoint", "{s}/truncated", "--out", "{s}/" + NEW],
     r"model.safetensors: unreadable safetensors file"),
    ("build-missing-tensor", ["build", "--checkpoint", "{s}/no_tensor", "--out", "{s}/" + NEW],
     rf"tensor '{LAYER}' is missing"),
    ("build-wrong-shape", ["build", "--checkpoint", "{s}/bad_shape", "--out", "{s}/" + NEW],
     rf"tensor '{LAYER}' has shape \[8, 64\]"),
    ("build-unexpected-tensor", ["build", "--checkpoint", "{s}/extra_tensor", "--out", "{s}/" + NEW],
     r"tensor 'model.layers.0.extra.weight' is unexpected"),
    ("build-integer-weights", ["build", "--checkpoint", "{s}/int_tensor", "--out", "{s}/" + NEW],
     r"'model.norm.weight' has dtype I32"),
    ("build-missing-fp8-scale", ["build", "--checkpoint", "{s}/no_scale", "--out", "{s}/" + NEW],
     r"'model.layers.0.self_attn.q_a_proj.weight_scale_inv' is missing"),
    ("build-missing-shard", ["build", "--checkpoint", "{s}/no_shard", "--out", "{s}/" + NEW],
     r"listed in model.safetensors.index.json but missing"),
    ("build-nan-weights", ["build", "--checkpoint", "{s}/nan", "--out", "{s}/" + NEW],
     rf"tensor '{LAYER}' holds non-finite values"),
    ("build-require-engine-here", ["build", "--require-engine", "--out", "{s}/" + NEW],
     r"step 'engine' cannot run on this machine: (TensorRT is not installed|no CUDA GPU)"),
    ("engine-fp8-on-a100", ["engine", "--gpu", "a100", "--precision", "fp8", "--out", "{s}/export"],
     r"--precision fp8: a100 \(sm_80\) has no FP8"),
    ("engine-without-kernels", ["engine", "--out", "{s}/export"], r"step 'engine' needs 'kernels', which has not run"),
    ("engine-zero-workspace", ["engine", "--workspace-gb", "0"], r"'--workspace-gb': 0.0 is not in the range x>0"),
    ("inspect-unknown-preset", ["inspect", "huge"], r"'huge' is neither a checkpoint directory nor a preset"),
    ("inspect-a-file", ["inspect", "{s}/afile"], r"afile: not a checkpoint directory"),
    ("inspect-no-argument", ["inspect"], r"Missing argument 'SOURCE'"),
    ("inspect-truncated", ["inspect", "{s}/truncated"], r"unreadable safetensors file"),
    ("inspect-missing-tensor", ["inspect", "{s}/no_tensor"], rf"tensor '{LAYER}' is missing"),
    ("init-unknown-preset", ["init", "--preset", "huge", "{s}/" + NEW], r"preset 'huge'|'huge'"),
    ("init-too-large", ["init", "--preset", "v3.2-exp", "{s}/" + NEW], r"needs [\d,.]+ GB of weights in memory"),
    ("init-negative-seed", ["init", "--seed", "-3", "{s}/" + NEW], r"'--seed': -3 is not in the range"),
    ("init-zero-shard", ["init", "--max-shard-mb", "0", "{s}/" + NEW], r"'--max-shard-mb': 0 is not in the range"),
    ("init-over-a-checkpoint", ["init", "{s}/ckpt"], r"already holds a checkpoint"),
    ("init-into-a-foreign-directory", ["init", "{s}/foreign"], r"not empty and not a checkpoint"),
    ("init-into-a-file", ["init", "{s}/afile"], r"exists and is not a directory"),
    ("kernels-unknown-gpu", ["kernels", "--gpu", "v100"], r"Invalid value for '--gpu'"),
    ("kernels-out-is-a-file", ["kernels", "--out", "{s}/afile"], r"output path exists and is not a directory"),
    ("kernels-bad-checkpoint", ["kernels", "--checkpoint", "{s}/bad_shape", "--out", "{s}/" + NEW], r"has shape"),
    ("export-zero-capacity", ["export", "--capacity", "0", "--out", "{s}/" + NEW], r"'--capacity': 0 is not in"),
    ("export-integer-dtype", ["export", "--dtype", "int8", "--out", "{s}/" + NEW], r"'--dtype': 'int8' is not one"),
    ("export-missing-field", ["export", "--checkpoint", "{s}/no_field", "--out", "{s}/" + NEW], r"is missing"),
    ("export-unknown-option", ["export", "--price", "2"], r"No such option '--price'"),
    ("export-zero-data-file", ["export", "--data-file-gb", "0", "--out", "{s}/" + NEW],
     r"'--data-file-gb': 0.0 is not"),
    ("export-zero-gpus", ["export", "--gpus", "0", "--out", "{s}/" + NEW], r"'--gpus': 0 is not in the range x>=1"),
    ("export-more-gpus-than-layers", ["export", "--gpus", "4", "--out", "{s}/" + NEW],
     r"--gpus 4: the model has 3 layers, so 1 to 3 stages"),
    ("plan-does-not-fit", ["plan", "--preset", "v3.2-exp", "--gpu", "h100", "--gpus", "8", "--dtype", "bf16",
                           "--dequantize-experts"],
     r"8 x h100: stage \d+ \(layers [\d-]+\) needs [\d.]+ GB .* [\d.]+ GB short"),
    ("plan-unknown-gpu", ["plan", "--gpu", "v100"], r"Invalid value for '--gpu'"),
    ("parity-without-an-export", ["parity", "--checkpoint", "{s}/ckpt", "--out", "{s}/" + NEW],
     r"step 'parity' needs 'export', which has not run"),
    ("parity-truncated-data", ["parity", "--checkpoint", "{s}/ckpt", "--out", "{s}/trunc_data"],
     r"model.onnx.data changed since it was written \(its sha256 differs\): run `dsa-export export"),
    ("parity-random-onnx", ["parity", "--checkpoint", "{s}/ckpt", "--out", "{s}/random_onnx"],
     r"random_onnx/model.onnx changed since it was written"),
    ("parity-corrupt-io-json", ["parity", "--checkpoint", "{s}/ckpt", "--out", "{s}/bad_io"],
     r"bad_io/io.json changed since it was written"),
    ("parity-other-model", ["parity", "--checkpoint", "{s}/ckpt", "--out", "{s}/other_model"],
     r"other_model/config.json changed since it was written"),
    ("parity-no-config", ["parity", "--checkpoint", "{s}/ckpt", "--out", "{s}/no_config"],
     r"no_config/config.json is missing: run `dsa-export export"),
    ("parity-zero-new-tokens", ["parity", "--new-tokens", "0", "--out", "{s}/export"], r"'--new-tokens': 0"),
    ("cost-zero-price", ["cost", "--price", "0"], r"'--price': 0.0 is not in the range x>0"),
    ("cost-unknown-gpu", ["cost", "--gpu", "v100"], r"Invalid value for '--gpu'"),
    ("cost-efficiency-above-one", ["cost", "--memory", "2"], r"cost assumption memory is a fraction of peak"),
    ("cost-corrupt-io-json", ["cost", "--out", "{s}/bad_io"], r"bad_io/io.json changed since it was written"),
    ("cost-random-onnx", ["cost", "--out", "{s}/random_onnx"], r"random_onnx/model.onnx changed since it was written"),
    ("cost-truncated-data", ["cost", "--out", "{s}/trunc_data"], r"model.onnx.data changed since it was written"),
    ("deploy-without-an-export", ["deploy", "--out", "{s}/" + NEW], r"step 'deploy' needs 'export', which has not run"),
    ("deploy-corrupt-io-json", ["deploy", "--out", "{s}/bad_io"], r"bad_io/io.json changed since it was written"),
    ("serve-no-such-dir", ["serve", "/no/such/dir"], r"Directory '/no/such/dir' does not exist"),
    ("serve-not-a-repository", ["serve", "{s}/export"], r"no dsa_generate/config.pbtxt\); run `dsa-export deploy"),
    ("serve-port-zero", ["serve", "{s}/export", "--grpc-port", "0"], r"'--grpc-port': 0 is not in the range"),
    ("generate-no-prompt", ["generate"], r"give either --prompt-ids or --prompt"),
    ("generate-two-prompts", ["generate", "--prompt-ids", "1", "--prompt", "hi"], r"either --prompt-ids or --prompt"),
    ("generate-bad-ids", ["generate", "--prompt-ids", "1,x"], r"expected token ids separated by commas or spaces"),
    ("generate-chat-on-ids", ["generate", "--prompt-ids", "1", "--chat"], r"--chat applies to --prompt"),
    ("generate-zero-tokens", ["generate", "--prompt-ids", "1", "--max-new-tokens", "0"],
     r"'--max-new-tokens': 0 is not in the range x>=1"),
    ("generate-stop-and-ignore-eos", ["generate", "--prompt-ids", "1", "--stop-ids", "1", "--ignore-eos"],
     r"--ignore-eos and --stop-ids exclude each other"),
    ("generate-no-server", ["generate", "--url", "127.0.0.1:1", "--prompt-ids", "1"],
     r"cannot reach Triton Inference Server at 127.0.0.1:1"),
    ("unknown-command", ["frobnicate"], r"No such command 'frobnicate'"),
    # data lost before: a rejected input over a good build, a build directory that is (in) the checkpoint it reads
    ("export-nan-over-a-good-export", ["export", "--checkpoint", "{s}/nan", "--out", "{s}/export", "--capacity", "64"],
     rf"tensor '{LAYER}' holds non-finite values"),
    ("export-nan-scale-over-a-good-export", ["export", "--checkpoint", "{s}/nan_scale", "--out", "{s}/export",
                                             "--capacity", "64"],
     r"tensor 'model.layers.0.self_attn.q_a_proj.weight_scale_inv' holds non-finite values"),
    ("export-tiny-data-files", ["export", "--out", "{s}/export", "--data-file-gb", "1e-12"],
     r"'--data-file-gb': 1e-12 is not in the range x>=0.001"),
    ("parity-too-many-tokens", ["parity", "--checkpoint", "{s}/ckpt", "--out", "{s}/reported",
                                "--new-tokens", "100000"], r"--new-tokens 100000: the parity prompts .* do not fit"),
    ("export-into-its-checkpoint", ["export", "--checkpoint", "{s}/ckpt", "--out", "{s}/ckpt"],
     r"the build directory .*ckpt is \(inside\) .*ckpt, which the build reads"),
    ("export-inside-its-checkpoint", ["export", "--checkpoint", "{s}/ckpt", "--out", "{s}/ckpt/sub"],
     r"is \(inside\) .*ckpt, which the build reads"),
    # the manifest is data, not instructions
    *[(f"parity-{name.replace('_', '-')}", ["parity", "--checkpoint", "{s}/ckpt", "--out", "{s}/" + name],
       r"manifest.json: .*; remove the manifest") for name in BROKEN_MANIFESTS],
    # trusted blindly before
    ("parity-flipped-data", ["parity", "--checkpoint", "{s}/ckpt", "--out", "{s}/flipped_data"],
     r"flipped_data/model.onnx.data changed since it was written"),
    ("deploy-flipped-data", ["deploy", "--out", "{s}/flipped_data"],
     r"flipped_data/model.onnx.data changed since it was written"),
    *[(f"build-{name.replace('_', '-')}", ["build", "--checkpoint", "{s}/" + name, "--out", "{s}/" + NEW], message)
      for name, message in (
          ("scaling_nan", r"'routed_scaling_factor' must be a finite number, got nan"),
          ("factor_inf", r"'rope_scaling.factor' must be a finite number, got inf"),
          ("mscale_nan", r"'rope_scaling.mscale_all_dim' must be a finite number, got nan"),
          ("quant_string", r"'quantization_config' must be an object or null, got 'fp8'"),
          ("rope_string", r"'rope_scaling' must be an object or null, got 'yarn'"),
          ("vocab_float", r"'vocab_size' must be an integer, got 1e\+30"),
          ("theta_one", r"'rope_theta' must be > 1 with YaRN scaling"),
          ("many_layers", r"'num_hidden_layers' is 20,000, beyond what any model"),
          ("deep_json", r"config.json: nested too deeply"),
          ("config_dir", r"config.json: not a regular file"),
          ("garbage_tokenizer", r"tokenizer.json: not a tokenizer"),
          ("garbage_tokenizer_config", r"tokenizer_config.json: not valid JSON"),
          ("broken_template", r"its chat_template does not compile"),
          ("linked_tokenizer", r"tokenizer.json: tokenizer file of the checkpoint but outside"),
          ("fifo_shard", r"z.safetensors: shard of the checkpoint but not a regular file"),
          ("dir_shard", r"d.safetensors: shard of the checkpoint but not a regular file"),
          ("index_int", r"malformed index \(its weight_map must map tensor names to file names\)"),
          ("index_list", r"malformed index"),
          ("index_escape", r"outside.safetensors: shard listed in .* but outside"))],
    ("inspect-fifo-shard", ["inspect", "{s}/fifo_shard"], r"shard of the checkpoint but not a regular file"),
    ("build-random-671b", ["build", "--preset", "v3.2-exp", "--out", "{s}/" + NEW],
     r"a random checkpoint of preset 'v3.2-exp' .* needs [\d,.]+ GB"),
    # tracebacks before
    *[(f"build-{flag.strip('-')}-{value}", ["build", flag, value], rf"'{flag}': '{value}' is not a finite number")
      for flag, value in (("--price", "nan"), ("--price", "inf"), ("--data-file-gb", "nan"), ("--data-file-gb", "inf"),
                          ("--workspace-gb", "nan"), ("--max-abs-logits", "nan"), ("--memory", "nan"))],
    ("build-huge-seed", ["build", "--seed", str(2**70)], r"'--seed': 1180591620717411303424 is not in the range"),
    ("build-empty-out", ["build", "--out", ""], r"'--out': the path is empty"),
    ("generate-huge-id", ["generate", "--prompt-ids", str(2**64)], r"token id 18446744073709551616 is not an id"),
    ("generate-nan-wait", ["generate", "--prompt-ids", "1", "--wait", "nan"], r"'--wait': 'nan' is not a finite"),
    ("unknown-global-option", ["--bogus"], r"No such option '--bogus'"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_input(sandbox, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(sandbox)  # a command that wrongly wrote its default build/<gpu> would show in the hash
    before = tree(sandbox)
    code = main([a.format(s=sandbox) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (err, out)
    assert err.startswith("dsa-export: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert tree(sandbox) == before  # nothing that was there changed, nothing new appeared
    assert not (sandbox / NEW).exists()  # a build directory a rejected run created is gone again


def _model():
    return dsa_export.load_model("tiny")


def _ort(sandbox):
    return GraphBackend.onnxruntime(sandbox / "export")


# (id, call(sandbox), what the ValueError says)
API_CASES = [
    ("export-layers-not-a-range", lambda s: export_onnx(s / "ckpt", s / NEW / "x", layers=(2, 1)),
     r"layers 2:1 are not a range of the model's 3 layers"),
    ("api-export-zero-data-file", lambda s: export_onnx(s / "ckpt", s / NEW / "x", max_data_file_bytes=0),
     r"the data file size must be > 0 bytes"),
    ("export-nan-checkpoint", lambda s: export_onnx(s / "nan", s / NEW),
     rf"tensor '{LAYER}' holds non-finite values"),
    ("load-no-such-path", lambda s: dsa_export.load_model("/no/such/dir"),
     r"'/no/such/dir' is neither a checkpoint directory nor a preset"),
    ("load-float16", lambda s: dsa_export.load_model("tiny", dtype="float16"),
     r"dtype must be float32 or bfloat16, got 'float16'"),
    ("load-negative-seed", lambda s: dsa_export.load_model("tiny", seed=-1), r"seed must be an integer >= 0"),
    ("load-too-large", lambda s: dsa_export.load_model("v3.2-exp"), r"needs [\d,.]+ GB of weights in memory"),
    ("load-nan-weights", lambda s: dsa_export.load_model(s / "nan"), rf"tensor '{LAYER}' holds non-finite values"),
    ("load-truncated", lambda s: load_checkpoint(s / "truncated"), r"unreadable safetensors file"),
    ("forward-id-beyond-vocab", lambda s: _model()(torch.tensor([[320]])),
     r"token id 320 is outside the vocabulary \[0, 320\)"),
    ("forward-negative-id", lambda s: _model()(torch.tensor([[-1]])), r"token id -1 is outside the vocabulary"),
    ("forward-float-ids", lambda s: _model()(torch.tensor([[1.0, 2.0]])), r"token ids must be integers, got float32"),
    ("forward-1d-ids", lambda s: _model()(torch.tensor([1, 2, 3])), r"must be 2-D \[batch, seq\].*got shape \[3\]"),
    ("forward-empty-ids", lambda s: _model()(torch.zeros(1, 0, dtype=torch.long)), r"at least one token"),
    ("forward-positions-shape", lambda s: _model()(torch.tensor([[1, 2, 3]]), positions=torch.tensor([[0, 1]])),
     r"positions have shape \[1, 2\], the token ids \[1, 3\]"),
    ("forward-positions-gap", lambda s: _model()(torch.tensor([[1, 2]]), positions=[[0, 5]]), r"must be consecutive"),
    ("forward-negative-position", lambda s: _model()(torch.tensor([[1]]), positions=[[-2]]),
     r"positions must not be negative"),
    ("forward-cache-batch", lambda s: (lambda m: m(torch.tensor([[1]]), cache=m.new_cache(batch=2)))(_model()),
     r"the caches hold 2 sequences, the step has 1"),
    ("forward-cache-layers", lambda s: _model()(torch.tensor([[1]]), cache=KVCache.empty(
        get_preset("tiny").replace(num_hidden_layers=2), capacity=8)), r"KVCache of this model's 3 layers"),
    ("forward-cache-full", lambda s: (lambda m: m(torch.tensor([[1, 2, 3]]), cache=m.new_cache(capacity=2)))(
        _model()), r"3 tokens do not fit a cache of capacity 2"),
    ("cache-zero-batch", lambda s: KVCache.empty(get_preset("tiny"), batch=0), r"a cache needs batch >= 1"),
    ("generate-negative-tokens", lambda s: Session(EagerBackend(_model(), capacity=16)).generate([[1]], -1),
     r"max_new_tokens must be an integer >= 0"),
    ("generate-negative-temperature", lambda s: Session(EagerBackend(_model(), capacity=16)).generate(
        [[1]], 2, temperature=-1), r"temperature must be a number >= 0"),
    ("generate-negative-top-k", lambda s: Session(EagerBackend(_model(), capacity=16)).generate(
        [[1]], 2, temperature=1, top_k=-5), r"top_k must be an integer >= 0"),
    ("generate-empty-prompt", lambda s: Session(EagerBackend(_model(), capacity=16)).generate([[1], []], 2),
     r"every prompt needs at least one token"),
    ("generate-prompts-not-lists", lambda s: Session(EagerBackend(_model(), capacity=16)).generate("abc", 2),
     r"prompts must be a list of token-id lists"),
    ("generate-beyond-capacity", lambda s: Session(_ort(s)).generate([[1] * 60], 8),
     r"a prompt of 60 tokens \+ 8 new tokens does not fit the cache capacity 64"),
    ("onnxruntime-negative-id", lambda s: (lambda b: b.step(torch.tensor([[-1]]), torch.tensor([[0]]),
                                                            b.new_caches(1)))(_ort(s)),
     r"token id -1 is outside the vocabulary"),
    ("onnxruntime-no-export", lambda s: GraphBackend.onnxruntime("/no/such/dir"), r"no exported model"),
    ("onnxruntime-truncated-data", lambda s: GraphBackend.onnxruntime(s / "trunc_data"),
     r"model.onnx.data: missing or truncated"),
    ("onnxruntime-corrupt-io-json", lambda s: GraphBackend.onnxruntime(s / "bad_io"), r"io.json: not a readable io.json"),
    ("onnxruntime-no-config", lambda s: GraphBackend.onnxruntime(s / "no_config"), r"config.json not found"),
    ("onnxruntime-io-json-of-another-capacity", lambda s: GraphBackend.onnxruntime(s / "bad_capacity"),
     r"io.json does not describe model.onnx \(graph input 'block_tables' has dims \['sequences', 1\], io.json "
     r"says \['sequences', 2\]\)"),
    ("onnxruntime-random-onnx", lambda s: GraphBackend.onnxruntime(s / "random_onnx"), r"model.onnx: not a readable ONNX file"),
    ("export-capacity-too-small", lambda s: export_onnx(_model(), s / NEW / "x", capacity=2),
     r"capacity 2 is too small"),
    ("thresholds-negative", lambda s: Thresholds(max_kl=-1), r"max_kl must be a number >= 0"),
    ("assumptions-zero", lambda s: Assumptions(memory=0), r"memory is a fraction of peak in \(0, 1\]"),
    ("api-parity-other-model", lambda s: run_parity(_model(), s / "other_model", s / NEW, Thresholds()),
     r"exported from a different model"),
    ("api-init-over-a-checkpoint", lambda s: init_checkpoint(get_preset("tiny"), s / "ckpt"),
     r"already holds a checkpoint"),
    ("options-unknown-preset", lambda s: run_build(Options(preset="huge", out=s / NEW)), r"'huge' is neither"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_bad_python_api_input(sandbox, call, message):
    before = tree(sandbox)
    with pytest.raises(ValueError, match=message) as raised:
        call(sandbox)
    assert "\n" not in str(raised.value)
    assert tree(sandbox) == before
    assert not (sandbox / NEW).exists()


def test_there_are_at_least_120_distinct_bad_inputs():
    ids = [c[0] for c in CLI_CASES + API_CASES]
    assert len(set(ids)) == len(ids) and len(ids) >= 120


def test_a_second_run_into_a_build_directory_in_use_is_refused(sandbox, capsys):
    from dsa_export.files import locked

    before = tree(sandbox)
    with locked(sandbox / "export"):  # another run holds it
        code = main(["export", "--out", str(sandbox / "export"), "--capacity", "64"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"export is in use by another dsa-export run", err), err
    assert tree(sandbox) == before


def test_a_full_disk_is_one_line_and_changes_nothing(sandbox, capsys, monkeypatch):
    """ENOSPC while the weights stream: exit 2, one line naming it, the build directory as it was."""
    import errno

    from dsa_export.exporter import weights

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(weights._DataFile, "write", full)
    before = tree(sandbox)
    code = main(["export", "--checkpoint", str(sandbox / "ckpt"), "--out", str(sandbox / "export"), "--capacity",
                 "32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert tree(sandbox) == before


def test_corrupt_outputs_are_found_before_reuse_and_made_again(sandbox, tmp_path, capsys):
    """64 bytes flipped in the data file (same size): the export is not reused, the log names the file, the run
    exports again; what the run reads (the checkpoint, inside the build directory) is never removed."""
    build = shutil.copytree(sandbox / "flipped_data", tmp_path / "b")
    good = (sandbox / "export" / "model.onnx.data").read_bytes()
    code = main(["export", "--checkpoint", str(sandbox / "ckpt"), "--out", str(build), "--capacity", "64"])
    out = capsys.readouterr().out
    assert code == 0 and re.search(r"\[export\] not reused: .*model.onnx.data changed since it was written", out)
    assert (build / "model.onnx.data").read_bytes() == good
    # a build whose checkpoint lies in its own directory: a preset build's checkpoint given back to it
    shutil.copytree(sandbox / "ckpt", build / "checkpoint")
    checkpoint = tree(build / "checkpoint")
    code = main(["export", "--checkpoint", str(build / "checkpoint"), "--out", str(build), "--capacity", "48"])
    assert code == 0 and tree(build / "checkpoint") == checkpoint


@pytest.mark.parametrize("ids, positions, message", [
    ([[-1]], [[0]], r"token id -1 is outside the vocabulary"),
    ([[320]], [[0]], r"token id 320 is outside the vocabulary"),
    ([[1.5]], [[0]], r"token ids must be integers"),
    ([[1, 2]], [[0, 2]], r"must be consecutive"),
    ([[1]], [[64]], r"65 tokens do not fit a cache of capacity 64"),
    ([[1], [2]], [[0], [0]], r"the caches hold 1 sequences, the step has 2"),
])
def test_every_backend_refuses_the_same_input_with_the_same_message(sandbox, tiny_model, ids, positions, message):
    backends = [EagerBackend(tiny_model, capacity=64), _ort(sandbox)]
    errors = []
    for backend in backends:
        caches = backend.new_caches(1)
        with pytest.raises(ValueError, match=message) as raised:
            backend.step(torch.tensor(ids), torch.tensor(positions), caches)
        errors.append(str(raised.value))
    assert errors[0] == errors[1]
