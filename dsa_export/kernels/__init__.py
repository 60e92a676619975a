"""Reference ops in plain torch, Triton kernels, torch.library registration of the dsa:: ops, AOT compilation per GPU."""

from dsa_export.kernels import ops
from dsa_export.models import dsa_ops
from dsa_export.models.model import DSAForCausalLM, DSAOps

# Eager runs: the dsa:: ops (reference on CPU, Triton on CUDA); caches written in place.
CUSTOM_OPS = DSAOps(ops.lightning_indexer, ops.sparse_mla, ops.routed_experts, ops.routed_experts_fp8,
                    dsa_ops.write_cache)
# Tracing for export: the same ops, and the functional cache write that becomes one ONNX TensorScatter per cache.
EXPORT_OPS = CUSTOM_OPS._replace(write_cache=ops.write_cache)


def use_custom_ops(model: DSAForCausalLM) -> DSAForCausalLM:
    """Route the model's DSA pieces and routed experts through `torch.ops.dsa.*` (reference on CPU, Triton on CUDA)."""
    model.ops = CUSTOM_OPS
    return model
