"""The thresholds of the accuracy parity gate (no torch: the command line declares them as flags)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from dsa_export.errors import DSAExportError

PROMPT_BATCHES = ((17, 29), (23,), (11,))  # the lengths of the parity prompts, by batch (parity/accuracy.py)


def check_room(new_tokens: int, capacity: int) -> None:
    """The parity prompts and their greedy tokens fit the export's cache capacity (checked before any work)."""
    longest = max(n for batch in PROMPT_BATCHES for n in batch)
    if longest + new_tokens - 1 > capacity:
        raise DSAExportError(f"--new-tokens {new_tokens}: the parity prompts of up to {longest} tokens and their "
                             f"{new_tokens} new tokens do not fit the export's cache capacity {capacity} (at most "
                             f"{capacity - longest + 1} new tokens)")


@dataclass(frozen=True)
class Thresholds:
    max_abs_logits: float = 1e-3
    min_cosine: float = 0.9999
    max_kl: float = 1e-4
    min_top1: float = 1.0
    min_greedy_match: float = 1.0
    min_indexer_recall: float = 0.99

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise DSAExportError(f"parity threshold {f.name} must be a number >= 0, got {value!r}")
            if f.name.startswith("min_") and value > 1:
                raise DSAExportError(f"parity threshold {f.name} is a fraction in [0, 1], got {value!r}")

    def for_precision(self, precision: str) -> "Thresholds":
        """The gate for a backend computing in `precision` (its caches' dtype): these thresholds for float32; for
        bfloat16 (7-bit mantissas: logits off by ~0.1, a near-tie may flip a greedy token and everything after it)
        BF16_THRESHOLDS, or these where they are looser. Engines with TF32 would need the same; they are built with it
        off (exporter/engine.py). The MoE kernels sum with fp32 atomics, in any order: ~1e-6 relative, inside both."""
        if precision == "float32":
            return self
        low = BF16_THRESHOLDS
        return Thresholds(**{f.name: (min if f.name.startswith("min_") else max)(getattr(self, f.name),
                                                                               getattr(low, f.name))
                             for f in fields(self)})


BF16_THRESHOLDS = Thresholds(max_abs_logits=0.5, min_cosine=0.999, max_kl=0.02, min_top1=0.9, min_greedy_match=0.5,
                             min_indexer_recall=0.9)

