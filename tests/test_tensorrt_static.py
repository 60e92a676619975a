"""What a CPU can check of the TensorRT code (TensorRT itself cannot be installed here):

- the modules that touch tensorrt type-check with pyright against tensorrt-stubs plus the wheel's pure-Python
  `tensorrt.plugin` package (scripts/tensorrt_typings.py), and pyright does catch planted mistakes;
- the plugins pass TensorRT's own registration and aot_impl validation: the real `tensorrt.plugin` code from the
  wheel, over a stand-in for the native module, validates the signatures generated from the contracts;
- the shape functions and launch grids the plugins compute, on concrete shapes, equal the contracts' and the kernels';
- the Triton kernels, launched under the interpreter with exactly the plugins' grid and argument order, equal the
  references;
- the exported graph's dsa nodes carry every attribute the plugins register, and the TensorRT import hints.

`make test` downloads the two wheels (tensorrt-stubs, tensorrt-cu12-bindings) into .typecheck/wheels.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
import pytest
import torch

from dsa_export.contracts import CONTRACTS, LIGHTNING_INDEXER, ROUTED_EXPERTS, ROUTED_EXPERTS_FP8, SPARSE_MLA
from dsa_export.kernels import aot, launch
from dsa_export.models import semantics
from dsa_export.models.presets import get_preset
from dsa_export.plugins.onnx_ops import TRT_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".typecheck" / "wheels"
TRT_MODULES = ["dsa_export/plugins/tensorrt.py", "dsa_export/exporter/engine.py", "dsa_export/runtime/backends.py",
               "dsa_export/serving/trt_graph.py"]
needs_wheels = pytest.mark.skipif(not list(WHEELS.glob("tensorrt_cu12_bindings-*.whl")),
                                  reason="run `make test`: it downloads the TensorRT wheels these checks read")

# A stand-in for the native `tensorrt` module: every attribute is an inert class, so that the wheel's pure-Python
# `tensorrt.plugin` package imports and runs its validation on CPU.
NATIVE_STAND_IN = '''
class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(name)
_made = {}
def _inert(name):
    if name not in _made:
        _made[name] = _Meta(name, (), {"__init__": lambda self, *a, **k: None,
                                       "__getattr__": lambda self, n: (lambda *a, **k: None)})
    return _made[name]
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _inert(name)
'''


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The tiny model's AOT kernels for h100, as `dsa-export kernels` writes them."""
    out = tmp_path_factory.mktemp("kernels")
    aot.compile_kernels("h100", out, aot.kernel_dims(get_preset("tiny")), progress=False)
    return out


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    root = tmp_path_factory.mktemp("shim")
    (root / "tensorrt").mkdir()
    (root / "tensorrt" / "__init__.py").write_text(NATIVE_STAND_IN)
    wheel = zipfile.ZipFile(next(WHEELS.glob("tensorrt_cu12_bindings-*.whl")))
    for name in wheel.namelist():
        if name.startswith("tensorrt_bindings/plugin/") and name.endswith(".py"):
            target = root / "tensorrt" / "plugin" / Path(name).name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(wheel.read(name))
    return root


def in_shim(shim: Path, code: str) -> dict:
    """Run `code` (which prints one JSON line) with the wheel's tensorrt.plugin over the stand-in."""
    env = {**os.environ, "PYTHONPATH": str(shim)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- TensorRT's own validation of the generated plugins --------------------------------------------------------------
@needs_wheels
def test_plugins_pass_tensorrts_own_registration_and_aot_validation(shim, kernels):
    registry = in_shim(shim, f'''
import json
from dsa_export.plugins.tensorrt import register_plugins
from tensorrt.plugin._lib import QDP_REGISTRY
register_plugins({str(kernels)!r})
print(json.dumps({{k: {{"inputs": d.input_tensor_names, "attrs": list(d.input_attrs),
                       "aot_attrs": d.aot_impl_attr_names, "outputs": d.num_outputs}}
                  for k, d in QDP_REGISTRY.items()}}))
''')
    assert set(registry) == {f"dsa::{c.onnx_name}" for c in CONTRACTS}
    for contract in CONTRACTS:
        plugin = registry[f"dsa::{contract.onnx_name}"]
        assert plugin["inputs"] == [t.name for t in contract.inputs]
        # every registered attribute, in registration order, also in aot_impl (TensorRT passes them all, positionally)
        assert plugin["attrs"] == plugin["aot_attrs"] == [a.name for a in contract.attributes]
        assert plugin["outputs"] == len(contract.outputs)


@needs_wheels
def test_tensorrts_validation_catches_a_planted_mistake(shim):
    result = in_shim(shim, '''
import json
from typing import Tuple, Union
import tensorrt.plugin as trtp

@trtp.register("planted::Op", lazy_register=True)
def desc(q: trtp.TensorDesc, topk: int, scale: float) -> trtp.TensorDesc:
    return q.like()

try:  # attributes out of registration order: TensorRT would pass them positionally into the wrong parameters
    @trtp.aot_impl("planted::Op")
    def aot(q: trtp.TensorDesc, scale: float, topk: int, outputs: Tuple[trtp.TensorDesc], tactic: int
            ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        raise NotImplementedError
    print(json.dumps({"error": None}))
except ValueError as e:
    print(json.dumps({"error": str(e)}))
''')
    assert result["error"] and "does not match" in result["error"]


@needs_wheels
def test_plugin_shapes_and_grids_on_concrete_shapes(shim, kernels):
    """The plugins' own functions (fed concrete ints where TensorRT feeds symbolic sizes) give the contracts' output
    shapes and the kernels' grids."""
    shapes = {
        "LightningIndexer": ({"q": [2, 3, 8, 16], "k": [2, 64, 16], "w": [2, 3, 8], "positions": [2, 3]}, {"topk": 8}),
        "SparseMLA": ({"q": [2, 3, 4, 40], "kv": [2, 64, 40], "indices": [2, 3, 8]}, {"scale": 0.1, "dv": 32}),
        "RoutedExperts": ({"x": [5, 64], "experts": [5, 2], "weights": [5, 2], "gate_up": [8, 64, 64],
                           "down": [8, 64, 32], "base": [5, 64]}, {}),
    }
    got = in_shim(shim, f'''
import json
from types import SimpleNamespace
from dsa_export.contracts import CONTRACTS
from dsa_export.plugins import tensorrt as plugins
plugins.register_plugins({str(kernels)!r})
shapes = {json.dumps(shapes)}
out = {{}}
for contract in CONTRACTS:
    if contract.onnx_name not in shapes:
        continue
    tensors, attrs = shapes[contract.onnx_name]
    args = {{n: SimpleNamespace(shape_expr=s) for n, s in tensors.items()}} | attrs
    meta = plugins.select(plugins._kernels, contract.onnx_name, {{n: "float32" if n in ("q", "x") else "x"
                                                                  for n in tensors}})
    out[contract.onnx_name] = {{"dims": list(plugins.output_dims(contract, args)),
                               "grid": [plugins.grid_size(axis, args) for axis in meta["grid"]]}}
print(json.dumps(out))
''')
    contracts = {c.onnx_name: c for c in CONTRACTS}
    metas = launch.load_kernels(kernels)
    for name, (tensors, attrs) in shapes.items():
        contract = contracts[name]
        assert tuple(got[name]["dims"]) == contract.output_shape(contract.input_dims(tensors, attrs))
        meta = launch.select(metas, name, {contract.inputs[0].name: "float32"})
        assert tuple(got[name]["grid"]) == launch.grid(meta, {n: tuple(s) for n, s in tensors.items()})
    assert got["LightningIndexer"]["grid"] == [6, 1, 1]  # B·S query rows


# ---- the kernels, launched exactly as the plugins launch them -------------------------------------------------------
def _contract_inputs(name: str, gen: torch.Generator) -> dict:
    if name == "LightningIndexer":
        return {"q": torch.randn(2, 3, 8, 16, generator=gen), "k": torch.randn(2, 30, 16, generator=gen),
                "w": torch.randn(2, 3, 8, generator=gen), "positions": torch.tensor([[20, 21, 22], [0, 1, 2]])}
    if name == "SparseMLA":
        indices = torch.randint(0, 30, (2, 3, 8), generator=gen, dtype=torch.int32)
        indices[1, 0, 3:] = -1
        return {"q": torch.randn(2, 3, 4, 40, generator=gen), "kv": torch.randn(2, 30, 40, generator=gen),
                "indices": indices}
    experts = torch.tensor([[0, 3], [3, 5], [0, 3], [1, 0], [5, 3]], dtype=torch.int32)
    return {"x": torch.randn(5, 64, generator=gen), "experts": experts, "weights": torch.rand(5, 2, generator=gen),
            "gate_up": torch.randn(8, 64, 64, generator=gen) / 8, "down": torch.randn(8, 64, 32, generator=gen) / 6,
            "base": torch.randn(5, 64, generator=gen)}


def _reference(name: str, t: dict, meta: dict) -> torch.Tensor:
    c = meta["constexprs"]
    if name == "LightningIndexer":
        return semantics.lightning_indexer(t["q"], t["k"], t["w"], t["positions"], c["TOPK"])
    if name == "SparseMLA":
        return semantics.sparse_mla(t["q"], t["kv"], t["indices"], c["SCALE"], c["DV"])
    return semantics.routed_experts(t["x"], t["experts"], t["weights"], t["gate_up"], t["down"], t["base"])


@pytest.mark.parametrize("name", ["LightningIndexer", "SparseMLA", "RoutedExperts"])
def test_kernels_with_the_plugins_grid_and_argument_order_equal_the_references(kernels, name):
    from dsa_export.kernels import triton_indexer, triton_moe, triton_sparse_mla

    jit = {"lightning_indexer_kernel": triton_indexer.lightning_indexer_kernel,
           "sparse_mla_kernel": triton_sparse_mla.sparse_mla_kernel,
           "routed_experts_kernel": triton_moe.routed_experts_kernel}
    first = {"LightningIndexer": "q", "SparseMLA": "q", "RoutedExperts": "x"}[name]
    meta = launch.select(launch.load_kernels(kernels), name, {first: "float32"})
    tensors = _contract_inputs(name, torch.Generator().manual_seed(0))
    contract = {c.onnx_name: c for c in CONTRACTS}[name]
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    output = contract.outputs[0]
    if dict(contract.aliases).get(output.name):  # written onto the aliased input, as in the engine
        tensors[output.name] = tensors[dict(contract.aliases)[output.name]].clone()
    else:
        dtype = getattr(torch, contract.output_dtype({n: str(t.dtype)[6:] for n, t in tensors.items()}))
        dims = contract.input_dims(shapes, {a.name: meta["constexprs"][a.name.upper()]
                                            for a in contract.attributes if a.type == "int"})
        tensors[output.name] = torch.empty(contract.output_shape(dims), dtype=dtype)
    jit[meta["symbol"]][launch.grid(meta, shapes)](*launch.arguments(meta, tensors), **meta["constexprs"],
                                                   num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    got, expected = tensors[output.name], _reference(name, tensors, meta)
    if name == "LightningIndexer":
        assert torch.equal(got.sort(-1).values, expected.sort(-1).values)
    else:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ---- the export carries what the plugins need -----------------------------------------------------------------------
def test_exported_dsa_nodes_carry_every_plugin_attribute(tiny_onnx):
    graph = onnx.load(tiny_onnx / "model.onnx", load_external_data=False).graph
    contracts = {c.onnx_name: c for c in (LIGHTNING_INDEXER, SPARSE_MLA, ROUTED_EXPERTS, ROUTED_EXPERTS_FP8)}
    nodes = [n for n in graph.node if n.domain == "dsa"]
    assert nodes
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert {a.name for a in contracts[node.op_type].attributes} <= set(attrs), node.name
        assert {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items() if k in TRT_ATTRIBUTES} == \
            TRT_ATTRIBUTES  # plugin_namespace="dsa" (import as our plugin), aot=1 (its AOT implementation)


# ---- type checks ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def typings(tmp_path_factory):
    out = tmp_path_factory.mktemp("typings") / "stubs"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "tensorrt_typings.py"), str(WHEELS), str(out)],
                   check=True)
    return out


def pyright(typings: Path, files: list[Path], workdir: Path) -> dict:
    config = workdir / "pyrightconfig.json"
    config.write_text(json.dumps({"stubPath": str(typings), "extraPaths": [str(ROOT)], "pythonVersion": "3.11",
                                  "typeCheckingMode": "basic",
                                  "reportMissingModuleSource": False}))
    binary = shutil.which("pyright", path=str(Path(sys.executable).parent))
    assert binary, "pyright is a test dependency (pip install .[test])"
    proc = subprocess.run([binary, "-p", str(config), "--pythonpath", sys.executable, "--outputjson",
                           *map(str, files)], capture_output=True, text=True, cwd=workdir)
    return json.loads(proc.stdout)


@needs_wheels
def test_tensorrt_modules_type_check(typings, tmp_path):
    report = pyright(typings, [ROOT / m for m in TRT_MODULES], tmp_path)
    assert report["summary"]["filesAnalyzed"] == len(TRT_MODULES)
    assert report["summary"]["errorCount"] == 0, [d["message"] for d in report["generalDiagnostics"]]


@needs_wheels
def test_type_check_catches_planted_mistakes(typings, tmp_path):
    planted = {  # a misspelled TensorRT attribute, swapped arguments, a misspelled launch parameter
        "dsa_export/exporter/engine.py": [("STRONGLY_TYPED", "STRONGLY_TYPD"),
                                           ("trt.OnnxParser(network, logger)", "trt.OnnxParser(logger, network)")],
        "dsa_export/plugins/tensorrt.py": [("grid_x=grid_x,", "gridx=grid_x,")],
        "dsa_export/serving/trt_graph.py": [("execute_async_v3(", "execute_async_v2(")],
    }
    files = []
    for module, edits in planted.items():
        text = (ROOT / module).read_text()
        for good, bad in edits:
            assert good in text, good
            text = text.replace(good, bad)
        files.append(tmp_path / module.replace("/", "_"))  # not tensorrt.py: that would shadow the package
        files[-1].write_text(text)
    report = pyright(typings, files, tmp_path)
    messages = " | ".join(d["message"] for d in report["generalDiagnostics"] if d["severity"] == "error")
    for needle in ("STRONGLY_TYPD", "OnnxParser", "gridx", "execute_async_v2"):
        assert needle in messages or needle == "OnnxParser" and "INetworkDefinition" in messages, (needle, messages)
