"""TensorRT plugins for the dsa:: ops: quickly-deployable plugins (`tensorrt.plugin`) generated from the contracts.

For every op TensorRT sees (contracts.TENSORRT_CONTRACTS: LightningIndexer as its two halves) this registers `dsa::<Name>` with
- a shape function: the output's dims named in the contract, taken from the inputs' symbolic shapes or from an int
  attribute; its dtype by the contract's rule; an output the contract says aliases an input (RoutedExperts writes
  onto `base`) is returned as that input's `aliased()` descriptor;
- an ahead-of-time implementation: the Triton kernel compiled for the target by `dsa-export kernels` (the PTX in
  kernels/<arch>/), chosen by the input dtypes, launched with the grid and int32 scalars its JSON describes (products
  of input dims, kernels/launch.py), after checking that the node's attributes equal the constants compiled into it.
An engine built with these runs without Python: TensorRT embeds the PTX and the launch parameters in the plan.

TensorRT imports a dsa:: ONNX node as the plugin of the same name because the node carries plugin_namespace="dsa",
and aot=1 selects the ahead-of-time implementation; the parser hands it every registered attribute, in registration
order (toolchain.md §2.1, trt-triton-recipes.md §B). Triton's two hidden scratch parameters stay in the PTX unchanged:
TensorRT's launcher pads parameters it was not given, and kernels/aot.py checks for every target that the PTX never
reads them and that Triton needs no scratch.

This module imports tensorrt at the top: import it only where TensorRT is installed (exporter/engine.py does, inside
the function that builds). The plugin API reads the annotations below at registration, so this module must not use
`from __future__ import annotations`.
"""

import inspect
import math
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from dsa_export.contracts import TENSORRT_CONTRACTS, OpContract
from dsa_export.errors import DSAExportError
from dsa_export.formats import FORMATS
from dsa_export.kernels.launch import load_kernels, select

# TensorRT dtype → the contracts' (torch) dtype names, from the formats table
DTYPE_NAMES = {getattr(trt, f.tensorrt): f.name for f in FORMATS.values() if f.tensorrt and hasattr(trt, f.tensorrt)}
TRT_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
ATTRIBUTE_TYPES = {"int": int, "float": float}
# attribute → the compile-time constant of the kernels it must equal
COMPILED_AS = {"topk": "TOPK", "scale": "SCALE", "dv": "DV", "block_out": "BLOCK_OUT", "block_in": "BLOCK_IN",
               "block_size": "BLOCK_SIZE", "split_rows": "SPLIT_ROWS"}
AOT_RETURN = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]
PARAMETER = inspect.Parameter.POSITIONAL_OR_KEYWORD

_kernels: List[dict] = []  # the target's AOT kernels (register_plugins)
_registered: Dict[str, bool] = {}


def register_plugins(kernel_dir: Union[str, Path]) -> List[str]:
    """Load the target's AOT kernels and register every dsa:: plugin with TensorRT (once per process); returns the
    plugin ids. The kernels must come from the checkpoint being built (their constants are checked per node)."""
    _kernels[:] = load_kernels(kernel_dir)
    for contract in TENSORRT_CONTRACTS:
        plugin_id = plugin_id_of(contract)
        if plugin_id not in _registered:
            trtp.register(plugin_id)(_generated(f"{contract.torch_name}_desc", _parameters(contract), trtp.TensorDesc,
                                                lambda args, c=contract: output_desc(c, args)))
            trtp.aot_impl(plugin_id)(_generated(f"{contract.torch_name}_aot", _parameters(contract, aot=True),
                                                AOT_RETURN, lambda args, c=contract: aot_launch(c, args)))
            _registered[plugin_id] = True
    return list(_registered)


def plugin_id_of(contract: OpContract) -> str:
    return f"{contract.domain}::{contract.onnx_name}"


def _parameters(contract: OpContract, aot: bool = False) -> List[inspect.Parameter]:
    """(inputs..., attributes in contract order[, outputs, tactic]): the signatures the plugin API validates."""
    parameters = [inspect.Parameter(t.name, PARAMETER, annotation=trtp.TensorDesc) for t in contract.inputs]
    parameters += [inspect.Parameter(a.name, PARAMETER, annotation=ATTRIBUTE_TYPES[a.type])
                   for a in contract.attributes]
    if aot:
        parameters += [inspect.Parameter("outputs", PARAMETER, annotation=Tuple[trtp.TensorDesc]),
                       inspect.Parameter("tactic", PARAMETER, annotation=int)]
    return parameters


def _generated(name: str, parameters: List[inspect.Parameter], returns, body: Callable[[dict], object]) -> Callable:
    """A function with exactly `parameters` (as `inspect.signature` sees them) whose arguments, passed positionally
    or by name, reach `body` as a dict."""
    signature = inspect.Signature(parameters, return_annotation=returns)

    def function(*args, **kwargs):
        return body(dict(signature.bind(*args, **kwargs).arguments))

    function.__name__ = function.__qualname__ = name
    function.__signature__ = signature  # type: ignore[attr-defined]
    return function


def output_dims(contract: OpContract, args: dict) -> tuple:
    """The output's (symbolic) dims, by the names the contract gives them."""
    shapes = {t.name: [args[t.name].shape_expr[i] for i in range(len(t.dims))] for t in contract.inputs}
    return contract.output_dims(contract.named_dims(shapes, args))


def output_desc(contract: OpContract, args: dict) -> trtp.TensorDesc:
    """The output's descriptor: an alias of the input the contract names, or a new tensor of its dims and dtype."""
    output = contract.outputs[0]
    aliased = dict(contract.aliases).get(output.name)
    if aliased is not None:
        return args[aliased].aliased()
    dtype = contract.output_dtype({t.name: args[t.name].dtype for t in contract.inputs})
    return trtp.from_shape_expr(output_dims(contract, args), dtype=TRT_DTYPES[dtype] if isinstance(dtype, str)
                                else dtype)


def grid_size(axis: list, descs: dict):
    """A grid dimension: the product of its factors, input dims first (a symbolic size has no __rmul__)."""
    sizes = [descs[f[0]].shape_expr[f[1]] for f in axis if not isinstance(f, int)]
    constant = math.prod(f for f in axis if isinstance(f, int))
    if not sizes:
        return constant
    value = sizes[0]
    for size in sizes[1:]:
        value = value * size
    return value * constant if constant != 1 else value


def check_compiled_constants(contract: OpContract, meta: dict, args: dict) -> None:
    """Float (and some int) attributes are compiled into the kernel: the node's must equal them."""
    for a in contract.attributes:
        compiled = meta["constexprs"].get(COMPILED_AS.get(a.name, ""))
        if compiled is None:
            continue
        value = args[a.name]
        same = math.isclose(value, compiled, rel_tol=1e-6) if a.type == "float" else value == compiled
        if not same:
            raise DSAExportError(f"dsa::{contract.onnx_name}: the node's {a.name}={value} differs from the "
                                 f"{compiled} compiled into {meta['kernel']} for {meta['target']}: compile the "
                                 f"kernels from the checkpoint the export came from")


def aot_launch(contract: OpContract, args: dict) -> tuple:
    """(kernel symbol, PTX, launch parameters, int32 scalars) for this node's input dtypes and shapes."""
    descs = {t.name: args[t.name] for t in contract.inputs}
    dtypes = {name: DTYPE_NAMES.get(d.dtype, str(d.dtype)) for name, d in descs.items()}
    try:  # every input as the contract says (FP8 codes as INT8, never widened), before a kernel reads its bytes
        contract.check_dtypes(dtypes)
    except ValueError as e:
        raise DSAExportError(f"{e} (as TensorRT imported the node)") from None
    meta = select(_kernels, contract.onnx_name, dtypes)
    check_compiled_constants(contract, meta, args)
    grid_x, grid_y, grid_z = (grid_size(axis, descs) for axis in meta["grid"])
    launch = trtp.KernelLaunchParams(grid_x=grid_x, grid_y=grid_y, grid_z=grid_z, block_x=meta["block"][0],
                                     shared_mem=meta["shared_bytes"])  # <= 48 KiB, checked at compile time
    scalars = [a for a in meta["arguments"] if a["kind"] == "scalar"]
    extra = trtp.SymIntExprs(len(scalars))
    for i, a in enumerate(scalars):
        extra[i] = trtp.SymInt32(descs[a["tensor"]].shape_expr[a["dim"]])
    return meta["symbol"], Path(meta["ptx_path"]).read_text(), launch, extra
