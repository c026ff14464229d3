"""The shape of the code: package imports point down, never in a circle (issue: hardening).

Read from the source with ``ast`` (imports inside functions count too: a lazy import is still an
arrow). A module at the top of ``app/`` is its own unit (``app.config``, ``app.answers``, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app"

# Who may never be imported by whom: the layers' promises.
FORBIDDEN: dict[str, set[str]] = {
    # the shared bottom imports nothing of app but each other
    "answers": {"*"},
    "protocol": {"*", "!errors"},
    "responses": {"*", "!errors", "!protocol"},
    "errors": {"*"},
    # the request path never reaches up into learning, replay, the HTTP layer or the CLI
    "upstream": {"cascade", "scoring", "learning", "replay", "api", "cli", "main", "runtime", "state"},
    "scoring": {"cascade", "learning", "replay", "api", "cli", "main", "runtime", "state"},
    "cascade": {"learning", "replay", "api", "cli", "main", "state"},
    "api": {"replay", "cli"},
    # learning sits above cascade and below replay and the CLI
    "learning": {"replay", "api", "cli", "main", "state"},
    "replay": {"api", "cli"},
}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "app" or len(parts) < 2:
        return None
    return parts[1]


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in APP.rglob("*.py"):
        rel = path.relative_to(APP.parent).with_suffix("")
        src_unit = _unit(".".join(rel.parts))
        if src_unit is None or src_unit == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                dst = _unit(name)
                if dst is not None and dst != src_unit:
                    edges.setdefault(src_unit, set()).add(dst)
    return edges


def test_no_import_cycle_between_packages() -> None:
    edges = _edges()
    seen: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if seen.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt, [*stack, nxt])
        seen[node] = 2

    for start in sorted(edges):
        if start not in seen:
            visit(start, [start])


def test_layers_import_only_downwards() -> None:
    edges = _edges()
    wrong = []
    for src, banned in FORBIDDEN.items():
        allowed = {b[1:] for b in banned if b.startswith("!")}
        for dst in sorted(edges.get(src, ())):
            if dst in allowed:
                continue
            if "*" in banned or dst in banned:
                wrong.append(f"{src} -> {dst}")
    assert not wrong, "imports against the layering: " + ", ".join(wrong)


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    """The walk finds an import inside a function (the checker cannot pass by missing them)."""
    tree = ast.parse("def f():\n    from app.learning.train import fit_cascade\n")
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found == ["app.learning.train"]
    assert "learning" in _edges()["replay"]
