#!/usr/bin/env python
"""Assemble the type stubs the TensorRT modules are checked against, from two PyPI wheels (`make test` downloads them
into .typecheck/wheels; nothing of theirs is committed):

- tensorrt-stubs 10.13 (pybind11-stubgen stubs of the tensorrt bindings), plus the one newer call our code makes
  (`ICudaEngine.get_aliased_input_tensor`, TensorRT >= 10.15, include/NvInferRuntime.h);
- tensorrt-cu12-bindings 11.4, for the pure-Python `tensorrt.plugin` package (quickly deployable plugins), with
  explicit re-exports (its __init__ exports by setattr, invisible to a type checker) and three annotations fixed that
  reject code the runtime accepts (trt-triton-recipes.md §A3): `from_shape_expr` takes a tuple of any length,
  `KernelLaunchParams` fields take ints, `SymIntExprs.from_tuple` returns SymIntExprs.

    python scripts/tensorrt_typings.py WHEEL_DIR OUT_DIR     (then: pyright with stubPath = OUT_DIR)
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

LAUNCH_FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")


def _patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"{path}: expected text not found ({old[:60]!r}): the wheel changed, update this script")
    path.write_text(text.replace(old, new))


def build(wheel_dir: Path, out: Path) -> None:
    stubs = next(wheel_dir.glob("tensorrt_stubs-*.whl"))
    bindings = next(wheel_dir.glob("tensorrt_cu12_bindings-*.whl"))
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zipfile.ZipFile(stubs).extractall(tmp / "stubs")
        zipfile.ZipFile(bindings).extractall(tmp / "bindings")
        shutil.copytree(tmp / "stubs" / "tensorrt_bindings", out / "tensorrt_bindings")
        (out / "tensorrt").mkdir(parents=True)
        shutil.copy(tmp / "stubs" / "tensorrt" / "__init__.pyi", out / "tensorrt" / "__init__.pyi")
        plugin = out / "tensorrt" / "plugin"
        plugin.mkdir()
        for source in sorted((tmp / "bindings" / "tensorrt_bindings" / "plugin").glob("_*.py")):
            shutil.copy(source, plugin / source.name)

    _patch(out / "tensorrt_bindings" / "tensorrt.pyi", "class ICudaEngine:\n",
           "class ICudaEngine:\n    def get_aliased_input_tensor(self, name: str) -> str | None: ...\n")
    _patch(plugin / "_top_level.py", "shape_expr: Union[Tuple[Union[ShapeExpr, int]], ShapeExprs]",
           "shape_expr: Union[Tuple[Union[ShapeExpr, int], ...], ShapeExprs]")
    fields = "".join(f"        {f}: Union[int, 'trt.IDimensionExpr', SymInt32]\n" for f in LAUNCH_FIELDS)
    _patch(plugin / "_tensor.py", "        def __init__(\n            self,\n            grid_x:",
           fields + "\n        def __init__(\n            self,\n            grid_x:")
    _patch(plugin / "_tensor.py", 'def from_tuple(cls, shape_exprs: Tuple[Union[SymIntExpr, int]]) -> "SymIntExpr":',
           'def from_tuple(cls, shape_exprs: Tuple[Union[SymIntExpr, int], ...]) -> "SymIntExprs":')

    # the package's public names: everything decorated @public_api() in its modules
    exports = []
    for module in sorted(plugin.glob("_*.py")):
        text = module.read_text()
        for name in re.findall(r"@public_api\([^)]*\)\s*\n\s*(?:def|class)\s+(\w+)", text):
            exports.append(f"from .{module.stem} import {name} as {name}")
    exports.append("from ._lib import op as op")
    (plugin / "__init__.pyi").write_text("\n".join(sorted(set(exports))) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    build(Path(sys.argv[1]), Path(sys.argv[2]))
