"""Checkpoint loading while a profile is active: the lean loader in `gemma_profiles.engine.loading`.

The checkpoint is checked against the model first (every name, shape and dtype;
docs/loading.md), then loaded memory-mapped, tensor by tensor, assigned instead
of copied, int8 on the fly, with NaN/Inf weights refused.  A model that was
materialised before loading (``.to()`` or ``load_state_dict`` first) goes
through gemma's own ``load_weights`` after the same checks.  Runs last, so a
plugin's ``gemma_profile_load_weights`` can replace it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gemma_profiles import hookimpl
from gemma_profiles.planning.plan import Plan


@hookimpl(trylast=True)
def gemma_profile_load_weights(model: Any, path: str, plan: Plan, gemma_loader: Callable[[str], Any]) -> bool:
    from gemma_profiles.engine.lazy import is_lazy, materialize
    from gemma_profiles.engine.loading import check_checkpoint, check_finite, check_for_gemma, lean_load

    check_checkpoint(path)
    if is_lazy(model):
        lean_load(model, path, plan)
    else:
        # Built eagerly (materialised by an earlier .to() or load_state_dict): gemma's own loader.
        materialize(model)
        check_for_gemma(model, path, plan)
        gemma_loader(path)
        check_finite(model, path)
    return True
