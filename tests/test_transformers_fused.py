"""transformers' Gemma norms and MLP middles on our fused CPU kernels (`gemma_profiles.engine.fused`; issue 17).

transformers' ``GemmaRMSNorm``/``Gemma2RMSNorm``/``Gemma3RMSNorm`` compute what gemma's ``RMSNorm``
does (``(1 + weight) * x / rms(x)``, in float32) and its ``Gemma2MLP``/``Gemma3MLP`` what gemma's
``GemmaMLP`` does (``down(gelu_tanh(gate(x)) * up(x))``), so under a CPU profile the same native
forwards serve them - checked against transformers' own forward when installed, exactly as for
gemma.  Tiny random Gemma 3 / Gemma 2 / Gemma models written with transformers' config classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")

import torch  # noqa: E402

import gemma_profiles  # noqa: E402
from gemma_profiles.engine import fused, surgery  # noqa: E402
from gemma_profiles.plugin import manager  # noqa: E402

PROMPT = [[2, 17, 33, 101, 7, 250, 61, 5]]
TEXT = [[(3 + i) % 509 for i in range(40)]]
KINDS = {"gemma3": 2 * 6 + 1, "gemma2": 2 * 4 + 1, "gemma": 2 * 2 + 1}  # norms: per layer x layers + final


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gemma_testing import tiny_hf_model

    root = tmp_path_factory.mktemp("hf-fused")
    for kind in KINDS:
        tiny_hf_model(kind).save_pretrained(root / kind)
    return {kind: root / kind for kind in KINDS}


def load(folder: Path, profile: str) -> Any:
    with gemma_profiles.use(profile):
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def answers(model: Any) -> tuple[torch.Tensor, list[int]]:
    with torch.no_grad():
        logits = model(torch.tensor(TEXT)).logits[0]
        tokens = model.generate(torch.tensor(PROMPT), max_new_tokens=10, do_sample=False)[0, len(PROMPT[0]) :]
    return logits, tokens.tolist()


def fused_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        if fused.is_fused(module):
            name = surgery.original_class(module).__name__
            kind = "norms" if name.endswith("RMSNorm") else "MLPs"
            counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.mark.parametrize("profile", ["cpu-32gb", "cpu-8gb"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_cpu_profiles_fuse_transformers_norms_and_mlps_with_the_same_answers(
    kind: str, profile: str, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, log_messages: list[str]
) -> None:
    if fused.unavailable():
        pytest.skip(f"fused kernels: {fused.unavailable()}")
    model = load(models[kind], profile)
    assert fused_counts(model) == {"norms": KINDS[kind], "MLPs": 2}
    assert any(f"fused CPU layers: {KINDS[kind]} norms, 2 MLPs" in m for m in log_messages)
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "fused")
    manager.reset_plugin_manager()  # (the block is read when the manager is made)
    plain = load(models[kind], profile)
    assert fused_counts(plain) == {}
    (logits, tokens), (want_logits, want_tokens) = answers(model), answers(plain)
    assert tokens == want_tokens
    # The same float32 arithmetic in another order (the norm's sum of squares): within rounding.
    torch.testing.assert_close(logits, want_logits, atol=2e-4, rtol=1e-4)


def test_a_norm_that_computes_otherwise_keeps_transformers_forward(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, log_messages: list[str]
) -> None:
    if fused.unavailable():
        pytest.skip(f"fused kernels: {fused.unavailable()}")
    from transformers.models.gemma3 import modeling_gemma3

    original = modeling_gemma3.Gemma3RMSNorm.forward

    def scaled_twice(self: Any, x: torch.Tensor) -> torch.Tensor:  # a transformers whose norm changed
        return original(self, x) * 2

    monkeypatch.setattr(modeling_gemma3.Gemma3RMSNorm, "forward", scaled_twice)
    model = load(models["gemma3"], "cpu-32gb")
    assert fused_counts(model) == {"MLPs": 2}
    assert any("own norms forward kept: differs from" in m for m in log_messages)
