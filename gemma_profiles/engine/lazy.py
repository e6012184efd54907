"""Parameters without memory until the checkpoint arrives (torch-touching).

While a profile is active, gemma's model is constructed with every
``torch.empty`` parameter on the ``meta`` device: nothing is allocated, and the
loader assigns checkpoint tensors in their place (memory-mapped, converted one
tensor at a time).  Everything else gemma computes at construction (the rope
tables) is real.  If something other than the loader touches the model first
(``.to()``, ``load_state_dict``, ``forward``), the meta parameters are
materialised as uninitialised CPU tensors - exactly what gemma itself builds -
and the model behaves as gemma's own.

Used by the runtime's patch of gemma's constructor (`gemma_profiles.runtime.patch`), the
``loading`` builtin (``hooks/loading.py``) and `gemma_profiles.engine.loading`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

LAZY_ATTRIBUTE = "_gemma_profile_lazy"
# Lazily built models not yet loaded, so `deactivate()` can hand them back materialised.
_pending: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class MetaParameters(TorchFunctionMode):
    """Sends ``torch.empty(...)`` calls without an explicit device to ``meta``."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def is_lazy(model: Any) -> bool:
    return bool(model.__dict__.get(LAZY_ATTRIBUTE, False))


def set_lazy(model: Any, lazy: bool) -> None:
    object.__setattr__(model, LAZY_ATTRIBUTE, lazy)
    if lazy:
        _pending.add(model)
    else:
        _pending.discard(model)


def materialize_all() -> None:
    """Materialise every lazily built model still waiting for weights (used by deactivate)."""
    for model in list(_pending):
        materialize(model)


def set_pending_device(model: Any, device: str) -> None:
    """A ``.to(device)`` asked for before the weights arrived."""
    object.__setattr__(model, "_gemma_profile_pending_device", str(device))


def pending_device(model: Any) -> str | None:
    return model.__dict__.get("_gemma_profile_pending_device")  # type: ignore[no-any-return]


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of parameters and buffers still without data."""
    names = [name for name, p in model.named_parameters() if p.is_meta]
    return names + [name for name, b in model.named_buffers() if b.is_meta]


def materialize(model: nn.Module, device: str | torch.device = "cpu") -> None:
    """Give every meta tensor real (uninitialised) storage, as gemma's ``torch.empty`` would."""
    if not is_lazy(model):
        return
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                module._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device=device), requires_grad=param.requires_grad
                )
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    set_lazy(model, False)


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of parameter or buffer ``name`` (no copy)."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attribute in module._parameters:
        module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
    elif attribute in module._buffers:
        module._buffers[attribute] = tensor
    else:
        raise KeyError(name)


def remove_parameter(model: nn.Module, name: str) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters.pop(attribute, None)
