"""Tensor formats: one row per dtype with its name in every system the package talks to (torch, ONNX, safetensors,
Triton kernels, Triton Inference Server, numpy, TensorRT), and the FP8 block format of DeepSeek's checkpoints.

A leaf like targets.py: it imports nothing heavy (torch, onnx and tensorrt names are plain strings and ints here), so
every room may read it. Adding a format (fp16, an FP4 expert format) is one row.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsa_export.errors import DSAExportError


@dataclass(frozen=True)
class Format:
    name: str  # the torch dtype's name, which io.json and the contracts use: "float32", "bfloat16", ...
    itemsize: int  # bytes per element
    onnx: int  # onnx.TensorProto.DataType value
    onnx_type: str  # the ONNX type string of schemas, "tensor(float)"
    safetensors: str | None  # safetensors' dtype string, "F32"
    triton: str | None  # a Triton kernel's pointer element type, "fp32" (signature "*fp32")
    server: str | None  # Triton Inference Server's config type, "TYPE_FP32"
    numpy: str | None  # numpy dtype name (None: numpy has no such type)
    tensorrt: str | None  # tensorrt.DataType attribute name

    @property
    def tag(self) -> str:
        """A short name for file names: fp32, bf16, fp8e4m3, i32, ..."""
        return TAGS[self.name]

    @property
    def floating(self) -> bool:
        return self.name in ("float32", "bfloat16", "float16", "float8_e4m3fn")


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("float32", 4, 1, "tensor(float)", "F32", "fp32", "TYPE_FP32", "float32", "float32"),
    Format("bfloat16", 2, 16, "tensor(bfloat16)", "BF16", "bf16", "TYPE_BF16", None, "bfloat16"),
    Format("float16", 2, 10, "tensor(float16)", "F16", "fp16", "TYPE_FP16", "float16", "float16"),
    Format("float8_e4m3fn", 1, 17, "tensor(float8e4m3fn)", "F8_E4M3", "fp8e4nv", None, None, "fp8"),
    Format("uint8", 1, 2, "tensor(uint8)", "U8", "u8", "TYPE_UINT8", "uint8", "uint8"),
    Format("int8", 1, 3, "tensor(int8)", "I8", "i8", "TYPE_INT8", "int8", "int8"),
    Format("int32", 4, 6, "tensor(int32)", "I32", "i32", "TYPE_INT32", "int32", "int32"),
    Format("int64", 8, 7, "tensor(int64)", "I64", "i64", "TYPE_INT64", "int64", "int64"),
    Format("bool", 1, 9, "tensor(bool)", "BOOL", "i1", "TYPE_BOOL", "bool_", "bool"),
)}
TAGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8e4m3", "uint8": "u8", "int8": "i8",
        "int32": "i32", "int64": "i64", "bool": "bool"}
ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
           "fp8": "float8_e4m3fn"}

# The model's weight and cache dtypes (the eager model, the export, the engine).
MODEL_DTYPES = ("float32", "bfloat16")
# DeepSeek's FP8 checkpoints: e4m3 codes, one fp32 scale (`weight_scale_inv`) per 128 x 128 block.
FP8_BLOCK = (128, 128)
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
                           "weight_block_size": list(FP8_BLOCK)}


def name_of(dtype) -> str:
    """The format name of a torch dtype (or of a name, an alias): torch.bfloat16 → "bfloat16"."""
    name = str(dtype).removeprefix("torch.").lower()
    return ALIASES.get(name, name)


def of(dtype) -> Format:
    """The format of a torch dtype or a name (an ONNX elem type int too); DSAExportError naming it if unknown."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        for f in FORMATS.values():
            if f.onnx == dtype:
                return f
    fmt = FORMATS.get(name_of(dtype))
    if fmt is None:
        raise DSAExportError(f"unknown tensor format {dtype!r} (known: {', '.join(FORMATS)})")
    return fmt


def by(field: str, value) -> Format:
    """The format whose `field` (safetensors, server, tensorrt, ...) is `value`."""
    for f in FORMATS.values():
        if getattr(f, field) == value:
            return f
    raise DSAExportError(f"no tensor format has {field} {value!r}")


def torch_dtype(dtype):
    """The torch dtype of a format or a name (imports torch)."""
    import torch

    return getattr(torch, of(dtype).name)


def model_dtype_name(value) -> str:
    """float32 or bfloat16 from a torch dtype or a name (float32/fp32/bfloat16/bf16)."""
    name = name_of(value)
    if name not in MODEL_DTYPES:
        raise DSAExportError(f"dtype must be float32 or bfloat16, got {value!r}")
    return name
