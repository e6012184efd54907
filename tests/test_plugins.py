"""The plugin manager: builtins, local plugins, entry points that are broken, blocked or clashing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import gemma_profiles
from gemma_profiles.errors import PluginError
from gemma_profiles.plugin import manager as plugins
from gemma_profiles.plugin.manager import BLOCK_ENV, DEFAULT_PLUGINS, GemmaPluginManager, get_plugin_manager
from gemma_profiles.plugin.types import ProfileSource
from gemma_profiles.spec.registry import Registry, default_registry

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
    from gemma_profiles.plugin.types import ProfileSource

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
        "import sys; from gemma_profiles.plugin.manager import get_plugin_manager; "
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
    assert "implements 'gemma_profile_source', which is not a hook" in message
    assert "(did you mean 'gemma_profile_sources'?)" in message
    assert f"{BLOCK_ENV}=typo-plugin" in message


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


# -- every hook result is checked, naming the plugin and its package (issue 13 item 8) ---------------


def install_plugin(plugin: object, name: str = "odd", package: str = "odd-package") -> GemmaPluginManager:
    manager = GemmaPluginManager(load_entry_points=False)
    manager.register(plugin, name, package=package)
    return install(manager)


def assert_names_the_plugin(error: PluginError, returned: str, hook: str, expected: str) -> None:
    message = str(error)
    assert message.startswith("plugin 'odd' (package 'odd-package') returned "), message
    assert f"returned {returned} from {hook}; expected {expected}" in message
    assert f"or set {BLOCK_ENV}=odd)" in message
    assert "\n" not in message


class SaysNo:
    @gemma_profiles.hookimpl(tryfirst=True)
    def gemma_profile_load_weights(self, model: object, path: str, plan: object, gemma_loader: object) -> object:
        return "no"


class LoadsNothingButSaysFalse:
    @gemma_profiles.hookimpl(tryfirst=True)
    def gemma_profile_load_weights(self, model: object, path: str, plan: object, gemma_loader: object) -> object:
        return False


class Answers:
    """A plugin whose every hook answers ``value``."""

    def __init__(self, value: object):
        self.value = value

    @gemma_profiles.hookimpl(tryfirst=True)
    def gemma_profile_sources(self) -> object:
        return self.value

    @gemma_profiles.hookimpl(tryfirst=True)
    def gemma_profile_detect_hardware(self) -> object:
        return self.value

    @gemma_profiles.hookimpl(tryfirst=True)
    def gemma_profile_preflight(self, plan: object) -> object:
        return self.value

    @gemma_profiles.hookimpl(tryfirst=True)
    def gemma_profile_resolve_device(self, requested: object, plan: object, call: str) -> object:
        return self.value


@pytest.fixture
def tiny_model(gemma, tokenizer_path, write_profile):
    """A tiny 2b model built under a CPU float32 profile, and its checkpoint; the profile stays active."""
    import torch
    from gemma_testing import tiny_config, write_random_checkpoint

    profile = write_profile("cpu-fp32", "description: x\nplacement: {device: cpu}\nconfig: {dtype: float32}\n")
    config = tiny_config(gemma.config, "2b", tokenizer_path, dtype="float32")
    checkpoint = Path(tokenizer_path).parent / "tiny-plugins.ckpt"
    if not checkpoint.exists():
        write_random_checkpoint(gemma.model.GemmaForCausalLM(config), str(checkpoint), torch.float32)
    with gemma_profiles.use(str(profile)):
        yield gemma.model.GemmaForCausalLM(config), str(checkpoint)


def test_load_weights_answering_no_stops_with_the_plugin_named(tiny_model):
    # Before: "no" was truthy, so no loader ran and generate worked on unloaded weights (NaN, exit 0).
    install_plugin(SaysNo())
    model, checkpoint = tiny_model
    with pytest.raises(PluginError) as caught:
        model.load_weights(checkpoint)
    assert_names_the_plugin(
        caught.value,
        "str 'no'",
        "gemma_profile_load_weights",
        "True (the weights are loaded) or None (let the next plugin load them)",
    )


def test_load_weights_answering_false_is_refused_too(tiny_model):
    # False would stop the builtin lean loader and leave the profile's int8/dtype loading undone.
    install_plugin(LoadsNothingButSaysFalse())
    model, checkpoint = tiny_model
    with pytest.raises(PluginError, match=r"returned bool False from gemma_profile_load_weights"):
        model.load_weights(checkpoint)


def test_a_good_load_weights_plugin_still_loads(tiny_model):
    import torch

    class Declines:
        calls = 0

        @gemma_profiles.hookimpl(tryfirst=True)
        def gemma_profile_load_weights(self, model: object, path: str, plan: object, gemma_loader: object) -> None:
            Declines.calls += 1
            return None

    install_plugin(Declines())
    model, checkpoint = tiny_model
    model.load_weights(checkpoint)
    assert Declines.calls == 1
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point())


@pytest.mark.parametrize(
    ("value", "returned", "expected"),
    [
        (7, "int 7", "a device string such as 'cpu' or 'cuda:0', or None"),
        ("warp-drive", "str 'warp-drive'", "torch does not know the device 'warp-drive'"),
        ("cuda:7", "str 'cuda:7'", "a device this machine has; 'cuda:7' is not usable"),
    ],
    ids=["int", "unknown-device", "absent-device"],
)
def test_resolve_device_answering_junk_names_the_plugin(tiny_model, value, returned, expected):
    import torch

    if value == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    install_plugin(Answers(value))
    model, _ = tiny_model
    with pytest.raises(PluginError) as caught:
        model.to("cpu")
    message = str(caught.value)
    assert message.startswith(f"plugin 'odd' (package 'odd-package') returned {returned} from "), message
    assert "gemma_profile_resolve_device; expected " in message
    assert expected in message
    assert f"{BLOCK_ENV}=odd" in message


def test_resolve_device_may_answer_a_torch_device(tiny_model):
    import torch

    install_plugin(Answers(torch.device("cpu")))
    model, _ = tiny_model
    assert model.to("cpu") is model


def test_sources_answering_42_names_the_plugin():
    # Before: TypeError: 'int' object is not iterable, a traceback.
    install_plugin(Answers(42))
    with pytest.raises(PluginError) as caught:
        default_registry().names()
    assert_names_the_plugin(
        caught.value, "int 42", "gemma_profile_sources", "a list of gemma_profiles.plugin.types.ProfileSource"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("profiles/", "a list of gemma_profiles.plugin.types.ProfileSource"),
        ([ProfileSource(42, "x")], "whose path is a pathlib.Path, got path int 42"),  # type: ignore[arg-type]
        ([ProfileSource(Path("."), 3)], "whose label is a str, got label int 3"),  # type: ignore[arg-type]
        ([ProfileSource(Path("."), "x", "high")], "whose precedence is an int"),  # type: ignore[arg-type]
    ],
    ids=["a-string", "path-int", "label-int", "precedence-str"],
)
def test_sources_answering_malformed_sources_names_the_plugin(value, expected):
    install_plugin(Answers(value))
    with pytest.raises(PluginError, match=r"plugin 'odd' \(package 'odd-package'\) returned") as caught:
        default_registry().names()
    assert expected in str(caught.value)


def test_a_source_path_given_as_a_string_is_taken_as_a_path(tmp_path, write_profile):
    write_profile("stringly", "description: from a str path\n", tmp_path / "pack")
    install_plugin(Answers([ProfileSource(str(tmp_path / "pack"), "pack")]))  # type: ignore[arg-type]
    assert default_registry().load("stringly").description == "from a str path"


def test_detect_hardware_answering_junk_names_the_plugin():
    from gemma_profiles.plugin.manager import detect_hardware

    install_plugin(Answers("fast"))
    with pytest.raises(PluginError) as caught:
        detect_hardware()
    assert_names_the_plugin(
        caught.value, "str 'fast'", "gemma_profile_detect_hardware", "gemma_profiles.planning.hardware.Hardware or None"
    )


def test_preflight_answering_false_is_refused_not_ignored(tiny_model):
    # A preflight that returns False to say "no" would otherwise be ignored silently.
    install_plugin(Answers(False))
    with pytest.raises(PluginError, match=r"returned bool False from gemma_profile_preflight; expected None"):
        plugins.get_plugin_manager().preflight(None)  # type: ignore[arg-type]


def test_a_wrapper_that_replaces_the_result_is_named():
    class Wraps:
        @gemma_profiles.hookimpl(wrapper=True)
        def gemma_profile_resolve_device(self, requested: object, plan: object, call: str):  # type: ignore[no-untyped-def]
            yield
            return 7

    manager = install_plugin(Wraps())
    with pytest.raises(PluginError, match=r"plugin 'odd' \(package 'odd-package'\) returned int 7"):
        manager.resolve_device("cpu", type("P", (), {"device": None, "offloads": False})(), "to")  # type: ignore[arg-type]


# -- a broken plugin: named with its package; read commands go on without it -------------------------


def distribution(folder: Path, name: str, module_source: str, entry: str = "typo") -> str:
    """An installed distribution ``name`` 1.0 whose entry point ``entry`` is a module with ``module_source``."""
    module = f"gp_dist_{uuid.uuid4().hex[:10]}"
    (folder / f"{module}.py").write_text(textwrap.dedent(module_source), encoding="utf-8")
    info = folder / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[gemma_profiles]\n{entry} = {module}\n", encoding="utf-8")
    return module


MISSPELT = """
    from gemma_profiles import hookimpl

    @hookimpl
    def gemma_profile_source():
        return []
"""


@pytest.fixture
def misspelt_plugin(tmp_path, monkeypatch) -> Iterator[str]:
    """The distribution 'typo-pack' with entry point 'typo' implementing gemma_profile_source (sic)."""
    module = distribution(tmp_path, "typo-pack", MISSPELT)
    monkeypatch.syspath_prepend(str(tmp_path))  # importlib.metadata finds the distribution there
    yield module
    sys.modules.pop(module, None)


def cli_invoke(*args: str):  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from gemma_profiles.cli.main import cli

    return CliRunner().invoke(cli, list(args), prog_name="gemma-profile")


WARNING = (
    "gemma-profile: warning: skipping a broken plugin: plugin 'typo' from package 'typo-pack' implements "
    "'gemma_profile_source', which is not a hook gemma-profiles calls (did you mean 'gemma_profile_sources'?) "
    "(hooks are listed in gemma_profiles/plugin/hookspecs.py; fix or uninstall typo-pack, or set "
    f"{BLOCK_ENV}=typo)"
)


def test_misspelt_hook_names_package_and_suggests_the_hook(misspelt_plugin):
    with pytest.raises(PluginError) as caught:
        GemmaPluginManager()
    assert str(caught.value) == WARNING.split("skipping a broken plugin: ", 1)[1]


@pytest.mark.usefixtures("fresh_log_handler")
@pytest.mark.parametrize("command", [["list"], ["plugins"], ["show", "t4"], ["plan", "t4", "-v", "2b"], ["current"]])
def test_read_commands_skip_a_misspelt_plugin_with_one_warning(misspelt_plugin, command, monkeypatch):
    # Before: every read command exited 2 with the plugin error.
    monkeypatch.setenv("GEMMA_PROFILE", "t4")  # for current to look the profile up
    result = cli_invoke(*command)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [WARNING]
    if command == ["plugins"]:
        rows = {line.split()[0]: line for line in result.stdout.splitlines()}
        assert "typo-pack" in rows["typo"] and "skipped" in rows["typo"]
        assert "builtin" in rows["sources"]


@pytest.mark.usefixtures("fresh_log_handler")
def test_after_a_read_command_building_still_refuses_the_broken_plugin(misspelt_plugin):
    assert cli_invoke("list").exit_code == 0
    with pytest.raises(PluginError, match="'typo' from package 'typo-pack'"):
        get_plugin_manager()  # what model construction asks for


@pytest.mark.usefixtures("fresh_log_handler")
def test_plugins_json_lists_a_skipped_plugin(misspelt_plugin):
    import json

    result = cli_invoke("plugins", "--json")
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["typo"]["package"] == "typo-pack"
    assert "gemma_profile_source" in rows["typo"]["skipped"]
    assert rows["sources"]["skipped"] is None


def test_misspelt_hook_without_the_prefix_still_gets_a_suggestion():
    class Unprefixed:
        @gemma_profiles.hookimpl
        def load_weights(self, model: object, path: str, plan: object, gemma_loader: object) -> None:
            return None

    with pytest.raises(PluginError, match=r"implements 'load_weights'.*did you mean 'gemma_profile_load_weights'"):
        GemmaPluginManager(load_entry_points=False).register(Unprefixed(), "bare", package="bare-pack")


@pytest.mark.usefixtures("fresh_log_handler")
def test_a_source_plugin_answering_42_is_skipped_by_list(tmp_path, monkeypatch):
    module = distribution(
        tmp_path,
        "answer-pack",
        "from gemma_profiles import hookimpl\n@hookimpl\ndef gemma_profile_sources():\n    return 42\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        result = cli_invoke("list")
        assert result.exit_code == 0 and "t4" in result.stdout
        (line,) = result.stderr.splitlines()
        assert line.startswith(
            "gemma-profile: warning: skipping a broken plugin: plugin 'typo' (package 'answer-pack')"
        )
        assert "returned int 42 from gemma_profile_sources" in line
    finally:
        sys.modules.pop(module, None)


@pytest.mark.usefixtures("fresh_log_handler")
def test_detect_skips_a_hardware_plugin_answering_junk(tmp_path, monkeypatch):
    source = """
        from gemma_profiles import hookimpl

        @hookimpl(tryfirst=True)
        def gemma_profile_detect_hardware():
            return "fast"
    """
    module = distribution(tmp_path, "fast-pack", source, entry="fast")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        result = cli_invoke("detect")
        assert result.exit_code == 0, result.output
        assert "best profile" in result.stdout
        (line,) = result.stderr.splitlines()
        assert "plugin 'fast' (package 'fast-pack') returned str 'fast' from gemma_profile_detect_hardware" in line
    finally:
        sys.modules.pop(module, None)


@pytest.mark.usefixtures("fresh_log_handler")
def test_a_misspelt_disabled_plugin_name_gets_one_line():
    os.environ[BLOCK_ENV] = "loadng"  # isolated_env removes it afterwards
    result = cli_invoke("plugins")
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        f"gemma-profile: warning: {BLOCK_ENV} names 'loadng', which is no plugin here (did you mean 'loading'?); "
        f"plugins: {', '.join(name for name, _ in DEFAULT_PLUGINS)}"
    ]
    assert any(line.startswith("loading ") for line in result.stdout.splitlines())
