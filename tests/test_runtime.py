"""The runtime Session over backends: generation modes, limits, bad input; CUDA paths where a GPU exists."""

import pytest
import torch

from dsa_export.errors import DSAExportError
from dsa_export.runtime import EagerBackend, GraphBackend, Session


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
    from dsa_export.models import semantics

    gen = torch.Generator().manual_seed(0)
    q, k, w = torch.randn(2, 3, 8, 16, generator=gen), torch.randn(2, 40, 16, generator=gen), torch.randn(2, 3, 8, generator=gen)
    positions = (37 + torch.arange(3)).expand(2, 3).contiguous()
    got = CUSTOM_OPS.lightning_indexer(q.cuda(), k.cuda(), w.cuda(), positions.cuda(), 8).cpu()
    expected = semantics.lightning_indexer(q, k, w, positions, 8)
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)
    mq, kv = torch.randn(2, 3, 4, 40, generator=gen), torch.randn(2, 40, 40, generator=gen)
    out = CUSTOM_OPS.sparse_mla(mq.cuda(), kv.cuda(), expected.cuda(), 0.2, 32).cpu()
    torch.testing.assert_close(out, semantics.sparse_mla(mq, kv, expected, 0.2, 32), atol=1e-4, rtol=1e-4)
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
