"""The import graph of ``app/``: layers point one way and no files import each other in a circle.

Layers, top to bottom (docs/architecture.md draws them)::

    app.__main__ -> app.cli -> app.serving -> app.ray_serve -> app.server -> app.api -> app.engine
      -> app.tasks -> app.repository -> (app.backbones, app.oip, app.runtime) -> app.equivariance
      -> app.tracing -> (app.command_line, app.metrics, app.web) -> (app.config, app.errors)

A module may import its own top-level package and anything in a lower layer, never a higher
one nor another package of its own layer. Every import counts: module level, inside functions
(lazy imports) and under ``TYPE_CHECKING``. And only ``app.tasks``'s table names a task: no module
outside ``app/tasks/`` imports a task package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app"

LAYERS: list[set[str]] = [
    {"app.__main__"},
    {"app.cli"},
    {"app.serving"},
    {"app.ray_serve"},
    {"app.server"},
    {"app.api"},
    {"app.engine"},
    {"app.tasks"},
    {"app.repository"},
    {"app.backbones", "app.oip", "app.runtime"},
    {"app.equivariance"},
    {"app.tracing"},
    {"app.command_line", "app.metrics", "app.web"},
    {"app.config", "app.errors"},
]
LAYER_OF = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
TASK_NAMES = ("classify", "embed", "generate", "translate", "act")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in APP.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The module of ours that ``import name`` loads last (a package's ``__init__`` or a file)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            if name == "app" or name.startswith("app."):
                target = resolve(name)
                if target is not None and target != module:
                    found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def top(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_every_module_has_a_layer() -> None:
    assert sorted({top(m) for m in MODULES} - set(LAYER_OF) - {"app"}) == []


def upward(graph: dict[str, set[str]]) -> list[str]:
    """The imports that go up the layers or sideways into another package of the same layer."""
    return [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        if module != "app"
        for target in sorted(targets)
        if target != "app" and top(target) != top(module) and LAYER_OF[top(target)] <= LAYER_OF[top(module)]
    ]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one file."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_imports_point_down_the_layers() -> None:
    assert upward(GRAPH) == []


def test_no_circle_of_files() -> None:
    assert circles(GRAPH) == []


def test_the_checks_can_fail() -> None:
    """A task importing the edge, the engine importing a server, and a circle of three files."""
    bad = {
        **GRAPH,
        "app.tasks.act.model": GRAPH["app.tasks.act.model"] | {"app.api.common"},
        "app.engine.engine": GRAPH["app.engine.engine"] | {"app.server"},
    }
    assert upward(bad) == ["app.engine.engine imports app.server", "app.tasks.act.model imports app.api.common"]
    assert upward({"app.backbones.factory": {"app.oip"}}) == ["app.backbones.factory imports app.oip"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_relative_imports_are_resolved() -> None:
    assert "app.tasks.act.messages" in GRAPH["app.tasks.act.http"]
    assert "app.tasks.classify.training.features" in GRAPH["app.tasks.classify.training.evaluate"]
    assert "app.tasks" in GRAPH["app.tasks.act"]  # from app.tasks import TaskParts


def test_only_the_tasks_package_imports_a_task() -> None:
    task_packages = {f"app.tasks.{t}" for t in TASK_NAMES}
    outside = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if not module.startswith("app.tasks")
        for target in targets
        if any(target == p or target.startswith(p + ".") for p in task_packages)
    ]
    assert outside == []


def test_the_registry_lists_every_task_package() -> None:
    from app.tasks import TASKS

    packages = sorted(p.parent.name for p in (APP / "tasks").glob("*/__init__.py"))
    assert sorted(TASKS) == packages == sorted(TASK_NAMES)


def test_every_task_has_its_docs_page() -> None:
    from app.tasks import TASKS, task_parts

    for task in TASKS:
        docs = task_parts(task).docs
        assert docs is not None and (ROOT / docs).is_file(), task
        assert f"/{task}" in (ROOT / docs).read_text(), f"{docs} does not show the {task} route"
