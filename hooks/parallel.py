"""Tensor parallel (``placement: {tensor_parallel: N}``): see `gemma_profiles.engine.parallel`.

With ``N`` > 1, a script launched by ``torchrun --nproc-per-node N`` (unmodified) runs as one
of ``N`` ranks: before the model is built this rank joins torchrun's process group (gloo on
the CPU, NCCL on GPUs, ``placement.tensor_parallel_timeout`` seconds to gather); gemma's
config copy gets the rank's head counts and MLP width, so gemma builds the rank's shapes
and sizes the KV cache per rank; the loader reads only the rank's slice of the checkpoint;
and an all-reduce after each attention and MLP gives every rank the whole layer's output.
Only rank 0 logs.  docs/parallel.md.
"""

from __future__ import annotations

import os
from typing import Any

from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.log import logger
from gemma_profiles.planning.plan import Plan
from gemma_profiles.plugin.hookspecs import hookimpl
from gemma_profiles.plugin.types import ConfigRewrite

#: id(rewritten config) -> (that config, the layout): handed from the rewrite to the built model.
_pending: dict[int, tuple[Any, Any]] = {}


def _ranks(plan: Plan) -> int:
    return int(getattr(plan.placement, "tensor_parallel", 1) or 1)


def _where(plan: Plan) -> str:
    return f"{plan.profile_path} placement.tensor_parallel"


def _device(plan: Plan) -> str:
    return str(plan.device.value) if plan.device is not None else "cpu"


@hookimpl(trylast=True)
def gemma_profile_preflight(plan: Plan) -> None:
    world = _ranks(plan)
    if world <= 1:
        return
    if plan.offloads:
        raise GemmaProfileError(
            f"tensor_parallel: {world} with offloaded or mapped layers: each rank must hold its whole share",
            where=_where(plan),
            hint="drop placement.offload/device_map, or use more ranks",
        )
    from gemma_profiles.engine import parallel

    problem = parallel.environment_problem(world)
    if problem is not None:
        raise GemmaProfileError(f"tensor_parallel: {world}: {problem}", where=_where(plan))
    if os.environ.get("RANK", "0") != "0":
        logger.disable("")  # rank 0 alone logs (errors still stop this rank with their line)
    timeout = float(getattr(plan.placement, "tensor_parallel_timeout", 300.0))
    parallel.join(world, timeout, _device(plan), _where(plan))


@hookimpl(trylast=True)
def gemma_profile_rewrite_config(rewrite: ConfigRewrite, plan: Plan) -> None:
    """Runs after the ``config`` builtin: the profile's shape first, then this rank's share of it."""
    world = _ranks(plan)
    if world <= 1:
        return
    import torch.distributed as dist

    from gemma_profiles.engine import parallel
    from gemma_profiles.planning.memory import ModelShape

    config = rewrite.config
    shape = ModelShape.of_config(config)
    problem = shape.tensor_parallel_problem(world)
    if problem is not None:
        raise GemmaProfileError(f"tensor_parallel: {world}: {problem}", where=_where(plan))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    layout = parallel.Layout(
        rank, world, shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim, shape.intermediate_size
    )
    reason = f"{_where(plan)}: {world} (rank {rank}'s share)"
    rewrite.set("num_attention_heads", layout.heads, reason=reason)
    rewrite.set("num_key_value_heads", layout.kv_heads, reason=reason)
    rewrite.set("intermediate_size", layout.intermediate, reason=reason)
    _pending.clear()  # a construction that failed after its rewrite left its entry
    _pending[id(config)] = (config, layout)


@hookimpl
def gemma_profile_model_built(model: Any, plan: Plan) -> None:
    if _ranks(plan) <= 1:
        return
    config, layout = _pending.pop(id(getattr(model, "config", None)), (None, None))
    if layout is None or config is not model.config:
        raise GemmaProfileError(
            "tensor_parallel: the model was not built from the config this rank rewrote",
            where=_where(plan),
            hint="build gemma's GemmaForCausalLM while the profile is active",
        )
    from gemma_profiles.engine import parallel

    parallel.register(model, layout)
    logger.info(
        "[{}] tensor parallel over {} ranks: {} of {} query heads, {} of {} KV heads{}, {} of {} MLP rows per rank",
        plan.profile,
        layout.world,
        layout.heads,
        layout.num_heads,
        layout.kv_heads,
        layout.num_kv_heads,
        " (replicated)" if layout.num_kv_heads < layout.world else "",
        layout.intermediate,
        layout.intermediate_size,
    )
