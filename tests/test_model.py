"""The eager model's own consistency: caches, attention paths, dense equivalence, padded batches (all fp32)."""

import pytest
import torch

from dsa_export.models import semantics
from dsa_export.models.cache import CacheFullError
from dsa_export.models.model import TORCH_SEMANTICS
from dsa_export.models.fp8 import fp8_act_roundtrip, hadamard_matrix, simulate_indexer_fp8
from conftest import random_ids

TOL = 1e-4


def run(model, ids, mode="sparse", **kw):
    model.attention = mode
    with torch.no_grad():
        return model(ids, **kw)


def test_prefill_then_decode_equals_full_forward(tiny_model, tiny_config):
    ids = random_ids(tiny_config, 2, 30)
    full = run(tiny_model, ids)
    cache = tiny_model.new_cache(2, 64)
    steps = [run(tiny_model, ids[:, :20], cache=cache)]
    steps += [run(tiny_model, ids[:, t:t + 1], cache=cache) for t in range(20, 30)]
    assert cache.length == 30
    assert (torch.cat(steps, 1) - full).abs().max() < TOL


def test_chunked_prefill_on_top_of_a_past(tiny_model, tiny_config):
    ids = random_ids(tiny_config, 2, 32, seed=1)
    full = run(tiny_model, ids)
    cache = tiny_model.new_cache(2, 64)
    chunks = [run(tiny_model, ids[:, a:b], cache=cache) for a, b in ((0, 12), (12, 25), (25, 32))]
    assert (torch.cat(chunks, 1) - full).abs().max() < TOL


def test_masked_dense_reference_equals_absorbed_topk_path(tiny_model, tiny_config):
    ids = random_ids(tiny_config, 2, 40, seed=2)
    assert 40 > tiny_config.index_topk
    sparse, masked, dense = (run(tiny_model, ids, mode) for mode in ("sparse", "masked", "dense"))
    assert (sparse - masked).abs().max() < TOL
    assert (sparse - dense).abs().max() > 1e-2  # the selection really drops keys at this length


def test_dsa_with_topk_covering_the_sequence_is_dense_mla(tiny_checkpoint, tiny_config):
    from dsa_export.models import load_checkpoint

    model = load_checkpoint(tiny_checkpoint, progress=False)
    for layer in model.model.layers:
        layer.self_attn.topk = 64
    ids = random_ids(tiny_config, 2, 40, seed=3)
    assert (run(model, ids, "sparse") - run(model, ids, "dense")).abs().max() < TOL


def test_batch_of_prompts_with_different_lengths(tiny_model, tiny_config):
    """Right-padded prompts in one batch, then per-row decode positions, equal each prompt run alone."""
    lengths, new_tokens = (13, 21), 4
    prompts = [random_ids(tiny_config, 1, n, seed=10 + n)[0] for n in lengths]
    singles = [run(tiny_model, torch.cat([p, torch.arange(new_tokens)])[None]) for p in prompts]

    padded = torch.zeros(2, max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
    cache = tiny_model.new_cache(2, 64)
    prefill = run(tiny_model, padded, cache=cache)
    decode = []
    for step in range(new_tokens):
        positions = torch.tensor([[n + step] for n in lengths])
        decode.append(run(tiny_model, torch.full((2, 1), step), positions=positions, cache=cache))
    for b, n in enumerate(lengths):
        assert (prefill[b, :n] - singles[b][0, :n]).abs().max() < TOL
        got = torch.cat([d[b] for d in decode])
        assert (got - singles[b][0, n:]).abs().max() < TOL


def test_positions_beyond_the_cache_or_not_consecutive_are_rejected(tiny_model, tiny_config):
    cache = tiny_model.new_cache(1, capacity=6)
    run(tiny_model, random_ids(tiny_config, 1, 4), cache=cache)
    before = [t.clone() for t in cache.tensors()]
    with pytest.raises(CacheFullError, match="7 tokens do not fit a cache of capacity 6"):
        run(tiny_model, random_ids(tiny_config, 1, 3), cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.tensors()))  # refused before any work
    with pytest.raises(ValueError, match="must be consecutive"):
        run(tiny_model, random_ids(tiny_config, 1, 4), positions=torch.tensor([[0, 1, 2, 9]]))


def test_indexer_fp8_simulation_keeps_the_first_layer_selection(tiny_model, tiny_config):
    h = hadamard_matrix(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16))
    x = torch.randn(4, 32)
    assert (fp8_act_roundtrip(x, 16) - x).abs().max() <= x.abs().max() / 8  # e4m3: 3 mantissa bits

    selections = []

    def spy(*args):
        selections.append(semantics.lightning_indexer(*args))
        return selections[-1]

    tiny_model.ops = TORCH_SEMANTICS._replace(lightning_indexer=spy)
    ids = random_ids(tiny_config, 2, 40, seed=4)
    run(tiny_model, ids)
    tiny_model.set_indexer_fp8_sim(True)
    run(tiny_model, ids)
    exact, simulated = selections[0], selections[tiny_config.num_hidden_layers]  # layer 0: identical inputs
    # FP8 (with the Hadamard rotation) only reorders near ties: most of the selected set survives, not all.
    same = sum(len(set(e.tolist()) & set(s.tolist()) - {-1}) for e, s in zip(exact.flatten(0, 1), simulated.flatten(0, 1)))
    recall = same / int((exact >= 0).sum())
    assert 0.9 < recall < 1.0


def test_indexer_fp8_simulation_rounds_the_rotation_to_the_input_dtype():
    """DeepSeek's rotate_activation returns bf16 in a bf16 model: the e4m3 codes come from the rounded rotation."""
    h = hadamard_matrix(128)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = simulate_indexer_fp8(x, h)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, fp8_act_roundtrip((x.float() @ h).to(torch.bfloat16), 128))
    quantised_in_fp32 = fp8_act_roundtrip(x.float() @ h, 128).to(torch.bfloat16)  # the old simulation
    assert 0.01 < (got != quantised_in_fp32).float().mean() < 0.1  # about 3% of the codes land one step off
    x32 = x.float()  # an fp32 model rotates and quantises in fp32
    assert torch.equal(simulate_indexer_fp8(x32, h), fp8_act_roundtrip(x32 @ h, 128))
