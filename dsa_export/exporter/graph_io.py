"""The exported graph's inputs and outputs: names, dtypes and named dims, defined once.

The export takes its input/output names and dynamic dims from here, writes it as `io.json` beside the ONNX file, and
runtimes (and the Triton model repository) are generated from that file, never typed twice.

    input_ids [batch, seq] int64, positions [batch, seq] int64,
    past_latent.{i} [batch, past, kv_lora_rank + rope], past_index_keys.{i} [batch, past, index_head_dim]
    → logits [batch, seq | 1, vocab] fp32, present_latent.{i} / present_index_keys.{i} [batch, past + seq, ...],
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dsa_export.models.config import DSAConfig

BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "past + seq"


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

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "last_logits_only": self.last_logits_only,
                "inputs": [asdict(t) for t in self.inputs], "outputs": [asdict(t) for t in self.outputs]}

    @classmethod
    def from_json(cls, data: dict) -> "GraphIO":
        def tensors(key):
            return tuple(IOTensor(t["name"], t["dtype"], tuple(t["dims"])) for t in data[key])

        return cls(tensors("inputs"), tensors("outputs"), data["num_layers"], data["last_logits_only"])

    @classmethod
    def load(cls, path: str | Path) -> "GraphIO":
        return cls.from_json(json.loads(Path(path).read_text()))


def graph_io(config: DSAConfig, cache_dtype: str = "float32", last_logits_only: bool = False) -> GraphIO:
    L, latent, index = config.num_hidden_layers, config.latent_dim, config.index_head_dim
    inputs = [IOTensor("input_ids", "int64", (BATCH, SEQ)), IOTensor("positions", "int64", (BATCH, SEQ))]
    inputs += [IOTensor(f"past_latent.{i}", cache_dtype, (BATCH, PAST, latent)) for i in range(L)]
    inputs += [IOTensor(f"past_index_keys.{i}", cache_dtype, (BATCH, PAST, index)) for i in range(L)]
    outputs = [IOTensor("logits", "float32", (BATCH, 1 if last_logits_only else SEQ, config.vocab_size))]
    outputs += [IOTensor(f"present_latent.{i}", cache_dtype, (BATCH, TOTAL, latent)) for i in range(L)]
    outputs += [IOTensor(f"present_index_keys.{i}", cache_dtype, (BATCH, TOTAL, index)) for i in range(L)]
    return GraphIO(tuple(inputs), tuple(outputs), L, last_logits_only)


def name_graph_dims(model, io: GraphIO) -> None:
    """Give the ONNX graph's symbolic dims io.json's names (the exporter spells sums either way round)."""
    for values, specs in ((model.graph.input, io.inputs), (model.graph.output, io.outputs)):
        for value, spec in zip(values, specs):
            for dim, name in zip(value.type.tensor_type.shape.dim, spec.dims):
                if isinstance(name, str) and dim.dim_param:
                    dim.dim_param = name
