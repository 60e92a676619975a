"""How a plugin launches an AOT kernel, as data: each kernel's JSON (written by kernels/aot.py) lists its arguments
in TensorRT's order (input pointers, int32 scalars that are dims of inputs, output pointers) and its grid as products
of input dims and constants. This module evaluates them for concrete shapes (the interpreter tests launch the Triton
kernels exactly so); plugins/tensorrt.py builds the same products from TensorRT's symbolic shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dsa_export.errors import DSAExportError


def load_kernels(kernel_dir: str | Path) -> list[dict]:
    """The metadata of every AOT kernel in kernel_dir (`dsa-export kernels`), each with its PTX's path."""
    kernel_dir = Path(kernel_dir)
    metas = []
    for path in sorted(kernel_dir.glob("*.json")):
        meta = json.loads(path.read_text())
        meta["ptx_path"] = str(kernel_dir / meta["files"]["ptx"])
        metas.append(meta)
    if not metas:
        raise DSAExportError(f"{kernel_dir}: no AOT kernels; run `dsa-export kernels` for this target first")
    return metas


def select(metas: list[dict], contract: str, dtypes: dict[str, str]) -> dict:
    """The specialisation of `contract` for the given input dtypes (tensor name -> torch dtype name)."""
    for meta in metas:
        if meta["contract"] == contract and dtypes.get(meta["selector"]["tensor"]) == meta["selector"]["dtype"]:
            return meta
    have = sorted(f"{m['selector']['tensor']}={m['selector']['dtype']}" for m in metas if m["contract"] == contract)
    raise DSAExportError(f"no AOT kernel for dsa::{contract} with inputs {dtypes} (compiled: {', '.join(have)})")


def factor(value, shapes: dict[str, tuple[int, ...]]) -> int:
    return value if isinstance(value, int) else shapes[value[0]][value[1]]


def grid(meta: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int]:
    x, y, z = (math.prod(factor(f, shapes) for f in axis) for axis in meta["grid"])
    return x, y, z


def scalars(meta: dict, shapes: dict[str, tuple[int, ...]]) -> list[int]:
    return [shapes[a["tensor"]][a["dim"]] for a in meta["arguments"] if a["kind"] == "scalar"]


def arguments(meta: dict, tensors: dict) -> list:
    """The kernel's runtime arguments in its order: tensors for pointers, ints for scalars (hidden ones excluded)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    out = []
    for a in meta["arguments"]:
        if a["kind"] in ("input", "output"):
            out.append(tensors[a["tensor"]])
        elif a["kind"] == "scalar":
            out.append(shapes[a["tensor"]][a["dim"]])
    return out


def check_driver(metas: list[dict], driver: tuple[int, int] | None) -> None:
    """The CUDA driver (its version, as cuDriverGetVersion gives it) must load the kernels' PTX: each JSON records
    the oldest driver that does (kernels/aot.py). A clear error before TensorRT meets the PTX
    (CUDA_ERROR_UNSUPPORTED_PTX_VERSION at engine build or load)."""
    if driver is None:
        return  # no driver here: nothing will load them
    old = [m["kernel"] for m in metas if "min_cuda_driver" not in m]
    if old:
        raise DSAExportError(f"kernels {', '.join(old)} predate the driver check: run `dsa-export kernels` again")
    need = max(metas, key=lambda m: tuple(int(x) for x in m["min_cuda_driver"].split(".")))
    needed = tuple(int(x) for x in need["min_cuda_driver"].split("."))
    if tuple(driver) < needed:
        raise DSAExportError(f"this machine's CUDA driver supports CUDA {driver[0]}.{driver[1]}; the {need['target']} "
                             f"kernels (PTX ISA {need['ptx_version']}) need {need['min_cuda_driver']} "
                             f"({need['min_linux_driver']} or newer): update the NVIDIA driver")


def cuda_driver_version() -> tuple[int, int] | None:
    """The installed CUDA driver's version (major, minor) from libcuda's cuDriverGetVersion; None without a driver."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10
