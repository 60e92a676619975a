"""The exported graph's inputs and outputs as io.json records them: names, dtypes and named dims.

Standalone (the standard library only): the Triton model repository ships this file beside its Python models, and
the package reads io.json through the same class (exporter/graph_io.py builds it from a config).

A step is a packed batch of tokens, any mix of sequences and of prefill chunks and decode tokens (models/cache.py):

    input_ids [tokens] int64              the tokens (a later pipeline stage: hidden_in [tokens, hidden])
    positions [tokens] int64              each token's position in its sequence
    sequence [tokens] int32               each token's row of block_tables
    slots [tokens] int64                  the pool row each token's cache rows go to
    block_tables [sequences, blocks] int32  each sequence's blocks of the pools, in order (blocks: capacity / block)
    latent_cache.{i} [pool_rows, kv_lora_rank + rope], index_key_cache.{i} [pool_rows, index_head_dim]
  the last stage also:
    logits_index [samples] int64          the tokens whose next token is wanted (a sequence's last in the step)
    temperature, top_p, uniform [samples] fp32, top_k [samples] int32   how each is picked (models/sampling.py)
  →
    next_tokens [samples] int64, logprobs [samples] fp32, logits [samples, vocab] fp32   (the last stage)
    hidden_out [tokens, hidden]                                                           (the others)
    latent_cache_out.{i}, index_key_cache_out.{i}  the same buffers as the pools: written in place

A pipeline stage (layers start:stop of a model cut across GPUs) has the pools of its layers only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

TOKENS, SEQUENCES, SAMPLES, POOL_ROWS = "tokens", "sequences", "samples", "pool_rows"
INPUT_IDS, POSITIONS, SEQUENCE, SLOTS, BLOCK_TABLES = "input_ids", "positions", "sequence", "slots", "block_tables"
LOGITS_INDEX, TEMPERATURE, TOP_K, TOP_P, UNIFORM = "logits_index", "temperature", "top_k", "top_p", "uniform"
NEXT_TOKENS, LOGPROBS, LOGITS = "next_tokens", "logprobs", "logits"
HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"
SAMPLING = (TEMPERATURE, TOP_K, TOP_P, UNIFORM)


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
    capacity: int  # the longest sequence: positions stay below it
    block_size: int  # rows per block of the pools
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
    def blocks(self) -> int:
        """Blocks per row of a block table: a sequence of `capacity` tokens."""
        return -(-self.capacity // self.block_size)

    @property
    def first_input(self) -> IOTensor:
        """input_ids, or hidden_in for a later pipeline stage."""
        return self.inputs[0]

    @property
    def output(self) -> IOTensor:
        """next_tokens, or hidden_out for an earlier pipeline stage."""
        return self.outputs[0]

    @property
    def cache_inputs(self) -> tuple[IOTensor, ...]:
        return tuple(t for t in self.inputs if "_cache." in t.name)

    @property
    def cache_outputs(self) -> tuple[IOTensor, ...]:
        return tuple(t for t in self.outputs if "_cache_out." in t.name)

    @property
    def step_inputs(self) -> tuple[IOTensor, ...]:
        """The inputs a step feeds (all but the pools)."""
        return tuple(t for t in self.inputs if "_cache." not in t.name)

    @property
    def step_outputs(self) -> tuple[IOTensor, ...]:
        return tuple(t for t in self.outputs if "_cache_out." not in t.name)

    def cache_shape(self, tensor: IOTensor, rows: int) -> tuple[int, ...]:
        """A pool's shape for `rows` rows (a multiple of the block size)."""
        return tuple(rows if d == POOL_ROWS else d for d in tensor.dims)

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

        return cls(tensors("inputs"), tensors("outputs"), int(data["num_layers"]), int(data["capacity"]),
                   int(data["block_size"]), str(data["cache_dtype"]), tuple(int(x) for x in data["layers"]),
                   int(data["model_layers"]), int(data["vocab_size"]), int(data["hidden_size"]))

    @classmethod
    def load(cls, path: str | Path) -> "GraphIO":
        """io.json at `path`; ValueError naming the file if it is unreadable."""
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a readable io.json ({type(e).__name__}: {e}); re-run the export") from None
