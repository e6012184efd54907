"""Checkpoint loading: checks the path, then gemma's own ``load_weights`` (runs last)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from gemma_profiles import hookimpl
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.plan import Plan

INDEX_FILE = "pytorch_model.bin.index.json"


def check_checkpoint(path: str) -> None:
    """A missing checkpoint is a user error with a clear message, not a traceback."""
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, INDEX_FILE)):
            raise GemmaProfileError(
                f"checkpoint folder has no {INDEX_FILE}", where=path, hint="pass the .ckpt file or a sharded checkpoint folder"
            )
        return
    raise GemmaProfileError("checkpoint not found", where=path, hint="check the --ckpt path")


@hookimpl(trylast=True)
def gemma_profile_load_weights(model: Any, path: str, plan: Plan, gemma_loader: Callable[[str], Any]) -> bool:
    check_checkpoint(path)
    gemma_loader(path)
    return True
