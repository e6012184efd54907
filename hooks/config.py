"""GemmaConfig rewrites: every ``config:`` value the plan carries (dtype, quant, any field)."""

from __future__ import annotations

from gemma_profiles.planning.plan import Plan
from gemma_profiles.plugin.hookspecs import hookimpl
from gemma_profiles.plugin.types import ConfigRewrite


@hookimpl
def gemma_profile_rewrite_config(rewrite: ConfigRewrite, plan: Plan) -> None:
    for name, setting in plan.config.items():
        rewrite.set(name, setting.value, reason=setting.origin)
