"""Helpers for tests that build tiny Gemma models (not a test module)."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import sentencepiece
import torch
from torch import nn

_CORPUS_WORDS = (
    "the a an one two three red blue green small large quick slow cat dog "
    "bird fish tree house river hill road city model token layer weight "
    "cache train runs sees makes takes gives finds reads writes sleeps "
    "jumps and or but with from into over under near far today again never "
    "always very quite"
)
_WORDS = _CORPUS_WORDS.split()

TOKENIZER_VOCAB_SIZE = 128


def train_tiny_tokenizer(directory: str | os.PathLike[str]) -> str:
    """Trains a tiny (128-piece) SentencePiece BPE model; returns its path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(0)
    corpus = os.path.join(directory, "tiny_corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(400):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
            f.write(" ".join(words).capitalize() + ".\n")
    prefix = os.path.join(directory, "tiny_tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        vocab_size=TOKENIZER_VOCAB_SIZE,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        input_sentence_size=400,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return prefix + ".model"


def _period(items: Sequence[Any]) -> list[Any]:
    """Returns the shortest prefix whose repetition gives ``items``."""
    n = len(items)
    for p in range(1, n + 1):
        if n % p == 0 and list(items[:p]) * (n // p) == list(items):
            return list(items[:p])
    return list(items)


def cpu_flags() -> set[str]:
    """The CPU's Linux ``/proc/cpuinfo`` flags (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def tiny_hf_model(kind: str, **overrides: Any) -> Any:
    """A tiny random transformers Gemma (``kind``: ``gemma3``, ``gemma2`` or ``gemma``), written with
    transformers' own config classes (no download): 2 layers of 64, vocabulary 512, seeded."""
    import transformers

    torch.manual_seed(0)
    shape: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=32,
        initializer_range=0.2,  # logits far enough apart that a top-1 means something
    )
    shape.update(overrides)
    if kind == "gemma3":
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(num_key_value_heads=1, **shape))
    if kind == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(num_key_value_heads=2, **shape))
    shape.pop("sliding_window")
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(num_key_value_heads=1, **shape))


def tiny_config(
    gemma_config_module: ModuleType,
    variant: str = "2b",
    tokenizer_path: str | None = None,
    dtype: str | None = None,
) -> Any:
    """Shrinks ``get_model_config(variant)`` to a model of a few thousand weights.

    The architecture and feature flags (softcapping, qk norm, extra norms, rope
    settings, quant) are kept. ``attn_types`` is cut to its repeating pattern and
    the layer count set to its length (2 for Gemma 2, 6 for Gemma 3), or 2 when
    there is no pattern. ``dtype`` overrides the config's dtype when given.
    """
    config = gemma_config_module.get_model_config(variant)
    vocab_size = TOKENIZER_VOCAB_SIZE
    if tokenizer_path is not None:
        vocab_size = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path).vocab_size()

    num_heads = 4
    if config.num_key_value_heads == config.num_attention_heads:
        num_kv_heads = num_heads  # multi-head attention stays multi-head
    elif config.num_key_value_heads == 1:
        num_kv_heads = 1  # multi-query attention stays multi-query
    else:
        num_kv_heads = 2  # grouped-query attention
    changes: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": 16,
        "max_position_embeddings": 64,
        "tokenizer": tokenizer_path,
    }
    if config.attn_types:
        pattern = _period(config.attn_types)
        changes["attn_types"] = pattern
        changes["num_hidden_layers"] = len(pattern)
    if config.sliding_window_size is not None:
        changes["sliding_window_size"] = min(config.sliding_window_size, 8)
    if config.query_pre_attn_scalar is not None:
        changes["query_pre_attn_scalar"] = 16
    if dtype is not None:
        changes["dtype"] = dtype
    return dataclasses.replace(config, **changes)


def build_tiny_model(
    gemma: Any, tokenizer_path: str | None, variant: str = "2b", dtype: str | None = "float32", **changes: Any
) -> Any:
    """gemma's construction step as ``scripts/run.py`` does it, on `tiny_config`: the config's
    dtype ``dtype`` (run.py forces float32; None keeps gemma's default for the variant), built
    with torch's default dtype float32 (restored after); ``changes`` overrides config fields
    (``hidden_size=...``, ``quant=False``).

    Built while a profile is active, the profile applies, as it would to run.py's model.
    """
    config = tiny_config(gemma.config, variant, tokenizer_path, dtype=dtype)
    if changes:
        config = dataclasses.replace(config, **changes)
    return construct(gemma, config)


def greedy(model: Any, device: str, prompt: str, tokens: int) -> tuple[str, list[torch.Tensor]]:
    """gemma's ``generate`` without sampling, and the logits of each step (float32, on the CPU)."""
    logits: list[torch.Tensor] = []
    handle = model.sampler.register_forward_hook(lambda m, a, out: logits.append(out[1].float().cpu()))
    try:
        text = model.generate(prompt, device, output_len=tokens, temperature=None)
    finally:
        handle.remove()
    return text, logits


def construct(gemma: Any, config: Any) -> Any:
    """``GemmaForCausalLM(config)`` with torch's default dtype float32 (restored after), as
    ``scripts/run.py`` builds it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return gemma.model.GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def cpu_profile(write_profile: Any, dtype: str, weights: str = "none") -> str:
    """Writes (with conftest's ``write_profile``) a profile for the CPU with ``config.dtype``
    ``dtype`` and ``quantization.weights`` ``weights``; returns its path."""
    text = (
        f"description: t\nplacement: {{device: cpu}}\nconfig: {{dtype: {dtype}}}\n"
        f"quantization: {{weights: {weights}}}\n"
    )
    return str(write_profile(f"cpu-{dtype}-{weights}", text))


def tiny_bench_profile(gemma: Any, write_profile: Any, tokenizer_path: str, ckpt: str | os.PathLike[str]) -> Any:
    """A profile "tiny-bench" that shrinks gemma's 2b by its own ``config:`` (any GemmaConfig field;
    `tiny_config`'s sizes, bfloat16 on the CPU), and a random float32 checkpoint for the model it
    builds written to ``ckpt``; returns the profile's path."""
    import gemma_profiles

    profile = write_profile(
        "tiny-bench",
        f"""
        description: 2b shrunk to a few thousand weights, bfloat16 on the CPU
        placement: {{device: cpu}}
        config: {{dtype: bfloat16, vocab_size: 128, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                  num_attention_heads: 4, num_key_value_heads: 1, head_dim: 16, max_position_embeddings: 64,
                  tokenizer: {tokenizer_path}}}
        """,
    )
    with gemma_profiles.use(str(profile)):
        model = gemma.model.GemmaForCausalLM(gemma.config.get_model_config("2b"))
        shapes = {n: p.shape for n, p in model.named_parameters()}
    write_random_checkpoint(shapes, ckpt, torch.float32)
    return profile


def _random_tensor(
    name: str,
    shape: Sequence[int],
    is_int8: bool,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> torch.Tensor:
    if is_int8:
        return torch.randint(-127, 128, tuple(shape), generator=generator, dtype=torch.int8)
    if name.endswith("weight_scaler"):
        # int8 values have std ~73; scale them to a weight std of ~0.02.
        scaler = 0.02 / 73 * (1 + 0.1 * torch.rand(tuple(shape), generator=generator))
        return scaler.to(dtype)
    return (torch.randn(tuple(shape), generator=generator) * 0.02).to(dtype)


def write_random_checkpoint(
    model_or_state_dict_shapes: nn.Module | Mapping[str, torch.Tensor | Sequence[int]],
    path: str | os.PathLike[str],
    dtype: torch.dtype,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Writes ``{'model_state_dict': ...}`` with random weights; returns the dict.

    Takes a constructed model (its parameters, not buffers) or a mapping from
    name to tensor or shape. Floating weights are normal(0, 0.02) in ``dtype``
    (norm weights too, so norms stay close to 1 + 0); int8 weights (quant) get
    random int8 values and their ``weight_scaler`` a small positive scale.
    Deterministic for a given seed.
    """
    if isinstance(model_or_state_dict_shapes, nn.Module):
        entries: dict[str, tuple[tuple[int, ...], bool]] = {
            name: (tuple(p.shape), p.dtype == torch.int8) for name, p in model_or_state_dict_shapes.named_parameters()
        }
    else:
        entries = {}
        names = set(model_or_state_dict_shapes)
        for name, value in model_or_state_dict_shapes.items():
            if isinstance(value, torch.Tensor):
                entries[name] = (tuple(value.shape), value.dtype == torch.int8)
            else:
                is_int8 = name.endswith("weight") and name + "_scaler" in names
                entries[name] = (tuple(value), is_int8)

    generator = torch.Generator().manual_seed(seed)
    state_dict = {
        name: _random_tensor(name, shape, is_int8, dtype, generator) for name, (shape, is_int8) in entries.items()
    }
    torch.save({"model_state_dict": state_dict}, os.fspath(path))
    return state_dict


def write_medium_checkpoint(gemma: Any, tokenizer_path: str, path: str | os.PathLike[str], layers: int) -> Any:
    """gemma's 2b with 1024-wide layers (MLP weights of 4 Mi elements: past a 2 MiB huge page
    even in int8), ``layers`` of them; writes a random float32 checkpoint of it to ``path`` and
    returns its config (float32 compute)."""
    config = tiny_config(gemma.config, "2b", tokenizer_path, dtype="float32")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 1024, 4096, layers
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 1, 128
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in gemma.model.GemmaForCausalLM(config).named_parameters()}
    write_random_checkpoint(shapes, path, torch.float32)
    return config
