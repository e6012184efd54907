"""The patch on gemma_pytorch's model classes: where the runtime meets torch and gemma.

The session (`gemma_profiles.runtime.session`) arms it when gemma's model modules are
imported; the engine (`gemma_profiles.engine`) does the work on weights behind the hooks.

On ``GemmaForCausalLM`` and ``Gemma3ForMultimodalLM`` only ``__init__`` is wrapped, while
a profile is active: plan + preflight + config rewrite on a copy of the config, then the
original constructor under ``torch.set_default_dtype(<rewritten dtype>)`` (gemma creates
parameters with ``torch.empty`` in the default dtype, and the calling script has already
set the default from the *old* config), with those parameters on the meta device (`lazy`):
the loader fills them.

A model built that way becomes an instance of a *profiled* subclass of its class (same
name, `profiled_class`), which keeps the plan for the model's whole life - after the
``with use(...)`` block, after `deactivate`, under another profile:

- ``load_weights``: through the ``gemma_profile_load_weights`` hook, then
  ``gemma_profile_weights_loaded``;
- ``to`` and ``generate``: the device goes through ``gemma_profile_resolve_device``
  (the profile's device wins);
- ``load_state_dict`` and ``forward``: materialise lazily built parameters first,
  so code other than our loader sees gemma's own behaviour.

Pickling a whole profiled model (``torch.save(model)``, ``pickle.dumps``) writes it as
gemma's own class with gemma's state, leaving the plan behind: the profiled subclass has no
importable name, so an unpickled model is plain gemma, without the profile.  A model running
on the profile's own kernels (int8, float16 storage, packed CPU weights) or offloading layers
is refused with one line: save its ``state_dict()`` instead.  ``copy.deepcopy`` keeps the profile.

A model built without a profile is gemma's own class and never goes through any of it.
Every attribute replaced on gemma's classes is recorded, and `unpatch_all` puts each back
exactly.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from gemma_profiles.engine import lazy
from gemma_profiles.engine.devices import device_problem
from gemma_profiles.errors import GemmaNotAvailableError, PatchError
from gemma_profiles.log import logger
from gemma_profiles.plugin.manager import get_plugin_manager

if TYPE_CHECKING:
    from gemma_profiles.runtime.session import Session

#: module -> classes patched in it.
TARGETS = {"gemma.model": ("GemmaForCausalLM",), "gemma.gemma3_model": ("Gemma3ForMultimodalLM",)}
_MARKER = "__gemma_profiles_patched__"
PLAN_ATTRIBUTE = "_gemma_profile_plan"


@dataclass(frozen=True)
class _Replaced:
    owner: type
    name: str
    had_own: bool
    original: Any


_replaced: list[_Replaced] = []


def patch_module(module: ModuleType, session_for_model: Callable[[], Session | None]) -> None:
    """Patch the gemma classes defined in ``module`` (idempotent).

    :param session_for_model: the session a model under construction uses, or None for none
        (`gemma_profiles.runtime.session.session_for_model`: the session arms this patch, so
        this module never imports the session's).
    """
    names = TARGETS.get(module.__name__, ())
    if module.__name__ == "gemma.model" and not hasattr(module, "GemmaForCausalLM"):
        raise GemmaNotAvailableError(
            f"the 'gemma' package at {getattr(module, '__file__', '?')} is not gemma_pytorch (no GemmaForCausalLM); "
            "PyPI's 'gemma' is DeepMind's JAX library",
            hint="pip uninstall gemma, then install google/gemma_pytorch (see the README)",
        )
    for name in names:
        cls = getattr(module, name, None)
        if isinstance(cls, type) and _MARKER not in cls.__dict__:
            _patch_class(cls, session_for_model)


def _patch_class(cls: type, session_for_model: Callable[[], Session | None]) -> None:
    had_own = "__init__" in cls.__dict__
    original = cls.__dict__["__init__"] if had_own else getattr(cls, "__init__")  # noqa: B009
    type.__setattr__(cls, "__init__", _wrap_init(original, session_for_model))
    _replaced.append(_Replaced(cls, "__init__", had_own, original))
    setattr(cls, _MARKER, True)
    _replaced.append(_Replaced(cls, _MARKER, False, None))
    logger.debug("patched {}.{}", cls.__module__, cls.__qualname__)


def unpatch_all() -> None:
    """Restore every replaced attribute, newest first."""
    while _replaced:
        item = _replaced.pop()
        if item.had_own:
            setattr(item.owner, item.name, item.original)
        elif item.name in item.owner.__dict__:
            delattr(item.owner, item.name)


def plan_of(model: Any) -> Any:
    """The plan a model was built with (whatever is active now); None for a model built without one."""
    return model.__dict__.get(PLAN_ATTRIBUTE)


#: What a profiled model does differently from gemma's class: method name -> wrapper factory.
_MODEL_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {}
#: gemma's class (or a user's subclass of it) -> its profiled subclass.
_profiled: dict[type, type] = {}


def profiled_class(cls: type) -> type:
    """The subclass of ``cls`` a model built under a profile becomes: the same name, and
    ``load_weights``, ``to``, ``generate``, ``load_state_dict`` and ``forward`` that follow
    the model's own plan.  Each calls ``cls``'s method as it is at call time (``super()``),
    so it is independent of whether gemma's classes are patched now."""
    if cls.__dict__.get(_PROFILED_MARKER):
        return cls
    sub = _profiled.get(cls)
    if sub is None:
        namespace: dict[str, Any] = {
            "__module__": __name__,
            "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__qualname__} built under a gemma-profiles profile (gemma_profiles.runtime.patch).",
            _PROFILED_MARKER: True,
            "__reduce_ex__": _reduce_ex,
            "__deepcopy__": _deepcopy,
        }
        sub = type(cls.__name__, (cls,), namespace)
        for name, wrap in _MODEL_WRAPPERS.items():
            if hasattr(cls, name):
                setattr(sub, name, wrap(_inherited(sub, cls, name)))
        _profiled[cls] = sub
    return sub


_PROFILED_MARKER = "__gemma_profiles_profiled__"
#: What a profile keeps in a model's ``__dict__`` (plan, lazy flag, pending device, mapped files,
#: offload state): left out when the model is pickled.
_OWN_ATTRIBUTES = "_gemma_profile"


def _deepcopy(self: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy``: a profiled model still, with its plan (what the default reduction did
    before `_reduce_ex` made pickling name gemma's class)."""
    clone = object.__new__(type(self))
    memo[id(self)] = clone
    clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
    return clone


def _changed_module(model: Any) -> str | None:
    """The first submodule a plugin changed beyond gemma's own, or None: one whose class the
    engine swapped (its ``_gemma_profile_surgery`` marker, `gemma_profiles.engine.surgery`:
    ``Int8Linear``, ``PackedLinear``, ``FusedSampler``...) or that keeps other state of ours
    (``_gemma_profile*``), or one with a function bound to the instance (the model's own
    ``_apply`` pin, `gemma_profiles.engine.kernels.pin_to_cpu`, or a third-party plugin's).
    A changed submodule is named before the model itself (whose pin only follows from one)."""
    found = None
    for name, module in model.named_modules():
        for key, value in module.__dict__.items():
            replaced = isinstance(value, (types.FunctionType, types.MethodType, functools.partial))
            if (name and key.startswith(_OWN_ATTRIBUTES)) or replaced:
                if name:
                    return str(name)
                found = "the model"
    return found


def _reduce_ex(self: Any, protocol: int) -> tuple[Any, ...]:
    """Pickle (``torch.save(model)``, ``pickle.dumps``) a profiled model as an instance of gemma's
    own class - the profiled subclass is made at run time and has no importable name - with
    gemma's state: its modules, parameters and buffers, without the plan and what the profile
    keeps beside it.  An unpickled model is plain gemma, without the profile; a lazily built
    one is materialised first, as gemma would have allocated it."""
    from gemma_profiles.errors import GemmaProfileError

    base = next(cls for cls in type(self).__mro__ if not cls.__dict__.get(_PROFILED_MARKER))
    if "_gemma_profile_offload" in self.__dict__:  # engine.offload.STATE_ATTRIBUTE
        raise GemmaProfileError(
            f"this {base.__name__} offloads layers under profile '{plan_of(self).profile}': its weights stream "
            "from host memory or disk through hooks that cannot be pickled",
            hint="save model.state_dict() (it reads the offloaded weights) and load it into a model built again",
        )
    changed = _changed_module(self)
    if changed is not None:
        raise GemmaProfileError(
            f"this {base.__name__} (profile '{plan_of(self).profile}') runs {changed} on the profile's own "
            "kernels (int8, float16 storage, packed CPU weights): pickled whole it would not be gemma's model",
            hint="save model.state_dict() and load it into a model built again, or build the model with "
            "GEMMA_PROFILE_DISABLE_PLUGINS=quantization,kernels,fused to pickle it whole",
        )
    lazy.materialize(self)
    state = {key: value for key, value in self.__dict__.items() if not key.startswith(_OWN_ATTRIBUTES)}
    # the loader's check that memory-mapped checkpoint files stay as they were (engine.loading.watch)
    watching = getattr(self.__dict__.get("_gemma_profile_mapped_files"), "handle", None)
    hooks = state.get("_forward_pre_hooks")
    if watching is not None and hooks is not None and watching.id in hooks:
        state["_forward_pre_hooks"] = type(hooks)((k, v) for k, v in hooks.items() if k != watching.id)
    return object.__new__, (base,), state


def _inherited(sub: type, cls: type, name: str) -> Callable[..., Any]:
    """``cls``'s ``name`` as it is when called, bound to the instance (through ``super``)."""

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(super(sub, self), name)(*args, **kwargs)

    functools.update_wrapper(call, getattr(cls, name))
    return call


# -- wrappers ---------------------------------------------------------------------


def _wrap_init(original: Callable[..., None], session_for_model: Callable[[], Session | None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        session = session_for_model()
        if session is None:
            original(self, config, *args, **kwargs)
            return
        build = session.prepare(config)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(build.config.get_dtype())
        try:
            with lazy.MetaParameters():
                original(self, build.config, *args, **kwargs)
        finally:
            torch.set_default_dtype(previous)
        lazy.set_lazy(self, True)
        # Kept out of nn.Module's registries: a plain attribute in __dict__.
        object.__setattr__(self, PLAN_ATTRIBUTE, build.plan)
        # The model keeps its plan for life, whatever is active (or patched) later.
        object.__setattr__(self, "__class__", profiled_class(type(self)))
        get_plugin_manager().model_built(self, build.plan)

    return __init__


def _wrap_load_weights(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_weights(self: Any, model_path: Any, *args: Any, **kwargs: Any) -> Any:
        plan = plan_of(self)
        gemma_loader = functools.partial(original, self)
        if plan is None:
            return gemma_loader(model_path, *args, **kwargs)
        if args or kwargs:
            # gemma's loader would fill a model the profile rewrote (int8, meta parameters) its own way.
            raise PatchError(
                f"load_weights under profile '{plan.profile}' takes only the checkpoint path "
                f"(given also {', '.join([*(repr(a) for a in args), *kwargs])})",
                where=f"profile {plan.profile}",
                hint="call model.load_weights(path); build the model without a profile for gemma's own loader",
            )
        manager = get_plugin_manager()
        if not manager.load_weights(self, str(model_path), plan, gemma_loader):
            gemma_loader(model_path)
        manager.weights_loaded(self, plan)
        return None

    return load_weights


def _wrap_to(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        plan = plan_of(self)
        if plan is None:
            lazy.materialize(self)
            return original(self, *args, **kwargs)
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        chosen = get_plugin_manager().resolve_device(device, plan, "to", device_problem) if device is not None else None
        if lazy.is_lazy(self) and device is not None and dtype is None:
            # No weights yet: remember the device; the loader puts each tensor there (or
            # keeps an offloaded layer on the CPU) instead of building and moving all of it now.
            lazy.set_pending_device(self, chosen or str(device))
            return self
        lazy.materialize(self)
        if chosen is None:
            return original(self, *args, **kwargs)
        converted: dict[str, Any] = {"device": torch.device(chosen), "non_blocking": non_blocking}
        if dtype is not None:
            converted["dtype"] = dtype
        if memory_format is not None:
            converted["memory_format"] = memory_format
        return original(self, **converted)

    return to


def _wrap_generate(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        if lazy.is_lazy(self):  # generating without weights: gemma's behaviour, on the asked device
            pending = lazy.pending_device(self)
            lazy.materialize(self)
            if pending is not None:
                self.to(pending)
        plan = plan_of(self)
        if plan is None:
            return original(self, *args, **kwargs)
        positional = len(args) > 1  # generate(prompts, device, ...)
        requested = args[1] if positional else kwargs.get("device")
        chosen = get_plugin_manager().resolve_device(requested, plan, "generate", device_problem)
        if chosen is not None:
            device = torch.device(chosen)
            parameter = next(self.parameters(), None)
            if parameter is not None and not same_device(parameter.device, device):
                self.to(device)
            if positional:
                args = (args[0], device, *args[2:])
            else:
                kwargs["device"] = device
        # gemma generates under no_grad; inference mode also skips version counters and view
        # tracking (1.5-2 ms of a 60 ms int8 CPU step).  Only text comes out of generate.
        with torch.inference_mode():
            return original(self, *args, **kwargs)

    return generate


def _wrap_materializing(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        lazy.materialize(self)
        return original(self, *args, **kwargs)

    return wrapper


def same_device(actual: torch.device, wanted: torch.device) -> bool:
    """``cuda:0`` matches ``cuda`` (no index means the current device)."""
    if actual.type != wanted.type:
        return False
    if wanted.index is None or actual.index is None:
        return True
    return actual.index == wanted.index


_MODEL_WRAPPERS.update(
    load_weights=_wrap_load_weights,
    to=_wrap_to,
    generate=_wrap_generate,
    load_state_dict=_wrap_materializing,
    forward=_wrap_materializing,
)
