"""The `dsa::` op contracts (design.md, "The custom ops"), written once as plain data.

Every implementation is checked against these: the torch reference and the Triton kernels (tests), the torch.library
schemas, the ONNX schemas and the TensorRT plugins (all generated from here). Each contract also says what its op
costs for given shapes, so the exported graph's cost can be audited without running it. This module imports only the
formats table: it is the bottom layer, and every other layer may read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from dsa_export.formats import FORMATS, name_of

FLOAT_TYPES = ("float32", "bfloat16")
INDEX_TYPES = ("int32", "int64")
FP8 = "float8_e4m3fn"
# FP8 expert weights travel as their bytes, typed int8: ONNX has no Gather/Slice for float8 tensors, so an ONNX
# consumer could not pick one expert's weights out of a float8 tensor, and TensorRT keeps INT8 initializers byte for
# byte (UINT8 ones its parser widened to INT32 up to 10.12, and addConstant does not take at all); a kernel reads the
# same bytes as e4m3.
FP8_BYTES = "int8"


@dataclass(frozen=True)
class TensorArg:
    name: str
    dims: tuple[str, ...]  # named dims; an output dim may name an int attribute ("topk", "dv")
    dtypes: tuple[str, ...]  # allowed torch dtype names; "like:q" = same dtype as input q
    doc: str = ""

    @property
    def dtype_rule(self) -> tuple[str, str]:
        """("like", input name): the dtype of that input; ("is", dtype name): that dtype (the first allowed)."""
        first = self.dtypes[0]
        return ("like", first.removeprefix("like:")) if first.startswith("like:") else ("is", first)

    def allowed(self, input_dtypes: Mapping[str, Any]) -> tuple[Any, ...]:
        """The dtypes allowed, a "like:x" rule resolved to input x's dtype (in whatever form input_dtypes gives)."""
        return tuple(input_dtypes[d.removeprefix("like:")] if d.startswith("like:") else d for d in self.dtypes)


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # "int" or "float"
    doc: str = ""


@dataclass(frozen=True)
class Workload:
    """What an op's cost depends on besides its shapes: the named dims, the bytes per element of each tensor, and
    where the tokens sit: N tokens of `sequences` aligned sequences, token s of each at position `past + s`."""
    dims: dict[str, int]
    itemsize: dict[str, int]  # tensor name -> bytes per element
    past: int = 0
    sequences: int = 1

    @property
    def per_sequence(self) -> int:
        """Tokens of each sequence in the step (S)."""
        return self.dims["N"] // self.sequences

    def visible_keys(self) -> int:
        """Σ over the tokens of the keys each may see (t <= its position): sequences · (S·past + S(S+1)/2)."""
        S = self.per_sequence
        return self.sequences * (S * self.past + S * (S + 1) // 2)

    def scored_keys(self, topk: int) -> int:
        """Σ of the keys each token scores when a token that sees no more than `topk` keys scores none (it keeps
        them all: the indexer skips it)."""
        low, high = max(self.past + 1, topk + 1), self.past + self.per_sequence  # visible counts that score
        return self.sequences * (low + high) * (high - low + 1) // 2 if low <= high else 0

    def nbytes(self, name: str, *dims: str) -> int:
        return self.itemsize[name] * math.prod(self.dims[d] for d in dims)


@dataclass(frozen=True)
class OpCost:
    """Work and device-memory traffic of one call, each tensor read or written once."""
    flops: float  # tensor-core work (multiply-adds count 2); elementwise work is left out, as in parity/cost.py
    weight_bytes: float = 0.0  # model weights read
    cache_bytes: float = 0.0  # KV-cache rows read
    activation_bytes: float = 0.0  # the op's other inputs and its outputs

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.cache_bytes + self.activation_bytes


@dataclass(frozen=True)
class OpContract:
    domain: str
    onnx_name: str  # ONNX op_type and TensorRT plugin name
    torch_name: str  # torch.ops.<domain>.<torch_name>
    version: int
    inputs: tuple[TensorArg, ...]
    attributes: tuple[Attribute, ...]
    outputs: tuple[TensorArg, ...]
    doc: str
    cost_model: Callable[[Workload], OpCost] = field(compare=False, repr=False)
    aliases: tuple[tuple[str, str], ...] = ()  # (output, input): the output is written in place of that input
    # dims computed from the others (ints and symbolic sizes alike), e.g. the candidates' rows N + split_rows
    derived_dims: Callable[[dict], dict] | None = field(default=None, compare=False, repr=False)

    @property
    def qualified_name(self) -> str:
        return f"{self.domain}::{self.torch_name}"

    def torch_schema(self) -> str:
        """The torch.library schema string, e.g. `lightning_indexer(Tensor q, ..., int topk) -> Tensor`."""
        args = [f"Tensor {t.name}" for t in self.inputs] + [f"{a.type} {a.name}" for a in self.attributes]
        return f"{self.torch_name}({', '.join(args)}) -> Tensor"

    def named_dims(self, shapes: Mapping[str, Sequence[Any]], attributes: Mapping[str, Any]) -> dict[str, Any]:
        """The contract's dim names → sizes: from the inputs' shapes (the first input that has the dim; an input
        missing from `shapes` is skipped) and the int attributes. Sizes of any kind: ints, ONNX dims, TensorRT
        shape expressions (no checks: see `check`)."""
        dims: dict[str, Any] = {}
        for spec in self.inputs:
            if spec.name in shapes:
                for name, size in zip(spec.dims, shapes[spec.name]):
                    dims.setdefault(name, size)
        dims.update((a.name, attributes[a.name]) for a in self.attributes if a.type == "int" and a.name in attributes)
        if self.derived_dims is not None:
            dims.update(self.derived_dims(dims))
        return dims

    def input_dims(self, shapes: dict[str, tuple[int, ...]], attributes: dict) -> dict[str, int]:
        """Named dims from the inputs' concrete shapes and the int attributes, as ints."""
        return {name: int(size) for name, size in self.named_dims(shapes, attributes).items()}

    def output_dims(self, named: Mapping[str, Any], output: int = 0) -> tuple[Any, ...]:
        """The output's dims, each looked up by the name the contract gives it (ints or symbolic sizes alike)."""
        return tuple(named[d] for d in self.outputs[output].dims)

    def output_shape(self, dims: dict[str, int], output: int = 0) -> tuple[int, ...]:
        return tuple(int(d) for d in self.output_dims(dims, output))

    def output_dtype(self, input_dtypes: Mapping[str, Any], output: int = 0) -> Any:
        """The output's dtype by the contract's rule: an input's (in the form input_dtypes gives) or a name."""
        kind, value = self.outputs[output].dtype_rule
        return input_dtypes[value] if kind == "like" else value

    def cost(self, shapes: dict[str, tuple[int, ...]], attributes: dict, itemsize: dict[str, int],
             past: int = 0, sequences: int = 1) -> OpCost:
        dims = self.input_dims(shapes, attributes)
        sizes = dict(itemsize)
        for spec in self.outputs:  # an output's own dtype, or (like an input) 4 bytes
            kind, dtype = spec.dtype_rule
            sizes.setdefault(spec.name, FORMATS[dtype].itemsize if kind == "is" else sizes.get(dtype, 4))
        return self.cost_model(Workload(dims, sizes, past, sequences))

    def check(self, inputs: dict, attributes: dict, outputs: dict | None = None) -> dict[str, int]:
        """Raise ValueError naming the first tensor whose rank, dims or dtype break the contract; return the dims.

        `inputs`/`outputs` map names to tensors (anything with `.shape` and `.dtype`)."""
        dims: dict[str, int] = {a.name: int(attributes[a.name]) for a in self.attributes if a.type == "int"}
        for arg, tensors in ((self.inputs, inputs), (self.outputs, outputs or {})):
            for spec in arg:
                if spec.name not in tensors:
                    if tensors is inputs:
                        raise ValueError(f"{self.qualified_name}: input '{spec.name}' is missing")
                    continue
                tensor = tensors[spec.name]
                shape = tuple(tensor.shape)
                if len(shape) != len(spec.dims):
                    raise ValueError(f"{self.qualified_name}: '{spec.name}' must have rank {len(spec.dims)} "
                                     f"[{','.join(spec.dims)}], got shape {list(shape)}")
                for dim, size in zip(spec.dims, shape):
                    if dims.setdefault(dim, size) != size:
                        raise ValueError(f"{self.qualified_name}: '{spec.name}' dim {dim}={size} disagrees with "
                                         f"{dim}={dims[dim]} elsewhere")
            self.check_dtypes({k: name_of(t.dtype) for k, t in tensors.items()}, arg,
                              {k: name_of(t.dtype) for k, t in inputs.items()})
        return dims

    def check_dtypes(self, dtypes: Mapping[str, str], specs: Sequence[TensorArg] | None = None,
                     input_dtypes: Mapping[str, str] | None = None) -> None:
        """Raise ValueError naming the first tensor (of `specs`, default the inputs) whose dtype, by name, the
        contract does not allow (a TensorRT plugin checks its inputs with this before launching a kernel)."""
        for spec in self.inputs if specs is None else specs:
            if spec.name in dtypes:
                allowed = spec.allowed(dtypes if input_dtypes is None else input_dtypes)
                if dtypes[spec.name] not in allowed:
                    raise ValueError(f"{self.qualified_name}: '{spec.name}' must be {'/'.join(allowed)}, got "
                                     f"{dtypes[spec.name]}")


# ---- the paged caches --------------------------------------------------------------------------------------------------
# Every layer's caches are pools of fixed-size blocks shared by all sequences (models/cache.py): [ROWS, D], ROWS a
# multiple of the block size. A step's tokens are packed (N of them, any mix of sequences); token n belongs to
# sequence `sequence[n]` (a row of `block_tables` [R, M], that sequence's blocks in order) at `positions[n]`, so key t
# of that sequence lives in pool row block_tables[s, t // block_size]·block_size + t % block_size.
_PAGING = (
    TensorArg("positions", ("N",), INDEX_TYPES, "each token's position in its sequence"),
    TensorArg("sequence", ("N",), ("int32",), "each token's sequence: a row of block_tables"),
    TensorArg("block_tables", ("R", "M"), ("int32",), "each sequence's blocks of the pool, in order"),
)


# ---- dsa::LightningIndexer ---------------------------------------------------------------------------------------------
def _indexer_cost(w: Workload) -> OpCost:
    d = w.dims
    scored = w.scored_keys(d["topk"])  # (token, key) pairs; none for a token that keeps all its keys
    # each sequence's visible keys, once, if any of its tokens scores them
    keys_read = w.sequences * (w.past + w.per_sequence) if scored else 0
    return OpCost(flops=scored * (2 * d["HI"] * d["DI"] + 2 * d["HI"]),
                  cache_bytes=keys_read * d["DI"] * w.itemsize["k"],
                  activation_bytes=w.nbytes("q", "N", "HI", "DI") + w.nbytes("w", "N", "HI")
                  + w.nbytes("positions", "N") + w.nbytes("indices", "N", "topk"))


LIGHTNING_INDEXER = OpContract(
    domain="dsa", onnx_name="LightningIndexer", torch_name="lightning_indexer", version=1,
    inputs=(
        TensorArg("q", ("N", "HI", "DI"), FLOAT_TYPES + (FP8,), "indexer queries after RoPE, one row per token"),
        TensorArg("k", ("ROWS", "DI"), FLOAT_TYPES + (FP8,), "indexer key pool (the step's keys already written)"),
        TensorArg("w", ("N", "HI"), ("float32",), "per-head weights, already scaled"),
        *_PAGING,
    ),
    attributes=(Attribute("topk", "int", "keys kept per token"),
                Attribute("block_size", "int", "rows per block of the pool")),
    outputs=(TensorArg("indices", ("N", "topk"), ("int32",), "pool rows of the selected keys; -1 beyond the "
                                                             "visible count"),),
    doc="for token n of sequence s = sequence[n] at position p = positions[n]: the pool rows of the keys t <= p of s "
        "with the largest Σ_h w[n,h]·ReLU(q[n,h]·k[row of t]); ties go to the lower t; order within a row is not "
        "part of the contract; no other row of the pool is read; a token that sees at most topk keys keeps them all, "
        "unscored",
    cost_model=_indexer_cost,
)


# ---- dsa::SparseMLA ----------------------------------------------------------------------------------------------------
def _sparse_mla_cost(w: Workload) -> OpCost:
    d = w.dims
    S = w.per_sequence
    slots = w.sequences * sum(min(d["K"], w.past + s + 1) for s in range(S))  # valid (non −1) slots read
    return OpCost(flops=d["N"] * d["K"] * d["H"] * 2 * (d["DK"] + d["dv"]),
                  cache_bytes=slots * d["DK"] * w.itemsize["kv"],
                  activation_bytes=w.nbytes("q", "N", "H", "DK") + w.nbytes("indices", "N", "K")
                  + w.nbytes("out", "N", "H", "dv"))


SPARSE_MLA = OpContract(
    domain="dsa", onnx_name="SparseMLA", torch_name="sparse_mla", version=1,
    inputs=(
        TensorArg("q", ("N", "H", "DK"), FLOAT_TYPES, "absorbed queries q_nope·W_UK ‖ q_pe, one row per token"),
        TensorArg("kv", ("ROWS", "DK"), FLOAT_TYPES, "latent pool: normalised latent ‖ roped k_pe"),
        TensorArg("indices", ("N", "K"), ("int32",), "pool rows to attend, -1 = empty slot"),
    ),
    attributes=(Attribute("scale", "float", "softmax scale (with YaRN mscale)"),
                Attribute("dv", "int", "value width = kv_lora_rank; the value is kv[..., :dv]")),
    outputs=(TensorArg("out", ("N", "H", "dv"), ("like:q",), "attention output in the latent space"),),
    doc="softmax over the selected rows only; a token with no valid index gives zeros",
    cost_model=_sparse_mla_cost,
)


# ---- dsa::WriteCache ---------------------------------------------------------------------------------------------------
def _write_cache_cost(w: Workload) -> OpCost:
    return OpCost(flops=0, cache_bytes=w.nbytes("cache", "N", "D"), activation_bytes=w.nbytes("rows", "N", "D"))


WRITE_CACHE = OpContract(
    domain="dsa", onnx_name="WriteCache", torch_name="write_cache", version=1,
    inputs=(
        TensorArg("cache", ("ROWS", "D"), FLOAT_TYPES, "a layer's pool"),
        TensorArg("rows", ("N", "D"), ("like:cache",), "the step's new rows, one per token"),
        TensorArg("slots", ("N",), ("int64",), "the pool row each token's row goes to"),
    ),
    attributes=(),
    outputs=(TensorArg("out", ("ROWS", "D"), ("like:cache",), "the pool with the new rows"),),
    doc="out = cache with row slots[n] replaced by rows[n]; in place: the output is the cache (TensorRT aliases "
        "them, ONNX Runtime writes into the buffer bound as both); no other row is touched",
    cost_model=_write_cache_cost,
    aliases=(("out", "cache"),),
)


# ---- dsa::RoutedExperts / dsa::RoutedExpertsFP8 -----------------------------------------------------------------------
def _routed_experts_cost(w: Workload) -> OpCost:
    d = w.dims
    routed = d["N"] * d["k"]  # (token, expert) pairs
    touched = min(d["E"], routed)  # experts whose weights are read: routed-only, never all E
    weight_bytes = touched * (w.nbytes("gate_up", "2I", "H") + w.nbytes("down", "H", "I"))
    if "gate_up_scale" in w.itemsize:
        weight_bytes += touched * (w.nbytes("gate_up_scale", "GB", "HB") + w.nbytes("down_scale", "DB", "IB"))
    return OpCost(flops=routed * 2 * (d["2I"] * d["H"] + d["H"] * d["I"]), weight_bytes=weight_bytes,
                  activation_bytes=w.nbytes("x", "N", "H") + w.nbytes("experts", "N", "k")
                  + w.nbytes("weights", "N", "k") + w.nbytes("base", "N", "H") + w.nbytes("out", "N", "H"))


_ROUTED_DOC = ("out[n] = base[n] + Σ_j weights[n,j]·y_e(x[n]) with e = experts[n,j] and the SwiGLU expert "
               "y_e(x) = down[e]·h, h = silu(g)·u rounded to x's dtype, [g ‖ u] = gate_up[e]·x rounded to x's dtype, "
               "y accumulated in fp32; tokens are grouped by expert, so only the chosen experts' weights are read. "
               "`base` (the shared expert's output) initialises the sum: a TensorRT plugin launches one kernel, whose "
               "split-I partial sums are combined with atomic adds into that buffer (the plugin output aliases it)")
_ROUTED_INPUTS = (
    TensorArg("x", ("N", "H"), FLOAT_TYPES, "hidden states, one row per token"),
    TensorArg("experts", ("N", "k"), ("int32",), "chosen experts per token (noaux_tc gate)"),
    TensorArg("weights", ("N", "k"), ("float32",), "routing weight of each chosen expert"),
)
_ROUTED_BASE = TensorArg("base", ("N", "H"), ("float32",), "what the routed sum is added to (shared expert output)")
_ROUTED_OUT = (TensorArg("out", ("N", "H"), ("float32",), "base + weighted sum of the chosen experts"),)

ROUTED_EXPERTS = OpContract(
    domain="dsa", onnx_name="RoutedExperts", torch_name="routed_experts", version=1,
    inputs=_ROUTED_INPUTS + (
        TensorArg("gate_up", ("E", "2I", "H"), ("like:x",), "stacked gate ‖ up projections of every expert"),
        TensorArg("down", ("E", "H", "I"), ("like:x",), "stacked down projections"),
        _ROUTED_BASE),
    attributes=(),
    outputs=_ROUTED_OUT,
    doc=_ROUTED_DOC,
    cost_model=_routed_experts_cost,
    aliases=(("out", "base"),),
)

ROUTED_EXPERTS_FP8 = OpContract(
    domain="dsa", onnx_name="RoutedExpertsFP8", torch_name="routed_experts_fp8", version=1,
    inputs=_ROUTED_INPUTS + (
        TensorArg("gate_up", ("E", "2I", "H"), (FP8_BYTES,), "gate ‖ up: FP8 e4m3 codes, as DeepSeek's checkpoint "
                  "stores them"),
        TensorArg("gate_up_scale", ("E", "GB", "HB"), ("float32",),
                  "block scales: GB = 2·ceil(I/block_out) (gate's row blocks, then up's), HB = ceil(H/block_in)"),
        TensorArg("down", ("E", "H", "I"), (FP8_BYTES,), "down projections: FP8 e4m3 codes"),
        TensorArg("down_scale", ("E", "DB", "IB"), ("float32",),
                  "block scales: DB = ceil(H/block_out), IB = ceil(I/block_in)"),
        _ROUTED_BASE),
    attributes=(Attribute("block_out", "int", "rows per scale block (128 in DeepSeek's checkpoint)"),
                Attribute("block_in", "int", "columns per scale block (128)")),
    outputs=_ROUTED_OUT,
    doc=_ROUTED_DOC + "; weights are dequantised per block (W8·scale, in fp32, then rounded to x's dtype) as they "
                      "are read, so an engine holds one byte per expert parameter",
    cost_model=_routed_experts_cost,
    aliases=(("out", "base"),),
)


# ---- dsa::IndexerChunks + dsa::IndexerMerge: LightningIndexer as TensorRT runs it -----------------------------------
# A TensorRT plugin launches one kernel, and the indexer splits each token's keys over several programs so that a
# decode step fills the GPU (kernels/triton_indexer.py): the engine build replaces every LightningIndexer node by
# these two (plugins/onnx_ops.split_indexer). They exist only in the graph TensorRT parses: no torch op, no ONNX
# schema or decomposition. The candidates' layout is the split rule of kernels/triton_indexer.py.
INDEXER_SPLIT_ROWS = 512  # the split_rows attribute the build gives the nodes (= triton_indexer.SPLIT_ROWS)


def _indexer_chunks_cost(w: Workload) -> OpCost:
    scoring = _indexer_cost(w)
    return OpCost(flops=scoring.flops, cache_bytes=scoring.cache_bytes,
                  activation_bytes=w.nbytes("q", "N", "HI", "DI") + w.nbytes("w", "N", "HI")
                  + w.nbytes("positions", "N") + w.nbytes("candidates", "N", "topk"))


def _indexer_merge_cost(w: Workload) -> OpCost:
    return OpCost(flops=0, activation_bytes=w.nbytes("candidates", "N", "topk") + w.nbytes("indices", "N", "topk"))


def _candidate_rows(dims: dict) -> dict:
    return {"SLOTS": dims["N"] + dims["split_rows"]} if "N" in dims and "split_rows" in dims else {}


_SPLIT_ROWS = Attribute("split_rows", "int", "candidate rows beyond the N first (the split rule's SPLIT_ROWS)")
_CANDIDATES = TensorArg("candidates", ("SLOTS", "topk"), ("int64",),
                        "each chunk's top-k keys, (score, position) packed so that they sort like the contract, "
                        "sorted descending; row n: token n's first chunk, N + n·(splits-1) + c - 1 its chunk c")

INDEXER_CHUNKS = OpContract(
    domain="dsa", onnx_name="IndexerChunks", torch_name="indexer_chunks", version=1,
    inputs=LIGHTNING_INDEXER.inputs,
    attributes=LIGHTNING_INDEXER.attributes + (_SPLIT_ROWS,),
    outputs=(_CANDIDATES,),
    doc="the first half of LightningIndexer: every chunk of each token's visible keys (the split rule) with its top-k "
        "keys; a token that keeps all its keys has no chunk",
    cost_model=_indexer_chunks_cost,
    derived_dims=_candidate_rows,
)

INDEXER_MERGE = OpContract(
    domain="dsa", onnx_name="IndexerMerge", torch_name="indexer_merge", version=1,
    inputs=(TensorArg("candidates", ("SLOTS", "topk"), ("int64",), "IndexerChunks' output"), *_PAGING),
    attributes=LIGHTNING_INDEXER.attributes + (_SPLIT_ROWS,),
    outputs=LIGHTNING_INDEXER.outputs,
    doc="the second half of LightningIndexer: each token's chunk lists merged into its top-k, mapped to pool rows; "
        "indices as LightningIndexer gives them",
    cost_model=_indexer_merge_cost,
)

CONTRACTS = (LIGHTNING_INDEXER, SPARSE_MLA, WRITE_CACHE, ROUTED_EXPERTS, ROUTED_EXPERTS_FP8)  # the exported graph's
TENSORRT_CONTRACTS = (INDEXER_CHUNKS, INDEXER_MERGE, SPARSE_MLA, WRITE_CACHE, ROUTED_EXPERTS,
                      ROUTED_EXPERTS_FP8)  # the TensorRT plugins: the ops of the graph an engine is built from
# an ONNX node's op type (a plugin's name) → its contract
BY_ONNX_NAME = {c.onnx_name: c for c in CONTRACTS + TENSORRT_CONTRACTS}


def fp8_scale_shape(rows: int, cols: int, block_out: int, block_in: int, stacked: int = 1) -> tuple[int, int]:
    """Block-scale shape of a [stacked·rows, cols] weight made of `stacked` projections of `rows` rows each (gate ‖ up
    is 2): every projection keeps its own row blocks, so the gate's last partial block never mixes with up's rows."""
    return stacked * -(-rows // block_out), -(-cols // block_in)
