"""A model built under a profile keeps that profile's plan for its whole life.

The README's snippet builds the model inside ``with gemma_profiles.use(...)``; what the
script does with it after the block (``load_weights``, ``to``, ``generate``), or under
another profile, follows the model's own plan.  A model built without a profile stays
gemma's own, whatever is active later.  Runs against gemma_pytorch or the stand-in.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma_profiles
from gemma_profiles.errors import GemmaProfileError, PatchError
from gemma_profiles.runtime.patch import plan_of

pytestmark = pytest.mark.integration

PROMPT = "the cat sees"


def build(gemma: Any, tokenizer: str) -> Any:
    """run.py's construction step on a tiny 2b config (float32, no quant in the script's config)."""
    from gemma_testing import tiny_config

    config = tiny_config(gemma.config, "2b", tokenizer)
    config.dtype = "float32"
    config.quant = False
    previous = torch.get_default_dtype()
    torch.set_default_dtype(config.get_dtype())
    try:
        return gemma.model.GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def answer(model: Any) -> str:
    text = model.generate(PROMPT, "cpu", output_len=4, temperature=None)
    assert isinstance(text, str)
    return text


def dtypes(model: Any) -> set[torch.dtype]:
    """The weights' dtypes as saved (an int8 weight on the native kernel is a buffer in its layout;
    ``state_dict()`` gives it back in gemma's format)."""
    return {t.dtype for t in model.state_dict().values() if t.is_floating_point() or t.dtype == torch.int8}


@pytest.fixture
def checkpoint(gemma: Any, tokenizer_path: str, tmp_path: Path) -> Iterator[str]:
    from gemma_testing import write_random_checkpoint

    path = tmp_path / "tiny-2b.ckpt"
    write_random_checkpoint(build(gemma, tokenizer_path), str(path), torch.float32, seed=1)
    yield str(path)


@pytest.fixture
def inside(gemma: Any, tokenizer_path: str, checkpoint: str) -> tuple[str, set[torch.dtype]]:
    """cpu-8gb (int8 weights, float32 compute) with every step inside the block."""
    with gemma_profiles.use("cpu-8gb"):
        model = build(gemma, tokenizer_path)
        model.load_weights(checkpoint)
        return answer(model), dtypes(model)


def test_build_inside_the_block_load_and_generate_after_it(
    gemma: Any, tokenizer_path: str, checkpoint: str, inside: tuple[str, set[torch.dtype]]
) -> None:
    # Before: the config said quant=True but gemma's own loader filled the model; generate gave ''.
    expected, expected_dtypes = inside
    assert expected.strip() != "" and expected_dtypes == {torch.float32, torch.int8}
    with gemma_profiles.use("cpu-8gb"):
        model = build(gemma, tokenizer_path)
    model.load_weights(checkpoint)
    assert answer(model) == expected
    assert dtypes(model) == expected_dtypes
    assert model.config.dtype == "float32"


def test_the_readme_snippet_builds_and_loads_inside_and_generates_after(
    gemma: Any, tokenizer_path: str, checkpoint: str, inside: tuple[str, set[torch.dtype]]
) -> None:
    with gemma_profiles.use("cpu-8gb"):
        model = build(gemma, tokenizer_path)
        model.load_weights(checkpoint)
    assert answer(model) == inside[0]


def test_another_profile_active_later_does_not_change_a_built_model(
    gemma: Any, tokenizer_path: str, checkpoint: str, inside: tuple[str, set[torch.dtype]]
) -> None:
    with gemma_profiles.use("cpu-8gb"):
        model = build(gemma, tokenizer_path)
    with gemma_profiles.use("cpu-32gb"):
        model.load_weights(checkpoint)
        assert plan_of(model).profile == "cpu-8gb"
        assert answer(model) == inside[0]
    assert dtypes(model) == inside[1]


def test_to_before_load_after_deactivate_keeps_the_lazy_load(
    gemma: Any, tokenizer_path: str, checkpoint: str, inside: tuple[str, set[torch.dtype]]
) -> None:
    gemma_profiles.activate("cpu-8gb")
    model = build(gemma, tokenizer_path)
    gemma_profiles.deactivate()
    model = model.to("cpu")  # remembered, not materialised: the loader still builds int8
    assert any(p.is_meta for p in model.parameters())
    model.load_weights(checkpoint)
    assert answer(model.eval()) == inside[0]


def test_a_model_built_without_a_profile_stays_gemmas_own(gemma: Any, tokenizer_path: str, checkpoint: str) -> None:
    plain = build(gemma, tokenizer_path)
    plain.load_weights(checkpoint)
    expected = answer(plain)
    model = build(gemma, tokenizer_path)
    with gemma_profiles.use("cpu-8gb"):
        assert type(model) is gemma.model.GemmaForCausalLM and plan_of(model) is None
        model.load_weights(checkpoint)
        assert answer(model) == expected
    assert dtypes(model) == {torch.float32} and model.config.quant is False


def test_a_profiled_model_is_a_gemma_model_and_gemmas_class_is_restored(gemma: Any, tokenizer_path: str) -> None:
    cls = gemma.model.GemmaForCausalLM
    before = dict(vars(cls))
    with gemma_profiles.use("cpu-8gb"):
        model = build(gemma, tokenizer_path)
    assert isinstance(model, cls) and type(model).__name__ == "GemmaForCausalLM"
    assert dict(vars(cls)) == before, "gemma's class is as it was, while the profiled model lives on"
    assert repr(model).startswith("GemmaForCausalLM(")
    twin = copy.deepcopy(model)
    assert plan_of(twin) is not None and plan_of(twin).profile == "cpu-8gb"


def test_load_weights_with_arguments_gemma_would_take_is_refused_in_one_line(gemma: Any, tokenizer_path: str) -> None:
    with gemma_profiles.use("cpu-8gb"):
        model = build(gemma, tokenizer_path)
    with pytest.raises(PatchError) as caught:
        model.load_weights("x.ckpt", strict=True)
    assert isinstance(caught.value, GemmaProfileError) and "\n" not in str(caught.value)
    assert "load_weights under profile 'cpu-8gb' takes only the checkpoint path" in str(caught.value)
