"""The docs are held to the code: every hook documented with an example that registers, every
builtin in the builtins table with the hooks it implements, every package on the design page."""

from __future__ import annotations

import ast
import inspect
import re
import types
from pathlib import Path

import pluggy
import pytest

from gemma_profiles.plugin import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS_MD = ROOT / "docs" / "hooks.md"
DESIGN_MD = ROOT / "docs" / "design.md"


def hook_names() -> list[str]:
    return [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("gemma_profile_")]


def examples() -> dict[str, str]:
    """``### `hook``` heading -> the first python block under it."""
    text = HOOKS_MD.read_text(encoding="utf-8")
    found: dict[str, str] = {}
    for match in re.finditer(r"^### `(\w+)`\n(.*?)(?=^### |^## |\Z)", text, flags=re.M | re.S):
        block = re.search(r"```python\n(.*?)```", match.group(2), flags=re.S)
        if block:
            found[match.group(1)] = block.group(1)
    return found


def test_every_hookspec_has_a_section_with_an_example() -> None:
    documented = examples()
    missing = [name for name in hook_names() if name not in documented]
    assert not missing, f"docs/hooks.md lacks a '### `name`' section with a python example for: {missing}"
    unknown = sorted(set(documented) - set(hook_names()))
    assert not unknown, f"docs/hooks.md documents hooks that do not exist: {unknown}"


@pytest.mark.parametrize("name", hook_names())
def test_each_example_registers_against_the_hookspecs(name: str) -> None:
    code = examples().get(name)
    if code is None:
        pytest.fail(f"no example for {name}")
    module = types.ModuleType(f"docs_example_{name}")
    exec(compile(code, f"docs/hooks.md:{name}", "exec"), module.__dict__)
    assert callable(getattr(module, name, None)), f"the example for {name} does not define {name}()"
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(module)  # pluggy checks the argument names against the spec
    manager.check_pending()


def builtins_table() -> dict[str, tuple[set[str], list[str]]]:
    """docs/hooks.md's "## The builtins" table: name -> (hooks named, engine files named)."""
    text = HOOKS_MD.read_text(encoding="utf-8")
    section = re.search(r"^## The builtins\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, "docs/hooks.md lacks its '## The builtins' section"
    rows: dict[str, tuple[set[str], list[str]]] = {}
    for line in section.group(1).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`(\w+)`", cells[0]) if len(cells) >= 3 else None
        if name:
            rows[name.group(1)] = (
                set(re.findall(r"`(gemma_profile_\w+)`", cells[1])),
                re.findall(r"`([\w/]+\.py)`", cells[2]),
            )
    return rows


def builtins() -> dict[str, Path]:
    """DEFAULT_PLUGINS' names -> the file in hooks/ each one loads."""
    from gemma_profiles.plugin.manager import DEFAULT_PLUGINS

    prefix = "gemma_profiles.hooks."
    return {entry[0]: ROOT / "hooks" / f"{entry[1].removeprefix(prefix)}.py" for entry in DEFAULT_PLUGINS}


def implemented(path: Path) -> set[str]:
    """The hooks a builtin's module implements, read from its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("gemma_profile_")
    }


def test_every_builtin_is_in_the_builtins_table() -> None:
    table, known = builtins_table(), builtins()
    missing = sorted(set(known) - set(table))
    assert not missing, f"docs/hooks.md '## The builtins' lacks a row for the builtins {missing} (DEFAULT_PLUGINS)"
    unknown = sorted(set(table) - set(known))
    assert not unknown, f"docs/hooks.md '## The builtins' lists {unknown}, which are not in DEFAULT_PLUGINS"


@pytest.mark.parametrize("name", sorted(builtins()))
def test_each_builtin_row_names_the_hooks_it_implements(name: str) -> None:
    hooks, engine = builtins_table().get(name, (set(), []))
    path = builtins()[name]
    actual = implemented(path)
    assert hooks == actual, (
        f"docs/hooks.md '## The builtins', row {name}: names {sorted(hooks)}, but {path.relative_to(ROOT)} "
        f"implements {sorted(actual)}; fix the row"
    )
    absent = [file for file in engine if not (ROOT / "gemma_profiles" / file).is_file()]
    assert not absent, (
        f"docs/hooks.md '## The builtins', row {name}: no such engine module {absent} under gemma_profiles/"
    )


def test_the_design_page_names_every_package_and_module() -> None:
    """docs/design.md's package map names each subpackage, each shared module and each engine module."""
    text = DESIGN_MD.read_text(encoding="utf-8")
    package = ROOT / "gemma_profiles"
    wanted = [f"{d.name}/" for d in sorted(package.iterdir()) if (d / "__init__.py").is_file()]
    wanted += [f"{f.name}" for f in sorted(package.glob("*.py")) if f.name != "__init__.py"]
    wanted += [f"`{f.stem}`" for f in sorted((package / "engine").glob("*.py")) if f.name != "__init__.py"]
    wanted += [f"`{f.stem}`" for f in sorted((package / "planning").glob("*.py")) if f.name != "__init__.py"]
    wanted += [f"`{f.stem}`" for f in sorted((package / "spec").glob("*.py")) if f.name != "__init__.py"]
    missing = [name for name in wanted if name not in text]
    assert not missing, f"docs/design.md's package map does not name {missing}: add them to the table"


#: Where a path in the docs may start: the repository, the package (``engine/loading.py``), the
#: engine (``csrc/decode.c``), the installed names of hooks/ and profiles/, an example pack's own layout.
PATH_BASES = (
    ROOT,
    ROOT / "gemma_profiles",
    ROOT / "gemma_profiles" / "engine",
    *(path for pack in sorted((ROOT / "examples").iterdir()) if pack.is_dir() for path in (pack, *pack.iterdir())),
)
INSTALLED = {"gemma_profiles/hooks": "hooks", "gemma_profiles/profiles": "profiles"}
OUR_FOLDERS = (
    "gemma_profiles|hooks|tests|benchmarks|profiles|examples|docs|engine|spec|planning|plugin|runtime|cli|tools|csrc"
)
#: Module files renamed by the layout of issue 16, by their old names.
RENAMED = {
    "loader.py": "engine/loading.py",
    "int8.py": "engine/quantization.py",
    "packed.py": "engine/kernels.py",
    "streaming.py": "engine/offload.py",
    "osutil.py": "engine/pages.py",
    "runtime.py": "runtime/session.py",
    "plugins.py": "plugin/manager.py",
    "cli.py": "cli/main.py",
}


def prose() -> list[Path]:
    return [*sorted((ROOT / "docs").glob("*.md")), ROOT / "CONTRIBUTING.md", *sorted((ROOT / "examples").rglob("*.md"))]


def test_paths_in_the_docs_exist() -> None:
    """A file of ours named in the docs exists (``engine/loading.py``, ``hooks/oom.py``, ``csrc/decode.c``...),
    and no page names a module by its name from before the layout of issue 16."""
    mention = re.compile(rf"(?<![\w./-])((?:{OUR_FOLDERS})/[\w./-]*\w)")
    old = re.compile(rf"(?<![\w./-])({'|'.join(re.escape(name) for name in RENAMED)})\b")
    problems = []
    for page in prose():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{page.relative_to(ROOT)}:{number}"
            for match in mention.finditer(line):
                path = match.group(1)
                for installed, folder in INSTALLED.items():
                    path = re.sub(rf"^{installed}\b", folder, path)
                placeholder = any(part.split(".")[0].isupper() for part in path.split("/"))
                if not placeholder and not any((base / path).exists() for base in PATH_BASES):
                    problems.append(f"{where}: {match.group(1)} does not exist")
            for match in old.finditer(line):
                problems.append(f"{where}: {match.group(1)} is now {RENAMED[match.group(1)]}")
    assert not problems, "\n".join(problems)


def _defined(path: Path) -> set[str]:
    """Top-level names a module defines or imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _module_file(dotted: str) -> Path | None:
    parts = dotted.split(".")
    folder = ROOT / ("hooks" if parts[:2] == ["gemma_profiles", "hooks"] else "gemma_profiles")
    rest = parts[2:] if parts[:2] == ["gemma_profiles", "hooks"] else parts[1:]
    base = folder.joinpath(*rest)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def test_dotted_names_in_the_docs_resolve() -> None:
    """``gemma_profiles.planning.hardware.torch_kernel_support`` in a page names a module that exists
    and, after it, a name that module defines (read from the source, nothing imported)."""
    problems = []
    for page in prose():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for match in re.finditer(r"(?<![\w.])gemma_profiles(?:\.\w+)+", line):
                dotted = match.group(0)
                if dotted == "gemma_profiles.pth":
                    continue
                parts = dotted.split(".")
                for size in range(len(parts), 0, -1):
                    module = _module_file(".".join(parts[:size]))
                    if module:
                        break
                attribute = parts[size] if module and size < len(parts) else None
                if module is None or (attribute and attribute not in _defined(module)):
                    problems.append(f"{page.relative_to(ROOT)}:{number}: {dotted} does not resolve")
    assert not problems, "\n".join(problems)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-``/``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#+ (.*)", line)
        if heading:
            slug = _slug(heading.group(1))
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links in ``page`` to a file that does not exist or a heading it does not have."""
    text = page.read_text(encoding="utf-8")
    problems = []
    for match in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, fragment = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        where = f"{page.name}:{text.count(chr(10), 0, match.start()) + 1}"
        if not destination.exists():
            problems.append(f"{where}: {target}: no such file")
        elif fragment and destination.suffix == ".md" and fragment not in _anchors(destination):
            problems.append(f"{where}: {target}: {destination.name} has no heading with that anchor")
    return problems


def test_links_between_pages_resolve() -> None:
    pages = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "CONTRIBUTING.md", ROOT / "README.md"]
    problems = [problem for page in pages for problem in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_link_check_sees_a_missing_page_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A page\n\n## The `x` hook\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#the-x-hook) [ok](#b) [web](https://example.org/x.md)\n# B\n[gone](c.md) [moved](a.md#the-y-hook)\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "b.md:3: c.md: no such file",
        "b.md:3: a.md#the-y-hook: a.md has no heading with that anchor",
    ]


def doc_samples() -> list[object]:
    from doc_samples import documents, samples

    found = [sample for path in documents() for sample in samples(path)]
    return [pytest.param(sample, id=f"{sample.path.name}:{sample.line}") for sample in found]


@pytest.mark.parametrize("sample", doc_samples())
def test_command_samples_are_what_the_cli_prints(sample: object, tmp_path: Path) -> None:
    """A sample in README/docs that the CLI no longer prints fails here; refresh with
    ``python tests/doc_samples.py --update``."""
    from doc_samples import matches, run

    actual = run(sample.command, tmp_path)  # type: ignore[attr-defined]
    assert matches(sample.expected, actual), "\n".join(  # type: ignore[attr-defined]
        [f"{sample.path.name}:{sample.line}: $ {sample.command}", "--- now prints:", *actual]  # type: ignore[attr-defined]
    )


def test_the_sample_checker_fails_on_stale_output(tmp_path: Path) -> None:
    from doc_samples import matches, run

    actual = run("gemma-profile show pascal-5gb", tmp_path)
    assert matches(actual, actual)
    assert matches([actual[0], "...", actual[-1]], actual)
    assert not matches([*actual[:-1], actual[-1] + " (stale)"], actual)
