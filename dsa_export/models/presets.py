"""Built-in configs: `tiny` (demo and tests, every mechanism active), `tiny-64e` (tiny with 64 routed experts, 8 active
per token: how cost grows with the number of experts) and `v3.2-exp` (the 671B shapes)."""

from __future__ import annotations

import os
from pathlib import Path

from dsa_export.errors import DSAExportError
from dsa_export.models.config import DSAConfig, YarnScaling, load_config

_REAL_YARN = YarnScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                         mscale=1.0, mscale_all_dim=1.0)

PRESETS: dict[str, DSAConfig] = {
    # 1 dense + 2 MoE layers, 8 experts in 2 groups, topk 8 (< the test sequences), YaRN on (max_pos > original).
    # 8 indexer heads keep exact score ties (all heads ReLU'd to 0) rare enough for set-equal comparisons.
    "tiny": DSAConfig(
        vocab_size=320, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1,
        intermediate_size=128, moe_intermediate_size=32,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, index_n_heads=8, index_head_dim=16, index_topk=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
        rope_theta=10000.0, rope_scaling=_REAL_YARN, rms_norm_eps=1e-6, max_position_embeddings=163840,
    ),
    # DeepSeek-V3.2-Exp (671B), from the official config.json. For cost modelling and meta-device tracing only.
    "v3.2-exp": DSAConfig(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3,
        intermediate_size=18432, moe_intermediate_size=2048,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, index_n_heads=64, index_head_dim=128, index_topk=2048,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
        rope_theta=10000.0, rope_scaling=_REAL_YARN, rms_norm_eps=1e-6, max_position_embeddings=163840,
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    ),
}

PRESETS["tiny-64e"] = PRESETS["tiny"].replace(n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4)


def get_preset(name: str) -> DSAConfig:
    if name not in PRESETS:
        raise DSAExportError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def resolve_source(source: str | Path) -> tuple[DSAConfig, Path | None]:
    """(config, checkpoint directory or None) for a checkpoint directory or a preset name: the one rule every command
    and `load_model` use. An existing path is a checkpoint (and must be a directory); otherwise a preset name."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise DSAExportError(f"{path}: not a checkpoint directory")
        return load_config(path), path
    if str(source) in PRESETS:
        return PRESETS[str(source)], None
    raise DSAExportError(f"'{source}' is neither a checkpoint directory nor a preset (presets: {', '.join(PRESETS)})")


def memory_shortfall(config: DSAConfig, bytes_per_param: int, what: str) -> str | None:
    """Why a model's weights would not fit in this machine's memory (with room to spare), or None if they do."""
    from dsa_export.models.summary import summarize

    need = summarize(config).total_params * bytes_per_param
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.7 * have:
        return f"{what} needs {need / 1e9:,.1f} GB of weights in memory, this machine has {have / 1e9:.0f} GB"
    return None


def check_fits_in_memory(config: DSAConfig, bytes_per_param: int, what: str) -> None:
    """Refuse to materialise a model whose weights would not fit in this machine's memory."""
    problem = memory_shortfall(config, bytes_per_param, what)
    if problem:
        raise DSAExportError(problem)
