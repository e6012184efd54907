"""The plugin manager: builtins, local plugins, entry points that are broken, blocked or clashing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import gemma_profiles
from gemma_profiles import plugins
from gemma_profiles.errors import PluginError
from gemma_profiles.plugins import BLOCK_ENV, DEFAULT_PLUGINS, GemmaPluginManager, get_plugin_manager
from gemma_profiles.registry import Registry, default_registry
from gemma_profiles.types import ProfileSource

BUILTINS = {"sources", "config", "preflight", "placement", "loading"}


class LocalSource:
    """A plugin object contributing one folder of profiles."""

    def __init__(self, folder: Path, precedence: int = 10):
        self.folder = folder
        self.precedence = precedence

    @gemma_profiles.hookimpl
    def gemma_profile_sources(self) -> list[ProfileSource]:
        return [ProfileSource(self.folder, "local-test", self.precedence)]


class BadSource:
    @gemma_profiles.hookimpl
    def gemma_profile_sources(self) -> list[object]:
        return ["/not/a/ProfileSource"]


class RaisingSource:
    @gemma_profiles.hookimpl
    def gemma_profile_sources(self) -> list[ProfileSource]:
        raise RuntimeError("disk on fire")


def install(manager: GemmaPluginManager) -> GemmaPluginManager:
    plugins.reset_plugin_manager(manager)
    return manager


# -- fake entry points -------------------------------------------------------------------------


@pytest.fixture
def entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., list[str]]]:
    """``entry_points(name=source, ...)``: each source becomes a module behind an entry point ``name``.

    Returns the module names.  An entry point value may carry ``:attr``: pass
    ``{"name": ("source", "attr")}``.  Modules are removed from sys.modules afterwards.
    """
    created: list[str] = []
    folder = tmp_path / "plugin_modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def make(*pairs: tuple[str, str | tuple[str, str]]) -> list[str]:
        points = []
        modules = []
        for name, spec in pairs:
            source, attribute = spec if isinstance(spec, tuple) else (spec, "")
            module = f"gp_test_plugin_{uuid.uuid4().hex[:10]}"
            (folder / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
            created.append(module)
            modules.append(module)
            value = f"{module}:{attribute}" if attribute else module
            points.append(EntryPoint(name=name, value=value, group=plugins.ENTRY_POINT_GROUP))

        def fake_entry_points(**selection: str) -> list[EntryPoint]:
            group = selection.get("group")
            return [p for p in points if group is None or p.group == group]

        monkeypatch.setattr(plugins.metadata, "entry_points", fake_entry_points)
        return modules

    try:
        yield make
    finally:
        for module in created:
            sys.modules.pop(module, None)


SOURCES_PLUGIN = """
    from pathlib import Path
    from gemma_profiles import hookimpl
    from gemma_profiles.types import ProfileSource

    FOLDER = Path(__file__).with_name("profiles_{tag}")

    @hookimpl
    def gemma_profile_sources():
        return [ProfileSource(FOLDER, "{tag}")]
"""


# -- builtins ------------------------------------------------------------------------------------


def test_builtins_are_registered_with_their_hooks():
    manager = GemmaPluginManager(load_entry_points=False)
    infos = {info.name: info for info in manager.plugins()}
    assert {name for name, _ in DEFAULT_PLUGINS} >= BUILTINS
    assert set(infos) == {name for name, _ in DEFAULT_PLUGINS}
    for info in infos.values():
        assert info.builtin
        assert info.package == "gemma-profiles"
        assert info.hooks, info
        assert all(hook.startswith("gemma_profile_") for hook in info.hooks)
    assert infos["sources"].hooks == ("gemma_profile_sources",)
    assert infos["config"].hooks == ("gemma_profile_rewrite_config",)
    assert "gemma_profile_preflight" in infos["preflight"].hooks
    assert {"gemma_profile_resolve_device", "gemma_profile_model_built"} <= set(infos["placement"].hooks)
    assert infos["loading"].hooks == ("gemma_profile_load_weights",)


def test_plugin_manager_is_lazy_and_resettable():
    first = get_plugin_manager()
    assert get_plugin_manager() is first
    plugins.reset_plugin_manager()
    assert get_plugin_manager() is not first


def test_building_the_manager_does_not_import_torch():
    code = (
        "import sys; from gemma_profiles.plugins import get_plugin_manager; "
        "get_plugin_manager().profile_sources(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_builtin_can_be_blocked(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, " sources , loading")
    manager = GemmaPluginManager(load_entry_points=False)
    assert {info.name for info in manager.plugins()} == {name for name, _ in DEFAULT_PLUGINS} - {"sources", "loading"}
    assert manager.blocked == {"sources", "loading"}
    assert manager.profile_sources() == []


# -- local plugin classes ----------------------------------------------------------------------


def test_local_plugin_contributes_profiles(tmp_path, write_profile):
    folder = tmp_path / "local"
    write_profile("from-plugin", "description: made by a plugin\nconfig: {dtype: float32}\n", folder)
    manager = GemmaPluginManager(load_entry_points=False)
    manager.register(LocalSource(folder), "local-source", package="tests")
    install(manager)

    assert "from-plugin" in default_registry().names()
    assert gemma_profiles.load_profile("from-plugin").description == "made by a plugin"
    info = {i.name: i for i in manager.plugins()}["local-source"]
    assert info.hooks == ("gemma_profile_sources",)
    assert not info.builtin
    assert info.package == "tests"


def test_plugin_source_overrides_bundled_but_not_user(tmp_path, write_profile, isolated_env):
    folder = tmp_path / "local"
    write_profile("t4", "description: plugin t4\n", folder)
    manager = GemmaPluginManager(load_entry_points=False)
    manager.register(LocalSource(folder), "local-source")
    install(manager)
    assert default_registry().load("t4").description == "plugin t4"

    write_profile("t4", "description: user t4\n", isolated_env / "user-profiles")
    assert default_registry().load("t4").description == "user t4"


def test_unregistered_plugin_profiles_disappear(tmp_path, write_profile):
    folder = tmp_path / "local"
    write_profile("from-plugin", "description: x\n", folder)
    manager = install(GemmaPluginManager(load_entry_points=False))
    manager.register(LocalSource(folder), "local-source")
    try:
        assert "from-plugin" in default_registry().names()
    finally:
        manager.unregister("local-source")
    assert "from-plugin" not in default_registry().names()
    assert "local-source" not in {i.name for i in manager.plugins()}


def test_non_profile_source_is_a_plugin_error():
    manager = GemmaPluginManager(load_entry_points=False)
    manager.register(BadSource(), "bad-source", package="badpkg")
    install(manager)
    with pytest.raises(PluginError) as caught:
        default_registry().names()
    message = str(caught.value)
    assert "'bad-source'" in message
    assert "str" in message
    assert "ProfileSource" in message


def test_raising_source_is_blamed_on_its_plugin():
    manager = GemmaPluginManager(load_entry_points=False)
    manager.register(RaisingSource(), "hot-source", package="hotpkg")
    with pytest.raises(PluginError) as caught:
        manager.profile_sources()
    message = str(caught.value)
    assert "'hot-source'" in message
    assert "hotpkg" in message
    assert "disk on fire" in message
    assert f"{BLOCK_ENV}=hot-source" in message


def test_registering_a_builtin_name_twice_is_a_plugin_error(tmp_path):
    manager = GemmaPluginManager(load_entry_points=False)
    with pytest.raises(PluginError, match="two plugins are named 'sources'") as caught:
        manager.register(LocalSource(tmp_path), "sources", package="impostor")
    assert "impostor" in str(caught.value)
    assert "gemma-profiles" in str(caught.value)


# -- entry points ----------------------------------------------------------------------------


def test_entry_point_plugin_is_loaded(tmp_path, entry_points, write_profile):
    (module,) = entry_points(("extra", SOURCES_PLUGIN.replace("{tag}", "extra")))
    write_profile("ep-profile", "description: from an entry point\n", tmp_path / "plugin_modules" / "profiles_extra")
    manager = install(GemmaPluginManager())
    info = {i.name: i for i in manager.plugins()}["extra"]
    assert info.hooks == ("gemma_profile_sources",)
    assert not info.builtin
    assert default_registry().index()["ep-profile"].source.label == "extra"
    assert module in sys.modules


def test_entry_point_with_attribute(entry_points):
    source = """
        from gemma_profiles import hookimpl

        class Plugin:
            @hookimpl
            def gemma_profile_sources(self):
                return []

        plugin = Plugin()
    """
    entry_points(("attr-plugin", (source, "plugin")))
    manager = GemmaPluginManager()
    assert {i.name: i.hooks for i in manager.plugins()}["attr-plugin"] == ("gemma_profile_sources",)


def test_misspelt_hook_is_a_plugin_error(entry_points):
    source = """
        from gemma_profiles import hookimpl

        @hookimpl
        def gemma_profile_source():
            return []
    """
    entry_points(("typo-plugin", source))
    with pytest.raises(PluginError) as caught:
        GemmaPluginManager()
    message = str(caught.value)
    assert "'typo-plugin'" in message
    assert "gemma_profile_source" in message
    assert "does not exist" in message


def test_misspelt_hook_via_default_manager(entry_points):
    entry_points(
        ("typo-plugin", "from gemma_profiles import hookimpl\n@hookimpl\ndef gemma_profile_source():\n    return []\n")
    )
    with pytest.raises(PluginError, match="typo-plugin"):
        default_registry()


def test_wrong_hook_arguments_are_a_plugin_error(entry_points):
    source = """
        from gemma_profiles import hookimpl

        @hookimpl
        def gemma_profile_preflight(plan, surprise):
            pass
    """
    entry_points(("argy", source))
    with pytest.raises(PluginError, match="'argy'"):
        GemmaPluginManager()


def test_import_error_names_the_plugin_and_the_way_out(entry_points):
    entry_points(("broken", "raise ImportError('needs the frobnicator package')\n"))
    with pytest.raises(PluginError) as caught:
        GemmaPluginManager()
    message = str(caught.value)
    assert "'broken'" in message
    assert "ImportError" in message
    assert "frobnicator" in message
    assert f"{BLOCK_ENV}=broken" in message
    assert "\n" not in message


def test_blocked_entry_point_is_not_even_imported(entry_points, monkeypatch):
    (module,) = entry_points(("broken", "raise ImportError('needs the frobnicator package')\n"))
    monkeypatch.setenv(BLOCK_ENV, "broken")
    manager = GemmaPluginManager()
    assert "broken" not in {i.name for i in manager.plugins()}
    assert module not in sys.modules
    assert "t4" in registry_names(manager)


def registry_names(manager: GemmaPluginManager) -> list[str]:
    return Registry(manager.profile_sources()).names()


def test_missing_attribute_is_a_plugin_error(entry_points):
    entry_points(("noattr", ("x = 1\n", "plugin")))
    with pytest.raises(PluginError, match=r"'noattr'.*AttributeError"):
        GemmaPluginManager()


def test_two_entry_points_with_one_name(entry_points):
    entry_points(
        ("twin", SOURCES_PLUGIN.replace("{tag}", "one")),
        ("twin", SOURCES_PLUGIN.replace("{tag}", "two")),
    )
    with pytest.raises(PluginError, match="two plugins are named 'twin'"):
        GemmaPluginManager()


def test_entry_point_named_like_a_builtin(entry_points):
    entry_points(("sources", SOURCES_PLUGIN.replace("{tag}", "fake")))
    with pytest.raises(PluginError, match="two plugins are named 'sources'"):
        GemmaPluginManager()


def test_non_profile_source_from_an_entry_point(entry_points):
    source = """
        from gemma_profiles import hookimpl

        @hookimpl
        def gemma_profile_sources():
            return ["profiles/"]
    """
    entry_points(("stringy", source))
    install(GemmaPluginManager())
    with pytest.raises(PluginError, match="'stringy'"):
        default_registry().names()
