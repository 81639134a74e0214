"""The package's imports: each module imports what it uses at its top, the imports form no
circle, and every module can be the first one a program imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = {
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
    for path in [*(ROOT / "fastbn").glob("*.py"), *(ROOT / "fastbn" / "bench").glob("*.py")]
}
MODULES = sorted(FILES)
# Imported where first used, not at the top: importing them needs a working triton, and the
# torch backend runs without one (triton is a dependency on Linux only).
IMPORTED_ON_FIRST_USE = {"fastbn.launch", "fastbn.kernels"}


def module_tree(name: str) -> ast.Module:
    return ast.parse(FILES[name].read_text(), filename=str(FILES[name]))


def fastbn_imports(node: ast.AST) -> set[str]:
    """The fastbn modules an import statement names (``from fastbn import ops`` names
    fastbn.ops; ``from fastbn.ops import f`` names fastbn.ops)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == "fastbn"}
    if not isinstance(node, ast.ImportFrom) or node.module is None:
        return set()
    if node.module == "fastbn":
        return {f"fastbn.{alias.name}" for alias in node.names}
    return {node.module} if node.module.startswith("fastbn.") else set()


def inside_functions(tree: ast.Module) -> set[int]:
    """The ids of the nodes inside some function of tree."""
    functions = (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    return {id(node) for f in functions for node in ast.walk(f)}


def imports_inside_functions(tree: ast.Module) -> set[str]:
    inside = inside_functions(tree)
    return {name for node in ast.walk(tree) if id(node) in inside for name in fastbn_imports(node)}


def top_level_imports(tree: ast.Module) -> set[str]:
    """The fastbn modules (of MODULES) imported outside every function."""
    inside = inside_functions(tree)
    return {
        name for node in ast.walk(tree) if id(node) not in inside
        for name in fastbn_imports(node) if name in MODULES
    }


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_no_fastbn_module_inside_a_function(name):
    lazy = imports_inside_functions(module_tree(name)) - IMPORTED_ON_FIRST_USE
    assert not lazy, f"{name} imports {sorted(lazy)} inside a function: import at the top"


def test_module_level_imports_form_no_circle():
    packages = {"fastbn", "fastbn.bench"}  # imported first by any import of their modules
    graph = {name: top_level_imports(module_tree(name)) - packages for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, (*path, name))
        done.add(name)

    for name in MODULES:
        visit(name, ())
    assert done == set(MODULES)


FIRST_IMPORTS = textwrap.dedent("""
    import os, sys
    # The costly imports, of what fastbn imports, shared by the forked interpreters below.
    import torch, torch._dynamo, torch.distributed, torch.fx, torch.onnx, triton, triton.language

    modules = sys.argv[1:]
    failed = []
    for first in modules:
        pid = os.fork()
        if pid == 0:  # a child with no fastbn module loaded: import first, then the rest
            import importlib
            try:
                importlib.import_module(first)
                for name in reversed(modules):
                    importlib.import_module(name)
            except BaseException as error:
                print(f"{first} first: {type(error).__name__}: {error}", flush=True)
                os._exit(1)
            os._exit(0)
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(first)
    assert not any(name.startswith("fastbn") for name in sys.modules)
    sys.exit(1 if failed else 0)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one interpreter per module")
def test_every_module_can_be_imported_first():
    importable = [name for name in MODULES if name != "fastbn.bench.__main__"]  # runs the bench
    result = subprocess.run([sys.executable, "-c", FIRST_IMPORTS, *importable],
                            capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stdout + result.stderr
