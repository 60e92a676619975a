"""Reference ops in plain torch, Triton kernels, torch.library registration of the dsa:: ops, AOT compilation per GPU."""

from dsa_export.kernels import registration
from dsa_export.models import semantics
from dsa_export.models.model import DSAForCausalLM, DSAOps

# Eager runs: the dsa:: ops (reference on CPU, Triton on CUDA); caches written in place.
CUSTOM_OPS = DSAOps(registration.lightning_indexer, registration.sparse_mla, registration.routed_experts,
                    registration.routed_experts_fp8, semantics.write_cache)
# Tracing for export: the same ops, and the functional cache write that becomes one dsa::WriteCache node per pool.
EXPORT_OPS = CUSTOM_OPS._replace(write_cache=registration.write_cache)


def use_custom_ops(model: DSAForCausalLM) -> DSAForCausalLM:
    """Route the model's DSA pieces and routed experts through `torch.ops.dsa.*` (reference on CPU, Triton on CUDA)."""
    model.ops = CUSTOM_OPS
    return model
