"""The two `dsa::` op contracts (design.md, "The custom ops"), written once as plain data.

Every implementation is checked against these: the torch reference and the Triton kernels (tests), the torch.library
schema (generated from here), and later the ONNX schemas and TensorRT plugins. This module imports nothing from the
package, so any layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT_TYPES = ("float32", "bfloat16")
INDEX_TYPES = ("int32", "int64")


@dataclass(frozen=True)
class TensorArg:
    name: str
    dims: tuple[str, ...]  # named dims; an output dim may name an int attribute ("topk", "dv")
    dtypes: tuple[str, ...]  # allowed torch dtype names; "like:q" = same dtype as input q
    doc: str = ""


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # "int" or "float"
    doc: str = ""


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

    @property
    def qualified_name(self) -> str:
        return f"{self.domain}::{self.torch_name}"

    def torch_schema(self) -> str:
        """The torch.library schema string, e.g. `lightning_indexer(Tensor q, ..., int topk) -> Tensor`."""
        args = [f"Tensor {t.name}" for t in self.inputs] + [f"{a.type} {a.name}" for a in self.attributes]
        return f"{self.torch_name}({', '.join(args)}) -> Tensor"

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
                dtype = str(tensor.dtype).removeprefix("torch.")
                allowed = tuple(str(inputs[d[5:]].dtype).removeprefix("torch.") if d.startswith("like:") else d
                                for d in spec.dtypes)
                if dtype not in allowed:
                    raise ValueError(f"{self.qualified_name}: '{spec.name}' must be {'/'.join(allowed)}, got {dtype}")
        return dims


LIGHTNING_INDEXER = OpContract(
    domain="dsa", onnx_name="LightningIndexer", torch_name="lightning_indexer", version=1,
    inputs=(
        TensorArg("q", ("B", "S", "HI", "DI"), FLOAT_TYPES + ("float8_e4m3fn",), "indexer queries after RoPE"),
        TensorArg("k", ("B", "T", "DI"), FLOAT_TYPES + ("float8_e4m3fn",), "indexer key cache incl. current tokens"),
        TensorArg("w", ("B", "S", "HI"), ("float32",), "per-head weights, already scaled"),
        TensorArg("positions", ("B", "S"), INDEX_TYPES, "absolute position of each query"),
    ),
    attributes=(Attribute("topk", "int", "keys kept per query"),),
    outputs=(TensorArg("indices", ("B", "S", "topk"), ("int32",), "selected keys; -1 beyond the visible count"),),
    doc="indices of the visible keys t <= positions[b,s] with the largest Σ_h w[b,s,h]·ReLU(q[b,s,h]·k[b,t]); "
        "ties go to the lower t; order within a row is not part of the contract",
)

SPARSE_MLA = OpContract(
    domain="dsa", onnx_name="SparseMLA", torch_name="sparse_mla", version=1,
    inputs=(
        TensorArg("q", ("B", "S", "H", "DK"), FLOAT_TYPES, "absorbed queries q_nope·W_UK ‖ q_pe"),
        TensorArg("kv", ("B", "T", "DK"), FLOAT_TYPES, "latent cache: normalised latent ‖ roped k_pe"),
        TensorArg("indices", ("B", "S", "K"), ("int32",), "selected rows, -1 = empty slot"),
    ),
    attributes=(Attribute("scale", "float", "softmax scale (with YaRN mscale)"),
                Attribute("dv", "int", "value width = kv_lora_rank; the value is kv[..., :dv]")),
    outputs=(TensorArg("out", ("B", "S", "H", "dv"), ("like:q",), "attention output in the latent space"),),
    doc="softmax over the selected keys only; a row with no valid index gives zeros",
)

CONTRACTS = (LIGHTNING_INDEXER, SPARSE_MLA)
