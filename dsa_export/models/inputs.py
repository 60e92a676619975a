"""Checks of what a caller hands to a forward step, shared by the eager model and every runtime backend, so that each
gives the same one-line error (a DSAExportError, which is a ValueError) instead of whatever torch or ONNX Runtime
would raise deeper down, or silently accept (ONNX Runtime gathers embedding row -1 without complaint)."""

from __future__ import annotations

import numpy as np
import torch

from dsa_export.errors import DSAExportError

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class InputError(DSAExportError):
    """Token ids, positions or caches that do not fit the model."""


def _as_int_tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as e:
            raise InputError(f"{what} must be a 2-D [batch, seq] array of integers ({e})") from None
    if value.dtype not in _INTEGER_DTYPES:
        raise InputError(f"{what} must be integers, got {str(value.dtype).removeprefix('torch.')}")
    if value.dim() != 2 or 0 in value.shape:
        raise InputError(f"{what} must be 2-D [batch, seq] with at least one token, got shape {list(value.shape)}")
    return value.long()


def token_ids(input_ids, vocab_size: int) -> torch.Tensor:
    """[B,S] int64 token ids, each in [0, vocab_size)."""
    ids = _as_int_tensor(input_ids, "token ids")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


def step_positions(positions, ids: torch.Tensor) -> torch.Tensor:
    """[B,S] int64 positions matching the ids: not negative, consecutive in each row (a step writes one run of rows)."""
    positions = _as_int_tensor(positions, "positions")
    if positions.shape != ids.shape:
        raise InputError(f"positions have shape {list(positions.shape)}, the token ids {list(ids.shape)}")
    if int(positions.min()) < 0:
        raise InputError(f"positions must not be negative, got {int(positions.min())}")
    if positions.shape[1] > 1 and not bool((positions.diff(dim=1) == 1).all()):
        raise InputError("the positions of each row must be consecutive (a step writes one run of cache rows)")
    return positions


def check_cache_batch(cache_batch: int, ids: torch.Tensor) -> None:
    if cache_batch != ids.shape[0]:
        raise InputError(f"the caches hold {cache_batch} sequences, the step has {ids.shape[0]}")
