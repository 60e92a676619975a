"""The eager DeepSeek-V3.2-Exp model (dsa-architecture.md §2–§6), readable top to bottom.

Module names follow the HF checkpoint (`model.layers.N.self_attn.q_a_proj`, ...), so `state_dict()` keys *are*
the checkpoint's tensor names and loading needs no renaming table.

Caches are paged pools, one pair per layer (layout and names: models/cache.py): the MLA latent pool
[rows, kv_lora_rank+rope] (normalised latent ‖ roped k_pe) and the indexer key pool [rows, index_head_dim]; a step's
`Paging` says where each token's rows go and which blocks its sequence owns. A step writes its new rows in place, so a
batch of prompts of different lengths shares one cache: row b's junk beyond its own length is never visible, because
a query at position p only sees keys t <= p. The ops see a step's tokens packed, [N, ...].

The routed experts of each MoE layer are stacked ([E,2I,H] gate ‖ up, [E,H,I] down; checkpoint.py maps HF's
per-expert tensors onto them) and run through `ops.routed_experts`, which touches only the chosen experts. FP8
checkpoints may keep them in FP8 with their block scales (`RoutedExperts.keep_fp8`).

Attention modes (`DSAForCausalLM.attention`):
  "sparse": absorbed MQA over the latent cache, attending only the indexer's top-k rows (the exported form);
  "masked": DeepSeek's reference semantics, MHA over expanded keys with the top-k mask added to dense scores;
  "dense":  plain dense MLA (causal mask only, indexer unused): the baseline DSA is compared with.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsa_export.contracts import fp8_scale_shape
from dsa_export.errors import DSAExportError
from dsa_export.models import inputs, semantics
from dsa_export.models.cache import KVCache, Paging, check_room
from dsa_export.models.config import DSAConfig, yarn_mscale
from dsa_export.models.semantics import visible_keys
from dsa_export.models.fp8 import hadamard_matrix, simulate_indexer_fp8

FP8_CODES = torch.int8  # FP8 e4m3 expert weights are held as their codes (contracts.FP8_BYTES)

ATTENTION_MODES = ("sparse", "masked", "dense")


class DSAOps(NamedTuple):
    """The functions that tracing swaps for `dsa::` custom ops (see `dsa_export.kernels`); `write_cache` writes a
    step's rows into a cache (in place when run eagerly, a TensorScatter in the exported graph)."""

    lightning_indexer: Callable
    sparse_mla: Callable
    routed_experts: Callable
    routed_experts_fp8: Callable
    write_cache: Callable


TORCH_SEMANTICS = DSAOps(semantics.lightning_indexer, semantics.sparse_mla, semantics.routed_experts,
                         semantics.routed_experts_fp8, semantics.write_cache)


# ---- RoPE with YaRN (§3) ----------------------------------------------------------------------------------------------
def rope_inv_freq(config: DSAConfig) -> torch.Tensor:
    dim, theta = config.qk_rope_head_dim, config.rope_theta
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    yarn = config.rope_scaling
    if yarn is not None:
        def correction_dim(rotations: float) -> float:
            return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
        high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / yarn.factor * ramp + freqs * (1 - ramp)
    return freqs.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float):
    angles = positions[..., None].float() * inv_freq  # [B,S,rope/2]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) (MLA; GLM-5-style indexers)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).to(x.dtype)


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[i], x[i+d/2]) (NeoX layout; DeepSeek's fixed indexer)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# ---- small blocks -----------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) · up x), the activation in fp32."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.gate_proj(x).float()) * self.up_proj(x).float()
        return self.down_proj(hidden.to(x.dtype))


# ---- lightning indexer (§5) -------------------------------------------------------------------------------------------
class Indexer(nn.Module):
    def __init__(self, config: DSAConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = config.index_n_heads, config.index_head_dim, config.qk_rope_head_dim
        self.interleaved = config.indexer_rope_interleave
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)  # kept in fp32
        # Per-head weight scale HI^-0.5, with DI^-0.5 folded in: ReLU(a·x) = a·ReLU(x) for a > 0.
        self.weight_scale = (self.n_heads * self.head_dim) ** -0.5
        self.fp8_sim = False
        self.register_buffer("hadamard", hadamard_matrix(self.head_dim) if self._hadamard_ok() else None,
                             persistent=False)

    def _hadamard_ok(self) -> bool:
        return self.head_dim & (self.head_dim - 1) == 0

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first rope_dim dims (rope first, then nope)."""
        rotate = rope_interleaved if self.interleaved else rope_halves
        return torch.cat([rotate(x[..., :self.rope_dim], cos, sin), x[..., self.rope_dim:]], dim=-1)

    def _maybe_fp8(self, x: torch.Tensor) -> torch.Tensor:
        return simulate_indexer_fp8(x, self.hadamard) if self.fp8_sim else x

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        k = F.layer_norm(self.wk(x).float(), (self.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float(),
                         self.k_norm.eps).to(x.dtype)
        return self._maybe_fp8(self._rope(k, cos, sin))

    def queries(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(q [B,S,HI,DI], w [B,S,HI] fp32) for `lightning_indexer`."""
        B, S, _ = x.shape
        q = self.wq_b(qr).view(B, S, self.n_heads, self.head_dim)
        q = self._maybe_fp8(self._rope(q, cos[:, :, None], sin[:, :, None]))
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.weight_scale
        return q, w


# ---- MLA (§4) ---------------------------------------------------------------------------------------------------------
class MLA(nn.Module):
    def __init__(self, config: DSAConfig):
        super().__init__()
        c = config
        self.n_heads, self.nope, self.rope, self.v_dim = (c.num_attention_heads, c.qk_nope_head_dim,
                                                          c.qk_rope_head_dim, c.v_head_dim)
        self.kv_rank, self.topk, self.scale = c.kv_lora_rank, c.index_topk, c.softmax_scale
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.indexer = Indexer(config)

    def forward(self, x, positions, cos, sin, latent_pool, index_pool, paging: Paging, mode: str, ops: DSAOps):
        """Attention output [B,S,hidden] of a step's tokens, and the layer's two pools with their rows written at
        `paging.slots` (models/cache.py). The ops see the tokens packed: [N = B·S, ...]."""
        B, S, _ = x.shape
        N = B * S
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(B, S, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = rope_interleaved(q_pe, cos[:, :, None], sin[:, :, None])
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        rows = torch.cat([self.kv_a_layernorm(latent), rope_interleaved(k_pe, cos, sin)], -1)
        latent_pool = ops.write_cache(latent_pool, rows.reshape(N, -1), paging.slots)
        index_pool = ops.write_cache(index_pool, self.indexer.keys(x, cos, sin).reshape(N, -1), paging.slots)

        indices = None
        if mode != "dense":
            iq, iw = self.indexer.queries(x, qr, cos, sin)
            indices = ops.lightning_indexer(iq.reshape(N, *iq.shape[2:]), index_pool, iw.reshape(N, -1),
                                            paging.positions, paging.sequence, paging.block_tables, self.topk,
                                            paging.block_size)

        # wkv_b viewed per head: [H, nope + v, kv_rank]
        w_kv = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w_kv[:, :self.nope], w_kv[:, self.nope:]
        if mode == "sparse":
            # absorb W_UK into the query, W_UV into the output (matmuls, not einsums: ONNX Einsum has no bf16)
            q_latent = (q_nope.transpose(1, 2) @ w_uk).transpose(1, 2)  # [B,S,H,kv_rank]
            q_absorbed = torch.cat([q_latent, q_pe], -1).reshape(N, self.n_heads, -1)
            o_latent = ops.sparse_mla(q_absorbed, latent_pool, indices, self.scale, self.kv_rank).view(B, S, self.n_heads,
                                                                                                    -1)
            out = (o_latent.transpose(1, 2) @ w_uv.transpose(1, 2)).transpose(1, 2)  # [B,S,H,v_dim]
        else:  # the reference paths read the pool as [B, rows] (the eager cache's identity paging)
            if paging.contiguous is None:
                raise DSAExportError(f"attention mode {mode!r} needs the eager model's own cache")
            rows_per_sequence = paging.contiguous[2]
            kv = latent_pool.view(B, rows_per_sequence, -1)
            if indices is not None:
                indices = paging.logical(indices).view(B, S, -1)
            out = self._mha(q_nope, q_pe, kv, positions, indices, w_uk, w_uv)
        return self.o_proj(out.flatten(2)), latent_pool, index_pool

    def _mha(self, q_nope, q_pe, kv, positions, indices, w_uk, w_uv):
        """MHA mode over expanded keys; the top-k selection (if any) is an additive mask on dense scores."""
        kv = kv[:, :int(positions.max()) + 1]  # rows beyond the last position are invisible to every query
        latent, k_pe = kv.split([self.kv_rank, self.rope], dim=-1)
        k_nope = torch.einsum("btc,hdc->bthd", latent, w_uk)
        value = torch.einsum("btc,hvc->bthv", latent, w_uv)
        scores = (torch.einsum("bshd,bthd->bsht", q_nope, k_nope) +
                  torch.einsum("bshr,btr->bsht", q_pe, k_pe)).float() * self.scale
        allowed = visible_keys(positions, kv.shape[1])
        if indices is not None:  # scatter the selection into a [B,S,T] mask; −1 slots land in a spare column
            T = kv.shape[1]
            slots = torch.where(indices >= 0, indices, T).long()
            selected = allowed.new_zeros(*allowed.shape[:2], T + 1).scatter(-1, slots, True)[..., :T]
            allowed = allowed & selected
        scores = scores.masked_fill(~allowed[:, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        return torch.einsum("bsht,bthv->bshv", probs, value)


# ---- MoE (§6) ---------------------------------------------------------------------------------------------------------
class Gate(nn.Module):
    """Sigmoid scores + correction bias, group-limited top-k (noaux_tc); weights from the unbiased scores."""

    def __init__(self, config: DSAConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts))  # kept in fp32

    def forward(self, x: torch.Tensor):
        c = self.config
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [N,E]
        biased = scores + self.e_score_correction_bias.float()
        group_scores = biased.view(-1, c.n_group, c.n_routed_experts // c.n_group).topk(2, dim=-1).values.sum(-1)
        top_groups = group_scores.topk(c.topk_group, dim=-1).indices
        # a float scatter, then a compare: TensorRT's ScatterElements takes no BOOL tensors
        group_mask = torch.zeros_like(group_scores).scatter(1, top_groups, 1.0) > 0
        expert_mask = group_mask.repeat_interleave(c.n_routed_experts // c.n_group, dim=1)
        experts = biased.masked_fill(~expert_mask, float("-inf")).topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, experts)
        if c.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * c.routed_scaling_factor, experts


class RoutedExperts(nn.Module):
    """The routed experts of one MoE layer, stacked: gate ‖ up [E,2I,H] and down [E,H,I] (bf16/fp32), or after
    `keep_fp8` FP8 e4m3 codes (held as int8, see contracts.FP8_BYTES) with per-projection block scales
    (contracts.ROUTED_EXPERTS[_FP8])."""

    SCALES = ("gate_up_scale", "down_scale")

    def __init__(self, config: DSAConfig):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.fp8_block: tuple[int, int] | None = None

    def keep_fp8(self, block: tuple[int, int]) -> "RoutedExperts":
        """Hold the weights as FP8 e4m3 codes plus fp32 block scales (filled by the checkpoint loader)."""
        E, two_i, H = self.gate_up_proj.shape
        device = self.gate_up_proj.device
        self.fp8_block = block
        self.gate_up_proj = nn.Parameter(torch.empty(E, two_i, H, dtype=FP8_CODES, device=device), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, two_i // 2, dtype=FP8_CODES, device=device),
                                      requires_grad=False)
        self.gate_up_scale = nn.Parameter(torch.empty(E, *fp8_scale_shape(two_i // 2, H, *block, stacked=2),
                                                      device=device))
        self.down_scale = nn.Parameter(torch.empty(E, *fp8_scale_shape(H, two_i // 2, *block), device=device))
        return self

    def dequantized(self, weight: str, dtype: torch.dtype, experts: slice = slice(None)) -> torch.Tensor:
        """`weight` ("gate_up_proj" or "down_proj") of `experts`, from FP8 codes to `dtype` (bitwise what loading
        dequantised would give)."""
        assert self.fp8_block is not None
        rows = self.down_proj.shape[-1] if weight == "gate_up_proj" else self.down_proj.shape[1]
        scale = self.gate_up_scale if weight == "gate_up_proj" else self.down_scale
        return semantics.dequantize_experts(getattr(self, weight)[experts], scale[experts], *self.fp8_block, rows, dtype)

    def dequantize(self, dtype: torch.dtype) -> "RoutedExperts":
        """Back from FP8 codes to `dtype` weights."""
        if self.fp8_block is not None:
            gate_up, down = self.dequantized("gate_up_proj", dtype), self.dequantized("down_proj", dtype)
            self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
            self.down_proj = nn.Parameter(down, requires_grad=False)
            del self.gate_up_scale, self.down_scale
            self.fp8_block = None
        return self

    def forward(self, x, experts, weights, base, ops: DSAOps) -> torch.Tensor:
        if self.fp8_block is None:
            return ops.routed_experts(x, experts, weights, self.gate_up_proj, self.down_proj, base)
        return ops.routed_experts_fp8(x, experts, weights, self.gate_up_proj, self.gate_up_scale, self.down_proj,
                                      self.down_scale, base, *self.fp8_block)


class MoE(nn.Module):
    def __init__(self, config: DSAConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor, ops: DSAOps) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.gate(flat)
        # only the chosen experts run (tokens grouped by expert in the kernels), added to the shared expert in fp32
        out = self.experts(flat, experts.to(torch.int32), weights, self.shared_experts(flat).float(), ops)
        return out.to(x.dtype).view_as(x)


# ---- blocks and model (§2) --------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, config: DSAConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h, positions, cos, sin, latent_pool, index_pool, paging, mode, ops):
        attn, kv, index_k = self.self_attn(self.input_layernorm(h), positions, cos, sin, latent_pool, index_pool, paging,
                                           mode, ops)
        h = h + attn
        x = self.post_attention_layernorm(h)
        h = h + (self.mlp(x, ops) if isinstance(self.mlp, MoE) else self.mlp(x))
        return h, kv, index_k


class DSAModel(nn.Module):
    def __init__(self, config: DSAConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DSAForCausalLM(nn.Module):
    # Parameters that stay fp32 whatever the model dtype (as in the official checkpoint and HF).
    FP32_PARAMS = ("indexer.weights_proj.weight", "gate.e_score_correction_bias")

    def __init__(self, config: DSAConfig):
        super().__init__()
        self.config = config
        self.model = DSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attention = "sparse"
        self.ops = TORCH_SEMANTICS  # `dsa_export.kernels.use_custom_ops` swaps in torch.ops.dsa.*
        yarn = config.rope_scaling
        self.rope_attention_factor = 1.0 if yarn is None else (
            yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim))
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def computed_buffers(self) -> dict[str, torch.Tensor]:
        """The non-persistent buffers (computed from the config, not stored in checkpoints), by name, on the CPU."""
        values = {"inv_freq": rope_inv_freq(self.config)}
        for i, layer in enumerate(self.model.layers):
            indexer = layer.self_attn.indexer
            if indexer.hadamard is not None:
                values[f"model.layers.{i}.self_attn.indexer.hadamard"] = hadamard_matrix(indexer.head_dim)
        return values

    def init_buffers(self) -> "DSAForCausalLM":
        """(Re)compute the non-persistent buffers, e.g. after `to_empty` from the meta device."""
        for name, value in self.computed_buffers().items():
            module, _, attr = name.rpartition(".")
            setattr(self.get_submodule(module), attr, value)
        return self

    def set_indexer_fp8_sim(self, enabled: bool) -> None:
        """Hadamard + FP8 round trip in every indexer (off by default; needs a power-of-two index_head_dim)."""
        if enabled and self.config.index_head_dim & (self.config.index_head_dim - 1):
            raise DSAExportError("indexer FP8 simulation needs a power-of-two index_head_dim")
        for layer in self.model.layers:
            layer.self_attn.indexer.fp8_sim = enabled

    def keep_fp32_params(self) -> "DSAForCausalLM":
        for name, param in self.named_parameters():
            if name.endswith(self.FP32_PARAMS):
                param.data = param.data.float()
        return self

    def cast(self, dtype: torch.dtype) -> "DSAForCausalLM":
        """`dtype` for every float weight, except the fp32 ones (FP32_PARAMS) and FP8 experts with their scales.
        Use this, not `.to(dtype)`, which would also convert those."""
        for name, param in self.named_parameters():
            if name.endswith(self.FP32_PARAMS):
                param.data = param.data.float()
            elif param.is_floating_point() and not name.endswith(RoutedExperts.SCALES):
                param.data = param.data.to(dtype)
        return self

    def routed_experts(self) -> list[RoutedExperts]:
        return [layer.mlp.experts for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def dequantize_experts(self) -> "DSAForCausalLM":
        """FP8 routed experts (if any) to the model's dtype."""
        for experts in self.routed_experts():
            experts.dequantize(self.lm_head.weight.dtype)
        return self

    def new_cache(self, batch: int = 1, capacity: int | None = None) -> KVCache:
        """Zeroed caches in the model's dtype (capacity: models/cache.py `default_capacity` if not given)."""
        return KVCache.empty(self.config, batch, capacity, self.lm_head.weight.dtype, self.lm_head.weight.device)

    def forward_with_cache(self, input_ids: torch.Tensor, positions: torch.Tensor,
                           latent_pools: list[torch.Tensor], index_pools: list[torch.Tensor], paging: Paging,
                           ops: DSAOps | None = None, attention: str | None = None, layers: range | None = None,
                           logits_index: torch.Tensor | None = None):
        """The functional core: (logits fp32, latent pools, index-key pools) with this step's rows written at
        `paging.slots` (into the given pools when run eagerly). input_ids and positions [B,S] (a packed step of N
        tokens is [1, N]); logits [B,S,V] for every token, or [L,V] for the tokens `logits_index` picks (of the N
        flattened). ops/attention default to the model's. layers: run only these (a pipeline stage, with the pools of
        these layers): unless they start at 0, `input_ids` is the previous stage's hidden state [B,S,H]; unless they
        end the model, the hidden state is returned in place of the logits."""
        ops, attention = ops or self.ops, attention or self.attention
        layers = layers if layers is not None else range(self.config.num_hidden_layers)
        if attention not in ATTENTION_MODES:
            raise DSAExportError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        h = self.model.embed_tokens(input_ids) if layers.start == 0 else input_ids
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_attention_factor)
        latents, index_keys = [], []
        for i, latent_pool, index_pool in zip(layers, latent_pools, index_pools):
            h, kv, ik = self.model.layers[i](h, positions, cos, sin, latent_pool, index_pool, paging, attention, ops)
            latents.append(kv)
            index_keys.append(ik)
        if layers.stop < self.config.num_hidden_layers:
            return h, latents, index_keys  # the next stage's input
        if logits_index is not None:
            h = h.reshape(-1, h.shape[-1]).index_select(0, logits_index)
        logits = self.lm_head(self.model.norm(h)).float()
        return logits, latents, index_keys

    def step(self, input_ids, positions, cache: KVCache, ops: DSAOps | None = None, attention: str | None = None):
        """One [B,S] step over the model's own cache (checked by the caller): logits [B,S,V], rows written in
        place."""
        paging = Paging.identity(positions, cache.rows)
        logits, _, _ = self.forward_with_cache(input_ids, positions, cache.latent, cache.index_keys, paging, ops,
                                               attention)
        return logits

    def forward(self, input_ids, positions=None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B,S,V] for every position. input_ids and positions: [B,S] integer tensors (or nested lists).
        With `cache`, continue from it: the step's rows are written into it and `cache.length` advances. Without, a
        cache just large enough is used and dropped. Bad input raises a ValueError naming the problem."""
        input_ids = inputs.token_ids(input_ids, self.config.vocab_size).to(self.lm_head.weight.device)
        B, S = input_ids.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + S, device=input_ids.device).expand(B, S)
        positions = inputs.step_positions(positions, input_ids).to(input_ids.device)
        if int(positions.max()) >= self.config.max_position_embeddings:
            raise inputs.InputError(f"position {int(positions.max())} is beyond max_position_embeddings "
                                    f"({self.config.max_position_embeddings})")
        if cache is None:
            cache = self.new_cache(B, int(positions.max()) + 1)
        elif not isinstance(cache, KVCache) or len(cache.latent) != self.config.num_hidden_layers:
            raise inputs.InputError(f"cache must be a KVCache of this model's {self.config.num_hidden_layers} layers "
                                    f"(model.new_cache)")
        inputs.check_cache_batch(cache.batch, input_ids)
        check_room(cache.capacity, positions)
        logits = self.step(input_ids, positions, cache)
        cache.length = max(cache.length, int(positions.max()) + 1)
        return logits
