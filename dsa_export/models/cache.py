"""The KV-cache layout, defined once for the eager model, io.json, every runtime backend and the cost code.

Per layer two tensors at a fixed capacity C (rows), written in place at each token's position:
  latent_cache.{i}     [B, 1, C, kv_lora_rank + qk_rope_head_dim]   MLA latent: normalised latent ‖ roped k_pe
  index_key_cache.{i}  [B, 1, C, index_head_dim]                    lightning-indexer keys
The axis of size 1 is the "heads" axis of TensorRT's KVCacheUpdate layer (what ONNX TensorScatter becomes there):
it takes only 4-D [B, H, S, D] caches that are network inputs with a static length, so C is fixed per export.
Order everywhere: every layer's latent cache, then every layer's index-key cache. A step of S tokens at positions
p..p+S-1 writes rows p..p+S-1 of row b's caches; the ops never read a row beyond a query's own position, so rows not
yet written (or junk from right-padding) are never seen.
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


def cache_shape(tensor: CacheTensor, batch, capacity) -> tuple:
    """[batch, 1, capacity, width]: ints, or dim names for io.json."""
    return (batch, 1, capacity, tensor.width)


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
    """Per-layer cache tensors at a fixed capacity; `length` = rows written so far (where the next default
    positions start). The model writes into these tensors in place."""

    latent: list[torch.Tensor]
    index_keys: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, config: DSAConfig, batch: int = 1, capacity: int | None = None,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "KVCache":
        capacity = default_capacity(config) if capacity is None else capacity
        if batch < 1 or capacity < 1:
            raise DSAExportError(f"a cache needs batch >= 1 and capacity >= 1, got batch {batch}, capacity {capacity}")
        tensors = {kind: [] for kind in KINDS}
        for t in cache_layout(config):
            tensors[t.kind].append(torch.zeros(cache_shape(t, batch, capacity), dtype=dtype, device=device))
        return cls(tensors["latent"], tensors["index_key"])

    @property
    def batch(self) -> int:
        return self.latent[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.latent[0].shape[2]

    def tensors(self) -> list[torch.Tensor]:
        """In layout order: every latent cache, then every index-key cache."""
        return [*self.latent, *self.index_keys]


def check_room(capacity: int, positions: torch.Tensor) -> None:
    """`past + S > C` is an error before any work: positions must lie in [0, capacity)."""
    if positions.numel() and int(positions.max()) >= capacity:
        raise CacheFullError(f"{int(positions.max()) + 1} tokens do not fit a cache of capacity {capacity}")


class CacheFullError(DSAExportError):
    """The step's last position is at or beyond the cache capacity."""
