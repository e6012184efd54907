"""The layering drawn in docs/design.md, held by reading the source (nothing here imports it).

Every ``import`` and ``from ... import`` in gemma_profiles/, hooks/ (installed as
``gemma_profiles.hooks``) and gemma_profiles_autoload.py is an edge, with its file and line:
imports inside functions (lazy ones) count, since they run sooner or later; imports under
``if TYPE_CHECKING:`` do not, since they never run. An edge goes to the most specific module
named (``from gemma_profiles.engine import loading`` is an edge to ``engine.loading``); the
parent packages Python imports on the way are not edges of their own, so a package's
``__init__`` is only a node when something imports a name from it.

The rules, each a test below:

- no import cycles (the autoload's edge into the package is the one by design, so nothing in
  the package imports the autoload back);
- ``spec`` and ``planning`` never reach torch or gemma, directly or through the modules they
  import;
- the engine imports only the engine and the shared leaves (errors, log, units, settings): it
  takes plain values, not a Plan, and knows nothing of plugins;
- hooks depend on the core, never back: only hooks/ imports ``gemma_profiles.hooks``;
- builtins do not import each other: a fact two of them need lives in the core;
- the torch-free layers (the shared leaves, spec, planning, plugin) import only what
  docs/design.md's package map says.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gemma_profiles"
HOOKS = f"{PACKAGE}.hooks"
AUTOLOAD = "gemma_profiles_autoload"
#: What the engine may import from the package besides itself.
ENGINE_MAY_IMPORT = tuple(f"{PACKAGE}.{leaf}" for leaf in ("errors", "log", "units", "settings"))
#: Third-party packages spec/ and planning/ must never reach.
HEAVY = ("torch", "gemma")
LEAVES = (f"{PACKAGE}.errors", f"{PACKAGE}.log", f"{PACKAGE}.units", f"{PACKAGE}.settings")
#: docs/design.md's "may import (ours)" column for the torch-free layers; the most specific entry wins.
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    **{leaf: LEAVES for leaf in LEAVES},
    f"{PACKAGE}.spec": (*LEAVES, f"{PACKAGE}.spec", f"{PACKAGE}.plugin.types"),
    f"{PACKAGE}.spec.registry": (
        *LEAVES,
        f"{PACKAGE}.spec",
        f"{PACKAGE}.plugin.types",
        f"{PACKAGE}.plugin.manager",  # the plugins' profile sources, detected hardware
        f"{PACKAGE}.planning.auto",  # the profile named auto
    ),
    f"{PACKAGE}.planning": (*LEAVES, f"{PACKAGE}.spec", f"{PACKAGE}.planning"),
    f"{PACKAGE}.planning.hardware": (*LEAVES, f"{PACKAGE}.planning", f"{PACKAGE}.engine.build"),  # torch-free verdict
    f"{PACKAGE}.plugin": (*LEAVES, f"{PACKAGE}.planning", f"{PACKAGE}.plugin"),
}


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is, and whether it runs at import time."""

    source: str
    target: str
    path: Path
    line: int
    lazy: bool

    def where(self, root: Path) -> str:
        try:
            shown = self.path.relative_to(root)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}{' (lazy)' if self.lazy else ''}"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for the package, the builtins and the autoload."""
    found: dict[str, Path] = {}
    for folder, package in ((root / PACKAGE, PACKAGE), (root / "hooks", HOOKS)):
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    autoload = root / f"{AUTOLOAD}.py"
    if autoload.exists():
        found[AUTOLOAD] = autoload
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.Module) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that can run, with whether it sits in a function."""

    def walk(node: ast.AST, lazy: bool) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            yield from walk_one(child, lazy)

    def walk_one(node: ast.AST, lazy: bool) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for other in node.orelse:
                yield from walk_one(other, lazy)
            return
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from walk(node, inner)

    yield from walk(tree, False)


def imports(root: Path = ROOT) -> list[Import]:
    """Every import in the tree, resolved to a module of ours where it names one, else as written."""
    known = modules(root)
    found: list[Import] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, lazy in _statements(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    written = ".".join(base + ([node.module] if node.module else []))
                else:
                    written = node.module or ""
                if written == "hooks" or written.startswith("hooks."):
                    written = f"{PACKAGE}.{written}"  # the repository's folder is the installed package
                for alias in node.names:
                    submodule = f"{written}.{alias.name}"
                    targets.append(submodule if submodule in known else written)
            for target in dict.fromkeys(targets):
                resolved = _ours(target, known)
                if resolved == name:
                    continue
                found.append(Import(name, resolved or target, path, node.lineno, lazy))
    return found


def _ours(target: str, known: dict[str, Path]) -> str | None:
    """The module of ours ``target`` lands in (``hooks.x`` seen from the repository counts), or None."""
    if target == "hooks" or target.startswith("hooks."):
        target = f"{PACKAGE}.{target}"
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def internal(found: list[Import], root: Path = ROOT) -> list[Import]:
    known = modules(root)
    return [edge for edge in found if edge.target in known]


def cycles(edges: list[Import]) -> list[list[Import]]:
    """One shortest cycle per strongly connected group of modules, as its edges (the group is
    every module that cycle's modules can reach and be reached from: `tangled`)."""
    graph: dict[str, dict[str, Import]] = {}
    for edge in edges:
        graph.setdefault(edge.source, {}).setdefault(edge.target, edge)
        graph.setdefault(edge.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def strong(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                strong(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            strong(node)
    return [_shortest_cycle(group, graph) for group in groups]


def _shortest_cycle(group: list[str], graph: dict[str, dict[str, Import]]) -> list[Import]:
    members = set(group)
    best: list[Import] = []
    for start in group:
        paths: dict[str, list[Import]] = {start: []}
        frontier = [start]
        while frontier and not (best and len(paths[frontier[0]]) >= len(best)):
            nxt_frontier = []
            for node in frontier:
                for target, edge in sorted(graph[node].items()):
                    if target not in members:
                        continue
                    if target == start:
                        if not best or len(paths[node]) + 1 < len(best):
                            best = [*paths[node], edge]
                    elif target not in paths:
                        paths[target] = [*paths[node], edge]
                        nxt_frontier.append(target)
            frontier = nxt_frontier
    return best


def tangled(cycle: list[Import], edges: list[Import]) -> list[str]:
    """Every module in the same strongly connected group as ``cycle``."""
    forward: dict[str, set[str]] = {}
    backward: dict[str, set[str]] = {}
    for edge in edges:
        forward.setdefault(edge.source, set()).add(edge.target)
        backward.setdefault(edge.target, set()).add(edge.source)

    def closure(start: str, graph: dict[str, set[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    start = cycle[0].source
    return sorted(closure(start, forward) & closure(start, backward))


def reaches(found: list[Import], start: str, bad: tuple[str, ...]) -> list[Import] | None:
    """The shortest import chain from ``start`` through our modules to a package of ``bad``, or None."""
    ours = {edge.source for edge in found}
    by_source: dict[str, list[Import]] = {}
    for edge in found:
        by_source.setdefault(edge.source, []).append(edge)
    seen = {start}
    frontier: list[tuple[str, list[Import]]] = [(start, [])]
    while frontier:
        following: list[tuple[str, list[Import]]] = []
        for node, chain in frontier:
            for edge in sorted(by_source.get(node, []), key=lambda e: (e.target, e.line)):
                if edge.target.split(".")[0] in bad:
                    return [*chain, edge]
                if edge.target in seen or edge.target not in ours:
                    continue
                seen.add(edge.target)
                following.append((edge.target, [*chain, edge]))
        frontier = following
    return None


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def _chain(edges: list[Import], root: Path = ROOT) -> str:
    return " -> ".join(
        [
            edges[0].source.removeprefix(f"{PACKAGE}."),
            *(f"{e.target.removeprefix(f'{PACKAGE}.')} [{e.where(root)}]" for e in edges),
        ]
    )


# The rules on this repository.


def test_no_import_cycles() -> None:
    edges = internal(imports())
    messages = []
    for cycle in cycles(edges):
        group = [name.removeprefix(f"{PACKAGE}.") for name in tangled(cycle, edges)]
        messages.append(
            f"import cycle: {_chain(cycle)} (rule: no import cycles, lazy imports included; break one of these "
            f"edges, e.g. move what both need lower down; {len(group)} modules are tangled: {', '.join(group)})"
        )
    assert not messages, "\n".join(messages)


@pytest.mark.parametrize("layer", ["spec", "planning"])
def test_spec_and_planning_never_reach_torch_or_gemma(layer: str) -> None:
    found = imports()
    problems = []
    for name in modules():
        if not _in(name, f"{PACKAGE}.{layer}"):
            continue
        chain = reaches(found, name, HEAVY)
        if chain:
            problems.append(
                f"{chain[-1].where(ROOT)}: {_chain(chain)} (rule: {PACKAGE}/{layer} never imports torch or gemma, "
                "not even lazily or through another module; planning runs where neither is installed)"
            )
    assert not problems, "\n".join(problems)


def test_the_engine_imports_only_itself_and_the_shared_leaves() -> None:
    engine = f"{PACKAGE}.engine"
    problems = [
        f"{edge.where(ROOT)}: {edge.source} imports {edge.target} (rule: the engine imports only "
        f"{engine} and {', '.join(ENGINE_MAY_IMPORT)}; it takes plain values from the builtin that calls it)"
        for edge in internal(imports())
        if _in(edge.source, engine) and not _in(edge.target, engine) and edge.target not in ENGINE_MAY_IMPORT
    ]
    assert not problems, "\n".join(problems)


def test_only_hooks_import_the_builtins() -> None:
    problems = [
        f"{edge.where(ROOT)}: {edge.source} imports {edge.target} (rule: hooks depend on the core, never back; "
        "move what the core needs out of hooks/ into the core)"
        for edge in internal(imports())
        if _in(edge.target, HOOKS) and not _in(edge.source, HOOKS)
    ]
    assert not problems, "\n".join(problems)


def test_builtins_do_not_import_each_other() -> None:
    problems = [
        f"{edge.where(ROOT)}: {edge.source} imports {edge.target} (rule: builtins never import each other; "
        "a fact two builtins need lives in the core, e.g. on the Plan)"
        for edge in internal(imports())
        if _in(edge.source, HOOKS) and _in(edge.target, HOOKS)
    ]
    assert not problems, "\n".join(problems)


def test_the_torch_free_layers_import_only_what_the_design_page_says() -> None:
    problems = []
    for edge in internal(imports()):
        keys = [key for key in MAY_IMPORT if _in(edge.source, key)]
        if not keys:
            continue
        key = max(keys, key=len)
        allowed = MAY_IMPORT[key]
        if not any(_in(edge.target, prefix) for prefix in allowed):
            shown = ", ".join(name.removeprefix(f"{PACKAGE}.") for name in allowed)
            problems.append(
                f"{edge.where(ROOT)}: {edge.source} imports {edge.target} (rule: {key} imports only {shown}; "
                "docs/design.md's package map - move the code, or change the map and this test together)"
            )
    assert not problems, "\n".join(problems)


# The reader itself, on a small tree made for it.


def _tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_the_reader_counts_lazy_imports_and_skips_type_checking(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "gemma_profiles/__init__.py": "",
            "gemma_profiles/spec/__init__.py": "",
            "gemma_profiles/spec/a.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from gemma_profiles.engine import b\n"
                "def f():\n    from gemma_profiles.engine import c\n"
            ),
            "gemma_profiles/engine/__init__.py": "",
            "gemma_profiles/engine/b.py": "import torch\n",
            "gemma_profiles/engine/c.py": "from . import d\n",
            "gemma_profiles/engine/d.py": "import gemma_profiles.spec.a\n",
            "hooks/__init__.py": "",
            "hooks/x.py": "from gemma_profiles.hooks import y\n",
            "hooks/y.py": "",
            "gemma_profiles_autoload.py": "def arm():\n    import gemma_profiles.spec.a\n",
        },
    )
    found = internal(imports(root), root)
    pairs = {(e.source, e.target, e.line, e.lazy) for e in found}
    assert ("gemma_profiles.spec.a", "gemma_profiles.engine.c", 5, True) in pairs
    assert not any(e.target == "gemma_profiles.engine.b" for e in found)  # TYPE_CHECKING only
    assert ("gemma_profiles.engine.c", "gemma_profiles.engine.d", 1, False) in pairs  # relative
    assert ("gemma_profiles.hooks.x", "gemma_profiles.hooks.y", 1, False) in pairs
    assert ("gemma_profiles_autoload", "gemma_profiles.spec.a", 2, True) in pairs
    (cycle,) = cycles(found)
    assert [e.source for e in cycle] == ["gemma_profiles.engine.c", "gemma_profiles.engine.d", "gemma_profiles.spec.a"]
    assert cycle[-1].where(root) == "gemma_profiles/spec/a.py:5 (lazy)"
    assert reaches(imports(root), "gemma_profiles.spec.a", HEAVY) is None  # torch only under TYPE_CHECKING
    (tmp_path / "gemma_profiles/engine/d.py").write_text("import torch.nn\n", encoding="utf-8")
    chain = reaches(imports(root), "gemma_profiles.spec.a", HEAVY)
    assert chain is not None and [e.target for e in chain] == [
        "gemma_profiles.engine.c",
        "gemma_profiles.engine.d",
        "torch.nn",
    ]
    assert cycles(internal(imports(root), root)) == []
