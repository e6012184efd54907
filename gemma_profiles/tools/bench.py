"""``gemma-profile bench``: time one profile on a real checkpoint (torch-touching)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemma_profiles.errors import GemmaProfileError, printable
from gemma_profiles.spec.profile import Profile
from gemma_profiles.spec.variants import family_of_architecture, identify_variant
from gemma_profiles.units import format_bytes


def _host_peak() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            return int(handle.read().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_bench(
    profile: Profile,
    variant: str | None,
    ckpt: str | None,
    *,
    tokenizer: str | None = None,
    tokens: int = 32,
    prompt: str = "The capital of France is",
    progress: Callable[[int], Any] | None = None,
    model_dir: str | None = None,
) -> dict[str, Any]:
    """gemma's run.py flow under ``profile``; returns timings and peak memory.

    :param variant: gemma's variant (``get_model_config``) with ``ckpt``; or None with ``model_dir``.
    :param model_dir: a ``gemma-profile import`` folder: its config.json, model.ckpt and tokenizer.
    :param progress: called with 1 after each decode step (the first call comes after loading
        and the prompt, so a progress display never shares a line with the loading's log lines).
    :raises GemmaProfileError: a checkpoint or tokenizer that is not there, before anything is built.
    """
    import torch
    from gemma import config as gemma_config
    from gemma import model as gemma_model

    from gemma_profiles.runtime import session

    if model_dir is not None:
        from gemma_profiles.tools.gguf_import import CHECKPOINT, load_config

        model_config = load_config(model_dir)
        ckpt = str(Path(model_dir) / CHECKPOINT)
        variant = identify_variant(model_config)
        if not Path(ckpt).is_file():
            raise GemmaProfileError(
                f"no {CHECKPOINT} in this folder", where=model_dir, hint="run 'gemma-profile import GGUF DIR' again"
            )
    else:
        if variant is None or ckpt is None:
            raise GemmaProfileError("bench needs --variant and --ckpt, or an imported folder (bench NAME DIR)")
        model_config = gemma_config.get_model_config(variant)  # the loader says when ckpt is not there
    if tokenizer:
        model_config.tokenizer = tokenizer
    _check_tokenizer(profile, variant, model_config, tokenizer, model_dir)
    with session.use(profile):
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
        "model_dir": model_dir,
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


def _check_tokenizer(
    profile: Profile, variant: str | None, model_config: Any, given: str | None, model_dir: str | None
) -> None:
    """The tokenizer the model will be built with is a file here; else one line naming ``--tokenizer``.

    gemma's configs name ``tokenizer/tokenizer.model`` relative to the working directory; a
    profile's ``config.tokenizer`` replaces it (and ``--tokenizer``) at construction.
    """
    family = family_of_architecture(getattr(model_config, "architecture", None))
    from_profile = profile.resolve(variant, family).model.config.tokenizer
    path = from_profile or getattr(model_config, "tokenizer", None)
    if not isinstance(path, str) or os.path.isfile(path):
        return
    if from_profile:
        origin = profile.origin("config", "tokenizer")
        where = f"config.tokenizer of profile '{profile.name}'" + (f" ({origin})" if origin else "")
        hint = "point config.tokenizer in the profile at your tokenizer.model"
    elif given:
        where, hint = "--tokenizer", "pass --tokenizer PATH/tokenizer.model"
    elif model_dir is not None:
        where, hint = f"{model_dir}/config.json", "run 'gemma-profile import GGUF DIR' again, or pass --tokenizer"
    else:
        where = f"gemma's default for {variant}, relative to {os.getcwd()}"
        hint = "pass --tokenizer PATH/tokenizer.model (it comes with the checkpoint)"
    raise GemmaProfileError(f"tokenizer file not found: {printable(path)} ({where})", hint=hint)
