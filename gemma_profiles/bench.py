"""``gemma-profile bench``: time one profile on a real checkpoint (torch-touching)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from .profile import Profile
from .units import format_bytes


def _host_peak() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            return int(handle.read().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_bench(
    profile: Profile,
    variant: str,
    ckpt: str,
    *,
    tokenizer: str | None = None,
    tokens: int = 32,
    prompt: str = "The capital of France is",
    progress: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """gemma's run.py flow under ``profile``; returns timings and peak memory."""
    import torch
    from gemma import config as gemma_config
    from gemma import model as gemma_model

    from . import runtime

    with runtime.use(profile):
        model_config = gemma_config.get_model_config(variant)
        if tokenizer:
            model_config.tokenizer = tokenizer
        start = time.perf_counter()
        model = gemma_model.GemmaForCausalLM(model_config)
        model.load_weights(ckpt)
        model = model.eval()
        load_s = time.perf_counter() - start
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        steps: list[float] = []

        def before(module: Any, args: Any, kwargs: Any) -> None:
            steps.append(time.perf_counter())

        def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            steps[-1] = time.perf_counter() - steps[-1]
            if progress is not None and len(steps) > 1:
                progress(1)

        handles = [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            model.generate(prompt, device, output_len=tokens, temperature=None)
        finally:
            for handle in handles:
                handle.remove()
    decode = steps[1:] or steps
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, kind = _host_peak() or 0, "peak RSS of this process"
    median = statistics.median(decode)
    return {
        "profile": profile.name,
        "variant": variant,
        "device": str(device),
        "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        "load_s": load_s,
        "prompt_tokens": len(model.tokenizer.encode(prompt)),
        "prefill_s": steps[0] if steps else 0.0,
        "decode_steps": len(decode),
        "s_per_token": median,
        "tokens_per_s": 1.0 / median if median else 0.0,
        "peak_memory": peak,
        "peak_memory_human": format_bytes(peak),
        "peak_memory_kind": kind,
    }
