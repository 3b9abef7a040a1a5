"""The package's imports go down the layers of DESIGN.md only, and no modules import each other in a circle.

Every ``import posttrain...`` counts, at module level or inside a function (a lazy import still makes the
lower layer depend on the higher one). A new top-level module or package must be given a floor here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "posttrain"

# Low to high, as DESIGN.md's "Layers" section: a module may import from its own floor and below.
FLOORS: list[tuple[str, ...]] = [
    ("__init__", "errors", "hf_compat", "sections"),  # leaves: errors, compatibility names, YAML sections
    ("data", "tasks", "losses", "advantages", "logprobs"),  # the pure pieces
    ("monitor", "report", "audit", "sandbox"),  # services every layer above may use
    ("config",),  # typed configs (they name the loss kinds' options and the health rules)
    ("engine", "models"),  # the one loop, run directories, loading models
    ("rollout",),  # generation engines, the rollout buffer, the online step source
    ("rewards",),  # reward fns: verifiers, the reward model, the judge, combine
    ("algorithms", "agents"),  # objectives; environments and the episode runner
    ("train", "train_env", "stage", "eval"),  # running a stage (prompts, agent episodes); evaluating a model
    ("pipeline", "quickstart", "generate", "flywheel", "collect"),  # many stages; AI, log and human feedback
    ("cli", "__main__"),  # the command line
]
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported posttrain module: line}} over every file of the package."""
    graph: dict[str, dict[str, int]] = {}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        edges = graph.setdefault(name, {})
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                    base = base.rstrip(".")
                # `from posttrain.x import y` imports the submodule posttrain.x.y when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "posttrain" and target != name:
                    edges.setdefault(target, node.lineno)
    return graph


def _where(graph, module: str, target: str) -> str:
    path = module.replace(".", "/")
    path += "/__init__.py" if (PACKAGE.parent / path).is_dir() else ".py"
    return f"{path}:{graph[module][target]}"


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in import_graph()}
    missing = sorted(rooms - set(FLOOR))
    assert not missing, f"give these top-level modules a floor in FLOORS: {missing}"


def test_no_upward_import():
    graph = import_graph()
    upward = [
        f"{_where(graph, module, target)}: {_room(module)} (floor {FLOOR[_room(module)]}) imports {target} "
        f"(floor {FLOOR[_room(target)]})"
        for module, targets in graph.items()
        for target in targets
        if _room(target) in FLOOR and FLOOR[_room(target)] > FLOOR.get(_room(module), 99)
    ]
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "modules that import each other in a circle:\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}, [["a", "b", "c"]]),
        ({"a": {"b": 1}, "b": {"c": 1}, "c": {}}, []),
        ({"a": {"b": 1}, "b": {"a": 1}, "c": {"c": 1}}, [["a", "b"]]),
    ],
)
def test_the_circle_finder_finds_circles(graph, expected):
    assert circles(graph) == expected


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # a lazy import inside a function counts (rewards/combine -> the judge was one)
    assert "posttrain.rewards.judge" in graph["posttrain.rewards.combine"]
    assert "posttrain.sections" in graph["posttrain.config"]
