"""The import graph of the `benchmark` and `methods` packages (README.md, "Layout").

Every import statement of every module counts: module level, inside functions, and inside
`if TYPE_CHECKING:` blocks (a type-only import is a dependency too: the layering holds for annotations
as well), plus the registry's ``"module:Class"`` targets (`methods.MethodSpec`, imported on first use).
Relative imports and the ``from package import name`` forms resolve to the package's modules:
``from benchmark import figures`` is module benchmark.figures, ``from methods import get_method`` is
module methods (methods/__init__.py). The import of a package's ``__init__`` that Python makes before
any of its submodules is not an edge (it is no import statement, and it cannot form a cycle that
matters: the package is set up first).

The rules:
- no cycle, counting the imports inside functions;
- a function imports no module of the package (those imports go at module level), except the pairs
  of `LOCAL_PACKAGE_IMPORTS`: a module that must import without torch calling into detector code
  that loads torch at import;
- a function imports a third-party or standard-library module only when it is in
  `LOCAL_THIRD_PARTY_IMPORTS`: optional, or heavy and needed by few paths.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "methods")

#: Third-party packages (by top-level name) that a function may import, and why each is optional there.
LOCAL_THIRD_PARTY_IMPORTS = {
    "torch": "the command line's start and the report path (run_all.py --report-only, benchmark.reports) never "
             "load torch (tests/test_report_page.py checks it): the modules they import (backends, estimate, "
             "jobs, stacking, methods.base) import it in the few functions that touch a device or thread count",
    "torchvision": "imports torch; needed only to download a dataset, to read CIFAR-10's python batches and for "
                   "anomalib's resize in the speed comparison",
    "dask": "an optional extra (pip install -e '.[dask]'): only --backend dask needs it",
    "distributed": "dask's scheduler package, the same optional extra as dask",
    "matplotlib": "only when a figure is drawn (and matplotlib.use('Agg') must run before pyplot is imported)",
    "anomalib": "an optional extra, only for the side-by-side comparison in benchmark.speed",
    "pyod": "only the pyod-backed detectors (iForest, pyod:<model>) need it, not the registry that names them",
}

#: Package modules that a function may import: (importer, imported) -> why. Each importer must import
#: without torch (the command line imports it) while the module it calls into loads torch at import;
#: test_local_package_imports_are_the_listed_torch_boundaries checks both.
LOCAL_PACKAGE_IMPORTS = {
    ("benchmark.estimate", "methods.torch_base"): "calibrate() tells the staged torch detectors from the rest "
                                                  "(isinstance TorchDetector) once a detector has been built",
    ("benchmark.estimate", "methods.engine"): "calibrate() times a fit in the job's training precision through "
                                              "fit_jobs (its TrainOptions)",
    ("benchmark.jobs", "methods.engine"): "train_jobs() trains a group of K >= 1 jobs through fit_jobs, the "
                                          "torch training engine",
}


@dataclass(frozen=True)
class Import:
    """One imported module, as written in one module of the package."""
    importer: str       # the importing module, dotted
    target: str         # the imported module: a package module (resolved) or a third-party / stdlib name
    line: int
    local: bool         # inside a function (def, async def, lambda), at any depth
    internal: bool      # `target` is a module of the package
    dynamic: bool = False  # a "module:Class" registry target, imported on first use


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of `PACKAGES` (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = package_modules()


def _internal(name: str) -> str | None:
    """The package module that importing dotted `name` names: the longest module prefix."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def resolve(importer: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> list[tuple[str, bool]]:
    """The modules one import statement names: [(module, internal)].

    ``from X import name`` names module X.name when that is a package module, else module X (a name
    defined in X); relative imports are resolved against `importer`.
    """
    if isinstance(node, ast.Import):
        found = []
        for alias in node.names:
            module = _internal(alias.name)
            found.append((module, True) if module else (alias.name, False))
        return found
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = []
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        if submodule in MODULES:
            found.append((submodule, True))
        elif (module := _internal(source)) is not None:
            found.append((module, True))
        else:
            found.append((source, False))
    return found


def _dynamic_target(node: ast.AST) -> str | None:
    """The module of a ``"module:Class"`` string naming a package module (a registry target), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.count(":") == 1:
        module, _, name = node.value.partition(":")
        if module in MODULES and name.isidentifier():
            return module
    return None


def module_imports(module: str) -> list[Import]:
    """Every import of one module of the package, module level and function-local."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target, internal in resolve(module, node, path.name == "__init__.py"):
                found.append(Import(module, target, node.lineno, local, internal))
        elif (target := _dynamic_target(node)) is not None:
            found.append(Import(module, target, node.lineno, True, True, dynamic=True))
        inside = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return found


ALL_IMPORTS = [imp for module in MODULES for imp in module_imports(module)]


def graph(imports: list[Import] = ALL_IMPORTS) -> dict[str, dict[str, Import]]:
    """importer -> {imported package module: the first such import}, self-imports left out."""
    edges: dict[str, dict[str, Import]] = {module: {} for module in MODULES}
    for imp in imports:
        if imp.internal and imp.target != imp.importer:
            edges[imp.importer].setdefault(imp.target, imp)
    return edges


def find_cycle(edges: dict[str, dict[str, Import]]) -> list[Import] | None:
    """One cycle of the graph as its imports in order, else None (depth-first search)."""
    done: set[str] = set()
    stack: list[str] = []     # the modules on the current path ...
    path: list[Import] = []   # ... and the imports between them: path[i] goes from stack[i] to stack[i + 1]

    def visit(module: str) -> list[Import] | None:
        stack.append(module)
        for target, imp in sorted(edges[module].items()):
            if target in stack:
                return path[stack.index(target):] + [imp]
            if target not in done:
                path.append(imp)
                if (cycle := visit(target)) is not None:
                    return cycle
                path.pop()
        stack.pop()
        done.add(module)
        return None

    for module in sorted(edges):
        if module not in done and (cycle := visit(module)) is not None:
            return cycle
    return None


def describe(imp: Import) -> str:
    where = "a registry target" if imp.dynamic else "inside a function" if imp.local else "module level"
    return f"{imp.importer} -> {imp.target} ({MODULES[imp.importer].relative_to(ROOT)}:{imp.line}, {where})"


def loads_torch(module: str, edges: dict[str, dict[str, Import]]) -> bool:
    """Whether importing `module` imports torch: its module-level imports, followed through the package."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for imp in ALL_IMPORTS:
            if imp.importer == current and not imp.local:
                if not imp.internal and imp.target.split(".")[0] in ("torch", "torchvision"):
                    return True
                if imp.internal:
                    todo.append(imp.target)
    return False


# ---- the checker itself ---------------------------------------------------------------------------
def _imports_of(source: str, module: str = "benchmark.cli") -> list[Import]:
    tree = ast.parse(source)
    node = tree.body[0]
    return [Import(module, target, 1, False, internal)
            for target, internal in resolve(module, node, MODULES[module].name == "__init__.py")]


def test_import_forms_resolve_to_the_package_modules():
    assert [(i.target, i.internal) for i in _imports_of("from benchmark import records, __version__")] == [
        ("benchmark.records", True), ("benchmark", True)]
    assert [i.target for i in _imports_of("from methods import get_method")] == ["methods"]
    assert [i.target for i in _imports_of("from methods.torch_base import TorchDetector")] == ["methods.torch_base"]
    assert [i.target for i in _imports_of("import benchmark.records as r")] == ["benchmark.records"]
    assert [i.target for i in _imports_of("from .records import iter_records")] == ["benchmark.records"]
    assert [i.target for i in _imports_of("from . import figures")] == ["benchmark.figures"]
    assert [i.target for i in _imports_of("from .base import Detector", "methods")] == ["methods.base"]
    assert [(i.target, i.internal) for i in _imports_of("from torch.func import vmap")] == [("torch.func", False)]


def test_the_checker_finds_a_cycle_through_a_function_local_import():
    a = Import("benchmark.data", "benchmark.datasets", 3, False, True)
    b = Import("benchmark.datasets", "benchmark.records", 5, False, True)
    c = Import("benchmark.records", "benchmark.data", 9, True, True)
    cycle = find_cycle(graph([a, b, c]))
    assert cycle is not None and {step.importer for step in cycle} == {"benchmark.data", "benchmark.datasets",
                                                                       "benchmark.records"}
    assert find_cycle(graph([a, b])) is None


def test_the_graph_sees_every_kind_of_import():
    edges = graph()
    assert len(MODULES) > 30 and sum(map(len, edges.values())) > 80
    assert "benchmark.stacking" in edges["benchmark.runner"]  # module level
    assert "methods.iforest" in edges["methods"]  # a registry target
    assert any(imp.local and imp.internal for imp in ALL_IMPORTS)  # the listed function-local ones


# ---- the package ----------------------------------------------------------------------------------
def test_no_import_cycle_among_the_package_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " ; ".join(describe(step) for step in cycle)


def test_functions_import_no_package_module_except_the_listed_torch_boundaries():
    local = [imp for imp in ALL_IMPORTS if imp.local and imp.internal and not imp.dynamic]
    unlisted = list(dict.fromkeys(describe(imp) for imp in local
                                  if (imp.importer, imp.target) not in LOCAL_PACKAGE_IMPORTS))
    assert not unlisted, "import these at module level (README, 'Layout'):\n" + "\n".join(unlisted)
    stale = set(LOCAL_PACKAGE_IMPORTS) - {(imp.importer, imp.target) for imp in local}
    assert not stale, f"LOCAL_PACKAGE_IMPORTS lists imports that no longer exist: {sorted(stale)}"


def test_local_package_imports_are_the_listed_torch_boundaries():
    edges = graph()
    for importer, target in LOCAL_PACKAGE_IMPORTS:
        assert not loads_torch(importer, edges), f"{importer} loads torch anyway: import {target} at module level"
        assert loads_torch(target, edges), f"{target} imports without torch: import it at module level in {importer}"


def test_functions_import_only_the_listed_optional_third_party_modules():
    local = [imp for imp in ALL_IMPORTS if imp.local and not imp.internal]
    unlisted = list(dict.fromkeys(describe(imp) for imp in local
                                  if imp.target.split(".")[0] not in LOCAL_THIRD_PARTY_IMPORTS))
    assert not unlisted, ("import these at module level, or add the package to LOCAL_THIRD_PARTY_IMPORTS with "
                          "the reason it is optional:\n" + "\n".join(unlisted))
    stale = set(LOCAL_THIRD_PARTY_IMPORTS) - {imp.target.split(".")[0] for imp in local}
    assert not stale, f"LOCAL_THIRD_PARTY_IMPORTS lists packages no function imports: {sorted(stale)}"


@pytest.mark.parametrize("module", ["benchmark.reports", "benchmark.render", "benchmark.figures",
                                    "benchmark.html_report", "benchmark.cli"])
def test_the_report_path_imports_without_torch(module):
    """The static side of tests/test_report_page.py's run-time check: neither module level nor below."""
    assert not loads_torch(module, graph())
