"""The direction of the package's imports, against the layers docs/design.md draws: every import (lazy ones too)
points to the module's own layer or below, and no modules import each other round a loop."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "beit3"


def layers() -> dict[str, int]:
    """{module or package name: layer}, from the ``layer N  names...`` lines of docs/design.md."""
    found = {}
    for line in (ROOT / "docs" / "design.md").read_text().splitlines():
        match = re.fullmatch(r"layer (\d+)\s+(.+)", line.strip())
        if match:
            found.update(dict.fromkeys(match[2].split(), int(match[1])))
    return found


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import name` imports the submodule pkg.name when there is one
            targets.update(f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names)
    return {t for t in targets if t in known and t != name}


def layer_of(name: str, table: dict[str, int]) -> int | None:
    while name:
        if name in table:
            return table[name]
        name = name.rpartition(".")[0]
    return None


def test_every_import_points_to_its_own_layer_or_below():
    table, found = layers(), modules()
    assert table, "docs/design.md has no layer lines"
    unplaced = sorted(name for name in found if layer_of(name, table) is None)
    assert not unplaced, f"modules in no layer of docs/design.md: {unplaced}"
    upward = [
        f"{name} (layer {layer_of(name, table)}) imports {target} (layer {layer_of(target, table)})"
        for name, path in found.items()
        for target in sorted(imports(name, path, set(found)))
        if layer_of(target, table) < layer_of(name, table)
    ]
    assert not upward, "\n".join(upward)


def test_no_modules_import_each_other():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    # A package's __init__ importing its own submodules is how it assembles them, not a loop back
    graph = {
        n: {t for t in deps if not (t.startswith(n + ".") and found[n].name == "__init__.py")}
        for n, deps in graph.items()
    }
    state, loops = {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                loops.append(" -> ".join(trail[trail.index(target) :] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not loops, "\n".join(loops)


def test_the_checkpoint_tools_load_neither_training_nor_deepspeed():
    code = (
        "import sys, beit3.convert, beit3.export, beit3.predict, beit3.task_catalogue\n"
        "print(sorted(m for m in sys.modules if m.startswith(('beit3.training', 'deepspeed'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
