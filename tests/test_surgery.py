"""What the engine changes in a gemma module shows in its class (`gemma_profiles.engine.surgery`).

Before: ``forward``, ``_save_to_state_dict``, ``_load_from_state_dict`` and ``_apply`` were
bound onto each instance (``types.MethodType``); ``type(module)`` still said ``Linear``.
Now each changed module is an instance of a subclass named for the change (``PackedLinear``,
``Int8Linear``, ``Float16StoredEmbedding``...), gemma's classes untouched, state-dict keys and
formats as gemma's.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gemma_profiles
from gemma_profiles.engine import fused, surgery
from gemma_profiles.errors import GemmaProfileError

#: Methods the engine used to bind onto instances.
METHODS = ("forward", "_save_to_state_dict", "_load_from_state_dict", "_apply")


class Doubled(surgery.Surgery):
    """Doubles the output."""

    prefix = "Doubled"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2  # type: ignore[no-any-return]


def test_a_swap_names_the_change_and_keeps_the_class_and_its_methods() -> None:
    plain_forward = nn.Linear.forward
    first, second = nn.Linear(3, 2), nn.Linear(3, 2)
    x = torch.randn(4, 3)
    expected = first(x) * 2
    surgery.swap(first, Doubled)
    surgery.swap(second, Doubled)
    assert type(first).__name__ == "DoubledLinear" and type(first) is type(second), "one class per (mixin, class)"
    assert isinstance(first, nn.Linear) and isinstance(first, Doubled)
    assert nn.Linear.forward is plain_forward and "forward" not in vars(first), "nothing bound to the instance"
    assert surgery.original_class(first) is nn.Linear
    torch.testing.assert_close(first(x), expected)
    assert first.state_dict().keys() == {"weight", "bias"}
    assert surgery.swap(first, Doubled) is first and type(first).__name__ == "DoubledLinear", "idempotent"
    twin = copy.deepcopy(first)
    assert type(twin) is type(first) and twin.weight is not first.weight
    torch.testing.assert_close(twin(x), expected)
    surgery.restore(first)
    assert type(first) is nn.Linear and surgery.ORIGINAL not in vars(first)
    torch.testing.assert_close(first(x) * 2, expected)


class Negated(surgery.Surgery):
    """Negates the output."""

    prefix = "Negated"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -super().forward(x)  # type: ignore[no-any-return]


def test_unswap_takes_one_change_off_and_keeps_the_others() -> None:
    layer, x = nn.Linear(3, 2), torch.randn(4, 3)
    plain = layer(x)
    surgery.swap(layer, Doubled)
    surgery.swap(layer, Negated)
    assert type(layer).__name__ == "NegatedDoubledLinear"
    torch.testing.assert_close(layer(x), -2 * plain)
    surgery.unswap(layer, Doubled)  # the one below: the class above is made again on the rest
    assert type(layer) is surgery.subclass(nn.Linear, Negated) and surgery.original_class(layer) is nn.Linear
    torch.testing.assert_close(layer(x), -plain)
    surgery.unswap(layer, Doubled)  # not on: nothing
    assert type(layer).__name__ == "NegatedLinear"
    surgery.unswap(layer, Negated)
    assert type(layer) is nn.Linear and surgery.ORIGINAL not in vars(layer)
    torch.testing.assert_close(layer(x), plain)


def test_a_fused_module_falls_back_to_gemmas_forward_not_to_itself(gemma: Any) -> None:
    # float16 is not the kernels' dtype: gemma's forward runs (the native library is not needed)
    norm = gemma.model.RMSNorm(8)
    x = torch.randn(2, 8, dtype=torch.float16)
    norm = norm.half()
    expected = norm(x)
    surgery.swap(norm, fused.FusedNorm)
    assert type(norm).__name__ == "FusedRMSNorm" and fused.is_fused(norm)
    torch.testing.assert_close(norm(x), expected)


# -- the builtins on a model ---------------------------------------------------------------------


def build(gemma: Any, tokenizer: str, dtype: str, quant: bool = False) -> Any:
    from gemma_testing import tiny_config

    config = tiny_config(gemma.config, "2b", tokenizer, dtype=dtype)
    config.quant = quant
    torch.set_default_dtype(config.get_dtype())
    try:
        return gemma.model.GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.fixture
def checkpoint(gemma: Any, tokenizer_path: str, tmp_path: Path) -> str:
    from gemma_testing import write_random_checkpoint

    path = tmp_path / "float.ckpt"
    write_random_checkpoint(build(gemma, tokenizer_path, "float32"), path, torch.float32, seed=3)
    return str(path)


def changed(model: nn.Module) -> dict[str, str]:
    """Module name -> class name, for every module the engine changed."""
    return {name: type(m).__name__ for name, m in model.named_modules() if surgery.ORIGINAL in vars(m)}


@pytest.mark.parametrize(
    ("dtype", "weights", "expected"),
    [
        ("float32", "none", {"PackedLinear", "SamplerPackedEmbedding"}),
        ("bfloat16", "int8", {"Int8Linear", "Int8Embedding"}),
        ("float32", "float16", {"Float16StoredLinear", "Float16StoredEmbedding"}),
    ],
    ids=["kernels", "int8", "float16-storage"],
)
def test_the_builtins_change_classes_not_instances(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: str,
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    dtype: str,
    weights: str,
    expected: set[str],
) -> None:
    from gemma_profiles.engine import kernels, native

    if weights == "none" and kernels.available(torch.float32):
        pytest.skip(str(kernels.available(torch.float32)))
    monkeypatch.setenv(native.ENV, "0")  # the same classes on every CPU (no Native*)
    native.reset()
    plain = build(gemma, tokenizer_path, dtype, quant=weights == "int8")  # gemma's own, for its keys
    text = f"description: t\nplacement: {{device: cpu}}\nconfig: {{dtype: {dtype}}}\n"
    text += f"quantization: {{weights: {weights}}}\n"
    with gemma_profiles.use(str(write_profile(f"surgery-{weights}", text))):
        model = build(gemma, tokenizer_path, dtype)
        model.load_weights(checkpoint)
    try:
        classes = changed(model)
        assert set(classes.values()) == expected, classes
        linears = [n for n, m in model.named_modules() if surgery.original_class(m) is gemma.model.Linear]
        assert linears and all(n in classes for n in linears), "every gemma Linear changed"
        for name in classes:
            module = model.get_submodule(name)
            assert isinstance(module, surgery.original_class(module))
            assert surgery.original_class(module) in (gemma.model.Linear, gemma.model.Embedding)
            assert not [key for key in METHODS if key in vars(module)], f"{name}: a method bound to the instance"
        assert gemma.model.Linear.__name__ == "Linear" and "forward" in vars(gemma.model.Linear)
        # gemma's keys and formats: the plain model loads the profiled model's state dict as it is
        state = model.state_dict()
        assert state.keys() == plain.state_dict().keys()
        plain.load_state_dict(state)
        # a deep copy's layers compute as the original's (oneDNN's packed tensors cannot be copied,
        # as before); pickling whole stays refused in one line
        if weights != "none":
            twin = copy.deepcopy(model)
            assert changed(twin) == classes
            x = torch.randn(3, model.config.hidden_size).to(model.config.get_dtype())
            from gemma_profiles.engine.tied import _HOOK

            assert twin.sampler.__dict__[_HOOK][0] is twin.embedder, "the twin's sampler reads the twin's embedder"
            for name in ("model.layers.0.mlp.gate_proj", "embedder"):
                ours, theirs = model.get_submodule(name), twin.get_submodule(name)
                assert ours is not theirs
                arg = x if name != "embedder" else torch.tensor([1, 2, 3])
                assert torch.equal(ours(arg), theirs(arg)), name
        with pytest.raises(GemmaProfileError, match="on the profile's own kernels"):
            pickle.dumps(model)
    finally:
        native.reset()


def test_a_packed_layer_refuses_to_move_in_one_line(
    gemma: Any, tokenizer_path: str, checkpoint: str, write_profile: Callable[..., Path]
) -> None:
    from gemma_profiles.engine import kernels

    if kernels.available(torch.float32):
        pytest.skip(str(kernels.available(torch.float32)))
    text = "description: t\nplacement: {device: cpu}\nconfig: {dtype: float32}\n"
    with gemma_profiles.use(str(write_profile("surgery-move", text))):
        model = build(gemma, tokenizer_path, "float32")
        model.load_weights(checkpoint)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "PackedLinear"
    with pytest.raises(GemmaProfileError, match="cannot move to float16") as caught:
        layer.half()
    assert "\n" not in str(caught.value) and caught.value.where == "Linear"
    assert layer.float() is layer and layer.weight.is_mkldnn, "a cast that changes nothing passes"
    with pytest.raises(GemmaProfileError, match="this model holds weights packed"):
        model.half()
    assert all(p.dtype == torch.float32 for p in model.parameters()), "refused before anything converted"
