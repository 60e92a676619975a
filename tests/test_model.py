"""The eager model's own consistency: caches, attention paths, dense equivalence, padded batches (all fp32)."""

import pytest
import torch

from dsa_export.errors import DSAExportError
from dsa_export.models import semantics
from dsa_export.models.cache import BLOCK_SIZE, CacheFullError, Paging, cache_layout
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


def test_kv_cache_is_whole_blocks_of_a_pool_per_sequence(tiny_model, tiny_config):
    cache = tiny_model.new_cache(2, capacity=100)
    assert (cache.batch, cache.capacity, cache.rows) == (2, 100, 2 * BLOCK_SIZE)  # 100 rows round up to 2 blocks
    assert [tuple(t.shape) for t in cache.tensors()] == [(2 * 128, t.width) for t in cache_layout(tiny_config)]
    views = cache.sequences()
    assert [tuple(v.shape) for v in views] == [(2, 128, t.width) for t in cache_layout(tiny_config)]
    assert all(v.data_ptr() == t.data_ptr() for v, t in zip(views, cache.tensors()))  # views of the pools
    paging = Paging.identity(torch.tensor([[5, 6], [0, 1]]), cache.rows)
    assert paging.slots.tolist() == [5, 6, 128, 129] and paging.sequence.tolist() == [0, 0, 1, 1]
    assert paging.block_tables.tolist() == [[0, 1], [2, 3]] and paging.contiguous == (2, 2, 128)
    run(tiny_model, random_ids(tiny_config, 2, 3), cache=cache)
    for view in views:  # sequence b's rows 0-2 are written into its own part of the pool, nothing beyond
        assert (view[:, :3] != 0).any(-1).all() and not view[:, 3:].any()


def test_blocks_anywhere_in_the_pool_give_the_identity_paging_result(tiny_model, tiny_config):
    """The same two 70-token sequences (each crossing a block boundary) packed into one step over pools whose blocks
    are handed out in another order: the same logits, the same rows (moved with their blocks), the indexer's pool
    rows mapped back by `Paging.logical` to the identity's positions; `logits_index` picks tokens' logits."""
    ids = random_ids(tiny_config, 2, 70, seed=5)
    positions = torch.arange(70).expand(2, -1).contiguous()
    selections = {}

    def ops(name):
        def indexer(*args):
            selections.setdefault(name, []).append(semantics.lightning_indexer(*args))
            return selections[name][-1]
        return TORCH_SEMANTICS._replace(lightning_indexer=indexer)

    cache = tiny_model.new_cache(2, capacity=128)  # identity: sequence 0 blocks 0, 1; sequence 1 blocks 2, 3
    identity = Paging.identity(positions, cache.rows)
    with torch.no_grad():
        expected, _, _ = tiny_model.forward_with_cache(ids, positions, cache.latent, cache.index_keys, identity,
                                                       ops("identity"))
    tables = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)  # sequence 0: blocks 3 then 0; sequence 1: 1 then 2
    sequence = torch.arange(2, dtype=torch.int32).repeat_interleave(70)
    flat = positions.reshape(-1)
    slots = tables[sequence.long(), flat // BLOCK_SIZE].long() * BLOCK_SIZE + flat % BLOCK_SIZE
    paged = Paging(flat, sequence, slots, tables)
    latent = [torch.zeros_like(t) for t in cache.latent]
    index_keys = [torch.zeros_like(t) for t in cache.index_keys]
    picks = torch.tensor([69, 139, 3])
    with torch.no_grad():
        logits, _, _ = tiny_model.forward_with_cache(ids.reshape(1, -1), flat[None], latent, index_keys, paged,
                                                     ops("paged"))
        picked, _, _ = tiny_model.forward_with_cache(ids.reshape(1, -1), flat[None], latent, index_keys, paged,
                                                     logits_index=picks)
    assert (logits.view(2, 70, -1) - expected).abs().max() < TOL
    assert (picked - logits[0, picks]).abs().max() < TOL and picked.shape == (3, tiny_config.vocab_size)
    moved = torch.tensor([3, 0, 1, 2])  # identity block b now lives in block moved[b]
    for new, old in zip(latent + index_keys, cache.tensors()):
        assert torch.equal(new.view(4, BLOCK_SIZE, -1)[moved], old.view(4, BLOCK_SIZE, -1))
    for rows, reference in zip(selections["paged"], selections["identity"]):
        assert not torch.equal(rows, reference)  # other pool rows ...
        assert torch.equal(paged.logical(rows).sort(-1).values, identity.logical(reference).sort(-1).values)
    with pytest.raises(DSAExportError, match="attention mode 'masked' needs the eager model's own cache"):
        tiny_model.forward_with_cache(ids.reshape(1, -1), flat[None], latent, index_keys, paged, attention="masked")


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
    assert exact.shape == (2 * 40, tiny_config.index_topk)  # packed tokens [N, topk]
    same = sum(len(set(e.tolist()) & set(s.tolist()) - {-1}) for e, s in zip(exact, simulated))
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
