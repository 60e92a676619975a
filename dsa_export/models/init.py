"""Random checkpoints in HF layout: seeded weights of the real architecture (bf16, or FP8 e4m3 with 128x128 block
scales as DeepSeek stores them), a small tokenizer, written atomically. What `dsa-export init` and the build's
checkpoint step write for a preset."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsa_export.files import atomic_dir
from dsa_export.formats import FP8_BLOCK, FP8_QUANTIZATION_CONFIG
from dsa_export.models.checkpoint import INDEX_FILE, SCALE_SUFFIX, CheckpointError, expected_tensors, fill_model
from dsa_export.models.config import DSAConfig
from dsa_export.models.fp8 import quantize_weight
from dsa_export.models.model import DSAForCausalLM


def random_state_dict(config: DSAConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Seeded random weights for every expected tensor, scaled so activations stay O(1) through the layers."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, spec in expected_tensors(config).items():
        if name.endswith(("layernorm.weight", "norm.weight")):  # RMSNorm/LayerNorm gains near 1
            t = 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
        elif name.endswith(("e_score_correction_bias", "k_norm.bias")):
            t = 0.1 * torch.randn(spec.shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(spec.shape, generator=gen)
        else:  # linear weights [out, in]
            t = torch.randn(spec.shape, generator=gen) / spec.shape[-1] ** 0.5
        keep_fp32 = name.endswith(DSAForCausalLM.FP32_PARAMS)
        state[name] = t.to(torch.float32 if keep_fp32 else dtype)
    return state


def random_model(config: DSAConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> DSAForCausalLM:
    """The model with `random_state_dict`'s weights: what `init` writes for `config`, without the round trip."""
    model = DSAForCausalLM(config).cast(dtype)
    fill_model(model, random_state_dict(config, seed).__getitem__, progress=False)
    return model.init_buffers().eval()


def quantize_state_dict(state: dict[str, torch.Tensor], config: DSAConfig,
                        block: tuple[int, int] = FP8_BLOCK) -> dict[str, torch.Tensor]:
    """FP8 block-quantise the weights that the official checkpoint stores in FP8."""
    specs = expected_tensors(config)
    out = {}
    for name, tensor in state.items():
        if specs[name].fp8_ok:
            out[name], out[name.removesuffix(".weight") + SCALE_SUFFIX] = quantize_weight(tensor, block)
        else:
            out[name] = tensor
    return out


def save_checkpoint(state: dict[str, torch.Tensor], config: DSAConfig, out_dir: str | Path,
                    max_shard_bytes: int = 2 << 30, overwrite: bool = False,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + safetensors shards (+ index when more than one) + extra_files (name → text, e.g. the
    tokenizer) atomically: temp dir, then rename. An existing checkpoint is replaced only with overwrite=True; any
    other non-empty directory never."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / "config.json").exists():
            raise CheckpointError(f"{out_dir}: not empty and not a checkpoint; refusing to replace it")
        if not overwrite:
            raise CheckpointError(f"{out_dir}: already holds a checkpoint; choose another directory (or overwrite "
                                  f"it: init --force)")
    if max_shard_bytes < 1:
        raise CheckpointError(f"the shard size must be > 0 bytes, got {max_shard_bytes}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")
    return out_dir


def init_checkpoint(config: DSAConfig, out_dir: str | Path, seed: int = 0, fp8: bool = False,
                    max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """A seeded random checkpoint in HF layout (bf16, or FP8 with 128×128 block scales), with a small byte-level
    tokenizer and chat template (models/tokenizer.py) when the vocabulary can hold one."""
    from dsa_export.models.tokenizer import small_tokenizer

    state = random_state_dict(config, seed)
    if fp8:
        config = config.replace(quantization_config=dict(FP8_QUANTIZATION_CONFIG))
        state = quantize_state_dict(state, config)
    else:
        config = config.replace(quantization_config=None)
    tokenizer = small_tokenizer(min(config.vocab_size, 512)) if config.vocab_size >= 260 else None
    return save_checkpoint(state, config, out_dir, max_shard_bytes, overwrite, tokenizer)
