"""The layering of DESIGN.md, read from the source: data_pipeline/ -> models/ -> search/, no
import circles, and the experiment directory's names spelled in one module."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipeline", "models", "search")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at any depth of the file (function-level too)."""
    package = module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from . import y
                base = f"{package}.{base}" if base else package
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # "from .x import y" names either module x.y or attribute y of x: keep what is a module.
        targets = {t if t in modules else t.rsplit(".", 1)[0] for t in project_imports(path)}
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")
                       and not (t in PACKAGES)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert "search.tune" in graph and "models.lnln" in graph["models.registry"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_only_import_downwards():
    for name, targets in import_graph().items():
        layer = name.split(".")[0]
        below = PACKAGES[:PACKAGES.index(layer) + 1]
        upward = sorted(t for t in targets if t.split(".")[0] not in below)
        assert not upward, f"{name} imports {upward} from a layer above it"


def test_experiment_file_names_are_spelled_only_in_the_layout_module():
    names = ('"config.yaml"', '"results"', '"checkpoints"', '"optuna.db"', '"space.json"', '"failures.jsonl"',
             '"trial_params"', '"epochs.jsonl"', '"last.pt"', '"ray"', '"trials"', '".trial-starts"')
    for path in (ROOT / "search").glob("*.py"):
        if path.name == "layout.py":
            continue
        text = path.read_text()
        spelled = [n for n in names if n in text]
        assert not spelled, f"{path.name} spells {spelled}; use search/layout.py"
