"""The plugin manager facade: loading, blocking, and one typed method per hook.

Callers never touch ``pm.hook``; they call `GemmaPluginManager` methods, which
flatten and check results and turn a failing plugin into a `PluginError` that
names it.  Builtins (``hooks/``) load through the same path as entry points.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import GemmaProfileError, PluginError
from .types import ProfileSource

if TYPE_CHECKING:
    from .hardware import Hardware
    from .plan import Plan
    from .types import ConfigRewrite

ENTRY_POINT_GROUP = "gemma_profiles"
#: Comma-separated plugin names not to load (builtins included), like pytest's ``-p no:NAME``.
BLOCK_ENV = "GEMMA_PROFILE_DISABLE_PLUGINS"

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
)


@dataclass(frozen=True)
class PluginInfo:
    """What ``gemma-profile plugins`` shows."""

    name: str
    package: str
    version: str
    hooks: tuple[str, ...]
    builtin: bool


class GemmaPluginManager:
    """Loads plugins and calls hooks on behalf of the rest of the library."""

    def __init__(self, *, load_entry_points: bool = True, blocked: set[str] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._packages: dict[str, tuple[str, str, bool]] = {}
        self.blocked = blocked if blocked is not None else blocked_from_env()
        for name in self.blocked:
            self.pm.set_blocked(name)
        for name, module in DEFAULT_PLUGINS:
            self._load(name, module, package="gemma-profiles", builtin=True)
        if load_entry_points:
            for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = entry_point.dist
                package = dist.metadata["Name"] if dist is not None else "?"
                version = dist.version if dist is not None else "?"
                self._load(entry_point.name, entry_point.value, package=package, version=version)
        self._check_pending()

    # -- loading -------------------------------------------------------------

    def _load(self, name: str, target: str, *, package: str, version: str | None = None, builtin: bool = False) -> None:
        if name in self.blocked:
            return
        try:
            plugin = _import_target(target)
        except Exception as exc:  # a plugin may fail in any way; report which one
            raise PluginError(
                f"plugin '{name}' from package '{package}' failed to import: {type(exc).__name__}: {exc}",
                hint=f"fix or uninstall {package}, or set {BLOCK_ENV}={name}",
            ) from exc
        self.register(plugin, name, package=package, version=version, builtin=builtin)

    def register(
        self, plugin: object, name: str, *, package: str = "?", version: str | None = None, builtin: bool = False
    ) -> None:
        """Register a plugin object (module or instance) under ``name``."""
        if self.pm.is_blocked(name):
            return
        if self.pm.get_plugin(name) is not None:
            other = self._packages.get(name, ("?", "", False))[0]
            raise PluginError(
                f"two plugins are named '{name}': from '{other}' and from '{package}'",
                hint=f"uninstall one, or set {BLOCK_ENV}={name}",
            )
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"plugin '{name}' from package '{package}' is invalid: {exc}") from exc
        self._packages[name] = (package, version or _version_of(package), builtin)

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._packages.pop(name, None)

    def _check_pending(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or "?"
            raise PluginError(
                f"plugin '{name}' implements a hook that does not exist: {exc}",
                hint="hook names start with gemma_profile_; see gemma_profiles/hookspecs.py",
            ) from exc

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
            result = self._call_one(impl, "gemma_profile_sources")
            for item in result or ():
                if not isinstance(item, ProfileSource):
                    raise PluginError(
                        f"plugin '{impl.plugin_name}' returned {type(item).__name__} from gemma_profile_sources, "
                        "expected ProfileSource"
                    )
                sources.append(item)
        return sorted(sources, key=lambda s: s.precedence)

    def detect_hardware(self) -> Hardware:
        from .hardware import Hardware

        result = self._call("gemma_profile_detect_hardware")
        if not isinstance(result, Hardware):
            raise PluginError(f"gemma_profile_detect_hardware returned {type(result).__name__}, expected Hardware")
        return result

    def preflight(self, plan: Plan) -> None:
        self._call("gemma_profile_preflight", plan=plan)

    def rewrite_config(self, rewrite: ConfigRewrite, plan: Plan) -> None:
        self._call("gemma_profile_rewrite_config", rewrite=rewrite, plan=plan)

    def model_built(self, model: Any, plan: Plan) -> None:
        self._call("gemma_profile_model_built", model=model, plan=plan)

    def load_weights(self, model: Any, path: str, plan: Plan, gemma_loader: Callable[[str], Any]) -> bool:
        return bool(
            self._call("gemma_profile_load_weights", model=model, path=path, plan=plan, gemma_loader=gemma_loader)
        )

    def weights_loaded(self, model: Any, plan: Plan) -> None:
        self._call("gemma_profile_weights_loaded", model=model, plan=plan)

    def resolve_device(self, requested: Any, plan: Plan, call: str) -> str | None:
        result = self._call("gemma_profile_resolve_device", requested=requested, plan=plan, call=call)
        return None if result is None else str(result)

    # -- error attribution -------------------------------------------------------

    def _call(self, hook_name: str, **kwargs: Any) -> Any:
        try:
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
        return PluginError(
            f"plugin '{name}' (package '{package}') raised {type(exc).__name__} in {hook_name}: {exc}",
            hint=f"report it to the plugin's authors, or set {BLOCK_ENV}={name}",
        )

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
    return {name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()}


_manager: GemmaPluginManager | None = None


def get_plugin_manager() -> GemmaPluginManager:
    """The process-wide plugin manager, created on first use."""
    global _manager
    if _manager is None:
        _manager = GemmaPluginManager()
    return _manager


def reset_plugin_manager(manager: GemmaPluginManager | None = None) -> None:
    """Drop (or replace) the process-wide manager; tests use this."""
    global _manager
    _manager = manager


__all__ = ["GemmaPluginManager", "PluginInfo", "ProfileSource", "get_plugin_manager", "reset_plugin_manager"]
