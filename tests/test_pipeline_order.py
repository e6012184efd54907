"""`gemma_profile_weights_loaded` runs the engine's stages in the hookspec's order
(`hookspecs.WEIGHTS_LOADED_STAGES`: quantization -> kernels -> fused -> offload) whatever the
order the plugins were registered in, other plugins' implementations before them (their
``trylast`` ones after), and wrappers around them all.

Before: the order came from ``DEFAULT_PLUGINS``' registration order and pluggy's
tryfirst/trylast rules; registering the builtins in another order ran them in another order.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Generator
from typing import Any

import pytest

import gemma_profiles
from gemma_profiles.errors import PluginError
from gemma_profiles.plugin import hookspecs
from gemma_profiles.plugin.manager import DEFAULT_PLUGINS, GemmaPluginManager, staged

STAGES = hookspecs.WEIGHTS_LOADED_STAGES


def test_the_stages_are_the_builtins_in_the_documented_order() -> None:
    assert STAGES == ("quantization", "kernels", "fused", "offload")
    builtins = dict(DEFAULT_PLUGINS)
    manager = GemmaPluginManager(load_entry_points=False)
    implemented = {impl.plugin_name for impl in manager.pm.hook.gemma_profile_weights_loaded.get_hookimpls()}
    for stage in STAGES:
        assert stage in builtins and stage in implemented, f"{stage} is a builtin implementing the hook"


def spy(name: str, calls: list[str], **opts: Any) -> object:
    class Spy:
        @gemma_profiles.hookimpl(**opts)
        def gemma_profile_weights_loaded(self, model: Any, plan: Any) -> None:
            calls.append(name)

    return Spy()


def wrapper(calls: list[str]) -> object:
    class Wrapper:
        @gemma_profiles.hookimpl(wrapper=True)
        def gemma_profile_weights_loaded(self, model: Any, plan: Any) -> Generator[None, Any, Any]:
            calls.append("wrapper: in")
            result = yield
            calls.append("wrapper: out")
            return result

    return Wrapper()


def without_stages(blocked: set[str] | None = None) -> GemmaPluginManager:
    """The builtins, less the engine's stages (the ``oom`` wrapper stays)."""
    manager = GemmaPluginManager(load_entry_points=False, blocked=blocked or set())
    for stage in STAGES:
        manager.unregister(stage)
    return manager


@pytest.mark.parametrize("order", list(itertools.permutations(STAGES)), ids="-".join)
def test_stages_run_in_order_whatever_the_registration_order(order: tuple[str, ...]) -> None:
    calls: list[str] = []
    manager = without_stages()
    third_party = [
        ("theirs: plain", spy("theirs: plain", calls)),
        ("theirs: tryfirst", spy("theirs: tryfirst", calls, tryfirst=True)),
        ("theirs: trylast", spy("theirs: trylast", calls, trylast=True)),
        ("theirs: wrapper", wrapper(calls)),
    ]
    plugins = [(stage, spy(stage, calls)) for stage in order] + third_party
    random.Random("".join(order)).shuffle(plugins)  # third-party plugins before, between, after
    for name, plugin in plugins:
        manager.register(plugin, name)
    manager.weights_loaded(object(), None)  # type: ignore[arg-type]
    assert calls == [
        "wrapper: in",
        "theirs: tryfirst",
        "theirs: plain",
        *STAGES,
        "theirs: trylast",
        "wrapper: out",
    ]


def test_a_blocked_stage_is_skipped_and_the_rest_keep_their_order() -> None:
    calls: list[str] = []
    manager = without_stages(blocked={"fused"})
    for stage in reversed(STAGES):
        manager.register(spy(stage, calls), stage)
    manager.weights_loaded(object(), None)  # type: ignore[arg-type]
    assert calls == ["quantization", "kernels", "offload"]


def test_the_real_builtins_in_reverse_registration_order_run_as_the_stages_say() -> None:
    import importlib

    manager = without_stages()
    builtins = dict(DEFAULT_PLUGINS)
    for stage in reversed(STAGES):
        manager.register(importlib.import_module(builtins[stage]), stage, builtin=True)
    impls = manager.pm.hook.gemma_profile_weights_loaded.get_hookimpls()
    run = [impl.plugin_name for impl in reversed(staged(impls, STAGES)) if not (impl.wrapper or impl.hookwrapper)]
    assert run == list(STAGES)
    wrappers = [impl.plugin_name for impl in staged(impls, STAGES) if impl.wrapper or impl.hookwrapper]
    assert wrappers == ["oom"], "the out-of-memory wrapper wraps every stage"


def test_an_error_in_a_stage_stops_the_stages_after_it() -> None:
    class Broken:
        @gemma_profiles.hookimpl
        def gemma_profile_weights_loaded(self, model: Any, plan: Any) -> None:
            raise ValueError("boom")

    calls: list[str] = []
    manager = without_stages()
    manager.register(spy("quantization", calls), "quantization")
    manager.register(Broken(), "kernels")
    manager.register(spy("offload", calls), "offload")
    with pytest.raises(PluginError, match="raised ValueError in gemma_profile_weights_loaded: boom"):
        manager.weights_loaded(object(), None)  # type: ignore[arg-type]
    assert calls == ["quantization"], "the stages after the failing one do not run"
