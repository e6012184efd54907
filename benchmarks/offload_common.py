"""Shared pieces of the offload benchmarks (offload_cpu.py, offload_gpu.py): model, checkpoint, timing, RSS.

The model is gemma's 2b at its real widths (hidden 2048, MLP 16384, 8 heads, one KV
head of 256) with fewer layers and the tests' 128-piece tokenizer, so the decoder
layers are the weights (105 Mi parameters each) and the sampler costs nothing.
Weights are random (a written checkpoint): only speed and memory are measured, and
greedy tokens are compared with the plain model's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "the cat sees the dog"


def tokenizer(folder: Path) -> str:
    from gemma_testing import train_tiny_tokenizer

    return train_tiny_tokenizer(folder)


def model_config(tokenizer_path: str, layers: int, dtype: str, variant: str = "2b", vocab: int | None = None) -> Any:
    """gemma's ``variant`` config at its real widths, ``layers`` layers, the tiny tokenizer's vocabulary.

    :param vocab: embedder rows; default the tokenizer's 128 pieces (then the layers are the weights).
    """
    import sentencepiece
    from gemma import config as gemma_config

    config = gemma_config.get_model_config(variant)
    if vocab is None:
        vocab = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path).vocab_size()
    return dataclasses.replace(
        config,
        num_hidden_layers=layers,
        vocab_size=vocab,
        tokenizer=tokenizer_path,
        dtype=dtype,
        quant=False,
        max_position_embeddings=min(config.max_position_embeddings, 512),
    )


def build(config: Any) -> Any:
    """gemma's construction step: parameters in the config's dtype."""
    import torch
    from gemma import model as gemma_model

    previous = torch.get_default_dtype()
    torch.set_default_dtype(config.get_dtype())
    try:
        return gemma_model.GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def write_checkpoint(config: Any, path: Path) -> int:
    """A random checkpoint in the config's dtype; returns the weights' size in bytes."""
    import torch
    from gemma import model as gemma_model
    from gemma_testing import write_random_checkpoint

    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in gemma_model.GemmaForCausalLM(config).named_parameters()}
    state = write_random_checkpoint(shapes, str(path), config.get_dtype(), seed=0)
    return sum(t.numel() * t.element_size() for t in state.values())


def layer_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


def profile_yaml(name: str, dtype: str, placement: str) -> str:
    return f"name: {name}\ndescription: offload benchmark\nconfig: {{dtype: {dtype}}}\nplacement: {placement}\n"


# -- measuring ------------------------------------------------------------------------------


def status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux), or 0."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass


def timed_generate(
    model: Any, device: str, tokens: int, runs: int, synchronize: Callable[[], None] = lambda: None
) -> tuple[list[float], str]:
    """One warm-up, then ``runs`` timed ``generate`` calls of ``tokens`` greedy tokens each."""
    text = model.generate(PROMPT, device, output_len=2, temperature=None)
    seconds = []
    for _ in range(runs):
        synchronize()
        start = time.perf_counter()
        text = model.generate(PROMPT, device, output_len=tokens, temperature=None)
        synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds, str(text)


def tokens_per_second(seconds: Sequence[float], tokens: int) -> float:
    return tokens / statistics.median(seconds)


def run_worker(
    script: Path, args: Sequence[str], env: dict[str, str] | None = None, timeout: int = 900
) -> dict[str, Any]:
    """Run ``script --worker ...`` in a fresh process; its last stdout line is JSON."""
    try:
        completed = subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if completed.returncode != 0:
        return {"error": (completed.stderr.strip().splitlines() or ["?"])[-1], "stderr": completed.stderr[-3000:]}
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"
