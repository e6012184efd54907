"""The plugin manager facade: loading, blocking, and one typed method per hook.

Callers never touch ``pm.hook``; they call `GemmaPluginManager` methods, which
flatten and check results and turn a failing plugin into a `PluginError` that
names it.  Builtins (``hooks/``) load through the same path as entry points.

Every implementation's result is checked against what its hook promises, in one
place (`_RESULT_CHECKS`), as it returns: a plugin that answers ``"no"`` from
``gemma_profile_load_weights`` or ``42`` from ``gemma_profile_sources`` is
named, with its package, instead of stopping the loading silently or failing
somewhere else with a traceback.

A broken plugin (it fails to import, implements a hook that does not exist,
clashes with another's name, or answers a discovery hook wrongly) stops model
construction with a `PluginError`: a model built without one of the plugins the
environment installed could be silently wrong.  The CLI's read commands
(``list``, ``show``, ``plan``...) instead skip it with one warning line each
(`tolerate_broken_plugins`), so a bad third-party package cannot hide the
profiles or the ``plugins`` listing that helps find it.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from gemma_profiles.errors import GemmaProfileError, PluginError, did_you_mean, printable
from gemma_profiles.plugin import hookspecs
from gemma_profiles.plugin.types import ProfileSource
from gemma_profiles.settings import DISABLE_PLUGINS

if TYPE_CHECKING:
    from gemma_profiles.planning.hardware import Hardware
    from gemma_profiles.planning.plan import Plan
    from gemma_profiles.plugin.types import ConfigRewrite

ENTRY_POINT_GROUP = "gemma_profiles"
#: Comma-separated plugin names not to load (builtins included), like pytest's ``-p no:NAME``.
BLOCK_ENV = DISABLE_PLUGINS.name
HOOK_PREFIX = "gemma_profile_"
#: Every hook name gemma-profiles calls.
HOOK_NAMES: tuple[str, ...] = tuple(sorted(n for n in vars(hookspecs) if n.startswith(HOOK_PREFIX)))

#: Builtin plugins, imported exactly like an entry point's ``module`` value.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("sources", "gemma_profiles.hooks.sources"),
    ("hardware", "gemma_profiles.hooks.hardware"),
    ("config", "gemma_profiles.hooks.config"),
    ("preflight", "gemma_profiles.hooks.preflight"),
    ("placement", "gemma_profiles.hooks.placement"),
    ("loading", "gemma_profiles.hooks.loading"),
    ("oom", "gemma_profiles.hooks.oom"),
    ("quantization", "gemma_profiles.hooks.quantization"),
    ("kernels", "gemma_profiles.hooks.kernels"),
    ("fused", "gemma_profiles.hooks.fused"),
    ("offload", "gemma_profiles.hooks.offload"),
    ("parallel", "gemma_profiles.hooks.parallel"),
    ("transformers", "gemma_profiles.hooks.transformers"),
)


@dataclass(frozen=True)
class PluginInfo:
    """What ``gemma-profile plugins`` shows."""

    name: str
    package: str
    version: str
    hooks: tuple[str, ...]
    builtin: bool


@dataclass(frozen=True)
class SkippedPlugin:
    """A broken plugin a read command went on without: who, and the one line said about it."""

    name: str
    package: str
    reason: str


# -- what each hook may return -------------------------------------------------------


class _BadResult(Exception):
    """A hook result that is not what the hook promises; the text names what was expected."""


def _shown(value: Any) -> str:
    """A short, printable picture of a returned value: ``str 'no'``, ``int 42``."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return printable(f"{type(value).__name__} {text}")


def _none_only(result: Any) -> None:
    if result is not None:
        raise _BadResult("None (the return value of this hook is not used; raise GemmaProfileError to stop)")


def _profile_sources(result: Any) -> list[ProfileSource]:
    expected = "a list of gemma_profiles.plugin.types.ProfileSource"
    if result is None:
        return []
    if isinstance(result, str | bytes | Mapping | ProfileSource) or not isinstance(result, Iterable):
        raise _BadResult(expected)
    items = []
    for item in result:
        if not isinstance(item, ProfileSource):
            raise _BadResult(f"{expected}, got an item {_shown(item)}")
        if isinstance(item.path, str) and item.path:
            item = ProfileSource(Path(item.path), item.label, item.precedence)
        if not isinstance(item.path, Path):
            raise _BadResult(f"{expected} whose path is a pathlib.Path, got path {_shown(item.path)}")
        if not isinstance(item.label, str):
            raise _BadResult(f"{expected} whose label is a str, got label {_shown(item.label)}")
        if isinstance(item.precedence, bool) or not isinstance(item.precedence, int):
            raise _BadResult(f"{expected} whose precedence is an int, got precedence {_shown(item.precedence)}")
        items.append(item)
    return items


def _hardware(result: Any) -> Hardware | None:
    from gemma_profiles.planning.hardware import CpuInfo, GpuInfo, Hardware

    if result is None:
        return None
    if not isinstance(result, Hardware):
        raise _BadResult("gemma_profiles.planning.hardware.Hardware or None")
    if not isinstance(result.cpu, CpuInfo):
        raise _BadResult(f"a Hardware whose cpu is a CpuInfo, got cpu {_shown(result.cpu)}")
    if not isinstance(result.gpus, tuple) or not all(isinstance(gpu, GpuInfo) for gpu in result.gpus):
        raise _BadResult(f"a Hardware whose gpus are a tuple of GpuInfo, got gpus {_shown(result.gpus)}")
    return result


def _loaded(result: Any) -> bool | None:
    if result is not None and result is not True:
        raise _BadResult("True (the weights are loaded) or None (let the next plugin load them)")
    return None if result is None else True


def _device(result: Any, device_problem: Callable[[str], str | None] | None = None) -> str | None:
    expected = "a device string such as 'cpu' or 'cuda:0', or None (keep the requested device)"
    if result is None:
        return None
    if type(result).__module__ == "torch" and type(result).__name__ == "device":
        result = str(result)
    if not isinstance(result, str) or not result:
        raise _BadResult(expected)
    device: str = result
    torch = sys.modules.get("torch")  # loaded: the model this device is for exists
    if torch is not None:
        try:
            device = str(torch.device(device))
        except (RuntimeError, ValueError, TypeError):
            raise _BadResult(f"{expected}; torch does not know the device {printable(repr(device))}") from None
        problem = device_problem(device) if device_problem is not None else None
        if problem:
            raise _BadResult(f"a device this machine has; {printable(repr(device))} is not usable: {problem}")
    return device


def _module_names(result: Any) -> list[str]:
    expected = "a list of dotted module names (str)"
    if result is None:
        return []
    if isinstance(result, str | bytes | Mapping) or not isinstance(result, Iterable):
        raise _BadResult(expected)
    names = list(result)
    for name in names:
        if not isinstance(name, str) or not name or not all(part.isidentifier() for part in name.split(".")):
            raise _BadResult(f"{expected}, got an item {_shown(name)}")
    return names


#: hook -> the check every implementation's result passes through (it returns the result to use).
_RESULT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "gemma_profile_sources": _profile_sources,
    "gemma_profile_detect_hardware": _hardware,
    "gemma_profile_watched_modules": _module_names,
    "gemma_profile_module_imported": _none_only,
    "gemma_profile_preflight": _none_only,
    "gemma_profile_rewrite_config": _none_only,
    "gemma_profile_model_built": _none_only,
    "gemma_profile_load_weights": _loaded,
    "gemma_profile_weights_loaded": _none_only,
    "gemma_profile_resolve_device": _device,
}


class GemmaPluginManager:
    """Loads plugins and calls hooks on behalf of the rest of the library.

    :param tolerant: skip a broken plugin (after one `warn` line) instead of raising; the
        CLI's read commands use this through `tolerate_broken_plugins`.
    :param warn: where a tolerant manager's lines go (default: our log, as a warning).
    """

    def __init__(
        self,
        *,
        load_entry_points: bool = True,
        blocked: set[str] | None = None,
        tolerant: bool = False,
        warn: Callable[[str], None] | None = None,
    ):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        #: `resolve_device`'s ``device_problem`` while it runs (the device check needs torch, which
        #: this module never imports: the runtime passes it).
        self._device_problem: Callable[[str], str | None] | None = None
        self._packages: dict[str, tuple[str, str, bool]] = {}
        self.tolerant = tolerant
        self.warn = warn
        self.skipped: list[SkippedPlugin] = []
        self.blocked = blocked if blocked is not None else blocked_from_env()
        for name in self.blocked:
            self.pm.set_blocked(name)
        known = [name for name, _ in DEFAULT_PLUGINS]
        for name, module in DEFAULT_PLUGINS:
            self._load(name, module, package="gemma-profiles", builtin=True)
        if load_entry_points:
            for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = entry_point.dist
                package = dist.metadata["Name"] if dist is not None else "?"
                version = dist.version if dist is not None else "?"
                known.append(entry_point.name)
                self._load(entry_point.name, entry_point.value, package=package, version=version)
            self._check_blocked(known)

    # -- loading -------------------------------------------------------------

    def _load(self, name: str, target: str, *, package: str, version: str | None = None, builtin: bool = False) -> None:
        if name in self.blocked:
            return
        try:
            plugin = _import_target(target)
        except Exception as exc:  # a plugin may fail in any way; report which one
            self._broken(
                PluginError(
                    f"plugin '{name}' from package '{package}' failed to import: {type(exc).__name__}: {exc}",
                    hint=f"fix or uninstall {package}, or set {BLOCK_ENV}={name}",
                ),
                name,
                package,
                exc,
            )
            return
        self.register(plugin, name, package=package, version=version, builtin=builtin)

    def register(
        self, plugin: object, name: str, *, package: str = "?", version: str | None = None, builtin: bool = False
    ) -> None:
        """Register a plugin object (module or instance) under ``name``.

        :raises PluginError: the name is taken, a hook's arguments are wrong, or the plugin
            implements a hook that does not exist (unless this manager is tolerant: then the
            plugin is skipped with one warning line).
        """
        if self.pm.is_blocked(name):
            return
        if self.pm.get_plugin(name) is not None:
            other = self._packages.get(name, ("?", "", False))[0]
            self._broken(
                PluginError(
                    f"two plugins are named '{name}': from '{other}' and from '{package}'",
                    hint=f"uninstall one, or set {BLOCK_ENV}={name}",
                ),
                name,
                package,
            )
            return
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            self._broken(
                PluginError(
                    f"plugin '{name}' from package '{package}' is invalid: {exc}",
                    hint=f"fix or uninstall {package}, or set {BLOCK_ENV}={name}",
                ),
                name,
                package,
                exc,
            )
            return
        unknown = self._unknown_hooks(plugin)
        if unknown:
            self.pm.unregister(plugin)
            hook = unknown[0]
            self._broken(
                PluginError(
                    f"plugin '{name}' from package '{package}' implements '{hook}', which is not a hook "
                    f"gemma-profiles calls{_hook_did_you_mean(hook)}",
                    hint=f"hooks are listed in gemma_profiles/plugin/hookspecs.py; fix or uninstall {package}, "
                    f"or set {BLOCK_ENV}={name}",
                ),
                name,
                package,
            )
            return
        self._packages[name] = (package, version or _version_of(package), builtin)
        self._check_results_of(plugin)

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._packages.pop(name, None)

    def _unknown_hooks(self, plugin: object) -> list[str]:
        """Hooks ``plugin`` implements that have no specification (pluggy's ``check_pending``, for one plugin)."""
        unknown = []
        for caller in self.pm.get_hookcallers(plugin) or []:
            if caller.has_spec():
                continue
            if any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()):
                unknown.append(caller.name)
        return sorted(unknown)

    def _check_results_of(self, plugin: object) -> None:
        """Route each of ``plugin``'s implementations through its hook's result check.

        ``HookImpl.function`` is what pluggy calls; replacing it with a checking shim keeps
        pluggy's order, firstresult and wrapper semantics while naming the plugin that answered
        wrongly (a wrapper sees the checked result, or the `PluginError`).
        """
        for caller in self.pm.get_hookcallers(plugin) or []:
            check = self._result_check(caller.name)
            if check is None:
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    setattr(impl, "function", self._checking(impl.function, caller.name, impl.plugin_name, check))  # noqa: B010

    def _checking(
        self, function: Callable[..., Any], hook: str, name: str, check: Callable[[Any], Any]
    ) -> Callable[..., Any]:
        def checked(*args: Any) -> Any:
            result = function(*args)
            try:
                return check(result)
            except _BadResult as bad:
                raise self._bad_result(name, hook, result, str(bad)) from None

        checked.__wrapped__ = function  # type: ignore[attr-defined]
        return checked

    def _bad_result(self, name: str, hook: str, result: Any, expected: str) -> PluginError:
        package = self._packages.get(name, ("?",))[0]
        error = PluginError(
            f"plugin '{name}' (package '{package}') returned {_shown(result)} from {hook}; expected {expected}",
            hint=f"report it to the plugin's authors, or set {BLOCK_ENV}={name}",
        )
        error.plugin = name  # type: ignore[attr-defined]
        return error

    def _broken(self, error: PluginError, name: str, package: str, cause: BaseException | None = None) -> None:
        """Raise ``error`` about a broken plugin, or, when tolerant, skip the plugin with one line."""
        if not self.tolerant:
            raise error from cause
        self.skipped.append(SkippedPlugin(name, package, str(error)))
        self._say(f"skipping a broken plugin: {error}")

    def _say(self, line: str) -> None:
        if self.warn is not None:
            self.warn(line)
        else:
            from gemma_profiles.log import logger

            logger.warning("{}", line)

    def _check_blocked(self, known: list[str]) -> None:
        """One line for each name in GEMMA_PROFILE_DISABLE_PLUGINS that names no plugin here."""
        for name in sorted(self.blocked - set(known)):
            self._say(
                f"{BLOCK_ENV} names {printable(repr(name))}, which is no plugin here{did_you_mean(name, known)}; "
                f"plugins: {', '.join(known)}"
            )

    def plugins(self) -> list[PluginInfo]:
        """Registered plugins with their package, version and hooks."""
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            package, version, builtin = self._packages.get(name, ("?", "?", False))
            hooks = tuple(sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or []))
            infos.append(PluginInfo(name, package, version, hooks, builtin))
        return infos

    # -- typed hook calls --------------------------------------------------------

    def profile_sources(self) -> list[ProfileSource]:
        """All profile sources, highest precedence last."""
        sources: list[ProfileSource] = []
        for impl in self.pm.hook.gemma_profile_sources.get_hookimpls():
            if impl.wrapper or impl.hookwrapper:
                continue
            try:
                result = self._call_one(impl, "gemma_profile_sources")
            except PluginError as exc:
                if not self._skippable(exc):
                    raise
                # A read command goes on without this plugin's profiles.
                self._skip_registered(exc)
                continue
            sources.extend(_profile_sources(result))  # checked by the shim; a plain list here
        return sorted(sources, key=lambda s: s.precedence)

    def detect_hardware(self) -> Hardware:
        from gemma_profiles.planning.hardware import Hardware

        while True:
            try:
                result = self._call("gemma_profile_detect_hardware")
                break
            except PluginError as exc:
                if not self._skippable(exc):
                    raise
                # A read command asks the next implementation, without this plugin.
                self._skip_registered(exc)
        if not isinstance(result, Hardware):
            raise PluginError(
                f"no plugin described this machine: gemma_profile_detect_hardware returned {_shown(result)}",
                hint=f"the builtin 'hardware' plugin answers last; is it in {BLOCK_ENV}?",
            )
        return result

    def watched_modules(self) -> frozenset[str]:
        """Every module some plugin arms on import (`gemma_profile_watched_modules`)."""
        results = self._call("gemma_profile_watched_modules")
        return frozenset(name for names in results for name in _module_names(names))

    def module_imported(self, module: ModuleType) -> None:
        self._call("gemma_profile_module_imported", module=module)

    def preflight(self, plan: Plan) -> None:
        self._call("gemma_profile_preflight", plan=plan)

    def rewrite_config(self, rewrite: ConfigRewrite, plan: Plan) -> None:
        self._call("gemma_profile_rewrite_config", rewrite=rewrite, plan=plan)

    def model_built(self, model: Any, plan: Plan) -> None:
        self._call("gemma_profile_model_built", model=model, plan=plan)

    def load_weights(self, model: Any, path: str, plan: Plan, gemma_loader: Callable[[str], Any]) -> bool:
        result = self._call("gemma_profile_load_weights", model=model, path=path, plan=plan, gemma_loader=gemma_loader)
        return bool(self._wrapped_result("gemma_profile_load_weights", result))

    def weights_loaded(self, model: Any, plan: Plan) -> None:
        """`gemma_profile_weights_loaded`, its implementations in the hookspec's order (`staged`)."""
        caller = self.pm.hook.gemma_profile_weights_loaded
        ordered = staged(caller.get_hookimpls(), hookspecs.WEIGHTS_LOADED_STAGES)
        self._call("gemma_profile_weights_loaded", _impls=ordered, model=model, plan=plan)

    def resolve_device(
        self, requested: Any, plan: Plan, call: str, device_problem: Callable[[str], str | None] | None = None
    ) -> str | None:
        """The device a plugin chooses instead of ``requested``, or None.

        :param device_problem: why a device cannot be used here, or None when it can
            (`gemma_profiles.engine.devices.device_problem`, passed by the runtime): a plugin
            answering a device this machine lacks is named.  None: only the form is checked.
        """
        previous, self._device_problem = self._device_problem, device_problem
        try:
            result = self._call("gemma_profile_resolve_device", requested=requested, plan=plan, call=call)
            return self._wrapped_result("gemma_profile_resolve_device", result)  # type: ignore[no-any-return]
        finally:
            self._device_problem = previous

    def _result_check(self, hook_name: str) -> Callable[[Any], Any] | None:
        """`_RESULT_CHECKS`' check for ``hook_name``; `resolve_device`'s also asks its ``device_problem``."""
        if hook_name == "gemma_profile_resolve_device":
            return lambda result: _device(result, self._device_problem)
        return _RESULT_CHECKS.get(hook_name)

    def _wrapped_result(self, hook_name: str, result: Any) -> Any:
        """A firstresult hook's final answer, checked again: a wrapper may have replaced it."""
        try:
            check = self._result_check(hook_name)
            return check(result) if check is not None else result
        except _BadResult as bad:
            caller = getattr(self.pm.hook, hook_name)
            wrappers = [impl.plugin_name for impl in caller.get_hookimpls() if impl.wrapper or impl.hookwrapper]
            raise self._bad_result(" or '".join(wrappers) or "?", hook_name, result, str(bad)) from None

    # -- error attribution -------------------------------------------------------

    def _call(self, hook_name: str, _impls: list[pluggy.HookImpl] | None = None, **kwargs: Any) -> Any:
        """Call a hook (its implementations in pluggy's order, or ``_impls``'s: `staged`)."""
        try:
            if _impls is not None:
                # what pluggy's HookCaller.__call__ runs, on a list in our order
                return self.pm._hookexec(hook_name, _impls, kwargs, False)
            return getattr(self.pm.hook, hook_name)(**kwargs)
        except GemmaProfileError:
            raise
        except Exception as exc:
            raise self._blame(exc, hook_name) from exc

    def _call_one(self, impl: Any, hook_name: str) -> Any:
        try:
            return impl.function()
        except GemmaProfileError:
            raise
        except Exception as exc:
            raise self._blame(exc, hook_name, impl.plugin_name) from exc

    def _blame(self, exc: BaseException, hook_name: str, name: str | None = None) -> PluginError:
        name = name or self._plugin_in_traceback(exc) or "?"
        package = self._packages.get(name, ("?",))[0]
        error = PluginError(
            f"plugin '{name}' (package '{package}') raised {type(exc).__name__} in {hook_name}: {exc}",
            hint=f"report it to the plugin's authors, or set {BLOCK_ENV}={name}",
        )
        error.plugin = name  # type: ignore[attr-defined]
        return error

    def _skippable(self, error: PluginError) -> bool:
        """Whether a tolerant manager may go on without the (third-party) plugin ``error`` blames."""
        name = getattr(error, "plugin", None)
        return self.tolerant and name in self._packages and not self._packages[name][2]

    def _skip_registered(self, error: PluginError) -> None:
        name = getattr(error, "plugin")  # noqa: B009
        self._broken(error, name, self._packages[name][0])
        self.unregister(name)  # said once; the rest of the command runs without it

    def _plugin_in_traceback(self, exc: BaseException) -> str | None:
        files: dict[str, str] = {}
        for name, plugin in self.pm.list_name_plugin():
            module = (
                sys.modules.get(getattr(plugin, "__module__", "") or "") if not hasattr(plugin, "__file__") else plugin
            )
            path = getattr(module, "__file__", None)
            if path:
                files[os.path.realpath(path)] = name
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            found = files.get(os.path.realpath(frame.filename))
            if found:
                return found
        return None


def staged(impls: list[pluggy.HookImpl], stages: tuple[str, ...]) -> list[pluggy.HookImpl]:
    """``impls`` (a hook's, in pluggy's list order: called last to first, wrappers at the end)
    reordered so that they run: other plugins' (not ``trylast``) as pluggy orders them, then the
    plugins named in ``stages`` in that order, then other plugins' ``trylast`` ones; wrappers
    still wrap them all.  The order holds however the plugins were registered."""
    wrappers = [impl for impl in impls if impl.wrapper or impl.hookwrapper]
    plain = [impl for impl in reversed(impls) if not (impl.wrapper or impl.hookwrapper)]  # in call order
    rank = {name: index for index, name in enumerate(stages)}
    first = [impl for impl in plain if impl.plugin_name not in rank and not impl.trylast]
    middle = sorted((impl for impl in plain if impl.plugin_name in rank), key=lambda impl: rank[impl.plugin_name])
    last = [impl for impl in plain if impl.plugin_name not in rank and impl.trylast]
    return [*reversed([*first, *middle, *last]), *wrappers]


def _hook_did_you_mean(hook: str) -> str:
    """`did_you_mean` for a hook name, trying it with the ``gemma_profile_`` prefix too."""
    hint = did_you_mean(hook, HOOK_NAMES)
    if not hint and not hook.startswith(HOOK_PREFIX):
        hint = did_you_mean(HOOK_PREFIX + hook, HOOK_NAMES)
    return hint


def _import_target(target: str) -> object:
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def _version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def blocked_from_env() -> set[str]:
    return {name.strip() for name in DISABLE_PLUGINS.raw().split(",") if name.strip()}


_manager: GemmaPluginManager | None = None
_tolerant_warn: Callable[[str], None] | None = None


def get_plugin_manager() -> GemmaPluginManager:
    """The process-wide plugin manager, created on first use."""
    global _manager
    if _manager is None:
        tolerant = _tolerant_warn is not None
        _manager = GemmaPluginManager(tolerant=tolerant, warn=_tolerant_warn)
    return _manager


def detect_hardware() -> Hardware:
    """This machine's facts, from the first plugin that supplies them (``gemma_profile_detect_hardware``,
    firstresult; the builtin ``hooks/hardware.py`` answers last and imports torch and psutil only then)."""
    return get_plugin_manager().detect_hardware()


def reset_plugin_manager(manager: GemmaPluginManager | None = None) -> None:
    """Drop (or replace) the process-wide manager; tests use this."""
    global _manager
    _manager = manager


def tolerate_broken_plugins(warn: Callable[[str], None] | None) -> None:
    """Let the process-wide manager skip broken plugins, saying so through ``warn``; None: refuse them again.

    The CLI's read commands turn this on; building a model never does.  A manager that
    skipped a plugin is dropped when tolerance ends, so the next one refuses it.
    """
    global _tolerant_warn, _manager
    _tolerant_warn = warn
    if _manager is not None:
        if warn is None and _manager.skipped:
            _manager = None
        else:
            _manager.tolerant = warn is not None
            _manager.warn = warn


__all__ = [
    "GemmaPluginManager",
    "PluginInfo",
    "ProfileSource",
    "SkippedPlugin",
    "get_plugin_manager",
    "reset_plugin_manager",
    "tolerate_broken_plugins",
]
