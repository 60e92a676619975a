"""Pipeline stages across GPUs (exporter/partition.py): the 671B plan checked against a hand computation, the split
against brute force, refusals with the shortfall, and `dsa-export plan` as a user runs it."""

import itertools
import math
import random

import pytest
import torch

from dsa_export.cli import main
from dsa_export.errors import DSAExportError
from dsa_export.exporter.plan import EngineShapes
from dsa_export.exporter.plan import check_plan, plan_pipeline, split_layers
from dsa_export.models import get_preset
from dsa_export.targets import get_target

GiB = 2**30


def hand_weights(c, bf16=2, fp32=4):
    """DeepSeek-V3.2-Exp's bytes per layer, written out from the config (bf16, FP8 experts with fp32 scales)."""
    H, heads, nope, rope, v = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    attention = bf16 * (H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * (nope + rope)
                        + H * (c.kv_lora_rank + rope) + c.kv_lora_rank + c.kv_lora_rank * heads * (nope + v)
                        + heads * v * H)
    indexer = bf16 * (c.q_lora_rank * c.index_n_heads * c.index_head_dim + H * c.index_head_dim
                      + 2 * c.index_head_dim) + fp32 * H * c.index_n_heads  # weights_proj stays fp32
    norms = bf16 * 2 * H
    dense = bf16 * 3 * H * c.intermediate_size
    E, inter = c.n_routed_experts, c.moe_intermediate_size
    scales = fp32 * E * (2 * math.ceil(inter / 128) * math.ceil(H / 128) + math.ceil(H / 128) * math.ceil(inter / 128))
    moe = (bf16 * E * H + fp32 * E  # gate + its correction bias
           + E * 3 * inter * H + scales  # routed experts, one byte per parameter
           + bf16 * 3 * H * inter * c.n_shared_experts)
    layers = [attention + indexer + norms + (moe if c.is_moe_layer(i) else dense) for i in range(c.num_hidden_layers)]
    return bf16 * c.vocab_size * H, layers, bf16 * (H + c.vocab_size * H)


def test_the_671b_plan_on_8_h200_matches_a_hand_computation(capsys):
    config = get_preset("v3.2-exp")
    shapes = EngineShapes()  # steps of up to 8 sequences and 8192 tokens; the pool: 8 sequences at the capacity
    plan = plan_pipeline(config, get_target("h200"), torch.bfloat16, True, None, shapes, 4.0, gpus=8)
    embed, layers, head = hand_weights(config)
    cache_row = (config.kv_lora_rank + config.qk_rope_head_dim + config.index_head_dim) * 2  # bf16 latent + key
    capacity = 131072  # min(max_position_embeddings, 128K): 2048 blocks of 64
    pool = 8 * capacity  # rows of every layer's pools: 8 sequences at the capacity
    logits = 8 * config.vocab_size * 4  # fp32 logits of the step's 8 samples (each sequence's next token)
    assert plan.gpus == 8 and plan.fits
    assert (plan.pool_rows, plan.capacity, plan.pool_sequences) == (pool, capacity, 8)
    record = plan.to_json()
    assert (record["pool_tokens"], record["capacity"], record["pool_sequences_at_capacity"]) == (pool, capacity, 8)
    assert [s.layers for s in plan.stages] == [(0, 10), (10, 17), (17, 24), (24, 31), (31, 38), (38, 46), (46, 54),
                                               (54, 61)]
    for i, stage in enumerate(plan.stages):
        start, stop = stage.layers
        weights = sum(layers[start:stop]) + (embed if i == 0 else 0) + (head if i == 7 else 0)
        assert stage.weights == weights
        assert stage.caches == (stop - start) * cache_row * pool
        assert stage.activations == 256 * 2**20 + (logits if i == 7 else 0)
        assert stage.workspace == 4 * GiB
        assert stage.total == weights + stage.caches + stage.activations + stage.workspace
    # the whole model: 671B parameters in about 690 GB as DeepSeek ships them (FP8 experts)
    assert 650e9 < embed + sum(layers) + head < 700e9
    # no other cut into 8 has a smaller largest stage (7 or 8 MoE layers per GPU: 8 somewhere)
    assert plan.largest.total / 1e9 == pytest.approx(110.55, abs=0.01)

    assert main(["plan", "--preset", "v3.2-exp", "--gpu", "h200", "--gpus", "8", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "61 layers on 8 x h200 (141 GB each); bf16 weights and caches, FP8 routed experts" in out
    for i, stage in enumerate(plan.stages):
        row = next(line.split() for line in out.splitlines() if line.split()[:1] == [str(i)])
        assert row[1:3] == ["0", f"{stage.layers[0]}-{stage.layers[1] - 1}"]  # one node of 8
        assert row[3] == f"{stage.weights / 1e9:.2f}" and row[7] == f"{stage.total / 1e9:.2f}"
        assert row[9] == f"{(141e9 - stage.total) / 1e9:.2f}"
    assert "node 0:" not in out  # a single node: no node lines


def test_the_671b_plan_on_h100s_with_fp8_experts_spans_two_nodes(capsys):
    """`dsa-export plan --preset v3.2-exp --gpu h100 --dtype bf16` (FP8 experts as shipped): the fewest H100s that
    hold it are 12 (11 cannot: its largest stage is over 80 GB), on two nodes of 8 GPUs: stages 0-7 and 8-11, each
    GPU's bytes as written out by hand."""
    config = get_preset("v3.2-exp")
    embed, layers, head = hand_weights(config)
    cache_row = (config.kv_lora_rank + config.qk_rope_head_dim + config.index_head_dim) * 2  # bf16 latent + key
    pool = 8 * 131072
    plan = plan_pipeline(config, get_target("h100"), torch.bfloat16, True, None, EngineShapes(), 4.0)
    assert plan.gpus == 12 and plan.fits and plan.nodes == [list(range(8)), [8, 9, 10, 11]]
    assert not plan_pipeline(config, get_target("h100"), torch.bfloat16, True, None, EngineShapes(), 4.0, 11).fits
    totals = []
    for i, stage in enumerate(plan.stages):
        start, stop = stage.layers
        weights = sum(layers[start:stop]) + (embed if i == 0 else 0) + (head if i == 11 else 0)
        activations = 256 * 2**20 + (8 * config.vocab_size * 4 if i == 11 else 0)
        totals.append(weights + (stop - start) * cache_row * pool + activations + 4 * GiB)
        assert stage.total == totals[-1] <= 80e9
    record = plan.to_json()
    assert [(n["stages"], n["gpus"], n["layers"]) for n in record["nodes"]] == \
        [(list(range(8)), 8, [0, plan.stages[7].layers[1]]), ([8, 9, 10, 11], 4, [plan.stages[8].layers[0], 61])]
    assert [n["total_gb"] for n in record["nodes"]] == pytest.approx([sum(totals[:8]) / 1e9, sum(totals[8:]) / 1e9])

    assert main(["plan", "--preset", "v3.2-exp", "--gpu", "h100", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "61 layers on 12 x h100 (80 GB each); bf16 weights and caches, FP8 routed experts" in out
    for i, stage in enumerate(plan.stages):
        row = next(line.split() for line in out.splitlines() if line.split()[:1] == [str(i)])
        assert row[1] == str(i // 8) and row[7] == f"{totals[i] / 1e9:.2f}"  # its node, its GPU's GB
    last = plan.stages[7].layers[1] - 1
    assert f"node 0: stages 0-7 (layers 0-{last}) on 8 x h100, {sum(totals[:8]) / 1e9:.2f} GB of 640 GB" in out
    assert f"node 1: stages 8-11 (layers {last + 1}-60) on 4 x h100, {sum(totals[8:]) / 1e9:.2f} GB of 320 GB" in out
    assert main(["plan", "--preset", "v3.2-exp", "--gpu", "h100", "--dtype", "bf16", "--gpus-per-node", "4"]) == 0
    assert "node 2: stages 8-11" in capsys.readouterr().out


def test_the_pool_is_sized_from_pool_tokens_in_whole_blocks(capsys):
    """--pool-tokens 300000: 4688 blocks of 64 rows (300,032 rows, 2 sequences at the 128K capacity) in every layer's
    latent and key pools; the weights, activations and workspace as without it."""
    config = get_preset("v3.2-exp")
    embed, layers, head = hand_weights(config)
    cache_row = (config.kv_lora_rank + config.qk_rope_head_dim + config.index_head_dim) * 2
    rows = 4688 * 64
    assert EngineShapes(pool_tokens=300_000).pool_rows(131072) == rows == 300_032
    assert EngineShapes(max_batch=3).pool_rows(100) == 3 * 128  # default: max_batch sequences of whole blocks
    assert EngineShapes(max_batch=3, max_tokens=10).step_tokens(100) == 10
    assert EngineShapes(max_batch=16, max_tokens=8, pool_tokens=200).step_tokens(100) == 16  # a token per sequence
    assert EngineShapes(max_tokens=8192, pool_tokens=200).step_tokens(100) == 256  # no more than the pool holds
    shapes = EngineShapes(pool_tokens=300_000)
    plan = plan_pipeline(config, get_target("h200"), torch.bfloat16, True, None, shapes, 4.0, gpus=8)
    assert (plan.pool_rows, plan.pool_sequences) == (rows, 2) and plan.fits
    full = plan_pipeline(config, get_target("h200"), torch.bfloat16, True, None, EngineShapes(), 4.0, gpus=8)
    for i, (stage, other) in enumerate(zip(plan.stages, full.stages)):
        start, stop = stage.layers
        assert stage.layers == other.layers  # the same cut: every stage holds the same share of its pools
        assert stage.weights == sum(layers[start:stop]) + (embed if i == 0 else 0) + (head if i == 7 else 0)
        assert stage.caches == (stop - start) * cache_row * rows
        assert stage.activations == 256 * 2**20 + (8 * config.vocab_size * 4 if i == 7 else 0)
        assert stage.total == stage.weights + stage.caches + stage.activations + 4 * GiB
    assert plan.largest.layers == (38, 46) and plan.largest.caches == 8 * 1408 * 300_032  # 3.38 GB

    assert main(["plan", "--preset", "v3.2-exp", "--gpu", "h200", "--gpus", "8", "--dtype", "bf16",
                 "--pool-tokens", "300000"]) == 0
    out = capsys.readouterr().out
    for i, stage in enumerate(plan.stages):
        row = next(line.split() for line in out.splitlines() if line.split()[:1] == [str(i)])
        assert row[4] == f"{(stage.layers[1] - stage.layers[0]) * cache_row * rows / 1e9:.2f}"  # caches GB
        assert row[7] == f"{stage.total / 1e9:.2f}"

    # ten million tokens of pool: 14.08 GB per layer, more than 8 GPUs can hold beside the weights
    huge = plan_pipeline(config, get_target("h200"), torch.bfloat16, True, None, EngineShapes(pool_tokens=10**7),
                         4.0, gpus=8)
    assert not huge.fits and huge.largest.caches == 8 * 1408 * 10**7
    assert main(["plan", "--preset", "v3.2-exp", "--gpu", "h200", "--gpus", "8", "--dtype", "bf16",
                 "--pool-tokens", "10000000"]) == 2
    assert f"{huge.shortfall / 1e9:.1f} GB short; use more GPUs (--gpus), FP8 experts, a smaller --pool-tokens" in \
        capsys.readouterr().err
    fewest = plan_pipeline(config, get_target("h200"), torch.bfloat16, True, None, EngineShapes(pool_tokens=10**7),
                           4.0)
    assert fewest.fits and not plan_pipeline(config, get_target("h200"), torch.bfloat16, True, None,
                                             EngineShapes(pool_tokens=10**7), 4.0, gpus=fewest.gpus - 1).fits
    assert fewest.gpus > plan_pipeline(config, get_target("h200"), torch.bfloat16, True, None, EngineShapes(),
                                       4.0).gpus


def test_bf16_experts_on_8_h100_are_refused_with_the_shortfall():
    plan = plan_pipeline(get_preset("v3.2-exp"), get_target("h100"), torch.bfloat16, False, None, EngineShapes(),
                         4.0, gpus=8)
    assert not plan.fits and plan.shortfall / 1e9 == pytest.approx(plan.largest.total / 1e9 - 80)
    with pytest.raises(DSAExportError, match=rf"8 x h100: .* {plan.shortfall / 1e9:.1f} GB short"):
        check_plan(plan)


def test_the_default_is_the_fewest_gpus_that_fit():
    config, target = get_preset("v3.2-exp"), get_target("h100")
    plan = plan_pipeline(config, target, torch.bfloat16, True, None, EngineShapes(), 4.0)
    assert plan.fits
    fewer = plan_pipeline(config, target, torch.bfloat16, True, None, EngineShapes(), 4.0, gpus=plan.gpus - 1)
    assert not fewer.fits
    assert plan_pipeline(get_preset("tiny"), target, torch.float32, False, 64, EngineShapes(), 4.0).gpus == 1


def test_the_split_is_the_best_contiguous_one():
    rng = random.Random(0)
    for _ in range(30):
        costs = [rng.randrange(1, 100) for _ in range(rng.randrange(2, 9))]
        first, last, parts = rng.randrange(0, 150), rng.randrange(0, 150), rng.randrange(1, 4)
        parts = min(parts, len(costs))

        def worst(cuts):
            bounds = [0, *cuts, len(costs)]
            return max(sum(costs[a:b]) + (first if a == 0 else 0) + (last if b == len(costs) else 0)
                       for a, b in zip(bounds, bounds[1:]))

        best = min(worst(c) for c in itertools.combinations(range(1, len(costs)), parts - 1))
        ranges = split_layers(costs, first, last, parts)
        assert [a for a, _ in ranges][1:] == [b for _, b in ranges][:-1] and ranges[0][0] == 0
        assert worst([a for a, _ in ranges][1:]) == best
