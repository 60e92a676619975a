"""The exported graph's inputs and outputs: names, dtypes and named dims, defined once.

The export takes its input/output names and dynamic dims from here, writes it as `io.json` beside the ONNX file, and
runtimes (and the Triton model repository) are generated from that file, never typed twice. The caches follow
models/cache.py (names, [batch, 1, capacity, width], order) at the export's fixed capacity:

    input_ids [batch, seq] int64, positions [batch, seq] int64 (consecutive per row),
    latent_cache.{i} [batch, 1, C, kv_lora_rank + rope], index_key_cache.{i} [batch, 1, C, index_head_dim]
    → logits [batch, seq | 1, vocab] fp32, latent_cache_out.{i}, index_key_cache_out.{i} (same shapes)

Each `*_cache_out` is the same buffer as its input: TensorRT aliases them (KVCacheUpdate), ONNX Runtime writes in
place when both are bound to one OrtValue.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dsa_export.errors import DSAExportError
from dsa_export.models.cache import cache_layout, cache_shape, default_capacity
from dsa_export.models.config import DSAConfig

BATCH, SEQ = "batch", "seq"
DYNAMIC_DIMS = (BATCH, SEQ)


@dataclass(frozen=True)
class IOTensor:
    name: str
    dtype: str  # torch dtype name: "int64", "float32", "bfloat16", "int32"
    dims: tuple  # ints and dim names


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[IOTensor, ...]
    outputs: tuple[IOTensor, ...]
    num_layers: int
    last_logits_only: bool
    capacity: int  # cache rows: the largest position + 1 a sequence can reach
    cache_dtype: str

    @property
    def cache_inputs(self) -> tuple[IOTensor, ...]:
        return self.inputs[2:]

    @property
    def cache_outputs(self) -> tuple[IOTensor, ...]:
        return self.outputs[1:]

    def cache_shape(self, tensor: IOTensor, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else d for d in tensor.dims)

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "last_logits_only": self.last_logits_only, "capacity": self.capacity,
                "cache_dtype": self.cache_dtype, "inputs": [asdict(t) for t in self.inputs],
                "outputs": [asdict(t) for t in self.outputs]}

    @classmethod
    def from_json(cls, data: dict) -> "GraphIO":
        def tensors(key):
            return tuple(IOTensor(t["name"], t["dtype"], tuple(t["dims"])) for t in data[key])

        return cls(tensors("inputs"), tensors("outputs"), data["num_layers"], data["last_logits_only"],
                   data["capacity"], data["cache_dtype"])

    @classmethod
    def load(cls, path: str | Path) -> "GraphIO":
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DSAExportError(f"{path}: not a readable io.json ({type(e).__name__}: {e}); re-run the export") \
                from None


def graph_io(config: DSAConfig, cache_dtype: str = "float32", last_logits_only: bool = False,
             capacity: int | None = None) -> GraphIO:
    capacity = default_capacity(config) if capacity is None else capacity
    if capacity < 1:
        raise DSAExportError(f"capacity must be >= 1, got {capacity}")
    layout = cache_layout(config)
    inputs = [IOTensor("input_ids", "int64", (BATCH, SEQ)), IOTensor("positions", "int64", (BATCH, SEQ))]
    inputs += [IOTensor(t.input_name, cache_dtype, cache_shape(t, BATCH, capacity)) for t in layout]
    outputs = [IOTensor("logits", "float32", (BATCH, 1 if last_logits_only else SEQ, config.vocab_size))]
    outputs += [IOTensor(t.output_name, cache_dtype, cache_shape(t, BATCH, capacity)) for t in layout]
    return GraphIO(tuple(inputs), tuple(outputs), config.num_hidden_layers, last_logits_only, capacity, cache_dtype)


def name_graph_dims(model, io: GraphIO) -> None:
    """Give the ONNX graph's symbolic dims io.json's names."""
    for values, specs in ((model.graph.input, io.inputs), (model.graph.output, io.outputs)):
        for value, spec in zip(values, specs):
            for dim, name in zip(value.type.tensor_type.shape.dim, spec.dims):
                if isinstance(name, str) and dim.dim_param:
                    dim.dim_param = name
