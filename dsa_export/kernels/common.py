"""What the Triton kernels share: tile sizes rounded to powers of two, the precision of their dots, and the indexer's
split rule (its two kernels and the torch reference read it from here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsa_export.contracts import INDEXER_SPLIT_ROWS


def pow2(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= n (and >= minimum: tl.dot needs tiles of at least 16)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: "ieee" for fp32 inputs (scores match the fp32 reference), "tf32" otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class IndexerSplit:
    """How the indexer splits each token's visible keys into chunks (kernels/triton_indexer.py): about `split_rows`
    chunk programs per step, at most `max_splits` chunks per token, each of at least `min_chunk` keys; a token that
    sees at most topk keys has none. The candidates [N + split_rows, topk] hold token n's chunk 0 in row n and its
    chunk c in row N + n·(splits−1) + c − 1. Defaults: the engine's (split_rows is ~4 programs per SM on the
    targets' 108-148 SMs, one wave at 48 KiB of shared memory each; 128K keys give 128 chunks of 1024)."""
    split_rows: int = INDEXER_SPLIT_ROWS
    max_splits: int = 128
    min_chunk: int = 1024  # shorter chunks would spend more on loading q and on the merge than they save

    def splits(self, tokens: int) -> int:
        """Chunks per token at most, for a step of `tokens` tokens."""
        return max(1, min(self.max_splits, self.split_rows // tokens))

    def chunks(self, tokens: int, visible: int, topk: int) -> int:
        return 0 if visible <= topk else min(self.splits(tokens), -(-visible // self.min_chunk))

    @staticmethod
    def chunk_length(visible: int, chunks: int, tile: int) -> int:
        """Keys per chunk: whole tiles, so that a tile never straddles a block of the pool; the last may be short."""
        return -(-(-(-visible // chunks)) // tile) * tile

    def candidate_row(self, tokens: int, token: int, chunk: int) -> int:
        return token if chunk == 0 else tokens + token * (self.splits(tokens) - 1) + chunk - 1

    def constexprs(self) -> dict:
        return {"SPLIT_ROWS": self.split_rows, "MAX_SPLITS": self.max_splits, "MIN_CHUNK": self.min_chunk}
