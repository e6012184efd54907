"""The docs are held to the code: every hook documented with an example that registers."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pluggy
import pytest

from gemma_profiles.plugin import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS_MD = ROOT / "docs" / "hooks.md"


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
