"""CPU and disk offload: decoder layers stream to the execution device, the next one prefetched.

This plugin decides; `gemma_profiles.engine.offload` (imported when a model is loaded,
so building the plugin manager never imports torch) carries it out.

What a profile's ``placement`` asks for (``offload: cpu|disk``, ``offload_folder``,
``device_map``, ``max_memory``) is applied once the weights are in place
(`gemma_profile_weights_loaded`, the last of the engine's stages):

- **the execution device** is ``placement.device``; without one, ``cuda:0`` when CUDA
  is present, else the CPU.  ``model.to(x)`` and ``generate(..., device=x)`` use it.
- **which layers are offloaded**: an explicit ``device_map`` (``{"0-12": cuda:0,
  "13-17": cpu}``, ``model.layers.N`` keys work too); else the plan's layer map
  (the planner keeps as many layers resident as ``max_memory`` / the device allows);
  else - no plan was sized, e.g. on MPS - as many leading layers as fit in
  ``max_memory[device]`` stay resident, or none when it is not set.  On a CPU
  execution device only ``disk`` frees memory: ``offload: cpu`` leaves the model as it
  is (set ``GEMMA_PROFILE_OFFLOAD_STREAM_CPU=1`` to stream anyway: the GPU's code path,
  for tests and benchmarks).
- **storage**: each offloaded layer is packed into one flat buffer - pinned CPU memory
  for ``cpu`` (plain memory without CUDA), or a file in ``offload_folder`` (default: the
  user cache, ``~/.cache/gemma-profiles/offload``) mapped with torch's ``from_file`` for
  ``disk`` - and its parameters become views into it, so ``state_dict()`` still works and
  reads from there.  The files have no name (``O_TMPFILE``; elsewhere they are unlinked
  once mapped): they go with the model, or with the process however it ends, ``kill -9``
  included (`gemma_profiles.engine.offload.DiskFiles`).  A folder without room for the ``disk``
  layers is refused before anything is written - or, when the disk fills up meanwhile,
  what was written is dropped at once - with an error naming the folder, the bytes needed
  and the bytes free; the model then stays resident as it was.
- **streaming**: right before an offloaded layer runs, its buffer is copied into one of
  two layer-sized slots on the execution device, and the copy of the next offloaded
  layer starts while it computes - one ``cudaMemcpyAsync`` per layer on a side CUDA
  stream, with events ordering slot reuse; disk layers go file -> pinned staging ->
  slot through a worker thread.  Afterwards the parameters point back at the storage.
  On a CPU execution device ``disk`` layers are used in place, zero-copy: the worker
  maps the next layer's pages in while the current one computes, and a layer's pages
  leave the process (``madvise``) once it has run, so the resident set holds about
  two layers, not the weights.
- **the KV cache**: gemma writes each layer's cache in place (``index_copy_``); moving it
  with ``.to()`` would write into a copy and give wrong tokens without an error (what
  accelerate's hooks do to this model).  Every decoder layer on the execution device checks
  that its cache is there and raises `GemmaProfileError` otherwise - it never copies.
- **a pipeline**: layers a ``device_map`` (or the planner's split over the GPUs ``max_memory``
  names) puts on another GPU (``cuda:1``) are computed there, beside a CUDA execution device:
  their weights are loaded straight onto it, their inputs follow them (the step's masks and
  rope rows once per GPU and step), and each one's KV cache - which gemma's ``generate``
  allocates on the execution device - is moved there in place at the first step
  (`gemma_profiles.engine.offload.relocate`), the same tensor object, so the in-place writes
  land in it.  Any other device is refused by the planner; a GPU this machine lacks by the
  preflight.
- **the tied embedder** stays on the execution device unless the ``device_map`` names
  ``embedder: cpu|disk``; then the lookup and the sampler - which reads
  ``embedder.weight`` directly - run where the weight is, and their outputs come back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from gemma_profiles import settings
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.log import logger
from gemma_profiles.planning.plan import (
    OFFLOAD_TARGETS,
    Plan,
    compress_layers,
    expand_layers,
    normalize_device,
    split_device_map,
    stage_problem,
)
from gemma_profiles.plugin.hookspecs import hookimpl
from gemma_profiles.units import parse_memory

if TYPE_CHECKING:
    from torch import nn

    from gemma_profiles.engine.offload import Layout

#: ``1``: stream ``cpu``-offloaded layers even when the execution device is the CPU.
STREAM_CPU_ENV = settings.OFFLOAD_STREAM_CPU.name


def execution_device(plan: Plan) -> str:
    """``placement.device``; else ``cuda:0`` when CUDA is present; else ``cpu``."""
    if plan.device is not None:
        return normalize_device(str(plan.device.value))
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def stream_on_cpu() -> bool:
    return settings.switch(settings.OFFLOAD_STREAM_CPU)


def _bytes_of(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _fit_by_budget(model: nn.Module, plan: Plan, device: str, offload: str) -> tuple[dict[int, str], str]:
    """No sized plan: keep leading layers while ``max_memory[device]`` allows, offload the rest."""
    from gemma_profiles.engine.offload import SLOTS, decoder_layers

    layers = decoder_layers(model)
    limits = {normalize_device(k): v for k, v in (plan.placement.max_memory or {}).items()}
    if device not in limits:
        return {i: offload for i in range(len(layers))}, f"all decoder layers (no max_memory for {device})"
    budget = parse_memory(limits[device])
    layer_bytes = max((_bytes_of(layer) for layer in layers), default=0)
    other = _bytes_of(model) - sum(_bytes_of(layer) for layer in layers)
    room = budget - other - SLOTS * layer_bytes
    resident = 0 if layer_bytes == 0 else max(0, min(len(layers), room // layer_bytes))
    return (
        {i: offload for i in range(resident, len(layers))},
        f"max_memory {device}: {limits[device]} holds {resident} of {len(layers)} layers",
    )


def decide_layout(model: nn.Module, plan: Plan, device: str) -> Layout:
    """The `Layout` for ``model`` under ``plan`` (see the module docstring for the rules)."""
    from gemma_profiles.engine.offload import Layout, decoder_layers

    layers = decoder_layers(model)
    count = len(layers)
    placement = plan.placement
    embedder: str | None = None
    per_layer: dict[int, str]
    if isinstance(placement.device_map, dict):
        per_layer, embedder = split_device_map(placement.device_map, count, f"{plan.profile_path} placement.device_map")
        reason = "placement.device_map"
    elif plan.layers:
        per_layer = expand_layers(plan.layers)
        reason = "the plan's layer map"
    elif placement.offload != "none":
        per_layer, reason = _fit_by_budget(model, plan, device, placement.offload)
    else:
        per_layer, reason = {}, "nothing to offload"
    stream_cpu = stream_on_cpu()
    offloaded: dict[int, str] = {}
    stages: dict[int, str] = {}
    for index in range(count):
        where = per_layer.get(index, device)
        if where in OFFLOAD_TARGETS and (where != device or stream_cpu):
            offloaded[index] = where
        elif where != device:
            stages[index] = _stage(plan, index, where, device)
    if embedder is not None and embedder not in OFFLOAD_TARGETS and embedder != device:
        raise GemmaProfileError(
            f"profile '{plan.profile}' puts the embedder on {embedder}; it can stay on {device}, cpu or disk",
            where=plan.profile_path,
        )
    if embedder == device or (embedder == "cpu" and device == "cpu"):
        embedder = None
    spans = compress_layers([offloaded.get(index, stages.get(index, device)) for index in range(count)])
    layer_map = ", ".join(f"{span} -> {where}" for span, where in spans.items())
    return Layout(device, offloaded, embedder, placement.offload_folder, reason, layer_map, stages)


def _stage(plan: Plan, index: int, where: str, device: str) -> str:
    """``where``, a second GPU that computes decoder layer ``index`` (a pipeline stage), once it is
    known to be usable beside the execution ``device``."""
    from gemma_profiles.engine.devices import device_problem

    # (the planner's check, for a plan it could not size: the profile's device is not here)
    problem = stage_problem(where, device, plan.placement.tensor_parallel)
    if problem:
        raise GemmaProfileError(
            f"profile '{plan.profile}': {problem}",
            where=f"{plan.profile_path} placement.device_map",
            hint=f"map layers to {device}, another cuda:N, cpu or disk",
        )
    problem = device_problem(where)
    if problem:
        raise GemmaProfileError(
            f"profile '{plan.profile}' computes decoder layer {index} on {where}, but {problem}",
            where=plan.profile_path,
            hint="map the layers to the GPUs this machine has ('nvidia-smi -L'), or offload them: cpu or disk",
        )
    return where


# -- hooks -------------------------------------------------------------------------------


@hookimpl  # the engine's stages run in hookspecs.WEIGHTS_LOADED_STAGES' order
def gemma_profile_weights_loaded(model: Any, plan: Plan) -> None:
    if not plan.offloads:
        return
    from gemma_profiles.engine.devices import device_problem

    device = execution_device(plan)
    problem = device_problem(device)
    if problem:
        logger.warning("[{}] offload not applied: {} ({})", plan.profile, problem, device)
        return
    layout = decide_layout(model, plan, device)
    if not layout.offloaded and layout.embedder is None and plan.placement.offload == "cpu" and device == "cpu":
        logger.info("[{}] offload: cpu on a CPU execution device: the weights are in CPU memory already", plan.profile)
    from gemma_profiles.engine.offload import apply_offload

    apply_offload(model, layout, plan.profile)


@hookimpl
def gemma_profile_resolve_device(requested: Any, plan: Plan, call: str) -> str | None:
    """An offloaded model without ``placement.device`` runs on its execution device (the slots are there)."""
    if plan.device is not None or not plan.offloads:
        return None
    return execution_device(plan)


@contextlib.contextmanager
def streaming_on_cpu() -> Iterator[None]:
    """Stream ``cpu``-offloaded layers on a CPU execution device within the block (tests, benchmarks)."""
    previous = os.environ.get(STREAM_CPU_ENV)
    os.environ[STREAM_CPU_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(STREAM_CPU_ENV, None)
        else:
            os.environ[STREAM_CPU_ENV] = previous
