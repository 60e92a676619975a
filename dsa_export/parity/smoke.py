"""The build's smoke check: prefill + greedy decode through the caches equals one forward over the whole sequence."""

from __future__ import annotations

import torch

from dsa_export.models import DSAForCausalLM

# Max abs logit difference allowed between prefill + decode and one full forward, by weight dtype.
SMOKE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05}


def smoke_check(model: DSAForCausalLM, prompt_len: int = 24, decode_steps: int = 4, seed: int = 0) -> dict:
    """Prefill a batch of 2 prompts, decode greedily token by token, and compare every step's logits with one
    forward over the whole sequence."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, prompt_len), generator=gen)
    cache = model.new_cache(2, prompt_len + decode_steps)
    with torch.no_grad():
        step_logits = [model(ids, cache=cache)]
        for _ in range(decode_steps):
            next_ids = step_logits[-1][:, -1:].argmax(-1)
            ids = torch.cat([ids, next_ids], dim=1)
            step_logits.append(model(next_ids, cache=cache))
        full = model(ids)  # every token was fed exactly once above
    steps = torch.cat(step_logits, dim=1)
    max_diff = (steps - full).abs().max().item()
    tolerance = SMOKE_TOLERANCE[model.lm_head.weight.dtype]
    finite = bool(torch.isfinite(steps).all() and torch.isfinite(full).all())
    passed = finite and max_diff < tolerance  # `<` is False for NaN too
    return {"prompt_len": prompt_len, "decode_steps": decode_steps, "batch": 2, "max_abs_diff": max_diff,
            "tolerance": tolerance, "passed": passed,
            "failures": [] if passed else [f"prefill+decode vs full forward differ by {max_diff:.3g} > {tolerance:g}"
                                           + ("" if finite else " (logits are not finite)")]}
