"""The exported graph's inputs and outputs, built from a config: the export takes its names and dynamic dims from
here and writes them as io.json beside the graph (the record itself, `GraphIO`, lives in serving/io_spec.py, which the
Triton model repository ships): runtimes and the repository are generated from that file, never typed twice."""

from __future__ import annotations

from dsa_export.errors import DSAExportError
from dsa_export.formats import name_of
from dsa_export.models.cache import cache_layout, cache_shape, default_capacity
from dsa_export.models.config import DSAConfig
from dsa_export.serving.io_spec import (BATCH, HIDDEN_IN, HIDDEN_OUT, INPUT_IDS, LOGITS, POSITIONS, SEQ, GraphIO,
                                        IOTensor)

__all__ = ["BATCH", "SEQ", "GraphIO", "IOTensor", "graph_io", "name_graph_dims"]


def graph_io(config: DSAConfig, cache_dtype="float32", last_logits_only: bool = False,
             capacity: int | None = None, layers: tuple[int, int] | None = None) -> GraphIO:
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
    hidden = (BATCH, SEQ, config.hidden_size)
    inputs = [IOTensor(INPUT_IDS, "int64", (BATCH, SEQ)) if start == 0 else IOTensor(HIDDEN_IN, cache_dtype, hidden),
              IOTensor(POSITIONS, "int64", (BATCH, SEQ))]
    inputs += [IOTensor(t.input_name, cache_dtype, cache_shape(t, BATCH, capacity)) for t in layout]
    outputs = [IOTensor(LOGITS, "float32", (BATCH, 1 if last_logits_only else SEQ, config.vocab_size))
               if stop == total else IOTensor(HIDDEN_OUT, cache_dtype, hidden)]
    outputs += [IOTensor(t.output_name, cache_dtype, cache_shape(t, BATCH, capacity)) for t in layout]
    return GraphIO(tuple(inputs), tuple(outputs), stop - start, last_logits_only and stop == total, capacity,
                   cache_dtype, (start, stop), total, config.vocab_size, config.hidden_size)


def name_graph_dims(model, io: GraphIO) -> None:
    """Give the ONNX graph's symbolic dims io.json's names."""
    for values, specs in ((model.graph.input, io.inputs), (model.graph.output, io.outputs)):
        for value, spec in zip(values, specs):
            for dim, name in zip(value.type.tensor_type.shape.dim, spec.dims):
                if isinstance(name, str) and dim.dim_param:
                    dim.dim_param = name
