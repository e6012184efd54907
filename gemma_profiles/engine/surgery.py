"""What the engine changes in a gemma module shows in its class (torch-touching).

After loading, the engine changes what some of gemma's modules do: an int8 ``Linear``
computes on its int8 weight directly, a full-precision one keeps its weight packed for a CPU
kernel (with its own state-dict conversion and a refusal to move off the CPU), a norm runs in
one native call.  Each change is a mixin class - a `Surgery` subclass whose methods are the new
``forward``, ``_save_to_state_dict``, ``_load_from_state_dict`` or ``_apply`` - and `swap` makes
the module an instance of the mixin on top of its own class, in place (``module.__class__``).
gpt-fast's ``quantize.py`` does the same kind of swap by building a ``WeightOnlyInt8Linear`` in
place of each ``nn.Linear``; here the module and its tensors stay and only the class changes, so
parents, hooks and references to the module are untouched.

- The subclass is made once per (mixin, class) and named after both: ``PackedLinear``,
  ``Int8Linear``, ``NativeInt8Embedding``, ``FusedRMSNorm``...  ``print(model)``, ``type()``
  and a debugger's stack show it; its methods are the mixin's, found in the engine's source.
- ``isinstance(module, <gemma's class>)`` stays true, methods the mixin does not define are
  gemma's, and gemma's classes are not modified.
- The module keeps its class before the swap in ``_gemma_profile_surgery`` (`original_class`):
  `restore` sets it back, `unswap` takes one mixin off (the others stay), and a model holding
  such a module is refused by ``pickle`` in one line (`gemma_profiles.runtime.patch`): its
  classes are made at run time and its tensors may be in a kernel's layout.
- ``copy.deepcopy`` keeps the classes, and what a mixin needs beside the module's tensors lives
  in the module's ``__dict__`` (never in a closure over the module), so a copy computes as the
  original, on its own tensors.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

from torch import nn

#: Instance attribute: the module's class before its first swap.
ORIGINAL = "_gemma_profile_surgery"

_made: dict[tuple[type, type], type] = {}
#: Each made class -> (the class it was made on, the mixin): how `unswap` takes one mixin off.
_parts: dict[type, tuple[type, type]] = {}

M = TypeVar("M", bound=nn.Module)


class Surgery(nn.Module):
    """Base of the engine's mixins.  ``prefix`` starts the name of the classes made with it."""

    prefix: ClassVar[str] = ""


def subclass(base: type[nn.Module], mixin: type[Surgery]) -> type[nn.Module]:
    """``mixin`` on top of ``base``, named ``mixin.prefix + base.__name__`` (made once)."""
    made = _made.get((base, mixin))
    if made is None:
        name = mixin.prefix + base.__name__
        namespace = {
            "__module__": mixin.__module__,
            "__qualname__": name,
            "__doc__": f"{base.__module__}.{base.__qualname__} changed by {mixin.__module__}.{mixin.__qualname__}.",
        }
        made = type(name, (mixin, base), namespace)
        _made[(base, mixin)] = made
        _parts[made] = (base, mixin)
    return made


def swap(module: M, mixin: type[Surgery]) -> M:
    """Make ``module`` an instance of ``mixin`` on top of its class, in place; returns it."""
    if isinstance(module, mixin):
        return module
    module.__dict__.setdefault(ORIGINAL, type(module))
    object.__setattr__(module, "__class__", subclass(type(module), mixin))
    return module


def original_class(module: nn.Module) -> type:
    """``module``'s class before any swap (gemma's)."""
    original: type = module.__dict__.get(ORIGINAL, type(module))
    return original


def unswap(module: nn.Module, mixin: type[Surgery]) -> None:
    """Take ``mixin`` off ``module``'s class, keeping the other swaps (in their order); nothing
    when it is not on."""
    cls, mixins = type(module), []
    while cls in _parts:
        cls, made_with = _parts[cls]
        mixins.append(made_with)
    if mixin not in mixins:
        return
    for other in reversed(mixins):
        if other is not mixin:
            cls = subclass(cls, other)
    object.__setattr__(module, "__class__", cls)
    if cls is module.__dict__.get(ORIGINAL):
        del module.__dict__[ORIGINAL]


def restore(module: nn.Module) -> None:
    """Undo every swap of ``module``: its class before the first one again."""
    original = module.__dict__.pop(ORIGINAL, None)
    if original is not None:
        object.__setattr__(module, "__class__", original)
