"""`torch.ops.dsa.lightning_indexer` and `torch.ops.dsa.sparse_mla`: schemas from the contracts, fake (meta)
implementations so `torch.export` keeps each as one node, the tiled reference on CPU, the Triton kernels on CUDA.
"""

from __future__ import annotations

import torch

from dsa_export.kernels.reference import lightning_indexer_reference, sparse_mla_reference
from dsa_export.plugins.contracts import LIGHTNING_INDEXER, SPARSE_MLA

_LIB = torch.library.Library("dsa", "DEF")
for _contract in (LIGHTNING_INDEXER, SPARSE_MLA):
    _LIB.define(_contract.torch_schema())


# ---- lightning_indexer --------------------------------------------------------------------------------------------------
@torch.library.register_fake(LIGHTNING_INDEXER.qualified_name)
def _lightning_indexer_fake(q, k, w, positions, topk):
    return q.new_empty((q.shape[0], q.shape[1], topk), dtype=torch.int32)


@torch.library.impl(LIGHTNING_INDEXER.qualified_name, "cpu")
def _lightning_indexer_cpu(q, k, w, positions, topk):
    return lightning_indexer_reference(q, k, w, positions, topk)


@torch.library.impl(LIGHTNING_INDEXER.qualified_name, "cuda")
def _lightning_indexer_cuda(q, k, w, positions, topk):
    from dsa_export.kernels.triton_indexer import lightning_indexer_triton

    return lightning_indexer_triton(q, k, w, positions, topk)


# ---- sparse_mla -------------------------------------------------------------------------------------------------------
@torch.library.register_fake(SPARSE_MLA.qualified_name)
def _sparse_mla_fake(q, kv, indices, scale, dv):
    return q.new_empty((*q.shape[:3], dv))


@torch.library.impl(SPARSE_MLA.qualified_name, "cpu")
def _sparse_mla_cpu(q, kv, indices, scale, dv):
    return sparse_mla_reference(q, kv, indices, scale, dv)


@torch.library.impl(SPARSE_MLA.qualified_name, "cuda")
def _sparse_mla_cuda(q, kv, indices, scale, dv):
    from dsa_export.kernels.triton_sparse_mla import sparse_mla_triton

    return sparse_mla_triton(q, kv, indices, scale, dv)


lightning_indexer = torch.ops.dsa.lightning_indexer
sparse_mla = torch.ops.dsa.sparse_mla
