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
        if logits.shape[1] == 1:  # an export that returns the last position's logits only: right-padding moves it
            return self._last_logits_one_by_one(prompts, logits)
        return logits[torch.arange(len(prompts)), self.lengths - 1]

    def _last_logits_one_by_one(self, prompts, logits):
        if len(set(self.lengths.tolist())) == 1:
            return logits[:, -1]
        raise DSAExportError("prompts of different lengths need an export with logits for every position "
                             "(export without --last-logits-only)")

    def decode(self, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Append one token per row; returns the next-token logits [B,V]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).view(-1, 1)
        logits = self._run(tokens, self.lengths.view(-1, 1).clone()).logits
        self.lengths = self.lengths + 1
        return logits[:, -1]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, seed: int = 0) -> list[list[int]]:
        """Greedy (temperature 0) or sampled continuation of every prompt; returns the new tokens per prompt."""
        for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DSAExportError(f"{name} must be an integer >= 0, got {value!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise DSAExportError(f"temperature must be a number >= 0, got {temperature!r}")
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens - 1 > self.backend.capacity:
            raise CacheFullError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens does not fit the cache "
                                 f"capacity {self.backend.capacity}")
        gen = torch.Generator().manual_seed(seed)
        logits = self.prefill(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(max_new_tokens):
            tokens = pick_tokens(logits, temperature, top_k, gen)
            for row, token in zip(out, tokens.tolist()):
                row.append(token)
            if step + 1 < max_new_tokens:
                logits = self.decode(tokens)
        return out


def pick_tokens(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)
