"""The hooks through which a plugin serves a codebase other than gemma_pytorch (issue 17), without
transformers: ``gemma_profile_watched_modules`` and ``gemma_profile_module_imported``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import gemma_profiles
from gemma_profiles import hookimpl
from gemma_profiles.errors import PluginError
from gemma_profiles.plugin.manager import get_plugin_manager


class Watcher:
    def __init__(self, names: Any):
        self.names = names
        self.seen: list[str] = []

    @hookimpl
    def gemma_profile_watched_modules(self) -> Any:
        return self.names

    @hookimpl
    def gemma_profile_module_imported(self, module: ModuleType) -> None:
        if module.__name__ in self.names:
            self.seen.append(module.__name__)


@pytest.fixture
def codebase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"other_codebase_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_plugins_module_is_handed_to_it_when_imported_under_a_profile(codebase: str) -> None:
    watcher = Watcher([codebase])
    get_plugin_manager().register(watcher, "watcher")
    with gemma_profiles.use("cpu-32gb"):
        module = importlib.import_module(codebase)
    assert module.LOADED and watcher.seen == [codebase]


def test_a_module_imported_before_the_profile_is_handed_over_at_activation(codebase: str) -> None:
    importlib.import_module(codebase)
    watcher = Watcher([codebase])
    get_plugin_manager().register(watcher, "watcher")
    with gemma_profiles.use("cpu-32gb"):
        assert watcher.seen == [codebase]


def test_without_a_profile_nothing_is_handed_over(codebase: str) -> None:
    watcher = Watcher([codebase])
    get_plugin_manager().register(watcher, "watcher")
    importlib.import_module(codebase)
    assert watcher.seen == []


@pytest.mark.parametrize("answer", ["transformers.modeling_utils", ["ok", 3], ["not a module"]])
def test_a_wrong_answer_names_the_plugin(answer: Any) -> None:
    get_plugin_manager().register(Watcher(answer), "watcher")
    with pytest.raises(PluginError, match=r"plugin 'watcher' .* from gemma_profile_watched_modules; expected a list"):
        get_plugin_manager().watched_modules()
