"""ONNX export: the model in absorbed (sparse) mode through the `dsa::` ops, per-layer caches written in place, weights
streamed.

The graph is traced with fake tensors (no weight is ever materialised): `torch.onnx.export(..., dynamo=True)` at opset
24 with a translation table that turns each `torch.ops.dsa.*` call into one `dsa::` node and each cache write into one
TensorScatter, then onnxscript's optimizer with the weights held opaque (so no weight is folded into a new constant:
every initializer is a model tensor as the checkpoint stores it, transposes stay nodes that TensorRT and ONNX Runtime
fold at load); the standard-op decompositions are appended as model-local functions (toolchain.md §1.5–1.6). Then
exporter/weights.py writes each initializer from the checkpoint (or a model in memory) into bounded external data
files, one row block at a time, and the graph is checked without loading a weight (exporter/checks.py). Everything is
written into a temporary directory and moved into place data first, `model.onnx` last: an interrupted export never
leaves a `model.onnx` that looks complete. Peak memory: the graph, one row block, and what safetensors maps
(benchmarks/export_memory.md), whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript.optimizer
from onnxscript.rewriter.rules.fusion._rms_normalization import fuse_rms_normalization
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from dsa_export._version import __version__
from dsa_export.errors import DSAExportError, signals_deferred
from dsa_export.progress import heartbeat
from dsa_export.exporter.artifacts import ExportDir, StageDir
from dsa_export.exporter.checks import check_graph
from dsa_export.exporter.graph_io import GraphIO, graph_io, name_graph_dims
from dsa_export.exporter.weights import (DEFAULT_MAX_FILE_BYTES, CheckpointWeights, ModelWeights, WeightSpec,
                                         write_weights)
from dsa_export.files import ensure_output_dir, make_readable
from dsa_export.formats import name_of
from dsa_export.kernels import EXPORT_OPS
from dsa_export.models.checkpoint import Checkpoint
from dsa_export.models.config import DSAConfig
from dsa_export.models.cache import Paging
from dsa_export.models.model import DSAForCausalLM
from dsa_export.models.sampling import sample
from dsa_export.serving.io_spec import (BLOCK_TABLES, HIDDEN_IN, INPUT_IDS, LOGITS_INDEX, POOL_ROWS, POSITIONS, SAMPLES,
                                        SEQUENCE, SEQUENCES, SLOTS, TEMPERATURE, TOKENS, TOP_K, TOP_P, UNIFORM)
from dsa_export.plugins.onnx_ops import OPSET, add_decompositions, translation_table

WRAPPER_PREFIX = "model."  # CachedLM holds the model as `.model`: initializer names are "model." + state-dict names


class CachedLM(nn.Module):
    """One packed step, as io.json lays it out: (first, positions, sequence, slots, block_tables, [logits_index and
    the sampling inputs], *pools) → ([next_tokens, logprobs, logits] or hidden_out, *pools written), through the dsa::
    ops."""

    def __init__(self, model: DSAForCausalLM, io: GraphIO):
        super().__init__()
        self.model, self.io = model, io
        self.model.ops, self.model.attention = EXPORT_OPS, "sparse"

    def forward(self, first, positions, sequence, slots, block_tables, *rest):
        """first: input_ids [N], or the previous stage's hidden state [N, H] (io.json says which)."""
        sampling, pools = (rest[:5], rest[5:]) if self.io.last else ((), rest)
        L = self.io.num_layers
        paging = Paging(positions, sequence, slots, block_tables, self.io.block_size)
        out, latents, index_keys = self.model.forward_with_cache(
            first[None], positions[None], list(pools[:L]), list(pools[L:]), paging, layers=range(*self.io.layers),
            logits_index=sampling[0] if sampling else None)
        if not self.io.last:
            return (out[0], *latents, *index_keys)
        tokens, logprobs = sample(out, *sampling[1:])
        return (tokens, logprobs, out, *latents, *index_keys)


def sample_inputs(io: GraphIO, config, tokens: int = 5, sequences: int = 2, seed: int = 0) -> tuple:
    """Trace inputs with distinct sizes >= 2 in every dynamic dim (torch.export specialises 0/1 and equal sizes): a
    step of `tokens` tokens of `sequences` sequences (the first sequence's 3-token chunk on a past, the other's
    decode tokens), `sequences` + 1 samples, a pool of 3 blocks per table column. Under a FakeTensorMode they take no
    memory (the pools of the 671B model would take tens of GB)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 3 * io.block_size
    seq = torch.tensor([0] * (tokens - sequences + 1) + list(range(1, sequences)), dtype=torch.int32)
    positions = torch.arange(tokens) % max(io.capacity - 1, 1)
    values = {INPUT_IDS: torch.randint(0, config.vocab_size, (tokens,), generator=gen),
              HIDDEN_IN: torch.randn(tokens, config.hidden_size, generator=gen).to(getattr(torch, io.inputs[0].dtype)),
              POSITIONS: positions, SEQUENCE: seq, SLOTS: torch.arange(tokens) % rows,
              BLOCK_TABLES: torch.zeros(sequences, io.blocks, dtype=torch.int32),
              LOGITS_INDEX: torch.arange(sequences + 1) % tokens, TEMPERATURE: torch.ones(sequences + 1),
              TOP_K: torch.zeros(sequences + 1, dtype=torch.int32), TOP_P: torch.ones(sequences + 1),
              UNIFORM: torch.full((sequences + 1,), 0.5)}
    return tuple(values[t.name] if t.name in values else torch.zeros(io.cache_shape(t, rows), dtype=getattr(
        torch, t.dtype)) for t in io.inputs)


def trace_graph(config: DSAConfig, io: GraphIO, dtype: torch.dtype, fp8_block: tuple[int, int] | None,
                indexer_fp8_sim: bool = False) -> tuple[onnx.ModelProto, list[tuple[str, WeightSpec]]]:
    """The optimised graph without its weights, and (initializer name, model tensor) for each weight it reads.
    fp8_block: routed experts held as FP8 codes with scales of this block (None: in `dtype`); indexer_fp8_sim: the
    indexer's FP8 simulation on (DSAForCausalLM.set_indexer_fp8_sim)."""
    mode = FakeTensorMode()
    with signals_deferred(), mode:  # parameters and inputs are fake: shapes and dtypes only (signals: below)
        model = DSAForCausalLM(config).cast(dtype)
        if fp8_block is not None:
            for experts in model.routed_experts():
                experts.keep_fp8(fp8_block)
        model.init_buffers().eval()
        model.set_indexer_fp8_sim(indexer_fp8_sim)
        args = sample_inputs(io, config)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    dims = {name: torch.export.Dim(name) for name in (TOKENS, SEQUENCES, SAMPLES, POOL_ROWS)}
    specs = [{i: dims[d] for i, d in enumerate(t.dims) if d in dims} for t in io.inputs]
    dynamic_shapes = (*specs[:5], tuple(specs[5:]))  # forward(first, positions, sequence, slots, block_tables, *rest)
    # torch.onnx logs a warning per missing optional library (torchvision ops) and warns about its own internals;
    # onnxscript's optimizer logs each opaque initializer it leaves alone
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # signals deferred while torch traces: one that cuts its fake-tensor mode stack aborts the process from C++ (no
    # clean exit, a stack dump); the trace is minutes at most, and the signal stops the export as soon as it ends
    with torch.no_grad(), warnings.catch_warnings(), heartbeat(f"tracing the graph ({len(io.inputs)} inputs)"), \
            signals_deferred():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(torch.export.export(CachedLM(model, io), args, dynamic_shapes=dynamic_shapes),
                                    dynamo=True, verbose=False, optimize=False, opset_version=OPSET,
                                    input_names=[t.name for t in io.inputs], output_names=[t.name for t in io.outputs],
                                    custom_translation_table=translation_table())
    graph = program.model.graph
    weights = {}
    for name, value in graph.initializers.items():
        tensor = tensors.get(name.removeprefix(WRAPPER_PREFIX))
        if tensor is None:
            raise DSAExportError(f"the traced graph holds a constant '{name}' that is no model tensor")
        weights[name] = WeightSpec(name.removeprefix(WRAPPER_PREFIX), tuple(tensor.shape), tensor.dtype)
        value.const_value = None  # opaque to the optimizer: nothing is computed from a weight at export time
    onnxscript.optimizer.optimize(program.model)
    # 7 nodes per RMSNorm -> one RMSNormalization (opset 23+, in TensorRT's op table): onnxscript's own rule, called
    # directly because its public onnx_fusions.fuse() runs only for opset 23 exactly
    fuse_rms_normalization(program.model)
    used = [(name, weights[name]) for name, value in graph.initializers.items() if name in weights and value.uses()]
    for name in [name for name in graph.initializers if name in weights]:
        graph.initializers.pop(name)  # written by exporter/weights.py straight into the external data (or unused:
        # the tensors of other pipeline stages)
    return ir.serde.serialize_model(program.model), used


def export_onnx(source: DSAForCausalLM | Checkpoint | str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                capacity: int | None = None, dequantize_experts: bool = False,
                max_data_file_bytes: int = DEFAULT_MAX_FILE_BYTES, progress: bool = False,
                layers: tuple[int, int] | None = None) -> StageDir:
    """Export, check and write `model.onnx`, its external data files and `io.json` into `out_dir`; returns the
    export (exporter/artifacts.py) with its io and graph already known. source: a checkpoint directory, or one opened by checkpoint.open_checkpoint (weights streamed from its
    safetensors; the model is never held in memory), or a loaded model. capacity: cache rows (default: models/cache.py `default_capacity`). FP8 experts (stored FP8
    in the checkpoint, or kept FP8 by the loaded model) stay FP8 with their block scales unless
    `dequantize_experts`, which stores them in `dtype`. max_data_file_bytes: the size of each external data file.
    layers: export only layers start:stop, a pipeline stage (exporter/graph_io.py), with only their weights."""
    if name_of(dtype) not in ("float32", "bfloat16", "float16"):
        raise DSAExportError(f"cannot export in {dtype}")
    if isinstance(source, DSAForCausalLM):  # traced as built from its config, with its switches
        config, weights = source.config, ModelWeights(source)
        fp8_experts = any(e.fp8_block is not None for e in source.routed_experts())
        fp8_sim = any(layer.self_attn.indexer.fp8_sim for layer in source.model.layers)
    else:
        weights = CheckpointWeights(source)
        config, fp8_experts, fp8_sim = weights.config, weights.experts_fp8, False
    io = graph_io(config, dtype, capacity, layers)
    if io.capacity < 4:
        raise DSAExportError(f"capacity {io.capacity} is too small to trace the export (>= 4)")
    if max_data_file_bytes < 1:
        raise DSAExportError(f"the data file size must be > 0 bytes, got {max_data_file_bytes}")
    existed = Path(out_dir).exists()
    out_dir = ensure_output_dir(out_dir)  # after the checks: bad input leaves nothing behind
    try:
        return _export(config, weights, io, out_dir, dtype, fp8_experts and not dequantize_experts, fp8_sim,
                       max_data_file_bytes, progress)
    except BaseException:
        if not existed:  # a weight found bad while streaming (NaN), or an interruption: no empty directory left
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _export(config: DSAConfig, weights, io: GraphIO, out_dir: Path, dtype: torch.dtype, fp8_experts: bool,
            fp8_sim: bool, max_data_file_bytes: int, progress: bool) -> StageDir:
    fp8_block = config.weight_block if fp8_experts else None
    proto, specs = trace_graph(config, io, dtype, fp8_block, fp8_sim)
    proto = add_decompositions(proto)
    name_graph_dims(proto, io)
    proto.doc_string = f"dsa-export {__version__}; {name_of(dtype)}, cache capacity {io.capacity}"
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out_dir))
    try:
        proto.graph.initializer.extend(write_weights(specs, weights, tmp, max_data_file_bytes, progress))
        new, old = StageDir(tmp), StageDir(out_dir)
        onnx.save_model(proto, new.model_path)  # the graph only; the weights are in the data files
        moe_layers = sum(config.is_moe_layer(i) for i in range(*io.layers))
        check_graph(new.model_path, io, moe_layers=moe_layers, model=proto)
        new.io_path.write_text(json.dumps(io.to_json(), indent=2) + "\n")
        new.config_path.write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")  # the model exported
        make_readable(tmp)
        old.model_path.unlink(missing_ok=True)  # never a new model.onnx beside old data, or the reverse
        for path in old.data_files():
            path.unlink()
        for path in (*new.data_files(), new.io_path, new.config_path, new.model_path):  # model.onnx last: it
            os.replace(path, out_dir / path.name)  # appears only when complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stage = StageDir(out_dir)
    stage.__dict__.update(io=io, config=config, graph=proto)  # known: nothing is read back
    return stage


def export_stages(source: DSAForCausalLM | Checkpoint | str | Path, root: str | Path, layers: list[tuple[int, int]],
                  **options) -> ExportDir:
    """Export the model cut into pipeline stages (layer ranges, in order) into root (one graph at the root for a
    single stage, else root/stage-i/), after removing what an export into another number of stages left there;
    `options` as export_onnx's. Returns the export, every stage's io and graph already known."""
    export = ExportDir(root)
    export.prepare(len(layers))
    return ExportDir(root, [export_onnx(source, ExportDir.stage_path(root, i, len(layers)), layers=stage,
                                        progress=True, **options) for i, stage in enumerate(layers)])
