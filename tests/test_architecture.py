"""The house rules of the code (issue #21), checked so that they cannot erode unnoticed:
rooms import only what their `__init__` says they may, nothing on the data path imports the
developer tooling, no import cycles, no module too long to read, a short `stream/` root."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stream", "workers", "schemas")
OURS = PACKAGES + ("devtools",)
MAX_LINES = 600

# room -> rooms it may import (besides itself); "root" = stream's root modules
MAY_IMPORT: dict[str, set[str]] = {
    "schemas": set(),
    "workers": {"schemas"},
    "stream.root": {"schemas", "stream.root"},
    "stream.kafka": {"stream.root", "schemas"},
    "stream.state": {"stream.root", "schemas", "workers"},
    "stream.processing": {"stream.root", "schemas", "workers", "stream.kafka", "stream.state",
                          "stream.runtime.logs", "stream.runtime.metrics"},
    "stream.api": {"stream.root", "schemas", "workers", "stream.state", "stream.runtime.model_thread",
                   "stream.index"},  # issue #19: POST /v1/search ranks through the sink's index
    "stream.runtime": {"stream.root", "schemas", "workers", "stream.kafka", "stream.state", "stream.processing",
                       "stream.api"},
    "stream.clients": {"stream.root", "schemas", "stream.kafka", "stream.api.models"},
    "stream.index": {"stream.root", "schemas", "stream.kafka", "stream.clients"},
    "stream.cli": {"stream.root", "schemas", "workers", "stream.kafka", "stream.state", "stream.processing",
                   "stream.runtime", "stream.api", "stream.clients", "stream.index"},
}
RUNTIME_LEAVES = {"stream.runtime.logs", "stream.runtime.log_limits", "stream.runtime.metrics",
                  "stream.runtime.model_thread", "stream.runtime.shutdown"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in OURS:
        for f in (REPO / pkg).rglob("*.py"):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "stream":
        return parts[0]
    if len(parts) == 1 or (len(parts) == 2 and (REPO / "stream" / f"{parts[1]}.py").is_file()):
        return "stream.root"
    return f"stream.{parts[1]}"


def _imports(path: Path, only: tuple[str, ...] | None = OURS) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every import of our packages (of any package
    with `only=None`); imports under `if TYPE_CHECKING:` do not run and are skipped."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if only is None or name.split(".")[0] in only:
                out.append((name, id(node) in top))
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module an import names (`from a.b import c` may name module a.b.c or object c)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_no_module_too_long_and_a_short_root() -> None:
    long = {str(p.relative_to(REPO)): n for m, p in MODULES.items() if m.split(".")[0] in PACKAGES
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    root = sorted(p.name for p in (REPO / "stream").glob("*.py"))
    assert len(root) <= 5, f"stream/ root should hold a handful of modules, holds {root}"


def test_the_data_path_never_imports_devtools() -> None:
    bad = []
    for mod, path in MODULES.items():
        if mod.split(".")[0] not in PACKAGES:
            continue
        for name, top in _imports(path):
            if name.startswith("devtools"):
                # only the CLI may reach for the dev tools, lazily, for `stack` and `demo`
                if not (_room(mod) == "stream.cli" and not top):
                    bad.append(f"{mod} imports {name}")
    assert not bad, bad


def test_one_command_line_parser() -> None:
    """The package's command line is the typer app in stream/cli/ (one `error:` shape, one
    exit-code table, one --help); a second, argparse-built entry point inside the package drifts
    from it (issue #18 found `python -m stream.kafka.topics` answering differently)."""
    bad = [f"{mod} imports {name}" for mod, path in MODULES.items() if mod.split(".")[0] in PACKAGES
           for name, _ in _imports(path, None) if name == "argparse" or name.startswith("argparse.")]
    assert not bad, bad


def test_rooms_import_only_what_they_may() -> None:
    bad = []
    for mod, path in MODULES.items():
        room = _room(mod)
        if room not in MAY_IMPORT:
            continue
        allowed = MAY_IMPORT[room] | {room}
        for name, top in _imports(path):
            target = _resolve(name)
            if target is None or (room == "stream.cli" and target.startswith("devtools") and not top):
                continue  # (the CLI's lazy reach for the dev tools is checked by the test above)
            troom = _room(target)
            if troom in allowed or any(target == a or target.startswith(a + ".") for a in allowed):
                continue
            bad.append(f"{mod} ({room}) imports {target} ({troom})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_runtime_leaves_stay_leaves() -> None:
    bad = []
    for mod in RUNTIME_LEAVES & set(MODULES):
        for name, _ in _imports(MODULES[mod]):
            target = _resolve(name)
            if target and target.startswith("stream.runtime") and target != mod and target not in RUNTIME_LEAVES:
                bad.append(f"{mod} imports {target}")
    assert not bad, bad


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in MODULES.items():
        for name, top in _imports(path):
            target = _resolve(name)
            if top and target and target != mod:
                graph[mod].add(target)
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for mod in list(graph):
        graph[mod] = {t for t in graph[mod] if not (mod == t.rpartition(".")[0] or t == mod.rpartition(".")[0])}
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if seen.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(MODULES):
        if m not in seen:
            visit(m)
    assert not cycles, cycles


@pytest.mark.parametrize("room", sorted(r for r in MAY_IMPORT if r.startswith("stream.") and r != "stream.root")
                         + ["devtools"])
def test_every_room_says_what_it_holds_and_may_import(room: str) -> None:
    init = REPO.joinpath(*room.split("."), "__init__.py")
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert len(doc) > 80, f"{init.relative_to(REPO)} has no docstring saying what the room holds"
    if room != "devtools":
        assert "May import" in doc or "imported only by" in doc, f"{init.relative_to(REPO)} does not say what it may import"
