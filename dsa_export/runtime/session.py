"""`Session`: prefill, decode steps and generation over any backend (runtime.Backend); owns the caches and each
row's length.

A batch of prompts of different lengths is right-padded for prefill; decode then feeds each row at its own position.
Row b's padding leaves junk in the caches only at positions >= its length, which its queries never see (key t is
visible to a query at position p iff t <= p) and which its next tokens overwrite.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dsa_export.errors import DSAExportError
from dsa_export.models.cache import CacheFullError
from dsa_export.models.sampling import sample


class Session:
    def __init__(self, backend):
        self.backend = backend
        self.caches = None
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.last = None  # the last StepResult, for parity checks

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor):
        self.last = self.backend.step(input_ids, positions, self.caches)
        return self.last

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Start new sequences; returns the logits [B,V] at each prompt's last token."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not prompts or not all(isinstance(p, (list, tuple)) for p in prompts):
            raise DSAExportError("prompts must be a list of token-id lists, e.g. [[1, 2, 3]]")
        if any(len(p) == 0 for p in prompts):
            raise DSAExportError("every prompt needs at least one token")
        self.lengths = torch.tensor([len(p) for p in prompts])
        ids = torch.zeros(len(prompts), int(self.lengths.max()), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = torch.as_tensor(prompt)
        if ids.shape[1] > self.backend.capacity:
            raise CacheFullError(f"a prompt of {ids.shape[1]} tokens does not fit the cache capacity "
                                 f"{self.backend.capacity}")
        self.caches = self.backend.new_caches(len(prompts))
        positions = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
        logits = self._run(ids, positions).logits
        return logits[torch.arange(len(prompts)), self.lengths - 1]

    def decode(self, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Append one token per row; returns the next-token logits [B,V]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).view(-1, 1)
        logits = self._run(tokens, self.lengths.view(-1, 1).clone()).logits
        self.lengths = self.lengths + 1
        return logits[:, -1]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
        """Greedy (temperature 0) or sampled continuation of every prompt (models/sampling.py, the server's own
        sampling); returns the new tokens per prompt."""
        for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DSAExportError(f"{name} must be an integer >= 0, got {value!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise DSAExportError(f"temperature must be a number >= 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise DSAExportError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens - 1 > self.backend.capacity:
            raise CacheFullError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens does not fit the cache "
                                 f"capacity {self.backend.capacity}")
        gen = torch.Generator().manual_seed(seed)
        logits = self.prefill(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        rows = len(prompts)
        settings = (torch.full((rows,), float(temperature)), torch.full((rows,), top_k, dtype=torch.int32),
                    torch.full((rows,), float(top_p)))
        for step in range(max_new_tokens):
            tokens, _ = sample(logits.float(), *settings, torch.rand(rows, generator=gen))
            for row, token in zip(out, tokens.tolist()):
                row.append(token)
            if step + 1 < max_new_tokens:
                logits = self.decode(tokens)
        return out

