"""The export's weights, streamed into ONNX external data one tensor, or one row block, at a time.

The graph is traced without weights (exporter/onnx_export.py); each of its initializers is a model tensor (a
`DSAForCausalLM` state-dict name, or a buffer computed from the config), written here straight from where it lives:
- `CheckpointWeights`: an HF-layout checkpoint's safetensors, read by row blocks (stacked experts from their
  per-expert projections, in order); FP8 routed experts kept as their e4m3 codes with their block scales when the
  graph holds them so, every other FP8 weight dequantised block row by block row to the export dtype;
- `ModelWeights`: a model already in memory (the Python API, tests), cast block by block, never copied whole.
Memory stays at one row block (CHUNK_BYTES) plus what safetensors maps (checkpoint.TensorReader bounds that), whatever
the checkpoint's size. Data files are bounded (`max_file_bytes`; a single tensor larger than that gets a file of its
own, since ONNX cannot split one), named model.onnx.data, model.onnx.data.1, ...; tensors start 4 KiB-aligned, so
runtimes can map them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import onnx
import torch
from dsa_export.progress import bar as progress_bar

from dsa_export.errors import DSAExportError
from dsa_export.exporter.artifacts import data_file_name
from dsa_export.files import remember_digest
from dsa_export.formats import of
from dsa_export.models.checkpoint import (SCALE_SUFFIX, Checkpoint, TensorReader, check_finite, open_checkpoint,
                                          tensor_sources)
from dsa_export.models.fp8 import dequantize_weight
from dsa_export.models.model import DSAForCausalLM, RoutedExperts

CHUNK_BYTES = 64 << 20
ALIGN = 4096
DEFAULT_MAX_FILE_BYTES = 4 << 30


@dataclass(frozen=True)
class WeightSpec:
    name: str  # the model tensor (state-dict or buffer name)
    shape: tuple[int, ...]
    dtype: torch.dtype  # as the graph holds it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class WeightSource(Protocol):
    def chunks(self, spec: WeightSpec) -> Iterator[torch.Tensor]:
        """The tensor `spec.name` in `spec.dtype`, as consecutive row blocks that together make it."""
        ...


def _row_blocks(rows: int, row_bytes: int, multiple: int = 1) -> Iterator[tuple[int, int]]:
    step = max(multiple, CHUNK_BYTES // max(row_bytes, 1) // multiple * multiple)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class CheckpointWeights:
    """Model tensors read from an HF-layout checkpoint (headers checked up front: see checkpoint.open_checkpoint)."""

    def __init__(self, checkpoint: Checkpoint | str | Path):
        """checkpoint: a directory, or one already opened (several stage exports read one checkpoint)."""
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
        self.config = self.checkpoint.config
        self.block = self.config.weight_block
        self.buffers = self.checkpoint.skeleton.computed_buffers()
        self.reader = TensorReader(self.checkpoint.stored)

    @property
    def experts_fp8(self) -> bool:
        return self.checkpoint.experts_fp8

    def chunks(self, spec: WeightSpec) -> Iterator[torch.Tensor]:
        if spec.name in self.buffers:
            yield self.buffers[spec.name].to(spec.dtype)
            return
        for source, _ in tensor_sources(spec.name, self.config.n_routed_experts):
            yield from self._stored(source, spec.dtype)

    def _stored(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        stored = self.checkpoint.stored[name]
        rows, row_elems = (stored.shape[0], math.prod(stored.shape[1:])) if stored.shape else (1, 1)
        fp8 = stored.dtype == of("float8_e4m3fn").safetensors
        dequantize = fp8 and dtype != torch.int8  # int8 in the graph: the FP8 codes themselves
        multiple = self.block[0] if dequantize else 1  # whole block rows, so each block meets its scale
        for start, stop in _row_blocks(rows, row_elems * 4, multiple):
            tensor = self.reader.rows(name, start, stop) if stored.shape else self.reader.rows(name)
            check_finite(name, tensor)
            if dequantize:
                bo = self.block[0]
                scale_name = name.removesuffix(".weight") + SCALE_SUFFIX
                scale = self.reader.rows(scale_name, start // bo, -(-stop // bo))
                check_finite(scale_name, scale)
                tensor = dequantize_weight(tensor, scale, self.block, dtype)
            elif fp8:
                tensor = tensor.view(torch.int8)
            yield tensor.to(dtype)

    def close(self) -> None:
        self.reader.close()


class ModelWeights:
    """Model tensors from a model in memory."""

    def __init__(self, model: DSAForCausalLM):
        self.tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        self.fp8_experts = {name: module for name, module in model.named_modules()
                            if isinstance(module, RoutedExperts) and module.fp8_block is not None}

    def chunks(self, spec: WeightSpec) -> Iterator[torch.Tensor]:
        tensor = self.tensors[spec.name].detach()
        experts, _, weight = spec.name.rpartition(".")
        if experts in self.fp8_experts and tensor.dtype == torch.int8 and spec.dtype != torch.int8:
            for e in range(tensor.shape[0]):  # the graph wants them dequantised: expert by expert
                yield self.fp8_experts[experts].dequantized(weight, spec.dtype, slice(e, e + 1))
            return
        if tensor.dim() == 0:
            yield tensor.to(spec.dtype)
            return
        for start, stop in _row_blocks(tensor.shape[0], tensor[0].numel() * 4):
            yield tensor[start:stop].to(spec.dtype)

    def close(self) -> None:
        pass


class _DataFile:
    """One external data file being written, its sha256 computed as it is written (the build's runner records it
    without reading the file again: files.remember_digest)."""

    def __init__(self, path: Path):
        self.path, self.handle, self.hash, self.size = path, open(path, "wb"), hashlib.sha256(), 0

    def write(self, data) -> None:
        self.handle.write(data)
        self.hash.update(data)
        self.size += len(data)

    def pad_to(self, offset: int) -> None:
        """Zeros up to `offset` (tensors start aligned)."""
        if offset > self.size:
            self.write(bytes(offset - self.size))

    def close(self, finished: bool = True) -> None:
        self.handle.close()
        if finished:
            remember_digest(self.path, self.hash.hexdigest())


def write_weights(specs: list[tuple[str, WeightSpec]], source: WeightSource, out_dir: Path,
                  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, progress: bool = False) -> list[onnx.TensorProto]:
    """Write every (initializer name, spec) into data files in `out_dir`; the initializers that point at them."""
    if max_file_bytes < 1:
        raise DSAExportError(f"the data file size must be > 0 bytes, got {max_file_bytes}")
    initializers, index = [], 0
    data_file = _DataFile(out_dir / data_file_name(0))
    total = sum(spec.nbytes for _, spec in specs)
    finished = False
    try:
        with progress_bar(total=total, enabled=progress, desc="writing weights", unit="B", unit_scale=True) as bar:
            for onnx_name, spec in specs:
                offset = -(-data_file.size // ALIGN) * ALIGN
                if offset and offset + spec.nbytes > max_file_bytes:  # next file (a lone tensor may exceed it)
                    data_file.close()
                    index, offset = index + 1, 0
                    data_file = _DataFile(out_dir / data_file_name(index))
                data_file.pad_to(offset)
                for chunk in source.chunks(spec):
                    data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                    data_file.write(data)
                    bar.update(data.size)
                if data_file.size - offset != spec.nbytes:
                    raise DSAExportError(f"tensor '{spec.name}': wrote {data_file.size - offset:,} bytes, the graph "
                                         f"expects {spec.nbytes:,} ({list(spec.shape)} {spec.dtype})")
                tensor = onnx.TensorProto(name=onnx_name, dims=spec.shape, data_type=of(spec.dtype).onnx,
                                          data_location=onnx.TensorProto.EXTERNAL)
                for key, value in (("location", data_file_name(index)), ("offset", offset),
                                   ("length", spec.nbytes)):
                    tensor.external_data.add(key=key, value=str(value))
                initializers.append(tensor)
        finished = True
    finally:
        data_file.close(finished)
        source.close()
    return initializers
