"""The exported graph's inputs and outputs as io.json records them: names, dtypes and named dims.

Standalone (the standard library only): the Triton model repository ships this file beside its Python models, and
the package reads io.json through the same class (exporter/graph_io.py builds it from a config). The caches follow
models/cache.py (names, [batch, 1, capacity, width], order) at the export's fixed capacity:

    input_ids [batch, seq] int64, positions [batch, seq] int64 (consecutive per row),
    latent_cache.{i} [batch, 1, C, kv_lora_rank + rope], index_key_cache.{i} [batch, 1, C, index_head_dim]
    → logits [batch, seq | 1, vocab] fp32, latent_cache_out.{i}, index_key_cache_out.{i} (same shapes)

A pipeline stage (layers start:stop of a model cut across GPUs) has the caches of its layers only, takes
`hidden_in` [batch, seq, hidden] (the previous stage's output, in the export dtype) instead of input_ids unless it
is the first, and returns `hidden_out` instead of logits unless it is the last. Each `*_cache_out` is the same buffer
as its input: TensorRT aliases them (KVCacheUpdate), ONNX Runtime writes in place when both are bound to one OrtValue.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

BATCH, SEQ = "batch", "seq"
INPUT_IDS, POSITIONS, LOGITS = "input_ids", "positions", "logits"
HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"


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
    layers: tuple[int, int]  # the model layers start:stop this graph runs (a pipeline stage)
    model_layers: int  # the model's layer count
    vocab_size: int  # the model's vocabulary (token ids the first stage accepts)
    hidden_size: int  # the hidden state between pipeline stages

    @property
    def first(self) -> bool:
        return self.layers[0] == 0

    @property
    def last(self) -> bool:
        return self.layers[1] == self.model_layers

    @property
    def first_input(self) -> IOTensor:
        """input_ids, or hidden_in for a later pipeline stage."""
        return self.inputs[0]

    @property
    def output(self) -> IOTensor:
        """logits, or hidden_out for an earlier pipeline stage."""
        return self.outputs[0]

    @property
    def cache_inputs(self) -> tuple[IOTensor, ...]:
        return self.inputs[2:]

    @property
    def cache_outputs(self) -> tuple[IOTensor, ...]:
        return self.outputs[1:]

    def cache_shape(self, tensor: IOTensor, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else d for d in tensor.dims)

    def to_json(self) -> dict:
        data = asdict(self)
        data["layers"] = list(self.layers)
        data["inputs"] = [asdict(t) for t in self.inputs]
        data["outputs"] = [asdict(t) for t in self.outputs]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "GraphIO":
        def tensors(key):
            return tuple(IOTensor(str(t["name"]), str(t["dtype"]), tuple(t["dims"])) for t in data[key])

        return cls(tensors("inputs"), tensors("outputs"), int(data["num_layers"]), bool(data["last_logits_only"]),
                   int(data["capacity"]), str(data["cache_dtype"]), tuple(int(x) for x in data["layers"]),
                   int(data["model_layers"]), int(data["vocab_size"]), int(data["hidden_size"]))

    @classmethod
    def load(cls, path: str | Path) -> "GraphIO":
        """io.json at `path`; ValueError naming the file if it is unreadable."""
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a readable io.json ({type(e).__name__}: {e}); re-run the export") from None
