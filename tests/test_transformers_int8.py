"""transformers' int8 layers on our native int8 kernel (hooks/transformers.py ``quantize``; issues 15, 17).

Under cpu-8gb (int8 weights, float32 compute) the plain linear layers of a transformers Gemma are
quantized with a scale per 64 columns where the kernel's AVX2 path runs (one per row on the VNNI
path) and computed by the kernel; the tied embedder is one packed int8 weight with row and column
scales, shared by the lookup and the output projection.  Where the kernel does not run (no kernel,
float16 compute), today's torch path stays: per-row scales, ``Int8Linear``.

In process (``gemma_profiles.use``), on tiny random Gemma 3 / Gemma 2 models written with
transformers' own config classes; the unmodified-script runs are in test_transformers.py.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")

import torch  # noqa: E402
from gemma_profiles.hooks import transformers as hook  # noqa: E402

import gemma_profiles  # noqa: E402
from gemma_profiles.engine import native, quantization  # noqa: E402
from gemma_profiles.errors import GemmaProfileError  # noqa: E402

PROMPT = [[2, 17, 33, 101, 7, 250, 61, 5]]
#: Teacher-forced text: 120 tokens, below the rows from which the kernel dequantizes (`DEQUANTIZE_ROWS_AVX2`: 128).
TEXT = [[(3 + i) % 509 for i in range(120)]]
STRENGTH = 16
LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down); the tied lm_head is the embedder's


def _tiny(kind: str, folder: Path, **overrides: Any) -> Path:
    from gemma_testing import tiny_hf_model

    model = tiny_hf_model(kind, **overrides)
    with torch.no_grad():
        # Layers that outweigh the embedding in the residual stream: otherwise a random model with a tied
        # embedder predicts its input token again (half the positions, and greedy text repeats one token).
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(STRENGTH)
            layer.mlp.down_proj.weight.mul_(STRENGTH)
            for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):  # Gemma 2/3 norm those
                if kind != "gemma":
                    getattr(layer, norm).weight.fill_(STRENGTH)  # (gemma's norms scale by 1 + weight)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-int8")
    return {kind: _tiny(kind, root / kind) for kind in ("gemma3", "gemma2")}


def load(folder: Path, profile: str | None = "cpu-8gb", **kwargs: Any) -> Any:
    if profile is None:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    with gemma_profiles.use(profile):
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def answers(model: Any) -> tuple[torch.Tensor, list[int]]:
    """Teacher-forced logits over `TEXT` (float64) and 12 greedy tokens after `PROMPT`."""
    with torch.no_grad():
        logits = model(torch.tensor(TEXT)).logits[0].double()
        tokens = model.generate(torch.tensor(PROMPT), max_new_tokens=12, do_sample=False)[0, len(PROMPT[0]) :]
    return logits, tokens.tolist()


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference || other) over positions."""
    p, q = torch.log_softmax(reference, -1), torch.log_softmax(other, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def top1(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.argmax(-1) == other.argmax(-1)).double().mean())


@pytest.fixture(scope="module")
def float32(models: dict[str, Path]) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """transformers as it is, float32, no profile."""
    return {kind: answers(load(path, None, dtype=torch.float32)) for kind, path in models.items()}


def _native_or_skip() -> str:
    native.reset()
    path = native.int8_path()
    if path is None:
        pytest.skip(f"native int8 kernel: {native.unavailable()}")
    return path


def _classes(model: Any) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def _layers(model: Any, kind: str) -> list[Any]:
    """The model's plain linear layers of class ``kind`` (``NativeInt8Linear``, ``Int8Linear``, ``Linear``)."""
    return [m for m in model.modules() if type(m).__name__ == kind and m is not model.get_output_embeddings()]


def _logged(messages: list[str], text: str) -> bool:
    return any(text in message for message in messages)


# -- on the native kernel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_cpu_8gb_computes_transformers_linears_on_the_native_kernel(
    kind: str, models: dict[str, Path], float32: dict[str, Any], log_messages: list[str]
) -> None:
    path = _native_or_skip()
    model = load(models[kind])
    assert model.dtype == torch.float32  # cpu-8gb computes in float32
    assert len(_layers(model, "NativeInt8Linear")) == LINEARS
    embedder, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedder, quantization.NativeInt8Lookup) and isinstance(head, quantization.NativeInt8)
    shared = embedder.__dict__["_gemma_profile_int8"]
    assert head.__dict__["_gemma_profile_int8"] is shared  # one int8 weight for the lookup and lm_head
    assert len(quantization.native_weights(model)) == LINEARS + 1
    grouped = path == "avx2"  # the VNNI path sums whole rows: one scale per row there
    assert {packed.group for packed in quantization.native_weights(model) if packed is not shared} == {
        64 if grouped else 0
    }
    scales = "a scale per 64 columns" if grouped else "a scale per row"
    assert _logged(
        log_messages,
        f"linear layers: {LINEARS} on the native int8 kernel ({path}, {scales}), computed in float32",
    ), log_messages
    assert _logged(
        log_messages, f"the tied embedder: int8 with row and column scales on the native int8 kernel ({path})"
    )
    logits, tokens = answers(model)
    reference, reference_tokens = float32[kind]
    # measured on the AVX2 box (groups of 64): KL 5.3e-4 / 6.2e-4 and top-1 96 % / 93 % (gemma3 / gemma2);
    # torch's per-row path: 5.7e-4 / 6.4e-4, 96 % / 96 %
    assert kl(reference, logits) <= 1e-3
    assert top1(reference, logits) >= 0.9
    if grouped:
        assert tokens == reference_tokens  # (measured: all 12 the same; per row, gemma2's differ from the 2nd)
    else:
        assert tokens[:1] == reference_tokens[:1]


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_groups_of_64_are_closer_to_float32_than_one_scale_per_row(
    kind: str, models: dict[str, Path], float32: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of the groups (issue 15): the same model on the AVX2 path against torch's per-row path."""
    if _native_or_skip() != "avx2":
        pytest.skip("scales per group of columns are the AVX2 path's")
    grouped = kl(float32[kind][0], answers(load(models[kind]))[0])
    monkeypatch.setenv(native.ENV, "0")
    native.reset()
    try:
        per_row = kl(float32[kind][0], answers(load(models[kind]))[0])
    finally:
        monkeypatch.delenv(native.ENV)
        native.reset()
    assert grouped < per_row  # measured: 5.3e-4 < 5.7e-4, 6.2e-4 < 6.4e-4


def test_no_weight_is_dequantized_per_call(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding reads the packed int8 weights: no float copy of a weight (torch's float32 path copied each
    weight into a scratch buffer on every call, the tied 262144 x 640 lm_head of the real 270M too)."""
    _native_or_skip()
    model = load(models["gemma3"])
    monkeypatch.setattr(quantization, "_scratch", {})

    def refuse(self: Any, dtype: Any) -> Any:
        raise AssertionError(f"dequantized {self.shape} in a decode step")

    monkeypatch.setattr(native.Int8Weight, "dequantize", refuse)
    with torch.no_grad():
        model.generate(torch.tensor(PROMPT), max_new_tokens=4, do_sample=False)
    assert quantization._scratch == {}


def test_bfloat16_compute_runs_on_the_kernel_too(
    models: dict[str, Path], float32: dict[str, Any], write_profile: Any, log_messages: list[str]
) -> None:
    path = _native_or_skip()
    profile = write_profile("cpu-8gb-bf16", "extends: cpu-8gb\ndescription: x\nconfig: {dtype: bfloat16}\n")
    model = load(models["gemma3"], str(profile))
    assert model.dtype == torch.bfloat16
    assert len(_layers(model, "NativeInt8Linear")) == LINEARS
    assert _logged(log_messages, f"{LINEARS} on the native int8 kernel ({path}")
    assert _logged(log_messages, "computed in bfloat16")
    logits, _ = answers(model)
    assert kl(float32["gemma3"][0], logits) <= 1.5e-3  # measured 6.8e-4 (torch's _weight_int8pack_mm: 7.6e-4)


def test_a_width_the_groups_do_not_fit_keeps_one_scale_per_row(
    tmp_path: Path, log_messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """hidden 96: the layers reading it (q, k, v, gate, up) get a scale per row on the kernel, o and down
    (64 and 128 wide) groups of 64."""
    if _native_or_skip() != "avx2":
        pytest.skip("scales per group of columns are the AVX2 path's")
    folder = _tiny("gemma3", tmp_path / "wide", hidden_size=96)
    reference, tokens = answers(load(folder, None, dtype=torch.float32))
    model = load(folder)
    groups = sorted(packed.group for packed in quantization.native_weights(model))
    assert groups == [0] * 11 + [64] * 4  # and the embedder, per row with column scales
    assert _logged(log_messages, "10 on the native int8 kernel (avx2, a scale per row); 4 on the native int8 kernel")
    logits, greedy = answers(model)
    assert kl(reference, logits) <= 1e-3  # measured 6.7e-4
    assert greedy == tokens


def test_state_dict_is_gemmas_per_row_int8(models: dict[str, Path]) -> None:
    """``state_dict()`` unpacks the kernel's layout into per-row int8 (the groups and the embedder's column
    scales folded in): weight x scale is the float32 weight to within the rounding."""
    _native_or_skip()
    original = load(models["gemma3"], None, dtype=torch.float32).state_dict()
    state = load(models["gemma3"]).state_dict()
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.embed_tokens"):
        weight, scaler = state[f"{name}.weight"], state[f"{name}.weight_scaler"]
        assert weight.dtype == torch.int8 and weight.shape == original[f"{name}.weight"].shape
        dense = weight.float() * scaler.float().unsqueeze(1)
        error = (dense - original[f"{name}.weight"]).abs().amax(dim=1)
        row_max = original[f"{name}.weight"].abs().amax(dim=1)
        assert bool((error <= row_max / 127 * 1.5).all()), name  # half a step, twice rounded (+ columns)


def test_a_move_off_the_cpu_is_one_line(models: dict[str, Path]) -> None:
    _native_or_skip()
    model = load(models["gemma3"])
    with pytest.raises(GemmaProfileError, match="holds weights packed for the CPU kernels; they cannot move to meta"):
        model.to("meta")


# -- where the kernel does not serve: today's path ----------------------------------------------------------


def test_without_the_kernel_torchs_per_row_path(
    models: dict[str, Path], float32: dict[str, Any], monkeypatch: pytest.MonkeyPatch, log_messages: list[str]
) -> None:
    monkeypatch.setenv(native.ENV, "0")
    native.reset()
    try:
        model = load(models["gemma3"])
    finally:
        monkeypatch.delenv(native.ENV)
        native.reset()
    assert len(_layers(model, "Int8Linear")) == LINEARS and not quantization.native_weights(model)
    assert type(model.get_input_embeddings()).__name__ == "Int8Gemma3TextScaledWordEmbedding"
    assert _logged(log_messages, "int8: not on the native int8 kernel: turned off (GEMMA_PROFILE_NATIVE=0)")
    assert _logged(log_messages, f"{LINEARS} on a scratch-buffer matmul (a scale per row), computed in float32")
    assert kl(float32["gemma3"][0], answers(model)[0]) <= 1e-3  # measured 5.7e-4


def test_float16_compute_keeps_torchs_path(tmp_path: Path, log_messages: list[str]) -> None:
    """Gemma (1) may compute in float16; the kernel takes float32 or bfloat16 only."""
    folder = _tiny("gemma", tmp_path / "gemma")
    model = load(folder, None, dtype=torch.float16)
    reference = load(folder, None, dtype=torch.float32)
    hook.quantize(model, types.SimpleNamespace(profile="f16"), torch.float16)  # type: ignore[arg-type]
    assert len(_layers(model, "Int8Linear")) == LINEARS and not quantization.native_weights(model)
    assert _logged(log_messages, "not on the native int8 kernel")
    assert _logged(log_messages, "computed in float16")
    with torch.no_grad():
        text = torch.tensor(TEXT)
        assert kl(reference(text).logits[0].double(), model(text).logits[0].double()) <= 5e-3  # measured 2.4e-3


def test_a_linear_with_a_bias_stays_as_it_is(tmp_path: Path, log_messages: list[str]) -> None:
    _native_or_skip()
    folder = _tiny("gemma3", tmp_path / "bias", attention_bias=True)
    model = load(folder)
    attention = _layers(model, "Linear")
    assert len(attention) == 8 and all(m.bias is not None and m.weight.dtype == torch.float32 for m in attention)
    assert len(_layers(model, "NativeInt8Linear")) == 6  # the MLPs'
    assert _logged(log_messages, "linear layers: 6 on the native int8 kernel")


def test_on_cuda_int8_is_not_done(models: dict[str, Path], log_messages: list[str]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = load(models["gemma3"], device_map="cuda")
    assert not quantization.native_weights(model) and not _layers(model, "Int8Linear")
    assert _logged(log_messages, "int8 weights: not done for transformers' models on cuda")
