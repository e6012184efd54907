"""Activation: which profile is active, and arming the gemma patch.

`activate` records a `Session` and installs an import hook, so gemma_pytorch
is patched whether it is imported before or after activation.  The hook and
the session are cheap: YAML is read on first use, torch only by gemma itself.

A profile chosen by ``GEMMA_PROFILE`` or ``apply`` is armed when this module is
first imported - by the .pth's finder when gemma's model module is, or by the
program - never at interpreter start (see gemma_profiles_autoload).  The program's
own ``sys.excepthook`` and loguru handlers are left alone: an error is raised as a
`GemmaProfileError` whose type and one-line text are the interface.
"""

from __future__ import annotations

import copy
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import gemma_profiles.log as log
from gemma_profiles.errors import GemmaProfileError, PatchError, ProfileError
from gemma_profiles.log import logger
from gemma_profiles.planning.plan import Plan, make_plan
from gemma_profiles.plugin.types import ConfigRewrite
from gemma_profiles.spec.profile import Profile
from gemma_profiles.spec.variants import family_of_architecture, identify_variant

#: gemma_pytorch modules holding classes we patch (`patch.TARGETS`' keys).
PATCHED_MODULES = ("gemma.model", "gemma.gemma3_model")
#: Modules whose import arms the chosen profile: gemma's, and those the builtin plugins name in
#: ``gemma_profile_watched_modules`` (tests/test_transformers.py checks the two lists agree).
ARM_ON = (*PATCHED_MODULES, "transformers.modeling_utils")
#: The attribute marking the ``.pth`` module's finder (``gemma_profiles_autoload.ArmOnGemmaImport``)
#: on ``sys.meta_path``.  The package never imports that module (it imports the package), so
#: the finder is known by this mark; the runtime removes it once a session is armed or chosen.
#: `PATCHED_MODULES`, `ARM_ON` and this name have copies there; tests/test_settings.py compares them.
ARMING_FINDER = "gemma_profiles_arming"


def _arming(finder: object) -> bool:
    return getattr(finder, ARMING_FINDER, None) is True


def arming_pending() -> bool:
    """Whether the ``.pth``'s finder waits for gemma (a profile was chosen, none is armed yet)."""
    return any(_arming(finder) for finder in sys.meta_path)


def _disarm() -> None:
    """Remove the ``.pth``'s finder: a session is armed, or the program chose (or dropped) one itself."""
    if arming_pending():
        sys.meta_path[:] = [finder for finder in sys.meta_path if not _arming(finder)]


@dataclass(frozen=True)
class Build:
    """A rewritten config and the plan it came from."""

    config: Any
    plan: Plan


class Session:
    """An active profile: a reference (name, path or `Profile`) and why it is active.

    :param problem: why the profile the user chose cannot be known (an unreadable state
        file): raised again at every model construction, so gemma never builds unpatched.
    """

    def __init__(self, reference: str | Profile, source: str = "api", problem: GemmaProfileError | None = None):
        self.reference = reference
        self.source = source  # "api", "env", "applied"
        self.problem = problem
        self._profile: Profile | None = reference if isinstance(reference, Profile) else None

    @property
    def label(self) -> str:
        return self._profile.name if self._profile else str(self.reference)

    def profile(self) -> Profile:
        """The loaded profile; errors name the env var or state that chose it."""
        if self.problem is not None:
            problem = self.problem
            raise type(problem)(problem.message, where=problem.where, hint=problem.hint)
        if self._profile is None:
            from gemma_profiles.spec.registry import default_registry

            try:
                if self.reference == "auto":
                    from gemma_profiles.planning.auto import auto_profile
                    from gemma_profiles.plugin.manager import detect_hardware

                    self._profile = auto_profile(detect_hardware())
                else:
                    self._profile = default_registry().load(str(self.reference))
            except GemmaProfileError as exc:
                if self.source == "env":
                    raise type(exc)(
                        f"GEMMA_PROFILE={self.reference!r}: {exc.message}", where=exc.where, hint=exc.hint
                    ) from None
                if self.source == "applied":
                    raise type(exc)(
                        f"applied profile {self.reference!r}: {exc.message}",
                        where=exc.where,
                        hint=(exc.hint or "") + "; run 'gemma-profile reset' or apply another",
                    ) from None
                raise
            if self._profile.model.abstract:
                raise ProfileError(
                    f"profile '{self._profile.name}' is abstract (a base for extends), not for a machine",
                    where=str(self._profile.path),
                    hint="pick a concrete profile from 'gemma-profile list'",
                )
        return self._profile

    def plan_for(self, config: Any) -> Plan:
        """The plan for one config, sized against this machine when the profile's device is here."""
        from gemma_profiles.planning.memory import ModelShape
        from gemma_profiles.planning.plan import Target
        from gemma_profiles.plugin.manager import detect_hardware

        profile = self.profile()
        variant = identify_variant(config)
        family = family_of_architecture(getattr(config, "architecture", None))
        plan = make_plan(profile, variant, family)
        hardware = detect_hardware()
        device = plan.device.value if plan.device is not None else ("cuda:0" if hardware.gpus else "cpu")
        if device.startswith("cuda") and hardware.gpu(device) is None:
            return plan  # the device is missing here; the preflight stops construction and says so
        if device == "mps":
            return plan
        shape = ModelShape.of_config(config)
        return make_plan(profile, variant, family, target=Target.of_hardware(hardware, device), shape=shape)

    def prepare(self, config: Any) -> Build:
        """Plan, preflight and rewrite a copy of ``config`` (the caller's is untouched)."""
        from gemma_profiles.plugin.manager import get_plugin_manager

        plan = self.plan_for(config)
        for warning in plan.warnings:
            logger.warning("[{}] {}", plan.profile, warning)
        manager = get_plugin_manager()
        manager.preflight(plan)
        rewrite = ConfigRewrite(copy.copy(config), plan.profile)
        manager.rewrite_config(rewrite, plan)
        for change in rewrite.changes:
            if change.before != change.after:
                logger.info(
                    "[{}] config.{}: {!r} -> {!r} ({})",
                    plan.profile,
                    change.field,
                    _show(change.before),
                    _show(change.after),
                    change.reason,
                )
        dtype = getattr(rewrite.config, "dtype", None)
        if hasattr(rewrite.config, "get_dtype") and rewrite.config.get_dtype() is None:
            raise PatchError(
                f"dtype {dtype!r} is not one gemma knows",
                where=f"profile {plan.profile}",
                hint="use float32, float16 or bfloat16",
            )
        tokenizer = getattr(rewrite.config, "tokenizer", None)
        if isinstance(tokenizer, str) and not os.path.isfile(tokenizer):
            # gemma would stop on a bare `assert` naming only the path, after our plan ran.
            raise PatchError(
                f"tokenizer file not found: {tokenizer} (relative to {os.getcwd()})",
                where=f"profile {plan.profile}",
                hint="set model_config.tokenizer, or config.tokenizer in the profile, to your tokenizer.model",
            )
        return Build(rewrite.config, plan)


def _show(value: Any) -> Any:
    return getattr(value, "name", value)


_session: Session | None = None


def current() -> Session | None:
    """The active session, or None."""
    return _session


def session_for_model() -> Session | None:
    """The session a model being constructed uses; a bad profile reference raises here."""
    if _session is not None:
        _session.profile()  # a bad name or file fails here, before anything is built
    return _session


def activate(profile: str | Profile, *, source: str = "api", lazy: bool = False) -> Session:
    """Make ``profile`` (a name, a path or a `Profile`) active in this process.

    :param lazy: defer loading the YAML to the first model construction (autoload).
    :raises GemmaProfileError: when not lazy and the profile cannot be loaded.
    """
    session = Session(profile, source)
    if not lazy:
        session.profile()
    _set_session(session)
    logger.debug("profile {} active ({})", session.label, source)
    return session


def _set_session(session: Session) -> None:
    global _session
    _disarm()  # this session replaces what the environment chose
    log.enable()
    _session = session
    _install_import_hook()


def deactivate() -> None:
    """Deactivate any profile and restore every attribute the patch replaced.

    Models already built under a profile keep it: their plan goes with them (`patch.profiled_class`).
    """
    global _session
    _disarm()  # and the environment's choice is not armed later either
    _session = None
    _remove_import_hook()
    patch = sys.modules.get("gemma_profiles.runtime.patch")
    if patch is not None:
        patch.unpatch_all()


@contextmanager
def use(profile: str | Profile) -> Iterator[Session]:
    """``with use("t4"): ...`` - a profile active for the block, then the previous state."""
    previous = _session
    session = activate(profile)
    try:
        yield session
    finally:
        if previous is not None:
            _set_session(previous)
        else:
            deactivate()


def arm_from_environment() -> Session | None:
    """Activate what ``GEMMA_PROFILE`` or ``apply`` chose (lazily: YAML is read at the first model).

    Never raises for a user's mistake: an unreadable state becomes a session whose every
    model construction raises that `StateError`.
    """
    from gemma_profiles.errors import StateError
    from gemma_profiles.runtime.state import active_reference

    try:
        active = active_reference()
    except StateError as exc:
        _set_session(Session("the applied profile", "applied", problem=exc))
        return _session
    if active.reference is None:
        _disarm()
        return None
    return activate(active.reference, source=active.source, lazy=True)


def spec_after_arming(
    fullname: str, path: Sequence[str] | None, target: ModuleType | None
) -> importlib.machinery.ModuleSpec | None:
    """The .pth finder's answer for a gemma model module: arm, then let our import hook find it."""
    if arming_pending():
        arm_from_environment()
    _disarm()
    hook = next((f for f in sys.meta_path if isinstance(f, GemmaImportHook)), None)
    return hook.find_spec(fullname, path, target) if hook is not None else None


# -- the import hook ------------------------------------------------------------


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the module it produced."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if _session is not None:
            if module.__name__ in PATCHED_MODULES:
                from gemma_profiles.runtime import patch

                patch.patch_module(module, session_for_model)
            else:
                _serve(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class GemmaImportHook(importlib.abc.MetaPathFinder):
    """Patches gemma_pytorch's model modules as they are imported."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in PATCHED_MODULES and not _watches(fullname):
            return None
        for finder in sys.meta_path:
            if isinstance(finder, GemmaImportHook) or _arming(finder):
                continue
            if not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


#: The builtins' watched modules (what the .pth arms on, beside gemma's own).
_BUILTIN_WATCHED = frozenset(ARM_ON) - frozenset(PATCHED_MODULES)
#: (the plugin manager asked, its answer): asked again when the manager is replaced.
_watched: tuple[object, frozenset[str]] | None = None
_asking = False


def watched_modules() -> frozenset[str]:
    """Modules plugins arm on import (``gemma_profile_watched_modules``), asked once per plugin manager.

    While the plugins load (their own imports pass through the hook) and when they cannot
    load (a broken plugin: model construction reports it), only the builtins' list in
    `ARM_ON` is watched.
    """
    global _watched, _asking
    fallback = _BUILTIN_WATCHED
    if _asking:
        return fallback
    _asking = True
    try:
        from gemma_profiles.plugin.manager import get_plugin_manager

        manager = get_plugin_manager()
        if _watched is None or _watched[0] is not manager:
            _watched = (manager, manager.watched_modules() - frozenset(PATCHED_MODULES))
    except GemmaProfileError as exc:
        logger.debug("watched modules: the plugins did not load ({}); watching {}", exc, sorted(fallback))
        return fallback
    finally:
        _asking = False
    return _watched[1]


def _watches(fullname: str) -> bool:
    """Whether the import of ``fullname`` is handed to the plugins: a builtin's watched module, or (once
    the plugin manager is loaded - never loaded here, for an unrelated import) any plugin's."""
    if fullname in _BUILTIN_WATCHED:
        return True
    return _manager_loaded() and fullname in watched_modules()


def _manager_loaded() -> bool:
    manager = sys.modules.get("gemma_profiles.plugin.manager")
    return manager is not None and getattr(manager, "_manager", None) is not None


def _serve(module: ModuleType) -> None:
    """Hand a watched module to the plugins (``gemma_profile_module_imported``); a failure is one log line."""
    from gemma_profiles.plugin.manager import get_plugin_manager

    try:
        get_plugin_manager().module_imported(module)
    except GemmaProfileError as exc:  # never break the program's import; its model loads unprofiled
        logger.error("{} was imported without the profile's changes: {}", module.__name__, exc)


def _install_import_hook() -> None:
    if not any(isinstance(f, GemmaImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, GemmaImportHook())
    loaded = [sys.modules[name] for name in PATCHED_MODULES if name in sys.modules]
    if loaded:
        from gemma_profiles.runtime import patch

        for module in loaded:
            patch.patch_module(module, session_for_model)
    # A watched module imported before the session (`import transformers` first): served now.
    # Only when one is loaded is the plugin manager asked, so activating stays cheap otherwise.
    if any(name in sys.modules for name in _BUILTIN_WATCHED) or _manager_loaded():
        for name in sorted(watched_modules()):
            imported = sys.modules.get(name)
            if imported is not None:
                _serve(imported)


def _remove_import_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, GemmaImportHook)]


# The .pth saw a profile chosen: arm it now that we are loaded.  Where the .pth did not run
# (``python -S``, an install without it), decide now what it would have decided at start.
if arming_pending() or "gemma_profiles_autoload" not in sys.modules:
    arm_from_environment()
