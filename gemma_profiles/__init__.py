"""gemma-profiles: hardware profiles for gemma_pytorch, applied at runtime.

Use::

    import gemma_profiles
    gemma_profiles.activate("t4")          # or: with gemma_profiles.use("t4"): ...

A model built while a profile is active keeps that profile for its whole life: its
``load_weights``, ``to`` and ``generate`` follow the profile after the ``with`` block ends
too.  A profile whose device this machine lacks stops the construction, before any
weight is read.

Write a plugin (a module with ``@hookimpl`` functions named after the hooks in
``gemma_profiles.plugin.hookspecs``) and expose it in your ``pyproject.toml``::

    [project.entry-points.gemma_profiles]
    my_plugin = "my_package.gemma_plugin"

Set ``GEMMA_PROFILE_DISABLE_PLUGINS=my_plugin`` to keep a plugin from loading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loguru import logger

from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.plugin.hookspecs import hookimpl  # ``@gemma_profiles.hookimpl`` marks a plugin's hooks

__version__ = "0.1.0"

# A library stays quiet until asked (loguru's advice); activation enables it.
logger.disable("gemma_profiles")

if TYPE_CHECKING:
    from gemma_profiles.runtime.session import Session
    from gemma_profiles.spec.profile import Profile


def activate(profile: str | Profile) -> Session:
    """Apply ``profile`` (a name, a path to a YAML file, or a `Profile`) to gemma models built from now on."""
    from gemma_profiles.runtime.session import activate as _activate

    return _activate(profile)


def deactivate() -> None:
    """Stop applying any profile and restore gemma_pytorch's classes."""
    from gemma_profiles.runtime.session import deactivate as _deactivate

    _deactivate()


def use(profile: str | Profile) -> Any:
    """Context manager: ``with gemma_profiles.use("t4"): model = GemmaForCausalLM(cfg)``.

    The model built in the block keeps the profile after it: loading and generating later is fine.
    """
    from gemma_profiles.runtime.session import use as _use

    return _use(profile)


def load_profile(reference: str) -> Profile:
    """Load a profile by name or path (validated, ``extends`` resolved)."""
    from gemma_profiles.spec.registry import default_registry

    return default_registry().load(reference)


__all__ = ["GemmaProfileError", "__version__", "activate", "deactivate", "hookimpl", "load_profile", "use"]
