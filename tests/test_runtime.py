"""The runtime Session over backends: generation modes, limits, bad input; CUDA paths where a GPU exists."""

import pytest
import torch

from dsa_export.errors import DSAExportError
from dsa_export.runtime import EagerBackend, GraphBackend, Session
from conftest import TINY_CAPACITY


def test_sampled_generation_is_seeded_and_top_k_limited(tiny_onnx, tiny_config):
    session = Session(GraphBackend.onnxruntime(tiny_onnx))
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    a = session.generate(prompts, 6, temperature=1.0, top_k=5, seed=3)
    b = session.generate(prompts, 6, temperature=1.0, top_k=5, seed=3)
    assert a == b and all(len(row) == 6 for row in a)
    greedy = session.generate(prompts, 6)
    assert a != greedy  # sampling at temperature 1 does not follow the argmax everywhere
    # top_k=1 sampling is greedy
    assert session.generate(prompts, 6, temperature=1.0, top_k=1, seed=9) == greedy


def test_greedy_generation_is_the_same_on_eager_and_onnxruntime(tiny_onnx, tiny_model):
    """Prompts of different lengths (one longer than the indexer's top-k, so the selection drops keys)."""
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8], [7, 8, 9]]
    eager = Session(EagerBackend(tiny_model, capacity=TINY_CAPACITY))
    ort = Session(GraphBackend.onnxruntime(tiny_onnx))
    tokens = eager.generate(prompts, 8)
    assert ort.generate(prompts, 8) == tokens and [len(row) for row in tokens] == [8, 8]
    assert len({tuple(row) for row in tokens}) == 2  # the two rows really differ
    assert torch.equal(ort.lengths, eager.lengths) and ort.lengths.tolist() == [19 + 7, 3 + 7]


def test_decode_steps_are_bound_once_and_follow_the_thread_policy(tiny_onnx, tiny_model):
    """ONNX Runtime on the CPU: every decode step of a batch reuses one binding (inputs written in place, logits in
    the same buffer) and still gives the eager model's logits; the session has the threads asked for, spinning only
    while a step runs."""
    import numpy as np

    ort = GraphBackend.onnxruntime(tiny_onnx, threads=2)
    options = ort.graphs[0].session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    eager = EagerBackend(tiny_model, capacity=TINY_CAPACITY)
    prompts = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [7, 8, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]])
    caches = (ort.new_caches(2), eager.new_caches(2))
    ort.step(prompts, torch.arange(12).expand(2, -1), caches[0])
    eager.step(prompts, torch.arange(12).expand(2, -1), caches[1])
    buffers = []
    for position, tokens in enumerate([[11, 12], [13, 14], [15, 300]], start=12):
        ids, positions = torch.tensor(tokens)[:, None], torch.full((2, 1), position)
        got = ort.step(ids, positions, caches[0]).logits
        assert (got - eager.step(ids, positions, caches[1]).logits).abs().max() < 1e-3
        buffers.append(got.numpy())
    assert list(caches[0].bound) == [(2, 1)]  # one binding for every decode step of the batch
    assert all(np.shares_memory(buffers[0], b) for b in buffers[1:])  # its logits bound once


def test_session_rejects_sequences_longer_than_the_cache(tiny_model):
    session = Session(EagerBackend(tiny_model, capacity=8))
    session.prefill([[1, 2, 3, 4, 5, 6]])
    session.decode([1])
    session.decode([1])
    with pytest.raises(DSAExportError, match="9 tokens do not fit a cache of capacity 8"):
        session.decode([1])
    with pytest.raises(DSAExportError, match="a prompt of 2 tokens \\+ 8 new tokens does not fit the cache capacity 8"):
        session.generate([[1, 2]], max_new_tokens=8)
    with pytest.raises(DSAExportError, match="at least one token"):
        session.prefill([[1, 2], []])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_custom_ops_on_cuda_run_the_triton_kernels_and_match_the_reference():
    from dsa_export.kernels import CUSTOM_OPS
    from dsa_export.kernels.triton_write_cache import write_cache_triton
    from dsa_export.models import semantics

    gen = torch.Generator().manual_seed(0)
    # a pool of 4 blocks of 64 rows; sequence 0 owns blocks 2 then 0 (positions 70-72 cross into its second block),
    # sequence 1 block 3; packed tokens: 3 of sequence 0, 2 of sequence 1
    q, k, w = torch.randn(5, 8, 16, generator=gen), torch.randn(256, 16, generator=gen), torch.randn(5, 8, generator=gen)
    positions, sequence = torch.tensor([70, 71, 72, 0, 1]), torch.tensor([0, 0, 0, 1, 1], dtype=torch.int32)
    tables = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    got = CUSTOM_OPS.lightning_indexer(*(t.cuda() for t in (q, k, w, positions, sequence, tables)), 8, 64).cpu()
    expected = semantics.lightning_indexer(q, k, w, positions, sequence, tables, 8, 64)
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)
    assert set(expected[3].tolist()) == {192, -1}  # pool rows: sequence 1's position 0 is row 3·64
    mq, kv = torch.randn(5, 4, 40, generator=gen), torch.randn(256, 40, generator=gen)
    out = CUSTOM_OPS.sparse_mla(mq.cuda(), kv.cuda(), expected.cuda(), 0.2, 32).cpu()
    torch.testing.assert_close(out, semantics.sparse_mla(mq, kv, expected, 0.2, 32), atol=1e-4, rtol=1e-4)
    pool, rows = torch.randn(256, 40, generator=gen), torch.randn(5, 40, generator=gen)
    slots = torch.tensor([134, 135, 136, 192, 193])
    on_gpu = pool.cuda()
    written = write_cache_triton(on_gpu, rows.cuda(), slots.cuda())
    assert written.data_ptr() == on_gpu.data_ptr()  # in place
    assert torch.equal(written.cpu(), semantics.write_cache(pool.clone(), rows, slots))
    assert torch.equal(torch.ops.dsa.write_cache(pool.cuda(), rows.cuda(), slots.cuda()).cpu(), written.cpu())
    x, experts = torch.randn(5, 64, generator=gen), torch.randint(0, 8, (5, 2), generator=gen, dtype=torch.int32)
    weights, base = torch.rand(5, 2, generator=gen), torch.randn(5, 64, generator=gen)
    gate_up, down = torch.randn(8, 64, 64, generator=gen) / 8, torch.randn(8, 64, 32, generator=gen) / 6
    got = CUSTOM_OPS.routed_experts(*(t.cuda() for t in (x, experts, weights, gate_up, down, base))).cpu()
    torch.testing.assert_close(got, semantics.routed_experts(x, experts, weights, gate_up, down, base), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and onnxruntime-gpu")
def test_onnxruntime_prefers_the_cuda_provider_on_a_gpu(tiny_onnx):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime-gpu")
    assert GraphBackend.onnxruntime(tiny_onnx).providers[0] == "CUDAExecutionProvider"
