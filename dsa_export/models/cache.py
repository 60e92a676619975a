"""The KV-cache layout, defined once for the eager model, io.json, every runtime backend and the cost code: paged.

Per layer two pools of fixed-size blocks (BLOCK_SIZE rows each), shared by all the sequences of a batch or a server:
  latent_cache.{i}     [rows, kv_lora_rank + qk_rope_head_dim]   MLA latent: normalised latent ‖ roped k_pe
  index_key_cache.{i}  [rows, index_head_dim]                    lightning-indexer keys
A sequence owns whole blocks, listed in order in its row of a block table; its token at position t lives in pool row
block_tables[s, t // BLOCK_SIZE] · BLOCK_SIZE + t % BLOCK_SIZE (its slot). A step writes its tokens' rows at their
slots (dsa::WriteCache, in place) and the ops read a sequence's keys through its block table; they never read a
position beyond a token's own, so rows not yet written (or junk from right-padding) are never seen. Order everywhere:
every layer's latent pool, then every layer's index-key pool.

`Paging` is one step's view of that: the tokens' positions, sequences and slots, and the block tables. The eager
model's own cache (`KVCache`) gives every sequence of its batch `capacity` rows of the pool in order (a contiguous
cache is the identity paging); the serving scheduler and the graph backends allocate blocks as sequences grow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsa_export.errors import DSAExportError
from dsa_export.formats import of
from dsa_export.models.config import DSAConfig

KINDS = ("latent", "index_key")
DEFAULT_MAX_CAPACITY = 131072  # 128K: the context DeepSeek's cost figure goes to
BLOCK_SIZE = 64  # rows per block of a pool, as FlashMLA's and DeepGEMM's paged kernels take them


@dataclass(frozen=True)
class CacheTensor:
    kind: str  # "latent" or "index_key"
    layer: int
    width: int

    @property
    def input_name(self) -> str:
        return f"{self.kind}_cache.{self.layer}"

    @property
    def output_name(self) -> str:
        return f"{self.kind}_cache_out.{self.layer}"


def cache_layout(config: DSAConfig, layers: range | None = None) -> tuple[CacheTensor, ...]:
    layers = layers if layers is not None else range(config.num_hidden_layers)
    widths = {"latent": config.latent_dim, "index_key": config.index_head_dim}
    return tuple(CacheTensor(kind, i, widths[kind]) for kind in KINDS for i in layers)


def cache_order(input_name: str) -> tuple[int, int]:
    """The position of a cache (by its input name) in `cache_layout`'s order: kind, then layer."""
    kind, _, layer = input_name.partition("_cache.")
    return KINDS.index(kind), int(layer)


def cache_shape(tensor: CacheTensor, rows) -> tuple:
    """[rows, width]: an int, or a dim name for io.json."""
    return (rows, tensor.width)


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """The blocks that hold `tokens` rows."""
    return -(-tokens // block_size)


@dataclass
class Paging:
    """Where one step's tokens (packed, N of them) read and write the pools: token n belongs to sequence
    sequence[n] (a row of block_tables) at positions[n] and writes pool row slots[n]. `contiguous` is (batch, seq,
    capacity) when the tokens are a [batch, seq] step over the eager cache's identity paging (the reference MHA paths
    read the pools as [batch, capacity] then)."""
    positions: torch.Tensor  # [N] int64
    sequence: torch.Tensor  # [N] int32
    slots: torch.Tensor  # [N] int64
    block_tables: torch.Tensor  # [R, M] int32
    block_size: int = BLOCK_SIZE
    contiguous: tuple[int, int, int] | None = None

    @classmethod
    def identity(cls, positions: torch.Tensor, capacity: int, block_size: int = BLOCK_SIZE) -> "Paging":
        """A [B, S] step over B sequences that each own `capacity` (a multiple of block_size) rows in order."""
        B, S = positions.shape
        blocks = capacity // block_size
        device = positions.device
        sequence = torch.arange(B, device=device, dtype=torch.int32)[:, None].expand(B, S)
        tables = torch.arange(B * blocks, device=device, dtype=torch.int32).view(B, blocks)
        slots = (sequence.long() * capacity + positions.long()).reshape(-1)
        return cls(positions.reshape(-1).long(), sequence.reshape(-1).contiguous(), slots, tables, block_size,
                   (B, S, capacity))

    def logical(self, rows: torch.Tensor) -> torch.Tensor:
        """Pool rows selected for each token ([N, K], -1 = none) → the positions in that token's sequence."""
        tables = self.block_tables[self.sequence.long()].long()  # [N, M]
        block, offset = rows.long() // self.block_size, rows.long() % self.block_size
        index = (tables[:, :, None] == block[:, None, :]).long().argmax(1)  # [N, K]: where the block sits
        return torch.where(rows >= 0, index * self.block_size + offset, -1).to(rows.dtype)


def default_capacity(config: DSAConfig) -> int:
    return min(config.max_position_embeddings, DEFAULT_MAX_CAPACITY)


def cache_row_bytes(config: DSAConfig, fmt: str) -> tuple[float, float]:
    """Bytes of one token's latent row and indexer-key row in one layer. fmt: a dtype name for the plain layout
    above, or "fp8" for the serving layouts DeepSeek uses: FlashMLA's latent row (fp8 latent + an fp32 scale per 128 +
    bf16 rope) and DeepGEMM's indexer key (fp8 + one fp32 scale per 128)."""
    c, r, di = config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim
    if fmt == "fp8":
        return c + 4 * math.ceil(c / 128) + 2 * r, di + 4 * math.ceil(di / 128)
    size = of(fmt).itemsize
    return (c + r) * size, di * size


def cache_bytes_per_token(config: DSAConfig, fmt: str, layers: int | None = None) -> float:
    """Bytes one token's cache rows take over `layers` layers (default: all); fmt as `cache_row_bytes`."""
    layers = config.num_hidden_layers if layers is None else layers
    return sum(cache_row_bytes(config, fmt)) * layers


@dataclass
class KVCache:
    """The eager model's paged caches: per layer a pool of `batch` · `rows` rows, sequence b owning rows b·rows ...
    (`capacity` rounded up to whole blocks: the identity paging); `length` = positions written so far (where the next
    default positions start). The model writes into these pools in place."""

    latent: list[torch.Tensor]
    index_keys: list[torch.Tensor]
    batch: int
    capacity: int  # positions a sequence can reach
    rows: int  # pool rows each sequence owns: whole blocks
    length: int = 0

    @classmethod
    def empty(cls, config: DSAConfig, batch: int = 1, capacity: int | None = None,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "KVCache":
        capacity = default_capacity(config) if capacity is None else capacity
        if batch < 1 or capacity < 1:
            raise DSAExportError(f"a cache needs batch >= 1 and capacity >= 1, got batch {batch}, capacity {capacity}")
        rows = blocks_for(capacity) * BLOCK_SIZE
        tensors = {kind: [] for kind in KINDS}
        for t in cache_layout(config):
            tensors[t.kind].append(torch.zeros(cache_shape(t, batch * rows), dtype=dtype, device=device))
        return cls(tensors["latent"], tensors["index_key"], batch, capacity, rows)

    def tensors(self) -> list[torch.Tensor]:
        """In layout order: every latent pool, then every index-key pool."""
        return [*self.latent, *self.index_keys]

    def sequences(self) -> list[torch.Tensor]:
        """The pools as [batch, capacity, width] views, in layout order: what sequence b holds at each position."""
        return [t.view(self.batch, self.rows, -1) for t in self.tensors()]


def check_room(capacity: int, positions: torch.Tensor) -> None:
    """`past + S > C` is an error before any work: positions must lie in [0, capacity)."""
    if positions.numel() and int(positions.max()) >= capacity:
        raise CacheFullError(f"{int(positions.max()) + 1} tokens do not fit a cache of capacity {capacity}")


class CacheFullError(DSAExportError):
    """The step's last position is at or beyond the cache capacity."""
