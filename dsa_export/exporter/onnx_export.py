"""ONNX export: the model in absorbed (sparse) mode through the `dsa::` ops, per-layer caches written in place.

`torch.onnx.export(..., dynamo=True)` at opset 24 with a translation table that turns each `torch.ops.dsa.*` call
into one `dsa::` node and each cache write into one TensorScatter; the standard-op decompositions are appended as
model-local functions afterwards (toolchain.md §1.5–1.6). The graph is checked (exporter/checks.py), then written with
external weights into a temporary directory and moved into place data first, `model.onnx` last: an interrupted
export never leaves a `model.onnx` that looks complete.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

import dsa_export
from dsa_export.errors import DSAExportError
from dsa_export.files import ensure_output_dir, make_readable
from dsa_export.exporter.checks import check_graph
from dsa_export.exporter.graph_io import BATCH, SEQ, GraphIO, graph_io, name_graph_dims
from dsa_export.kernels import EXPORT_OPS
from dsa_export.models.model import DSAForCausalLM
from dsa_export.plugins.onnx_ops import OPSET, add_decompositions, translation_table

MODEL_FILE, DATA_FILE, IO_FILE, CONFIG_FILE = "model.onnx", "model.onnx.data", "io.json", "config.json"


class CachedLM(nn.Module):
    """(input_ids, positions, *caches) → (logits, *caches written) in `io`'s order, through the dsa:: ops."""

    def __init__(self, model: DSAForCausalLM, io: GraphIO):
        super().__init__()
        self.model, self.io = model, io
        self.model.ops, self.model.attention = EXPORT_OPS, "sparse"

    def forward(self, input_ids, positions, *caches):
        L = self.io.num_layers
        logits, latents, index_keys = self.model.forward_with_cache(input_ids, positions, list(caches[:L]),
                                                                    list(caches[L:]))
        if self.io.last_logits_only:
            logits = logits[:, -1:]
        return (logits, *latents, *index_keys)


def sample_inputs(io: GraphIO, config, batch: int = 2, seq: int = 3, seed: int = 0) -> tuple:
    """Trace inputs with distinct sizes >= 2 in every dynamic dim (torch.export specialises 0/1 and equal sizes)."""
    gen = torch.Generator().manual_seed(seed)
    past = min(5, io.capacity - seq)
    values = [torch.randint(0, config.vocab_size, (batch, seq), generator=gen),
              (past + torch.arange(seq)).expand(batch, seq).contiguous()]
    values += [torch.zeros(io.cache_shape(t, batch), dtype=getattr(torch, t.dtype)) for t in io.cache_inputs]
    return tuple(values)


def export_onnx(model: DSAForCausalLM, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                last_logits_only: bool = False, capacity: int | None = None,
                dequantize_experts: bool = False) -> Path:
    """Export, check and write `model.onnx`, `model.onnx.data` and `io.json` into `out_dir`; returns the ONNX path.

    capacity: cache rows (default: models/cache.py `default_capacity`). FP8 experts (a model loaded from an FP8
    checkpoint) stay FP8 with their block scales unless `dequantize_experts`, which stores them in `dtype`."""
    io = graph_io(model.config, str(dtype).removeprefix("torch."), last_logits_only, capacity)
    if io.capacity < 4:
        raise DSAExportError(f"capacity {io.capacity} is too small to trace the export (>= 4)")
    out_dir = ensure_output_dir(out_dir)  # after the checks: bad input leaves nothing behind
    export_model = copy.deepcopy(model).cast(dtype).init_buffers().eval()
    if dequantize_experts:
        export_model.dequantize_experts()
    wrapper = CachedLM(export_model, io)
    args = sample_inputs(io, model.config)
    specs = [{i: d for i, d in enumerate(t.dims) if d in (BATCH, SEQ)} for t in io.inputs]
    dynamic_shapes = (specs[0], specs[1], tuple(specs[2:]))  # forward(input_ids, positions, *caches)
    # torch.onnx logs a warning per missing optional library (torchvision ops) and warns about its own internals
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, args, dynamo=True, verbose=False, opset_version=OPSET,
                                    input_names=[t.name for t in io.inputs], output_names=[t.name for t in io.outputs],
                                    dynamic_shapes=dynamic_shapes, custom_translation_table=translation_table())
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out_dir))
    try:
        program.save(tmp / MODEL_FILE, external_data=True)  # writes model.onnx + model.onnx.data
        proto = add_decompositions(onnx.load(tmp / MODEL_FILE, load_external_data=False))
        name_graph_dims(proto, io)
        proto.doc_string = (f"dsa-export {dsa_export.__version__}; {str(dtype).removeprefix('torch.')}, "
                            f"cache capacity {io.capacity}")
        onnx.save_model(proto, tmp / MODEL_FILE)  # the graph only; weights stay in model.onnx.data
        check_graph(tmp / MODEL_FILE, io, moe_layers=len(export_model.routed_experts()))
        (tmp / IO_FILE).write_text(json.dumps(io.to_json(), indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")  # the model exported
        make_readable(tmp)
        (out_dir / MODEL_FILE).unlink(missing_ok=True)  # never a new model.onnx beside old data, or the reverse
        for name in (DATA_FILE, IO_FILE, CONFIG_FILE, MODEL_FILE):  # model.onnx last: it appears only when complete
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / MODEL_FILE
