"""The package's floors: no sub-package imports one above it, and there are no import cycles."""

import ast
from pathlib import Path

import maskrcnn_coco

from conftest import REPO

PACKAGE = Path(maskrcnn_coco.__file__).parent

# Lower floors never import higher ones (README "Code map").
FLOORS = {
    "utils": 0,
    "config": 1,
    "tracking": 2,
    "data": 2,
    "modeling": 2,
    "solver": 2,
    "evaluation": 3,
    "analysis": 3,
    "engine": 4,
    "probe": 5,
    "inference": 5,
    "cli": 6,
    "benchmark": 7,
    "__init__": 8,
    "__main__": 8,
    "main_mlops": 8,
}


def unit_of(module: str) -> str | None:
    """``maskrcnn_coco.engine.fit`` -> ``engine``; modules outside the package -> None."""
    parts = module.split(".")
    if parts[0] != "maskrcnn_coco":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        unit = rel.parts[0]
        targets = {u for m in imports_of(path) if (u := unit_of(m)) and u in FLOORS}
        graph.setdefault(unit, set()).update(targets - {unit})
    return graph


def test_every_unit_has_a_floor():
    units = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in PACKAGE.rglob("*.py")}
    assert units <= set(FLOORS), units - set(FLOORS)


def test_no_import_runs_upward():
    upward = [
        f"{unit} (floor {FLOORS[unit]}) imports {target} (floor {FLOORS[target]})"
        for unit, targets in unit_graph().items()
        for target in targets
        if FLOORS[target] >= FLOORS[unit]
    ]
    assert not upward, upward


def test_no_import_cycles():
    graph = unit_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_no_print_outside_the_cli():
    """Human-readable output goes through logging (rank-zero filtered); only the CLI prints."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("cli", "main_mlops.py", "__main__.py") or relative == Path("benchmark", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
