"""The package's structure, checked: dependencies point one way (no room imports a room above it, no import circle
between files, nobody imports the package face), the files shipped into the Triton model repository import nothing of
the package, and the command line registers its commands without importing torch."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dsa_export"
# Rooms from the ground up (README "Layout"); a room may import rooms on its floor's left or below, never above.
FLOORS = [
    ("errors", "_version", "progress"),
    ("formats",),
    ("contracts", "targets", "files"),
    ("serving",),  # standalone: it imports nothing of dsa_export at all (checked apart)
    ("models",),
    ("kernels",),
    ("plugins",),
    ("exporter",),
    ("runtime",),
    ("parity", "cost"),
    ("deploy",),
    ("build",),
    ("cli",),
]
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every dsa_export module `path` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dsa_export"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dsa_export":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules} - {name} for name, path in modules.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_room_imports_a_room_above_it(graph):
    assert set(FLOOR) | {"__init__"} == {room(m) for m in graph}, "a room is missing from FLOORS"
    upward = [(m, i) for m, targets in graph.items() for i in targets
              if room(m) != "__init__" and room(i) != room(m) and FLOOR[room(i)] >= FLOOR[room(m)]
              and not (FLOOR[room(i)] == FLOOR[room(m)] and FLOORS[FLOOR[room(m)]].index(room(i))
                       < FLOORS[FLOOR[room(m)]].index(room(m)))]
    assert not upward, f"imports that point up or sideways: {upward}"


def test_no_import_circle_between_files(graph):
    state: dict[str, int] = defaultdict(int)  # 0 unseen, 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state[target] == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if state[target] == 0:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module, [module])


def test_nobody_imports_the_package_face(graph):
    assert [m for m, targets in graph.items() if "dsa_export" in targets] == []


def test_serving_imports_nothing_of_the_package(graph):
    assert {m: sorted(t) for m, t in graph.items() if room(m) == "serving" and t} == {}


def test_the_command_line_registers_its_commands_without_torch():
    """`dsa-export --help` and every command's --help (and the gRPC client command) import neither torch nor the
    dsa:: ops: what a user types first answers at once."""
    code = ("import sys; from dsa_export.cli import cli, main\n"
            "for argv in [['--help']] + [[name, '--help'] for name in cli.commands]:\n"
            "    assert main(argv) == 0, argv\n"
            "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'triton', 'dsa_export.kernels') if m in sys.modules)\n"
            "print(heavy, len(cli.commands))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, commands = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert heavy == "[]" and int(commands) >= 11
