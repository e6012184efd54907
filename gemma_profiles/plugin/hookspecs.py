"""Every hook gemma-profiles calls, in the order a model's life meets them.

Implement any of these in a module or class, mark it with
``gemma_profiles.hookimpl``, and expose it through the ``gemma_profiles``
entry-point group (see the package docstring).  The builtin behaviour in
``hooks/`` is written exactly this way.

Phases:

1. *Discovery* - `gemma_profile_sources`, `gemma_profile_detect_hardware`,
   `gemma_profile_watched_modules` / `gemma_profile_module_imported` (other codebases).
2. *Before construction* - `gemma_profile_preflight`, `gemma_profile_rewrite_config`.
3. *After construction* - `gemma_profile_model_built`.
4. *Loading and running* - `gemma_profile_load_weights`, `gemma_profile_weights_loaded`,
   `gemma_profile_resolve_device`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from gemma_profiles.planning.hardware import Hardware
    from gemma_profiles.planning.plan import Plan
    from gemma_profiles.plugin.types import ConfigRewrite, ProfileSource

PROJECT_NAME = "gemma_profiles"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a hook implementation: ``@hookimpl`` (a plugin writes ``@gemma_profiles.hookimpl``,
#: the same object re-exported).  Code inside the package imports it from here, not from
#: the package root, so nothing it imports leads back to the root.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- discovery ---------------------------------------------------------------


@hookspec
def gemma_profile_sources() -> Iterable[ProfileSource]:
    """Contribute places to find profile YAML files.

    :returns: `ProfileSource` items (a directory of ``*.yaml`` files or a single
        file, with a precedence; higher precedence wins a name clash).

    Results of all implementations are combined.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def gemma_profile_detect_hardware() -> Hardware | None:
    """Describe this machine: CUDA devices, MPS, CPU, memory, torch.

    :returns: a `Hardware` value, or None to let the next implementation answer.

    Stops at first non-None result.  The builtin ``hardware`` plugin (torch,
    psutil, /proc/cpuinfo) runs last; a plugin can supply facts for hardware it
    knows better, and tests supply fakes.
    """


@hookspec
def gemma_profile_watched_modules() -> Iterable[str]:
    """Name modules this plugin arms when they are imported while a profile is active.

    :returns: dotted module names (``"transformers.modeling_utils"``).

    Results of all implementations are combined.  The runtime's import hook calls
    `gemma_profile_module_imported` for each one once its code has run (or at once, when it
    was imported before the profile was activated), so a plugin can serve a codebase other
    than gemma_pytorch without the core importing it.  The .pth autoload arms the session on
    gemma's modules and on the builtins' watched modules (``gemma_profiles_autoload.ARM_ON``);
    a third-party plugin's module is served once the session is armed.
    """
    raise NotImplementedError


@hookspec
def gemma_profile_module_imported(module: ModuleType) -> None:
    """A module some plugin named in `gemma_profile_watched_modules` was imported with a profile active.

    :param module: the module, its code run.

    All implementations run; each checks ``module.__name__`` for its own modules.
    """


# -- before construction -----------------------------------------------------


@hookspec
def gemma_profile_preflight(plan: Plan) -> None:
    """Check that ``plan`` can work here, before anything is built or read.

    :param plan: the resolved plan for the model about to be constructed.
    :raises GemmaProfileError: to stop construction with a message for the user.

    All implementations run; the first error stops construction.
    """


@hookspec
def gemma_profile_rewrite_config(rewrite: ConfigRewrite, plan: Plan) -> None:
    """Rewrite the GemmaConfig before the model is constructed.

    Call ``rewrite.set(field, value, reason=...)``; each change is logged as
    before -> after and the model's parameters are built in the final dtype.

    :param rewrite: wraps a copy of the caller's GemmaConfig.
    :param plan: what the active profile resolved to for this model.

    All implementations run, later-registered plugins first.
    """


# -- after construction ------------------------------------------------------


@hookspec
def gemma_profile_model_built(model: Any, plan: Plan) -> None:
    """Act on the freshly constructed model (placement, wrapping modules).

    :param model: the ``GemmaForCausalLM`` / ``Gemma3ForMultimodalLM`` instance.
    :param plan: the plan it was built with.

    All implementations run.
    """


# -- loading and running -------------------------------------------------------


@hookspec(firstresult=True)
def gemma_profile_load_weights(model: Any, path: str, plan: Plan, gemma_loader: Callable[[str], Any]) -> bool | None:
    """Load a checkpoint into ``model``.

    :param model: the constructed model.
    :param path: the checkpoint file or folder the caller passed to ``load_weights``.
    :param plan: the plan the model was built with.
    :param gemma_loader: gemma_pytorch's own ``load_weights`` bound to ``model``.
    :returns: True when this implementation loaded the weights.

    Stops at first non-None result.  The builtin ``loading`` plugin runs last and
    calls ``gemma_loader``.
    """


#: The engine's stages of `gemma_profile_weights_loaded`, in the order they run: the builtin
#: plugin of each name (``hooks/<name>.py``).  Each works on what the one before left: int8 or
#: float16 weights first, then full-precision weights packed for the CPU kernels, then the
#: layers' fused forwards, and offload last, once every weight is in its final form.
WEIGHTS_LOADED_STAGES: tuple[str, ...] = ("quantization", "kernels", "fused", "offload")


@hookspec
def gemma_profile_weights_loaded(model: Any, plan: Plan) -> None:
    """Act on the model once its weights are in place (offload, kernel swaps).

    :param model: the model, after ``load_weights`` returned.
    :param plan: the plan it was built with.

    All implementations run, in a fixed order whatever the order plugins were registered in:

    1. other plugins' implementations (pluggy's order among them; ``trylast`` ones excepted):
       the model as gemma's loader left it, its weights in the checkpoint's format;
    2. the engine's stages, `WEIGHTS_LOADED_STAGES`: ``quantization`` -> ``kernels`` ->
       ``fused`` -> ``offload`` (each one that is loaded: a blocked builtin is skipped);
    3. other plugins' ``trylast`` implementations: the model as it will run.

    Wrappers (``wrapper=True``, such as the ``oom`` builtin's) wrap all of them.
    """


@hookspec(firstresult=True)
def gemma_profile_resolve_device(requested: Any, plan: Plan, call: str) -> str | None:
    """Decide the device a model call really uses.

    :param requested: the device the script passed (``model.to(x)``,
        ``generate(..., device=x)``), possibly None.
    :param plan: the plan the model was built with.
    :param call: ``"to"`` or ``"generate"``.
    :returns: the device to use, or None to keep ``requested``.

    Stops at first non-None result.
    """
