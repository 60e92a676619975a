"""`DSAConfig`: the model's hyper-parameters, read from (and written to) an HF `config.json` of model_type `deepseek_v32`.

Field names are HF's, so a config.json maps one to one. See dsa-architecture.md §1 and §3.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsa_export.errors import DSAExportError
from dsa_export.formats import FP8_BLOCK

MODEL_TYPE = "deepseek_v32"


class ConfigError(DSAExportError):
    pass


# Sizes no model of this architecture comes near (the 671B model: 61 layers, hidden 7168, vocabulary 129,280, 256
# experts): a corrupt or hostile config is refused at once, not after minutes of building a skeleton of its size.
MAX_DIM = 1 << 20
LIMITS = {"num_hidden_layers": 1024, "vocab_size": 1 << 24, "n_routed_experts": 4096, "num_attention_heads": 1024,
          "index_n_heads": 1024, "max_position_embeddings": 1 << 24}
MAX_CONFIG_BYTES = 1 << 20

@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class DSAConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    intermediate_size: int
    moe_intermediate_size: int
    # MLA
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # lightning indexer
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    # MoE
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    scoring_func: str
    topk_method: str
    # positions and norms
    rope_theta: float
    rope_scaling: YarnScaling | None
    rms_norm_eps: float
    max_position_embeddings: int
    quantization_config: dict | None = None
    # False: DeepSeek's fixed (non-interleaved) indexer RoPE; True: GLM-5-style checkpoints (interleaved).
    indexer_rope_interleave: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1  # HF configs write one id or a list of them
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # other config.json keys, written back as-is

    def __post_init__(self):
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one MLA latent-cache row: normalised latent ‖ roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale² when YaRN is on (HF applies it through mscale_all_dim)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        """The FP8 weights' scale block of an FP8-quantised config (None: not quantised)."""
        if not self.quantization_config:
            return None
        return tuple(self.quantization_config.get("weight_block_size", FP8_BLOCK))

    @property
    def weight_block(self) -> tuple[int, int]:
        """The scale block FP8 weights of this model have or would have (DeepSeek's format when not quantised)."""
        return self.fp8_block or FP8_BLOCK

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def replace(self, **changes) -> "DSAConfig":
        return dataclasses.replace(self, **changes)

    # ---- checks ---------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{name}' {why}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                need(isinstance(value, int) and not isinstance(value, bool), f.name, f"must be an integer, got {value!r}")
                need(value >= 0, f.name, f"must not be negative, got {value}")
                need(value <= LIMITS.get(f.name, MAX_DIM), f.name,
                     f"is {value:,}, beyond what any model of this architecture has "
                     f"({LIMITS.get(f.name, MAX_DIM):,}): is the config corrupt?")
            elif f.type == "float":
                need(isinstance(value, float) and math.isfinite(value), f.name, f"must be a finite number, got {value!r}")
        for name in ("bos_token_id", "eos_token_id"):
            ids = getattr(self, name)
            ids = ids if isinstance(ids, list) else [] if ids is None else [ids]
            need(bool(ids) or getattr(self, name) is None, name, "must be a token id or a non-empty list of them")
            need(all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids), name,
                 f"must hold token ids in [0, vocab_size={self.vocab_size}), got {getattr(self, name)!r}")
        need(self.q_lora_rank > 0, "q_lora_rank", "must be > 0 (the indexer reads the query latent)")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "v_head_dim", "index_n_heads", "index_topk", "vocab_size", "max_position_embeddings"):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even and > 0")
        need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim",
             f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): RoPE covers its first qk_rope_head_dim dims")
        need(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be <= num_hidden_layers ({self.num_hidden_layers})")
        need(self.scoring_func == "sigmoid", "scoring_func", f"must be 'sigmoid', got {self.scoring_func!r}")
        need(self.topk_method == "noaux_tc", "topk_method", f"must be 'noaux_tc', got {self.topk_method!r}")
        if self.first_k_dense_replace < self.num_hidden_layers:  # there are MoE layers
            need(self.n_routed_experts > 0, "n_routed_experts", "must be > 0")
            need(self.n_group > 0 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts ({self.n_routed_experts})")
            need(self.n_routed_experts // self.n_group >= 2, "n_group", "must leave >= 2 experts per group")
            need(0 < self.topk_group <= self.n_group, "topk_group", f"must be in 1..n_group ({self.n_group})")
            reachable = self.topk_group * self.n_routed_experts // self.n_group
            need(0 < self.num_experts_per_tok <= reachable, "num_experts_per_tok",
                 f"must be in 1..{reachable} (experts in the top {self.topk_group} groups)")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
        if self.first_k_dense_replace > 0:
            need(self.intermediate_size > 0, "intermediate_size", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        if self.rope_scaling is not None:
            y = self.rope_scaling
            for f in dataclasses.fields(y):
                value = getattr(y, f.name)
                need(math.isfinite(value), f"rope_scaling.{f.name}", f"must be a finite number, got {value!r}")
            need(y.factor >= 1, "rope_scaling.factor", f"must be >= 1, got {y.factor}")
            need(self.rope_theta > 1, "rope_theta", f"must be > 1 with YaRN scaling (it takes log(rope_theta)), got "
                                                    f"{self.rope_theta}")
            need(y.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings", "must be > 0")
            need(y.beta_fast > y.beta_slow > 0, "rope_scaling.beta_fast", "must be > beta_slow > 0")
        if self.quantization_config is not None:
            need(isinstance(self.quantization_config, dict), "quantization_config",
                 f"must be an object or null, got {self.quantization_config!r}")
        if self.quantization_config:
            q = self.quantization_config
            need(q.get("quant_method") == "fp8", "quantization_config.quant_method",
                 f"must be 'fp8', got {q.get('quant_method')!r}")
            block = q.get("weight_block_size", list(FP8_BLOCK))
            need(isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block),
                 "quantization_config.weight_block_size", f"must be two positive integers, got {block!r}")

    # ---- HF config.json -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "DSAConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"config field 'model_type' must be '{MODEL_TYPE}', got {model_type!r}")
        raw = dict(raw)
        rope_theta, rope_scaling = _read_rope(raw)
        values: dict[str, Any] = {"rope_theta": rope_theta, "rope_scaling": rope_scaling}
        optional = {"quantization_config": None, "indexer_rope_interleave": False, "bos_token_id": 0,
                    "eos_token_id": 1}
        for f in dataclasses.fields(cls):
            if f.name in values or f.name == "extra":
                continue
            if f.name in raw:
                values[f.name] = raw[f.name]
            elif f.name in optional:
                values[f.name] = optional[f.name]
            else:
                raise ConfigError(f"config field '{f.name}' is missing")
        for name in ("routed_scaling_factor", "rope_theta", "rms_norm_eps"):
            if isinstance(values[name], bool) or not isinstance(values[name], (int, float)):
                raise ConfigError(f"config field '{name}' must be a number, got {values[name]!r}")
            values[name] = float(values[name])
        for name in ("norm_topk_prob", "indexer_rope_interleave"):
            if not isinstance(values[name], bool):
                raise ConfigError(f"config field '{name}' must be true or false, got {values[name]!r}")
        known = {f.name for f in dataclasses.fields(cls)} | {"rope_parameters"}
        values["extra"] = {k: v for k, v in raw.items() if k not in known}
        return cls(**values)

    def to_hf_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": MODEL_TYPE}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "rope_scaling":
                value = None if value is None else {"type": "yarn", "rope_type": "yarn", **dataclasses.asdict(value)}
            if f.name == "quantization_config" and value is None:
                continue
            out[f.name] = value
        out.setdefault("num_key_value_heads", self.num_attention_heads)
        out.setdefault("hidden_act", "silu")
        out.setdefault("tie_word_embeddings", False)
        return out


def _read_rope(raw: dict) -> tuple[float, YarnScaling | None]:
    """Accept the official `rope_scaling` block and transformers-5 `rope_parameters` alike."""
    params = raw.get("rope_scaling")
    if params is None and isinstance(raw.get("rope_parameters"), dict):
        params = raw["rope_parameters"]
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"config field 'rope_scaling' must be an object or null, got {params!r}")
    theta = raw.get("rope_theta", (params or {}).get("rope_theta"))
    if theta is None:
        raise ConfigError("config field 'rope_theta' is missing")
    if params is None:
        return theta, None
    if not isinstance(params, dict):
        raise ConfigError(f"config field 'rope_scaling' must be an object or null, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"config field 'rope_scaling.type' must be 'yarn', got {kind!r}")
    kwargs = {}
    for f in dataclasses.fields(YarnScaling):
        if f.name in params:
            value = params[f.name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"config field 'rope_scaling.{f.name}' must be a finite number, got {value!r}")
            kwargs[f.name] = int(value) if f.type == "int" else float(value)
        elif f.default is dataclasses.MISSING:
            raise ConfigError(f"config field 'rope_scaling.{f.name}' is missing")
    return theta, YarnScaling(**kwargs)


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def load_config(path: str | Path) -> DSAConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{file}: config.json not found")
    if not file.is_file():
        raise ConfigError(f"{file}: not a regular file")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{file}: {file.stat().st_size:,} bytes, not a config.json")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{file}: nested too deeply to be a config.json") from None
    try:
        return DSAConfig.from_hf_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
