"""The exported graph's inputs and outputs, built from a config: the export takes its names and dynamic dims from
here and writes them as io.json beside the graph (the record itself, `GraphIO`, lives in serving/io_spec.py, which the
Triton model repository ships): runtimes and the repository are generated from that file, never typed twice."""

from __future__ import annotations

from dsa_export.errors import DSAExportError
from dsa_export.formats import name_of
from dsa_export.models.cache import BLOCK_SIZE, blocks_for, cache_layout, cache_shape, default_capacity
from dsa_export.models.config import DSAConfig
from dsa_export.serving.io_spec import (BLOCK_TABLES, HIDDEN_IN, HIDDEN_OUT, INPUT_IDS, LOGITS, LOGITS_INDEX,
                                        LOGPROBS, NEXT_TOKENS, POOL_ROWS, POSITIONS, SAMPLES, SEQUENCE, SEQUENCES,
                                        SLOTS, TEMPERATURE, TOKENS, TOP_K, TOP_P, UNIFORM, GraphIO, IOTensor)

__all__ = ["POOL_ROWS", "SAMPLES", "SEQUENCES", "TOKENS", "GraphIO", "IOTensor", "graph_io", "name_graph_dims"]


def graph_io(config: DSAConfig, cache_dtype="float32", capacity: int | None = None,
             layers: tuple[int, int] | None = None, block_size: int = BLOCK_SIZE) -> GraphIO:
    """The graph of layers start:stop (default: the whole model); cache_dtype: a torch dtype or its name."""
    cache_dtype = name_of(cache_dtype)
    capacity = default_capacity(config) if capacity is None else capacity
    if capacity < 1:
        raise DSAExportError(f"capacity must be >= 1, got {capacity}")
    total = config.num_hidden_layers
    start, stop = layers if layers is not None else (0, total)
    if not 0 <= start < stop <= total:
        raise DSAExportError(f"layers {start}:{stop} are not a range of the model's {total} layers")
    layout = cache_layout(config, range(start, stop))
    hidden = (TOKENS, config.hidden_size)
    inputs = [IOTensor(INPUT_IDS, "int64", (TOKENS,)) if start == 0 else IOTensor(HIDDEN_IN, cache_dtype, hidden),
              IOTensor(POSITIONS, "int64", (TOKENS,)), IOTensor(SEQUENCE, "int32", (TOKENS,)),
              IOTensor(SLOTS, "int64", (TOKENS,)),
              IOTensor(BLOCK_TABLES, "int32", (SEQUENCES, blocks_for(capacity, block_size)))]
    if stop == total:
        inputs += [IOTensor(LOGITS_INDEX, "int64", (SAMPLES,)), IOTensor(TEMPERATURE, "float32", (SAMPLES,)),
                   IOTensor(TOP_K, "int32", (SAMPLES,)), IOTensor(TOP_P, "float32", (SAMPLES,)),
                   IOTensor(UNIFORM, "float32", (SAMPLES,))]
    inputs += [IOTensor(t.input_name, cache_dtype, cache_shape(t, POOL_ROWS)) for t in layout]
    if stop == total:
        outputs = [IOTensor(NEXT_TOKENS, "int64", (SAMPLES,)), IOTensor(LOGPROBS, "float32", (SAMPLES,)),
                   IOTensor(LOGITS, "float32", (SAMPLES, config.vocab_size))]
    else:
        outputs = [IOTensor(HIDDEN_OUT, cache_dtype, hidden)]
    outputs += [IOTensor(t.output_name, cache_dtype, cache_shape(t, POOL_ROWS)) for t in layout]
    return GraphIO(tuple(inputs), tuple(outputs), stop - start, capacity, block_size, cache_dtype, (start, stop),
                   total, config.vocab_size, config.hidden_size)


def name_graph_dims(model, io: GraphIO) -> None:
    """Give the ONNX graph's symbolic dims io.json's names."""
    for values, specs in ((model.graph.input, io.inputs), (model.graph.output, io.outputs)):
        for value, spec in zip(values, specs):
            for dim, name in zip(value.type.tensor_type.shape.dim, spec.dims):
                if isinstance(name, str) and dim.dim_param:
                    dim.dim_param = name
