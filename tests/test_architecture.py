"""Imports only go downward (docs/architecture.md, "Layers"): every ``import`` in the package,
at module level or inside a function, is read from the source with ``ast`` and checked against
the layer table, and the module graph has no cycle. ``if TYPE_CHECKING:`` blocks are skipped:
they never run."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "comkd"

# Lowest first. A module may import its own layer or a lower one. The package root (its lazy
# public names) and __main__ sit above everything.
LAYERS: list[set[str]] = [
    {"fileio", "stats", "runlock", "digests", "config_io", "choices"},
    {"methods", "config_rules"},
    {"config", "config_sections"},
    {"losses"},
    {"data"},
    {"models"},
    {"engine"},
    {"deploy"},
    {"protocols"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["comkd", *parts])


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str], type_only: bool = False) -> set[str]:
    """The package modules ``path`` imports (``from .x import y`` counts ``.x.y`` when that is a
    module, else ``.x``); ``type_only``: the imports under ``if TYPE_CHECKING:`` too."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node) and not type_only:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("comkd"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "comkd" and all(a.name == "__version__" for a in node.names):
                return  # the root holds only __version__ and lazy names; reading the version is free
            if target.startswith("comkd"):
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(me)
    return found


def import_graph(type_only: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``type_only``: type-checking imports too)."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): {m for m in imports_of(p, modules, type_only) if m in modules} for p in files}


def layer_of(module: str) -> int | None:
    """The layer index of ``comkd.<top>...``; None for the package root and ``__main__``."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py's LAYERS: add it")


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        here = layer_of(src)
        for dst in targets:
            there = layer_of(dst)
            if here is None:
                continue
            if there is None or there > here:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def without_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without the edges from a package's ``__init__`` to its own submodules (a package
    re-exporting its parts is not a cycle with them) nor from a submodule to its parent package
    (importing ``..models`` means the names its ``__init__`` re-exports)."""
    g: dict[str, set[str]] = {}
    for src, targets in graph.items():
        g[src] = {t for t in targets if not t.startswith(src + ".") and not src.startswith(t + ".")}
    return g


def test_the_import_walk_sees_function_level_imports_and_skips_type_checking(tmp_path) -> None:
    pkg = tmp_path / "comkd"
    (pkg / "models").mkdir(parents=True)
    (pkg / "deploy").mkdir()
    for f in ("__init__.py", "models/__init__.py", "deploy/__init__.py", "deploy/predict.py", "config.py"):
        (pkg / f).write_text("")
    (pkg / "models" / "student.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..config import RunConfig\n"
        "def predict():\n    from ..deploy.predict import predict_images\n"
    )
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        graph, typed = import_graph(), import_graph(type_only=True)
    finally:
        PACKAGE = saved
    assert graph["comkd.models.student"] == {"comkd.deploy.predict"}
    assert typed["comkd.models.student"] == {"comkd.deploy.predict", "comkd.config"}
    assert upward_edges(graph) == ["comkd.models.student -> comkd.deploy.predict"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_only_go_downward() -> None:
    bad = upward_edges(import_graph())
    assert not bad, "upward imports (docs/architecture.md, 'Layers'):\n" + "\n".join(bad)


def test_no_import_cycles_type_only_ones_included() -> None:
    """A cycle through an ``if TYPE_CHECKING:`` import is a cycle too: the two modules cannot be
    understood (or moved) one without the other."""
    found = cycles(without_parents(import_graph(type_only=True)))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_extension_guide_names_files_and_names_that_exist() -> None:
    """docs/architecture.md, "Extending comkd": every ``src/...``/``tests/...`` path it names is a
    file, and every other code name it puts in backticks is defined in one of the files named in
    the same bullet (or is a config key or a quoted string)."""
    import re

    repo = PACKAGE.parents[1]
    text = (repo / "docs" / "architecture.md").read_text()
    guide = text[text.index("## Extending comkd") :]
    guide = guide[: guide.index("\n## ", 3)]
    bullets = re.split(r"\n- ", guide)[1:]
    assert len(bullets) == 4  # method, dataset source, protocol, export format
    for bullet in bullets:
        names = re.findall(r"`([^`]+)`", bullet)
        files = [n for n in names if n.startswith(("src/", "tests/"))]
        for f in files:
            assert (repo / f).is_file(), f"docs/architecture.md names {f}, which does not exist"
        sources = "\n".join((repo / f).read_text() for f in files if f.endswith(".py"))
        for n in names:
            if (
                n in files
                or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", n)
                or "." in n
                or n in ("protocol",)
            ):
                continue  # paths, config keys (distill.extra_teachers), phrases, the config field
            defined = re.search(rf"^\s*(def|class) {n}\b|^\s*{n}\b.*=|^\s*{n}:", sources, re.M)
            assert defined, f"docs/architecture.md names `{n}`, defined in none of {files}"
