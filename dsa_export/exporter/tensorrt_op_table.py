"""ONNX operators TensorRT imports, with the tensor types it supports for each: data for the export graph checks.

Source: onnx/onnx-tensorrt `docs/operators.md`, "TensorRT 10.15 supports operators in the inclusive range of opset 9
to opset 24" (operators marked Y). Restrictions that matter for the dsa-export graph are kept beside the op; the
check reads only the op and the types. FP8/FP4/INT8/INT4 are quantized types there (only via Q/DQ).
"""

from __future__ import annotations

SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15, opsets 9-24)"

_F = ("FLOAT", "FLOAT16", "BFLOAT16")
_I = ("INT32", "INT64")
_B = ("BOOL",)

SUPPORTED: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Ceil",
                     "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum", "Elu", "Erf",
                     "Exp", "Floor", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GroupNormalization",
                     "GRU", "HardSigmoid", "HardSwish", "Hardmax", "ImageScaler", "InstanceNormalization", "IsInf",
                     "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "LRN", "LSTM", "LpNormalization", "LpPool",
                     "MatMul", "MaxPool", "MeanVarianceNormalization", "ParametricSoftplus", "PRelu", "QuantizeLinear",
                     "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Reciprocal", "Resize",
                     "RMSNormalization", "RNN", "RotaryEmbedding", "Round", "ScaledTanh", "Scan", "Selu", "Sigmoid",
                     "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
                     "Upsample"), _F),
    **dict.fromkeys(("Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual",
                     "IsNaN", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Pow", "Range",
                     "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
                     "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Scatter", "ScatterElements", "ScatterND",
                     "Shrink", "Sign", "SpaceToDepth", "Sub", "Sum", "TopK"), _F + _I),
    **dict.fromkeys(("Concat", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "If",
                     "Loop", "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Slice", "Split", "Squeeze", "Tile",
                     "Transpose", "Trilu", "Unsqueeze", "Where"), _F + _I + _B),
    **dict.fromkeys(("And", "Not", "Or", "Xor"), _B),
    "Cast": _F + _I + ("UINT8",) + _B,
    "CastLike": _F + _I + ("UINT8",) + _B,
    "Constant": _F + ("FLOAT8E4M3FN",) + _I + _B,
    "ConstantOfShape": _F + ("FLOAT8E4M3FN",) + _I + _B,
    "DequantizeLinear": ("INT8", "FLOAT8E4M3FN", "INT4"),
    "Gelu": _F + ("INT8",) + _I,
    "Mean": _F + ("FLOAT8E4M3FN",) + _I,
    "Attention": _F + ("INT8", "FLOAT8E4M3FN"),
    "BlackmanWindow": ("FLOAT", "FLOAT16"), "HammingWindow": ("FLOAT", "FLOAT16"), "HannWindow": ("FLOAT", "FLOAT16"),
    "DeformConv": ("FLOAT", "FLOAT16"), "GridSample": ("FLOAT", "FLOAT16"), "Mish": ("FLOAT", "FLOAT16"),
    "NonMaxSuppression": ("FLOAT", "FLOAT16"), "NonZero": ("FLOAT", "FLOAT16"), "RoiAlign": ("FLOAT", "FLOAT16"),
    "STFT": ("FLOAT",),
    "TensorScatter": _F + ("INT32",),
}

RESTRICTIONS = {
    "TopK": "`sorted` must be 1; K must be less than 3840",
    "Squeeze": "`axes` must be resolvable to a constant",
    "Unsqueeze": "`axes` must be resolvable to a constant",
    "CumSum": "`axis` must be a build-time constant",
    "ScatterND": "`reduction` other than `none` is not supported",
    "ReduceSum": "`axes` must be an initializer",
}
