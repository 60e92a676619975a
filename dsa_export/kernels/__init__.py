"""Reference ops in plain torch, Triton kernels, torch.library registration of the dsa:: ops, AOT compilation per GPU."""

from dsa_export.kernels import ops
from dsa_export.models.model import DSAForCausalLM, DSAOps

CUSTOM_OPS = DSAOps(ops.lightning_indexer, ops.sparse_mla)


def use_custom_ops(model: DSAForCausalLM) -> DSAForCausalLM:
    """Route the model's indexer and sparse attention through `torch.ops.dsa.*` (reference on CPU, Triton on CUDA)."""
    model.ops = CUSTOM_OPS
    return model
