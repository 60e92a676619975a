import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dsa_export
from dsa_export.models import init_checkpoint, load_checkpoint
from dsa_export.models.checkpoint import CheckpointError, checkpoint_fingerprint, expected_tensors, read_headers
from dsa_export.models.init import save_checkpoint
from dsa_export.models.fp8 import FP8, dequantize_weight, quantize_weight
from conftest import random_ids


def logits(model, config, seed=0):
    with torch.no_grad():
        return model(random_ids(config, 2, 24, seed=seed))


def test_official_tensor_names(tiny_config):
    names = expected_tensors(tiny_config)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.indexer.wq_b.weight",
                 "model.layers.1.self_attn.indexer.k_norm.bias", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.2.mlp.experts.7.down_proj.weight", "model.layers.2.mlp.gate.e_score_correction_bias",
                 "model.layers.2.mlp.shared_experts.up_proj.weight"):
        assert name in names, name
    assert names["model.layers.1.self_attn.indexer.wq_b.weight"].fp8_ok
    assert not names["model.layers.1.self_attn.indexer.weights_proj.weight"].fp8_ok
    assert not names["lm_head.weight"].fp8_ok


def test_preset_model_equals_its_initialised_checkpoint(tmp_path, tiny_config):
    init_checkpoint(tiny_config, tmp_path / "c", seed=3)
    a = load_checkpoint(tmp_path / "c", progress=False)
    b = dsa_export.load_model("tiny", seed=3)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(t, b.state_dict()[name]) for name, t in a.state_dict().items())
    assert a.model.layers[1].self_attn.indexer.weights_proj.weight.dtype == torch.float32


def test_sharded_checkpoint_with_index_loads_the_same(tmp_path, tiny_config, tiny_checkpoint, tiny_model):
    init_checkpoint(tiny_config, tmp_path / "sharded", seed=1, max_shard_bytes=100_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    sharded = load_checkpoint(tmp_path / "sharded", progress=False)
    assert torch.equal(logits(sharded, tiny_config), logits(tiny_model, tiny_config))
    assert checkpoint_fingerprint(tmp_path / "sharded") != checkpoint_fingerprint(tiny_checkpoint)


def test_bf16_load(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16, progress=False)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[2].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_fp8_block_quantisation_round_trip():
    w = torch.randn(300, 200)
    q, scale_inv = quantize_weight(w, (128, 128))
    assert q.dtype == FP8 and scale_inv.shape == (3, 2)
    back = dequantize_weight(q, scale_inv, (128, 128))
    assert (back - w).abs().max() < w.abs().max() / 8


def test_fp8_checkpoint_matches_model_from_its_dequantised_weights(tmp_path, tiny_config):
    fp8_dir = init_checkpoint(tiny_config, tmp_path / "fp8", seed=2, fp8=True)
    raw = load_file(fp8_dir / "model.safetensors")
    assert raw["model.layers.1.self_attn.q_b_proj.weight"].dtype == FP8
    assert raw["model.layers.1.self_attn.indexer.weights_proj.weight"].dtype == torch.float32
    # Dequantise by hand into a plain bf16/fp32 checkpoint of the same config.
    plain = {}
    for name, tensor in raw.items():
        if name.endswith(".weight_scale_inv"):
            continue
        if tensor.dtype == FP8:
            tensor = dequantize_weight(tensor, raw[name.removesuffix(".weight") + ".weight_scale_inv"], (128, 128))
        plain[name] = tensor
    save_checkpoint(plain, tiny_config, tmp_path / "dequantised")
    a = load_checkpoint(fp8_dir, progress=False)
    b = load_checkpoint(tmp_path / "dequantised", progress=False)
    assert a.config.quantization_config["weight_block_size"] == [128, 128]
    assert torch.equal(logits(a, tiny_config), logits(b, tiny_config))


def test_mtp_layer_is_skipped(tmp_path, tiny_config, tiny_checkpoint, tiny_model):
    state = load_file(tiny_checkpoint / "model.safetensors")
    mtp = f"model.layers.{tiny_config.num_hidden_layers}"
    state[f"{mtp}.eh_proj.weight"] = torch.zeros(4, 4)
    state[f"{mtp}.self_attn.q_a_proj.weight"] = torch.zeros(4, 4)
    save_checkpoint(state, tiny_config, tmp_path / "mtp")
    assert torch.equal(logits(load_checkpoint(tmp_path / "mtp", progress=False), tiny_config),
                       logits(tiny_model, tiny_config))


def _edited_checkpoint(src, dst, config, edit):
    state = load_file(src / "model.safetensors")
    edit(state)
    save_checkpoint(state, config, dst)
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.layers.2.mlp.experts.3.up_proj.weight"),
     "tensor 'model.layers.2.mlp.experts.3.up_proj.weight' is missing"),
    (lambda s: s.update({"model.norm.weight": torch.ones(65)}), r"tensor 'model.norm.weight' has shape \[65\]"),
    (lambda s: s.update({"model.layers.0.self_attn.extra.weight": torch.ones(2)}),
     "tensor 'model.layers.0.self_attn.extra.weight' is unexpected"),
    (lambda s: s.update({"model.norm.weight": s["model.norm.weight"].to(torch.int32)}), "dtype I32"),
    (lambda s: s.update({"model.layers.0.self_attn.q_a_proj.weight":
                         s["model.layers.0.self_attn.q_a_proj.weight"].to(FP8)}),
     "'model.layers.0.self_attn.q_a_proj.weight_scale_inv' is missing"),
])
def test_bad_tensors_are_named(tmp_path, tiny_config, tiny_checkpoint, edit, message):
    bad = _edited_checkpoint(tiny_checkpoint, tmp_path / "bad", tiny_config, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad, progress=False)


def test_truncated_safetensors_is_reported(tmp_path, tiny_config, tiny_checkpoint):
    bad = _edited_checkpoint(tiny_checkpoint, tmp_path / "bad", tiny_config, lambda s: None)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors file"):
        read_headers(bad)


def test_index_naming_a_missing_shard(tmp_path, tiny_config):
    ckpt = init_checkpoint(tiny_config, tmp_path / "s", max_shard_bytes=100_000)
    next(ckpt.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002-.*listed in model.safetensors.index.json but missing"):
        load_checkpoint(ckpt, progress=False)


def test_save_never_clobbers_a_foreign_directory(tmp_path, tiny_config):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty and not a checkpoint"):
        init_checkpoint(tiny_config, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_reinit_replaces_a_checkpoint_only_when_asked_and_completely(tmp_path, tiny_config):
    ckpt = init_checkpoint(tiny_config, tmp_path / "c", max_shard_bytes=100_000)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        init_checkpoint(tiny_config, tmp_path / "c")
    init_checkpoint(tiny_config, tmp_path / "c", overwrite=True)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                           "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "deepseek_v32"
