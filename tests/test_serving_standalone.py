"""What ships into the Triton model repository runs in the server's Python, which has neither dsa_export nor (on a
CPU server) torch: each shipped file is imported here as the repository lays it out (copied flat beside its model,
siblings imported as top-level modules), with dsa_export blocked, and torch too wherever the file does not need it."""

import json
import subprocess
import sys

import pytest

from dsa_export.serving import NEEDS_TORCH, SHIPPED, shipped_files

BLOCKING_IMPORTER = """
import importlib.abc, json, sys, types

blocked = tuple(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not in the server's Python")
        return None

sys.meta_path.insert(0, Block())
# the Python backend's own module, as the server provides it (constants read at import)
utils = types.ModuleType("triton_python_backend_utils")
utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 1, 2
sys.modules["triton_python_backend_utils"] = utils
sys.path.insert(0, sys.argv[2])
for module in json.loads(sys.argv[3]):
    __import__(module)
print("imported", sorted(m for m in sys.modules if m.split(".")[0] in ("dsa_export", "torch")))
"""


SHIPPED_MODULES = sorted({(kind, name) for kind in SHIPPED for _, name in shipped_files(kind)})


@pytest.mark.parametrize("kind, name", SHIPPED_MODULES, ids=[f"{k}-{n}" for k, n in SHIPPED_MODULES])
def test_each_shipped_file_imports_without_the_package(kind, name, tmp_path):
    """Each file alone (its siblings beside it), torch blocked unless it is one of NEEDS_TORCH: the generation model
    and the ONNX Runtime runner load in a server without torch."""
    for source, target in shipped_files(kind):
        (tmp_path / target).write_bytes(source.read_bytes())
    source = next(source for source, target in shipped_files(kind) if target == name)
    needs_torch = source.name in NEEDS_TORCH
    blocked = ["dsa_export"] + ([] if needs_torch else ["torch"])
    out = subprocess.run([sys.executable, "-c", BLOCKING_IMPORTER, json.dumps(blocked), str(tmp_path),
                          json.dumps([name.removesuffix(".py")])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1:]
    imported = out.stdout.strip().splitlines()[-1]
    assert "dsa_export" not in imported and (needs_torch or "torch" not in imported), imported


def test_the_blocking_importer_catches_an_import_of_the_package(tmp_path):
    (tmp_path / "leaky.py").write_text("from dsa_export.errors import DSAExportError\n")
    out = subprocess.run([sys.executable, "-c", BLOCKING_IMPORTER, json.dumps(["dsa_export"]), str(tmp_path),
                          json.dumps(["leaky"])], capture_output=True, text=True)
    assert out.returncode != 0 and "dsa_export is not in the server's Python" in out.stderr
