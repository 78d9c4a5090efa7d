"""The dependency rule and the no-cycle rule over src/modelkiln (AST only, nothing imported).

Layers (docs/ARCHITECTURE.md):

* core: every top-level module and package that is not a stage or wiring
  (errors, configbase, config, stages, artifacts, contract/, kvgraph, onnxrt,
  onnxexport, stats, hardware, progress, report, recipes/ ...). Core imports no
  stage and no wiring.
* stages: the packages in :data:`STAGE_PACKAGES`. A stage imports core (and its
  own modules), never another stage and never the wiring.
* wiring: cli/, pipeline, pipeline_dist, pipeline_serve, pipeline_monitor. They import
  anything.

Every import counts for the dependency rule, also the ones inside functions
(a lazy import still couples the code); imports under ``if TYPE_CHECKING:``
do not (they never run). The cycle rule counts module-level imports only
(imports inside functions run after every module is loaded).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = "modelkiln"

STAGE_PACKAGES = frozenset(
    {"data", "train", "optimize", "serve", "monitor", "rollout", "deploy", "bench", "security",
     "doctor"}
)  # fmt: skip
WIRING = frozenset(
    {"cli", "pipeline", "pipeline_dist", "pipeline_serve", "pipeline_monitor", "__main__"}
)

#: The one list of allowed exceptions: (importing module, imported module) -> reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("modelkiln.deploy.azureml_score", "modelkiln.serve"): "the Azure ML scoring entry point "
    "starts the server inside the container (an entry point, like cli/)",
    ("modelkiln.deploy.ray_app", "modelkiln.serve"): "the Ray Serve replica entry point builds "
    "the server app with serve's public create_app (an entry point, like azureml_score)",
    ("modelkiln.rollout.serving", "modelkiln.serve"): "the rollout gateway starts one server per "
    "version through serve's public API (create_app, ServeConfig, ModelSpec): wiring",
}


#: Import cycles allowed when imports inside functions are counted too (module-level cycles
#: are never allowed): the modules of the cycle -> reason. Same place as EXCEPTIONS.
LAZY_CYCLE_EXCEPTIONS: dict[frozenset[str], str] = {}


def module_name(path: Path) -> str:
    """``modelkiln.a.b`` of ``src/modelkiln/a/b.py`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(source: str, module: str, *, is_package: bool = False, lazy: bool = True
            ) -> Iterator[tuple[str, int]]:  # fmt: skip
    """``(imported modelkiln module, line)`` of every import that runs (``lazy``: in functions too).

    ``from a.b import c`` yields ``a.b.c`` when that is a module of the tree, else ``a.b``.
    """

    def visit(nodes: list[ast.stmt]) -> Iterator[tuple[str, int]]:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                yield from visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, node.lineno
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    yield (sub if _exists(sub) else target), node.lineno
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not lazy:
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from visit(children)

    for name, line in visit(ast.parse(source).body):
        if name == ROOT or name.startswith(ROOT + "."):
            yield name, line


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (SRC / rel.with_suffix(".py")).is_file() or (SRC / rel / "__init__.py").is_file()


def layer(module: str) -> tuple[str, str]:
    """``(kind, top)``: kind is core / stage / wiring, top the first name below modelkiln."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top in STAGE_PACKAGES:
        return "stage", top
    if top in WIRING:
        return "wiring", top
    return "core", top


def violations(module: str, found: list[tuple[str, int]]) -> list[str]:
    """The dependency-rule breaks of ``module`` importing ``found`` (exceptions left out)."""
    kind, top = layer(module)
    out = []
    for target, line in found:
        t_kind, t_top = layer(target)
        if kind == "wiring" or (module, target) in EXCEPTIONS:
            continue
        if t_kind == "wiring" or (t_kind == "stage" and t_top != top):
            out.append(f"{module}:{line} imports {target} ({kind} -> {t_kind} {t_top})")
    return out


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / ROOT).rglob("*.py"))}


def _graph(lazy: bool) -> dict[str, list[tuple[str, int]]]:
    out = {}
    for name, path in _modules().items():
        source = path.read_text(encoding="utf-8")
        found = imports(source, name, is_package=path.name == "__init__.py", lazy=lazy)
        out[name] = [(t, line) for t, line in found if t != name]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_stages_import_only_core_and_themselves() -> None:
    broken = [v for m, found in _graph(lazy=True).items() for v in violations(m, found)]
    assert not broken, "dependency rule broken:\n" + "\n".join(broken)


def test_every_exception_is_still_needed() -> None:
    graph = _graph(lazy=True)
    stale = [pair for pair in EXCEPTIONS if pair[1] not in {t for t, _ in graph.get(pair[0], [])}]
    assert not stale, f"exceptions no longer needed (remove them): {stale}"


def test_no_import_cycles_among_modules() -> None:
    graph = {m: {t for t, _ in found} for m, found in _graph(lazy=False).items()}
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_no_import_cycles_even_through_lazy_imports() -> None:
    graph = {m: {t for t, _ in found} for m, found in _graph(lazy=True).items()}
    found = [c for c in cycles(graph) if frozenset(c) not in LAZY_CYCLE_EXCEPTIONS]
    assert not found, f"import cycles through imports inside functions: {found}"
    stale = [sorted(c) for c in LAZY_CYCLE_EXCEPTIONS if sorted(c) not in cycles(graph)]
    assert not stale, f"cycle exceptions no longer needed (remove them): {stale}"


def test_the_checker_reports_a_stage_importing_another_stage() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from modelkiln.contract import KV_ONNX\n"
        "from modelkiln.optimize import kv_export\n"
        "if TYPE_CHECKING:\n"
        "    from modelkiln.train.config import TrainConfig\n"
        "def load():\n"
        "    from modelkiln.pipeline import run_pipeline\n"
    )
    found = list(imports(source, "modelkiln.serve.fake"))
    broken = violations("modelkiln.serve.fake", found)
    assert broken == [
        "modelkiln.serve.fake:3 imports modelkiln.optimize.kv_export (stage -> stage optimize)",
        "modelkiln.serve.fake:7 imports modelkiln.pipeline (stage -> wiring pipeline)",
    ]
    assert not violations("modelkiln.optimize.fake", [("modelkiln.optimize.registry", 1)])
    assert violations("modelkiln.kvgraph", [("modelkiln.optimize.runners", 1)])


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", ["modelkiln.config", "modelkiln.stages", "modelkiln.contract"])
def test_core_entry_points_import_no_stage(module: str) -> None:
    path = _modules()[module]
    found = imports(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")
    assert all(layer(t)[0] == "core" for t, _ in found)


def test_test_file_basenames_are_unique() -> None:
    """tests/ has no __init__.py files, so pytest imports test modules by basename: two
    files with one name make collection fail for the whole suite."""
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted(tests.rglob("*.py")):
        if path.name in seen and path.name != "conftest.py":
            clashes.append(f"{seen[path.name].relative_to(tests)} and {path.relative_to(tests)}")
        seen.setdefault(path.name, path)
    assert not clashes, "rename one of each pair: " + "; ".join(clashes)
