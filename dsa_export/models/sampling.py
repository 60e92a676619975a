"""Picking the next token from a step's logits, per row: greedy, or sampled with temperature, top-k and top-p.

One function, `sample`, for the eager model and the exported graph alike (it is traced into the graph's last
stage, so only token ids and their log-probabilities leave a step). Randomness comes in as one uniform number per
row, drawn by the caller from the request's own seeded generator: a request's tokens do not depend on what else is in
its batch. Sampling draws among the SAMPLE_CANDIDATES most likely tokens of a row (top_k = 0 means all of them):
TensorRT's TopK takes K < 3840, and at any temperature a model puts almost no mass beyond its top thousand tokens.
"""

from __future__ import annotations

import torch

SAMPLE_CANDIDATES = 1024


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [L] int64, logprobs [L] fp32) from logits [L,V] fp32 and per-row temperature [L] (0: greedy, the
    first maximum), top_k [L] int (0: all candidates), top_p [L] in (0, 1] and uniform [L] in [0, 1). logprobs are the
    model's own log-probabilities of the tokens chosen (before temperature and truncation)."""
    greedy = logits.argmax(-1)
    candidates = min(SAMPLE_CANDIDATES, logits.shape[-1])
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    values, ids = scaled.topk(candidates, dim=-1)  # sorted, descending
    rank = torch.arange(candidates, device=logits.device)[None, :]
    kept = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = torch.softmax(values.masked_fill(~kept, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs  # the mass of the candidates ranked above: the first one always stays
    probs = probs * (before < top_p[:, None]).float()
    cumulative = probs.cumsum(-1)
    below = cumulative < uniform[:, None] * cumulative[:, -1:]  # inverse CDF: the first candidate past uniform
    # counted in fp32: TensorRT's Clip takes floats only
    choice = below.float().sum(-1, keepdim=True).clamp(max=candidates - 1).long()
    sampled = ids.gather(-1, choice).squeeze(-1)
    tokens = torch.where(temperature <= 0, greedy, sampled)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
