"""Sizes of a config, computed from the meta-device skeleton (no weights): layer plan, parameters, KV-cache bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsa_export.models.cache import cache_bytes_per_token
from dsa_export.models.checkpoint import expected_tensors
from dsa_export.models.config import DSAConfig


@dataclass(frozen=True)
class ModelSummary:
    layer_plan: list[str]  # "dense" or "moe" per layer
    total_params: int
    active_params: int  # per token: everything except the routed experts a token does not use
    kv_bytes_per_token: dict[str, int]  # per token, all layers: MLA latent + indexer keys, per cache format


def summarize(config: DSAConfig) -> ModelSummary:
    sizes = {name: math.prod(spec.shape) for name, spec in expected_tensors(config).items()}
    total = sum(sizes.values())
    expert = sum(n for name, n in sizes.items() if name.startswith("model.layers.") and ".mlp.experts.0." in name
                 and name.split(".")[2] == str(config.first_k_dense_replace))
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    unused = moe_layers * (config.n_routed_experts - config.num_experts_per_tok) * expert
    return ModelSummary(
        layer_plan=["moe" if config.is_moe_layer(i) else "dense" for i in range(config.num_hidden_layers)],
        total_params=total,
        active_params=total - unused,
        kv_bytes_per_token={"bf16": int(cache_bytes_per_token(config, "bfloat16")),
                            "fp8": int(cache_bytes_per_token(config, "fp8"))},
    )
