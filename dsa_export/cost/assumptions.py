"""The cost model's stated assumptions (no torch: the command line declares them as flags)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from dsa_export.errors import DSAExportError


@dataclass(frozen=True)
class Assumptions:
    """The model's assumptions: fractions of peak each kind of kernel reaches, and tokens per decode step.
    Defaults are fitted to the paper's H800 figure (see `calibration`, which lists the point each one moves)."""
    gemm_prefill: float = 0.38  # FP8 GEMMs of a prefill batch (projections, experts, head): moves both curves at 0
    gemm_decode: float = 0.30  # the same in decode batches (smaller GEMMs, expert imbalance)
    attention_prefill: float = 0.60  # dense MHA-mode attention: moves dense prefill at long context
    attention_decode: float = 0.60  # dense MQA-mode decode (FlashMLA alone: ~660 TFLOPS = 0.67 of H800): dense slope
    sparse_attention: float = 0.41  # top-k sparse MLA (FlashMLA sparse decode ~410 TFLOPS): DSA's floor
    indexer: float = 0.40  # FP8 indexer scoring: DSA's slope at long context
    memory: float = 0.80  # achieved / peak HBM bandwidth, for the cache reads in decode
    # Tokens decoded per step and sequence: DeepSeek serves with MTP (1 speculative token, FlashMLA's s_q=2), so one
    # read of a sequence's caches serves 2 tokens. Moves DSA decode at long context (memory-bound indexer reads).
    decode_tokens_per_step: float = 2.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            if f.name == "decode_tokens_per_step":
                if not number or not value >= 1:
                    raise DSAExportError(f"cost assumption {f.name} must be >= 1, got {value!r}")
            elif not number or not 0 < value <= 1:
                raise DSAExportError(f"cost assumption {f.name} is a fraction of peak in (0, 1], got {value!r}")
