"""Cost model: FLOPs, bytes, roofline time and dollars per token as a function of its position, prefill and decode,
dense-MLA baseline (same model, no indexer, full attention) vs DSA.

Per token at position t (it attends to t keys), summed over layers:
- MLA projections (q_a, q_b, kv_a, kv_b expansion/absorption, o): FP8 GEMMs where the target has FP8;
- indexer projections (wq_b, wk, weights_proj) and indexer scoring over t keys (FP8), DSA only;
- attention core: prefill in MHA mode, 2·H·keys·(qk_head_dim + v_head_dim), decode in MQA (absorbed) mode,
  2·H·keys·(2·kv_lora_rank + rope); dense reads keys = t, DSA keys = min(t, topk) (decode kernels process the
  topk slots even when fewer keys exist); DSA prefill of short contexts uses masked MHA mode (dsa-architecture.md,
  "Anchors"), i.e. the cheaper of MHA over t keys and MQA over topk slots;
- dense MLP layers, MoE routed (num_experts_per_tok) + shared experts and the gate; LM head.
Decode also reads the caches: the MLA latent per key in the FP8 FlashMLA layout, the indexer keys (FP8 + scale).
Each component's time is its roofline max(FLOPs / (peak · efficiency), bytes / (bandwidth · efficiency)); the
efficiencies are the stated assumptions (`Assumptions`) that calibrate the model against DeepSeek's figure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dsa_export.cost.assumptions import Assumptions
from dsa_export.models.cache import cache_row_bytes
from dsa_export.models.config import DSAConfig
from dsa_export.targets import GPUTarget

PHASES = ("prefill", "decode")
VARIANTS = ("dense", "dsa")


@dataclass(frozen=True)
class Component:
    name: str
    flops: float
    bytes: float
    fp8: bool  # runs on FP8 tensor cores where the GPU has them
    efficiency: str  # field of Assumptions


def token_components(config: DSAConfig, position: int, phase: str, variant: str,
                     decode_tokens_per_step: float = 1.0) -> list[Component]:
    """FLOPs and bytes of one token at `position` (keys it attends to), all layers; cache bytes in decode are shared
    by the `decode_tokens_per_step` tokens of one step."""
    c = config
    L, D, H = c.num_hidden_layers, c.hidden_size, c.num_attention_heads
    keys = max(position, 1)
    gemm = "gemm_prefill" if phase == "prefill" else "gemm_decode"
    mla_proj = 2 * (D * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim + D * (c.kv_lora_rank + c.qk_rope_head_dim)
                    + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D)
    dense_layers = c.first_k_dense_replace
    moe_layers = L - dense_layers
    mlp = 2 * 3 * D * c.intermediate_size
    moe = 2 * 3 * D * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts) + 2 * D * c.n_routed_experts
    mha_per_key = 2 * H * (c.qk_head_dim + c.v_head_dim)
    mqa_per_key = 2 * H * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    share = 1.0 / decode_tokens_per_step
    latent_row, index_key_row = cache_row_bytes(c, "fp8")  # DeepSeek's FP8 serving layouts
    latent_bytes, index_key_bytes = share * latent_row, share * index_key_row

    parts = [Component("mla_projections", L * mla_proj, 0, True, gemm),
             Component("dense_mlp", dense_layers * mlp, 0, True, gemm),
             Component("moe", moe_layers * moe, 0, True, gemm),
             Component("head", 2 * D * c.vocab_size, 0, False, gemm)]
    if phase == "prefill":
        dense_attention = L * mha_per_key * keys
        attention = (Component("attention_dense", dense_attention, 0, False, "attention_prefill") if variant == "dense"
                     else Component("attention_sparse", min(dense_attention, L * mqa_per_key * c.index_topk), 0, False,
                                    "sparse_attention"))
    elif variant == "dense":
        attention = Component("attention_dense", L * mqa_per_key * keys, L * latent_bytes * keys, False,
                              "attention_decode")
    else:
        attention = Component("attention_sparse", L * mqa_per_key * c.index_topk,
                              L * latent_bytes * min(keys, c.index_topk), False, "sparse_attention")
    parts.append(attention)
    if variant == "dsa":
        HI, DI = c.index_n_heads, c.index_head_dim
        projections = 2 * (c.q_lora_rank * HI * DI + D * DI + D * HI)
        parts.append(Component("indexer_projections", L * projections, 0, True, gemm))
        scored = keys if keys > c.index_topk else 0  # up to topk keys, all are kept: nothing to score
        parts.append(Component("indexer_scoring", L * (2 * HI * DI + 2 * HI) * scored,
                               L * index_key_bytes * scored if phase == "decode" else 0, True, "indexer"))
    return parts


def component_seconds(part: Component, gpu: GPUTarget, eff: Assumptions) -> float:
    peak = (gpu.fp8_tflops if part.fp8 and gpu.fp8_tflops else gpu.bf16_tflops) * 1e12
    compute = part.flops / (peak * getattr(eff, part.efficiency))
    memory = part.bytes / (gpu.hbm_tbps * 1e12 * eff.memory)
    return max(compute, memory)


def token_cost(config: DSAConfig, position: int, phase: str, variant: str, gpu: GPUTarget, eff: Assumptions,
               price_per_gpu_hour: float) -> dict:
    parts = token_components(config, position, phase, variant, eff.decode_tokens_per_step)
    seconds = {p.name: component_seconds(p, gpu, eff) for p in parts}
    total = sum(seconds.values())
    return {"position": position, "flops": sum(p.flops for p in parts), "bytes": sum(p.bytes for p in parts),
            "seconds": total, "usd_per_mtok": total * 1e6 * price_per_gpu_hour / 3600,
            "seconds_by_component": seconds, "flops_by_component": {p.name: p.flops for p in parts}}


def positions_grid(max_position: int = 131072, points: int = 65) -> list[int]:
    """0, then log-spaced up to max_position (plus every power of two), so both the start and the crossovers show."""
    grid = {0, max_position} | {2 ** i for i in range(4, int(math.log2(max_position)) + 1)}
    grid |= {int(round(math.exp(math.log(16) + i * (math.log(max_position) - math.log(16)) / (points - 1))))
             for i in range(points)}
    return sorted(grid)


def cost_curves(config: DSAConfig, gpu: GPUTarget, eff: Assumptions = Assumptions(), price: float = 2.0,
                positions: list[int] | None = None) -> dict:
    """Every point of every curve: {phase: {variant: [token_cost...]}}."""
    positions = positions or positions_grid()
    return {phase: {variant: [token_cost(config, t, phase, variant, gpu, eff, price) for t in positions]
                    for variant in VARIANTS} for phase in PHASES}


def crossover(config: DSAConfig, gpu: GPUTarget, eff: Assumptions, price: float, phase: str,
              max_position: int = 131072) -> int | None:
    """The first position (exact, to the token) from which DSA is cheaper than dense: the first point of the
    position grid where it is, then bisection down to the token before it. The one crossover figure every report
    gives."""
    def cheaper(t: int) -> bool:
        return (token_cost(config, t, phase, "dsa", gpu, eff, price)["usd_per_mtok"]
                < token_cost(config, t, phase, "dense", gpu, eff, price)["usd_per_mtok"])

    grid = [t for t in positions_grid(max_position) if t > 0]
    first = next((i for i, t in enumerate(grid) if cheaper(t)), None)
    if first is None:
        return None
    low, high = (grid[first - 1] if first else 0), grid[first]  # dense at low (or 0), DSA at high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if cheaper(middle) else (middle, high)
    return high


# Read off DeepSeek's Fig. 3 (H800, $2/GPU-hour), dsa-architecture.md "Anchors and numbers".
PAPER_POINTS = {
    ("prefill", "dense", 131072): 0.66, ("prefill", "dsa", 131072): 0.19,
    ("decode", "dense", 131072): 2.15, ("decode", "dsa", 131072): 0.25,
}
PAPER_CROSSOVERS = {"prefill": 10_000, "decode": 4_000}
ASSUMPTION_EFFECTS = {
    ("prefill", "dense"): "attention_prefill (and gemm_prefill)", ("prefill", "dsa"): "indexer, sparse_attention",
    ("decode", "dense"): "attention_decode (and memory)",
    ("decode", "dsa"): "decode_tokens_per_step, memory, indexer, sparse_attention",
}


def calibration(config: DSAConfig, gpu: GPUTarget, eff: Assumptions = Assumptions(), price: float = 2.0) -> dict:
    """The model's values beside the paper's read-off points, with relative errors."""
    rows = []
    for (phase, variant, position), paper in PAPER_POINTS.items():
        model = token_cost(config, position, phase, variant, gpu, eff, price)["usd_per_mtok"]
        rows.append({"phase": phase, "variant": variant, "position": position, "paper_usd": paper, "model_usd": model,
                     "relative_error": model / paper - 1, "moved_by": ASSUMPTION_EFFECTS[(phase, variant)]})
    crossings = [{"phase": phase, "paper_position": paper, "model_position": crossover(config, gpu, eff, price, phase)}
                 for phase, paper in PAPER_CROSSOVERS.items()]
    return {"gpu": gpu.name, "price_per_gpu_hour": price, "efficiency": asdict(eff), "points": rows,
            "crossovers": crossings}


# ---- one forward step of the exported graph, in closed form (what cost/graph.py checks the graph against) ----
@dataclass(frozen=True)
class StepCost:
    flops: float  # tensor-core work, as token_components counts it
    weight_bytes: float  # weights read: all but the routed experts no token chose; embedding rows gathered
    cache_bytes: float  # KV-cache rows read by the indexer and sparse MLA, and rows written

    def per_token(self, tokens: int) -> "StepCost":
        return StepCost(self.flops / tokens, self.weight_bytes / tokens, self.cache_bytes / tokens)


def step_cost(config: DSAConfig, batch: int, seq: int, past: int, weight_itemsize: int, cache_itemsize: int,
              expert_itemsize: int | None = None) -> StepCost:
    """FLOPs and memory traffic of one forward over `seq` tokens per row at positions past..past+seq-1 (batch rows
    aligned), the logits of each row's last token only (what a serving step needs), with the weights, caches and
    routed experts stored with the given bytes per element (FP8 experts: 1, plus their fp32 block scales)."""
    from dsa_export.models.model import DSAForCausalLM

    c = config
    tokens = batch * seq
    phase = "decode" if seq == 1 else "prefill"
    flops = batch * sum(sum(p.flops for p in token_components(c, past + s + 1, phase, "dsa")) for s in range(seq))
    flops -= (tokens - batch) * 2 * c.hidden_size * c.vocab_size  # no logits for a row's earlier tokens

    expert_itemsize = weight_itemsize if expert_itemsize is None else expert_itemsize
    routed = min(c.n_routed_experts, tokens * c.num_experts_per_tok)  # experts whose weights a MoE layer reads
    weight_bytes = 0.0
    for name, shape in _tensor_shapes(c).items():
        numel = math.prod(shape)
        if name.endswith("embed_tokens.weight"):
            weight_bytes += tokens * c.hidden_size * weight_itemsize
        elif ".mlp.experts." in name:
            expert = int(name.split(".mlp.experts.")[1].split(".")[0])
            if expert < routed:
                weight_bytes += numel * expert_itemsize
                if expert_itemsize == 1:  # FP8 codes + fp32 block scales
                    weight_bytes += 4 * math.prod(-(-d // b) for d, b in zip(shape, c.weight_block))
        else:
            weight_bytes += numel * (4 if name.endswith(DSAForCausalLM.FP32_PARAMS) else weight_itemsize)

    latent, index = c.kv_lora_rank + c.qk_rope_head_dim, c.index_head_dim
    index_reads = batch * (past + seq) * index if past + seq > c.index_topk else 0  # no token scores: none read
    latent_reads = batch * sum(min(c.index_topk, past + s + 1) for s in range(seq)) * latent
    writes = tokens * (latent + index)
    cache_bytes = c.num_hidden_layers * (index_reads + latent_reads + writes) * cache_itemsize
    return StepCost(flops, weight_bytes, cache_bytes)


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def _tensor_shapes(config: DSAConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor's shape, from the config's skeleton (built once per config and process)."""
    import json

    from dsa_export.models.checkpoint import expected_tensors

    key = json.dumps(config.to_hf_dict(), sort_keys=True, default=str)
    if key not in _SHAPES:
        _SHAPES[key] = {name: spec.shape for name, spec in expected_tensors(config).items()}
    return _SHAPES[key]
