"""The exported graph's inputs and outputs: names, dtypes and named dims, defined once.

The export takes its input/output names and dynamic dims from here, writes it as `io.json` beside the ONNX file, and
runtimes (and the Triton model repository) are generated from that file, never typed twice. The caches follow
models/cache.py (names, [batch, 1, capacity, width], order) at the export's fixed capacity:

    input_ids [batch, seq] int64, positions [batch, seq] int64 (consecutive per row),
    latent_cache.{i} [batch, 1, C, kv_lora_rank + rope], index_key_cache.{i} [batch, 1, C, index_head_dim]
    → logits [batch, seq | 1, vocab] fp32, latent_cache_out.{i}, index_key_cache_out.{i} (same shapes)

A pipeline stage (layers start:stop of a model cut across GPUs) has the caches of its layers only, takes
`hidden_in` [batch, seq, hidden] (the previous stage's output, in the export dtype) instead of input_ids unless it
is the first, and returns `hidden_out` instead of logits unless it is the last.

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
    layers: tuple[int, int] = (0, 0)  # the model layers start:stop this graph runs (a pipeline stage)
    model_layers: int = 0  # the model's layer count

    @property
    def first(self) -> bool:
        return self.layers[0] == 0

    @property
    def last(self) -> bool:
        return self.layers[1] == self.model_layers

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
                "cache_dtype": self.cache_dtype, "layers": list(self.layers), "model_layers": self.model_layers,
                "inputs": [asdict(t) for t in self.inputs], "outputs": [asdict(t) for t in self.outputs]}

    @classmethod
    def from_json(cls, data: dict) -> "GraphIO":
        def tensors(key):
            return tuple(IOTensor(t["name"], t["dtype"], tuple(t["dims"])) for t in data[key])

        return cls(tensors("inputs"), tensors("outputs"), data["num_layers"], data["last_logits_only"],
                   data["capacity"], data["cache_dtype"], tuple(data["layers"]), data["model_layers"])

    @classmethod
    def load(cls, path: str | Path) -> "GraphIO":
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DSAExportError(f"{path}: not a readable io.json ({type(e).__name__}: {e}); re-run the export") \
                from None


def graph_io(config: DSAConfig, cache_dtype: str = "float32", last_logits_only: bool = False,
             capacity: int | None = None, layers: tuple[int, int] | None = None) -> GraphIO:
    """The graph of layers start:stop (default: the whole model)."""
    capacity = default_capacity(config) if capacity is None else capacity
    if capacity < 1:
        raise DSAExportError(f"capacity must be >= 1, got {capacity}")
    total = config.num_hidden_layers
    start, stop = layers if layers is not None else (0, total)
    if not 0 <= start < stop <= total:
        raise DSAExportError(f"layers {start}:{stop} are not a range of the model's {total} layers")
    layout = cache_layout(config, range(start, stop))
    hidden = (BATCH, SEQ, config.hidden_size)
    inputs = [IOTensor("input_ids", "int64", (BATCH, SEQ)) if start == 0 else IOTensor(HIDDEN_IN, cache_dtype, hidden),
              IOTensor("positions", "int64", (BATCH, SEQ))]
    inputs += [IOTensor(t.input_name, cache_dtype, cache_shape(t, BATCH, capacity)) for t in layout]
    outputs = [IOTensor("logits", "float32", (BATCH, 1 if last_logits_only else SEQ, config.vocab_size))
               if stop == total else IOTensor(HIDDEN_OUT, cache_dtype, hidden)]
    outputs += [IOTensor(t.output_name, cache_dtype, cache_shape(t, BATCH, capacity)) for t in layout]
    return GraphIO(tuple(inputs), tuple(outputs), stop - start, last_logits_only and stop == total, capacity,
                   cache_dtype, (start, stop), total)


def name_graph_dims(model, io: GraphIO) -> None:
    """Give the ONNX graph's symbolic dims io.json's names."""
    for values, specs in ((model.graph.input, io.inputs), (model.graph.output, io.outputs)):
        for value, spec in zip(values, specs):
            for dim, name in zip(value.type.tensor_type.shape.dim, spec.dims):
                if isinstance(name, str) and dim.dim_param:
                    dim.dim_param = name


def stage_dir(build_dir: Path, stage: int, stages: int) -> Path:
    """Where pipeline stage `stage` of `stages` is exported: the build directory itself for a single stage."""
    return Path(build_dir) if stages == 1 else Path(build_dir) / f"stage-{stage}"


def stage_dirs(build_dir: Path) -> list[Path]:
    """The exports of a build in layer order: [build_dir] for one graph, else its stage-*/ directories."""
    build_dir = Path(build_dir)
    if (build_dir / "model.onnx").exists() or not (build_dir / "stage-0").is_dir():
        return [build_dir]
    dirs, i = [], 0
    while (build_dir / f"stage-{i}").is_dir():
        dirs.append(build_dir / f"stage-{i}")
        i += 1
    return dirs
