"""fxopt's import layers (listed in compiler/__init__.py), checked by reading the source with `ast`.

A module imports only from its own layer and the layers below it, never from another pass; fxopt
modules import each other at module level (an import inside a function is where a cycle hides);
those imports form no cycle; and every module in `passes/` registers exactly one pass. Nothing
here imports fxopt, so a broken layering fails these tests rather than their collection.
"""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {  # as pyproject.toml's [tool.setuptools.package-dir] maps them
    "compiler": "fxopt",
    "passes": "fxopt.passes",
    "codegen": "fxopt.codegen",
    "models": "fxopt.models",
}

# Bottom up. A module belongs to the layer whose prefix names it most closely, so "fxopt" holds
# what the others do not: the driver and tools at the top of compiler/, fxopt.testing and the
# model zoo.
LAYERS = (
    ("ir", "fxopt.ir"),
    ("analysis", "fxopt.analysis"),
    ("rules", "fxopt.rules"),
    ("passes", "fxopt.passes"),
    ("codegen", "fxopt.codegen"),
    ("driver", "fxopt"),
)


@dataclass
class Module:
    name: str
    path: pathlib.Path
    tree: ast.Module
    imports: list[tuple[str, int]] = field(default_factory=list)  # module level: (name, line)
    deferred: list[tuple[str, int]] = field(default_factory=list)  # inside a function


def layer(name: str) -> int:
    """The index in LAYERS of the layer `name` belongs to."""
    matches = [i for i, (_, prefix) in enumerate(LAYERS) if f"{name}.".startswith(f"{prefix}.")]
    return max(matches, key=lambda i: len(LAYERS[i][1]))


def read_modules(root: pathlib.Path = ROOT) -> dict[str, Module]:
    """Every module of the folders in FOLDERS with the fxopt modules it imports."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    for module in modules.values():
        _collect_imports(module, modules)
    return modules


def _collect_imports(module: Module, modules: dict[str, Module]) -> None:
    is_package = module.path.name == "__init__.py"
    for node, in_function in _imports(module.tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = module.name.split(".")
                package = package[: len(package) - node.level + is_package]
                base = ".".join([*package, base] if base else package)
            # `from package import submodule` imports the submodule
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for name in dict.fromkeys(n for n in names if n.split(".")[0] == "fxopt"):
            (module.deferred if in_function else module.imports).append((name, node.lineno))


def _imports(tree: ast.AST, in_function: bool = False):
    """(import node, whether it runs inside a function) for every import in `tree`."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function
        inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        yield from _imports(child, inside)


def cycles(modules: dict[str, Module], with_deferred: bool = False) -> list[list[str]]:
    """The import cycles among `modules`: each strongly connected component of more than one
    module (or a module importing itself), by Tarjan's algorithm."""
    edges = {
        name: [
            target
            for target, _ in m.imports + (m.deferred if with_deferred else [])
            if target in modules
        ]
        for name, m in modules.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in edges[name]:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == name:
                    break
            if len(component) > 1 or name in edges[name]:
                found.append(sorted(component))

    for name in modules:
        if name not in index:
            visit(name)
    return found


def _where(module: Module, line: int) -> str:
    return f"{module.path.relative_to(ROOT)}:{line}"


def test_imports_name_modules_that_exist():
    """In-repo code imports modules where they live, not through the old paths that
    `fxopt/__init__.py` keeps for users."""
    modules = read_modules()
    unknown = [
        f"{_where(m, line)} imports {target}"
        for m in modules.values()
        for target, line in m.imports + m.deferred
        if target not in modules
    ]
    assert not unknown, "\n".join(unknown)


def test_no_module_imports_from_a_higher_layer():
    modules = read_modules()
    upward = [
        f"{_where(m, line)}: {m.name} ({LAYERS[layer(m.name)][0]}) imports {target} "
        f"({LAYERS[layer(target)][0]})"
        for m in modules.values()
        for target, line in m.imports + m.deferred
        if layer(target) > layer(m.name)
    ]
    assert not upward, "\n".join(upward)


def test_no_pass_imports_another_pass():
    modules = read_modules()
    passes = {name for name in modules if name.startswith("fxopt.passes.")}
    found = [
        f"{_where(modules[name], line)}: {name} imports {target}"
        for name in passes
        for target, line in modules[name].imports + modules[name].deferred
        if target in passes and target != name
    ]
    assert not found, "\n".join(found)


def test_no_import_cycle():
    found = cycles(read_modules())
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def test_no_fxopt_import_inside_a_function():
    modules = read_modules()
    deferred = [
        f"{_where(m, line)}: {m.name} imports {target} inside a function"
        for m in modules.values()
        for target, line in m.deferred
    ]
    assert not deferred, "\n".join(deferred)


def test_every_pass_module_registers_one_pass():
    def registrations(tree: ast.Module) -> int:
        return sum(
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "register_pass"
            for node in ast.walk(tree)
        )

    modules = read_modules()
    wrong = [
        f"{m.path.relative_to(ROOT)} registers {registrations(m.tree)} passes"
        for name, m in modules.items()
        if name.startswith("fxopt.passes.") and registrations(m.tree) != 1
    ]
    assert not wrong, "\n".join(wrong)


def test_every_layer_has_modules():
    """The table names sub-packages that exist: a rename cannot leave a layer empty."""
    layers = {layer(name) for name in read_modules()}
    assert [name for i, (name, _) in enumerate(LAYERS) if i not in layers] == []
