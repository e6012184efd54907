"""Shared fixtures: an isolated environment per test, fresh plugin manager, tiny gemma."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from gemma_profiles import hookimpl, log, settings
from gemma_profiles.planning.hardware import Hardware
from gemma_profiles.plugin import manager as plugins
from gemma_profiles.runtime import session
from gemma_profiles.runtime.gemma_info import gemma_status


def pytest_report_header(config: pytest.Config) -> str:
    return f"gemma under test: {gemma_status().describe()}"


# -- pytest-xdist (.ci/run: -n 2 --dist loadfile) -----------------------------------------------------
#: Work that takes minutes on its own, started first under xdist so that it overlaps the many short
#: modules instead of running alone at the end (longest first; each name a scope of `xdist_scope`).
SLOW_FIRST = (
    "tests/test_transformers.py::real",
    "tests/test_real_model.py",
    "tests/test_transformers.py",
    "tests/test_offload.py",
    "tests/test_parallel.py",
)


def xdist_scope(nodeid: str) -> str:
    """What one xdist worker runs whole: the test's module (its module-scoped fixtures are built once),
    except transformers' real-270M tests, a scope of their own (their own fixture, ~2 min)."""
    module = nodeid.split("::", 1)[0]
    if module.endswith("test_transformers.py") and "::test_real_270m" in nodeid:
        return f"{module}::real"
    return module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with `xdist_scope`'s scopes (``--dist load``, ``each``, ...: xdist's own)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scopes(LoadFileScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return Scopes(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist the scopes are handed out in collection order: the slow ones go first."""
    if hasattr(config, "workerinput"):  # an xdist worker; else the order stays as it is
        rank = {name: i for i, name in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: rank.get(xdist_scope(item.nodeid), len(rank)))  # stable sort


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No profile active, state and user dir in a temp folder, a fresh plugin manager."""
    home = tmp_path_factory.mktemp("env")
    for variable in settings.VARIABLES:  # every one the package reads, not a copy of the list
        monkeypatch.delenv(variable.name, raising=False)
    monkeypatch.setenv(settings.STATE_DIR.name, str(home / "state"))
    monkeypatch.setenv(settings.USER_DIR.name, str(home / "user-profiles"))
    session.deactivate()
    plugins.reset_plugin_manager()
    try:
        yield home
    finally:
        session.deactivate()
        plugins.reset_plugin_manager()
        log.disable()  # activating a profile shows our records on stderr; the next test starts quiet


@pytest.fixture(params=["native", "torch"])
def int8_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each int8 CPU path: our native int8 kernel (AVX-512 VNNI or AVX2; skipped where it cannot run), torch's."""
    from gemma_profiles.engine import native

    if request.param == "torch":
        monkeypatch.setenv(native.ENV, "0")
    native.reset()
    if request.param == "native" and native.unavailable():
        pytest.skip(f"native int8 kernel: {native.unavailable()}")
    try:
        yield str(request.param)
    finally:
        monkeypatch.delenv(native.ENV, raising=False)
        native.reset()


@pytest.fixture
def log_messages() -> Iterator[list[str]]:
    """Our loguru records as text (they go to the library's own logger, `gemma_profiles.log.logger`)."""
    messages: list[str] = []
    sink = log.logger.add(messages.append, level="DEBUG", format="{level} | {message}")
    try:
        yield messages
    finally:
        log.logger.remove(sink)


@pytest.fixture
def fresh_log_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each CliRunner run gets its own stderr: let ``log.enable`` add a handler bound to it, then drop it."""
    with monkeypatch.context() as patch:
        patch.setattr(log, "_handler_id", None)
        try:
            yield
        finally:
            log.disable()


class FakeHardware:
    """A plugin that reports the given `Hardware` before the builtin detector runs."""

    def __init__(self, hardware: Hardware):
        self.hardware = hardware

    @hookimpl(tryfirst=True)
    def gemma_profile_detect_hardware(self) -> Hardware:
        return self.hardware


@pytest.fixture
def fake_hardware() -> Callable[[Hardware], None]:
    """``fake_hardware(Hardware(...))``: detection answers with it for the rest of the test."""

    def install(hardware: Hardware) -> None:
        manager = plugins.GemmaPluginManager(load_entry_points=False)
        manager.register(FakeHardware(hardware), "fake-hardware")
        plugins.reset_plugin_manager(manager)

    return install  # isolated_env resets the plugin manager afterwards


@pytest.fixture
def write_profile(tmp_path: Path) -> Callable[..., Path]:
    """``write_profile("name", "yaml text")`` -> path of tmp_path/name.yaml."""

    def write(name: str, text: str, directory: Path | None = None) -> Path:
        folder = directory or tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.yaml"
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from gemma_testing import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def gemma() -> object:
    """gemma's config and model modules (real gemma_pytorch or the stand-in)."""
    status = gemma_status()
    if status.kind not in ("gemma_pytorch", "standin"):
        pytest.skip(f"gemma_pytorch not available: {status.describe()}")
    from gemma import config, model

    class Gemma:
        pass

    modules = Gemma()
    modules.config = config  # type: ignore[attr-defined]
    modules.model = model  # type: ignore[attr-defined]
    return modules
