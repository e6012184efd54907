"""float16 storage, float32 compute (``quantization: {weights: float16}``; issue 15 item 5), against
real gemma or the stand-in.  The real Gemma 3 270M's figures are in test_real_model.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from gemma_testing import build_tiny_model, cpu_profile
from test_loading import TOKENS, logits

import gemma_profiles
from gemma_profiles.engine import half, surgery
from gemma_profiles.errors import GemmaProfileError


@pytest.fixture
def storage_profile(write_profile: Callable[..., Path]) -> Callable[[str], str]:
    return lambda weights="float16": cpu_profile(write_profile, "float32", weights)


@pytest.fixture
def float_checkpoint(gemma: Any, tokenizer_path: str, tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    from gemma_testing import write_random_checkpoint

    path = tmp_path / "float.ckpt"
    state = write_random_checkpoint(build_tiny_model(gemma, tokenizer_path), path, torch.float32, seed=21)
    return str(path), state


# -- the product ------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("chunk", [None, 100])
def test_half_linear_is_float32s_product_of_the_float16_weight(
    rows: int, chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk is not None:  # several blocks of rows, and a last partial one
        monkeypatch.setitem(half.CHUNK_ELEMENTS, "cpu", chunk * 24)
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(250, 24, generator=generator) * 0.05).half()
    x = torch.randn(2, rows, 24, generator=generator) * 30
    got = half.half_linear(x, weight)
    assert got.dtype == torch.float32 and got.shape == (2, rows, 250)
    want = torch.nn.functional.linear(x.double(), weight.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_half_linear_reuses_one_scratch_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(half.CHUNK_ELEMENTS, "cpu", 4096)
    monkeypatch.setattr(half, "_scratch", {})
    for n, k in ((1000, 64), (64, 1000), (8, 8)):
        half.half_linear(torch.randn(1, k), torch.randn(n, k).half())
    (buffer,) = half._scratch.values()
    assert buffer.numel() <= 4096, "no weight-sized float32 copy"


def test_float16_activations_stay_float16() -> None:
    weight = torch.randn(8, 4).half()
    x = torch.randn(2, 4).half()
    assert torch.equal(half.half_linear(x, weight), torch.nn.functional.linear(x, weight))


def test_a_weight_beyond_float16_is_refused_by_name() -> None:
    weight = torch.ones(4, 4)
    weight[1, 2] = 7e4
    with pytest.raises(GemmaProfileError, match=r"layers\.3\.mlp\.up_proj\.weight has 1 value\(s\) beyond float16"):
        half.to_stored("model.layers.3.mlp.up_proj.weight", weight)


# -- through a model ----------------------------------------------------------------------------


def test_weights_are_stored_in_float16_and_answers_are_float32s(
    gemma: Any, tokenizer_path: str, float_checkpoint: tuple[str, dict[str, torch.Tensor]], storage_profile: Any
) -> None:
    path, state = float_checkpoint
    with gemma_profiles.use(storage_profile("none")):
        dense = build_tiny_model(gemma, tokenizer_path)
        dense.load_weights(path)
        expected = logits(dense, TOKENS)
    with gemma_profiles.use(storage_profile()):
        model = build_tiny_model(gemma, tokenizer_path)
        model.load_weights(path)
        stored = {name: p.dtype for name, p in model.named_parameters()}
        got = logits(model, TOKENS)
        text = model.generate("the cat sees a dog", "cpu", output_len=3, temperature=None)
    assert isinstance(text, str)
    assert model.config.dtype in ("float32", torch.float32)
    linears = [n for n, m in model.named_modules() if surgery.original_class(m).__name__ == "Linear"]
    assert linears and all(stored[f"{n}.weight"] == torch.float16 for n in linears)
    assert stored["embedder.weight"] == torch.float16
    assert {dtype for name, dtype in stored.items() if "norm" in name} == {torch.float32}
    half_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    full_bytes = sum(t.numel() * t.element_size() for t in state.values())  # float32
    assert half_bytes < 0.52 * full_bytes
    # float32 arithmetic on float16-rounded weights: far closer than any 16-bit compute
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))
    assert int(got.argmax()) == int(expected.argmax())
    # the same weights, rounded to float16 and computed in float32 by gemma as it ships: equal
    for name, tensor in state.items():
        if stored.get(name) == torch.float16:
            assert torch.equal(model.get_parameter(name), tensor.half()), name


def test_gemmas_own_loader_path_stores_float16_too(
    gemma: Any, tokenizer_path: str, float_checkpoint: tuple[str, dict[str, torch.Tensor]], storage_profile: Any
) -> None:
    """A model materialised before loading (``.to()`` first) goes through gemma's loader; the
    weights are stored in float16 after it."""
    path, state = float_checkpoint
    with gemma_profiles.use(storage_profile()):
        model = build_tiny_model(gemma, tokenizer_path)
        model.load_state_dict(state, strict=False)  # materialised: load_weights goes to gemma's own loader
        model.load_weights(path)
        assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float16
        assert torch.isfinite(logits(model, TOKENS)).all()


def test_a_checkpoint_beyond_float16_is_one_clear_error(
    gemma: Any,
    tokenizer_path: str,
    float_checkpoint: tuple[str, dict[str, torch.Tensor]],
    storage_profile: Any,
    tmp_path: Path,
) -> None:
    from gemma_profiles.errors import CheckpointError

    _, state = float_checkpoint
    state = dict(state)
    name = "model.layers.1.mlp.gate_proj.weight"
    state[name] = state[name].clone()
    state[name][0, 0] = 1e6
    path = tmp_path / "big.ckpt"
    torch.save({"model_state_dict": state}, path)
    with gemma_profiles.use(storage_profile()):
        model = build_tiny_model(gemma, tokenizer_path)
        with pytest.raises(CheckpointError, match=r"gate_proj\.weight overflows float16 storage: 1 value") as caught:
            model.load_weights(str(path))
    assert "quantization.weights: float16" in str(caught.value.hint)


def test_state_dict_round_trips(
    gemma: Any, tokenizer_path: str, float_checkpoint: tuple[str, dict[str, torch.Tensor]], storage_profile: Any
) -> None:
    path, _ = float_checkpoint
    with gemma_profiles.use(storage_profile()):
        model = build_tiny_model(gemma, tokenizer_path)
        model.load_weights(path)
        before = logits(model, TOKENS)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        assert saved["embedder.weight"].dtype == torch.float16
        model.load_state_dict(saved)
        assert torch.equal(logits(model, TOKENS), before)


def test_without_the_quantization_builtin_weights_stay_float32(
    gemma: Any,
    tokenizer_path: str,
    float_checkpoint: tuple[str, dict[str, torch.Tensor]],
    storage_profile: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The float32 products of float16 weights are the quantization builtin's: while it is blocked,
    float16 weights would meet gemma's plain ``F.linear`` in float32 - so they stay float32."""
    path, _ = float_checkpoint
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "quantization")
    with gemma_profiles.use(storage_profile()):
        model = build_tiny_model(gemma, tokenizer_path)
        model.load_weights(path)
        assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
        assert torch.isfinite(logits(model, TOKENS)).all()
