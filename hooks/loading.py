"""Checkpoint loading: check the path and the int8-ness, then gemma's own ``load_weights`` (runs last).

gemma loads with ``load_state_dict(strict=False)``: a float checkpoint copied
into an int8 model (or the reverse) raises nothing and gives garbage.  So the
checkpoint's ``weight_scaler`` tensors are compared with the model's first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from gemma_profiles import hookimpl
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.plan import Plan

INDEX_FILE = "pytorch_model.bin.index.json"
SCALER = "weight_scaler"


def check_checkpoint(path: str) -> None:
    """A missing checkpoint is a user error with a clear message, not a traceback."""
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, INDEX_FILE)):
            raise GemmaProfileError(
                f"checkpoint folder has no {INDEX_FILE}",
                where=path,
                hint="pass the .ckpt file or a sharded checkpoint folder",
            )
        return
    raise GemmaProfileError("checkpoint not found", where=path, hint="check the --ckpt path")


def checkpoint_keys(path: str) -> Iterable[str]:
    """Tensor names in a checkpoint, read without loading tensor data (mmap / index)."""
    if os.path.isdir(path):
        with open(os.path.join(path, INDEX_FILE), encoding="utf-8") as handle:
            return list(json.load(handle).get("weight_map", {}))
    import torch

    state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    return list(state.get("model_state_dict", state))


def check_quantization(model: Any, path: str, plan: Plan) -> None:
    model_int8 = any(name.endswith(SCALER) for name, _ in model.named_parameters())
    try:
        ckpt_int8 = any(name.endswith(SCALER) for name in checkpoint_keys(path))
    except (OSError, RuntimeError, ValueError, AttributeError):
        return  # not a format we can inspect cheaply; gemma's loader will say what is wrong
    if model_int8 and not ckpt_int8:
        raise GemmaProfileError(
            f"profile '{plan.profile}' builds the model with int8 weights, but this checkpoint is not int8 "
            "(it has no weight_scaler tensors); gemma would load garbage",
            where=path,
            hint="use the int8 ('-quant') checkpoint, or a profile/variant with quantization: {weights: none}",
        )
    if ckpt_int8 and not model_int8:
        raise GemmaProfileError(
            f"this checkpoint is int8 (it has weight_scaler tensors) but profile '{plan.profile}' builds a float model",
            where=path,
            hint="use a float checkpoint, or set quantization: {weights: int8} in the profile",
        )


@hookimpl(trylast=True)
def gemma_profile_load_weights(model: Any, path: str, plan: Plan, gemma_loader: Callable[[str], Any]) -> bool:
    check_checkpoint(path)
    check_quantization(model, path, plan)
    gemma_loader(path)
    return True
