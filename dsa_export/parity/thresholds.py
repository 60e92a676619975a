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
