"""`torch.ops.dsa.*`: schemas from the contracts, fake (meta) implementations so `torch.export` keeps each op as one
node, the CPU references, the Triton kernels on CUDA. `dsa::write_cache` is functional here (a new pool): the export
turns it into one dsa::WriteCache node whose output is its input (eagerly the model writes its pools in place
instead: kernels/__init__.py).
"""

from __future__ import annotations

import torch

from dsa_export.contracts import (CONTRACTS, LIGHTNING_INDEXER, ROUTED_EXPERTS, ROUTED_EXPERTS_FP8, SPARSE_MLA,
                                  WRITE_CACHE)
from dsa_export.kernels.reference import (lightning_indexer_reference, routed_experts_reference,
                                          sparse_mla_reference)
from dsa_export.models import semantics

_LIB = torch.library.Library("dsa", "DEF")
for _contract in CONTRACTS:
    _LIB.define(_contract.torch_schema())


def _fake(contract):
    """The op's fake (meta) implementation: the output's shape and dtype by the contract's rules, so torch.export
    keeps the op as one node."""
    names = [t.name for t in contract.inputs] + [a.name for a in contract.attributes]

    def fake(*args):
        values = dict(zip(names, args))
        tensors = {t.name: values[t.name] for t in contract.inputs}
        dims = contract.named_dims({k: t.shape for k, t in tensors.items()}, values)
        dtype = contract.output_dtype({k: t.dtype for k, t in tensors.items()})
        first = tensors[contract.inputs[0].name]
        return first.new_empty(contract.output_dims(dims), dtype=getattr(torch, dtype) if isinstance(dtype, str)
                               else dtype)

    return fake


for _contract in CONTRACTS:
    torch.library.register_fake(_contract.qualified_name)(_fake(_contract))


# ---- lightning_indexer --------------------------------------------------------------------------------------------------
@torch.library.impl(LIGHTNING_INDEXER.qualified_name, "cpu")
def _lightning_indexer_cpu(q, k, w, positions, sequence, block_tables, topk, block_size):
    return lightning_indexer_reference(q, k, w, positions, sequence, block_tables, topk, block_size)


@torch.library.impl(LIGHTNING_INDEXER.qualified_name, "cuda")
def _lightning_indexer_cuda(q, k, w, positions, sequence, block_tables, topk, block_size):
    from dsa_export.kernels.triton_indexer import lightning_indexer_triton

    return lightning_indexer_triton(q, k, w, positions, sequence, block_tables, topk, block_size)


# ---- sparse_mla -------------------------------------------------------------------------------------------------------
@torch.library.impl(SPARSE_MLA.qualified_name, "cpu")
def _sparse_mla_cpu(q, kv, indices, scale, dv):
    return sparse_mla_reference(q, kv, indices, scale, dv)


@torch.library.impl(SPARSE_MLA.qualified_name, "cuda")
def _sparse_mla_cuda(q, kv, indices, scale, dv):
    from dsa_export.kernels.triton_sparse_mla import sparse_mla_triton

    return sparse_mla_triton(q, kv, indices, scale, dv)


# ---- routed_experts / routed_experts_fp8 ---------------------------------------------------------------------------
@torch.library.impl(ROUTED_EXPERTS.qualified_name, "cpu")
def _routed_experts_cpu(x, experts, weights, gate_up, down, base):
    return routed_experts_reference(x, experts, weights, gate_up, down, base)


@torch.library.impl(ROUTED_EXPERTS.qualified_name, "cuda")
def _routed_experts_cuda(x, experts, weights, gate_up, down, base):
    from dsa_export.kernels.triton_moe import routed_experts_triton

    return routed_experts_triton(x, experts, weights, gate_up, down, base)


@torch.library.impl(ROUTED_EXPERTS_FP8.qualified_name, "cpu")
def _routed_experts_fp8_cpu(x, experts, weights, gate_up, gate_up_scale, down, down_scale, base, block_out, block_in):
    return routed_experts_reference(x, experts, weights, gate_up, down, base,
                                    (gate_up_scale, down_scale, block_out, block_in))


@torch.library.impl(ROUTED_EXPERTS_FP8.qualified_name, "cuda")
def _routed_experts_fp8_cuda(x, experts, weights, gate_up, gate_up_scale, down, down_scale, base, block_out,
                             block_in):
    from dsa_export.kernels.triton_moe import routed_experts_triton

    return routed_experts_triton(x, experts, weights, gate_up, down, base,
                                 (gate_up_scale, down_scale, block_out, block_in))


# ---- write_cache -----------------------------------------------------------------------------------------------------
@torch.library.impl(WRITE_CACHE.qualified_name, "cpu")
def _write_cache_cpu(cache, rows, slots):
    return semantics.write_cache(cache.clone(), rows, slots)  # functional: the export makes it in place


@torch.library.impl(WRITE_CACHE.qualified_name, "cuda")
def _write_cache_cuda(cache, rows, slots):
    from dsa_export.kernels.triton_write_cache import write_cache_triton

    return write_cache_triton(cache.clone(), rows, slots)


lightning_indexer = torch.ops.dsa.lightning_indexer
sparse_mla = torch.ops.dsa.sparse_mla
routed_experts = torch.ops.dsa.routed_experts
routed_experts_fp8 = torch.ops.dsa.routed_experts_fp8
write_cache = torch.ops.dsa.write_cache
