"""Pickling a whole model built under a profile (``torch.save(model)``, ``pickle.dumps``): it is
an instance of a profiled subclass made at run time (`gemma_profiles.runtime.patch.profiled_class`), and
pickles as gemma's own class - an unpickled model is plain gemma, without the profile."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma_profiles
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.runtime.patch import plan_of


def build(gemma: Any, tokenizer: str) -> Any:
    from gemma_testing import tiny_config

    config = tiny_config(gemma.config, "2b", tokenizer, dtype="float32")
    torch.set_default_dtype(torch.float32)
    return gemma.model.GemmaForCausalLM(config)


@pytest.fixture
def checkpoint(gemma: Any, tokenizer_path: str, tmp_path: Path) -> str:
    from gemma_testing import write_random_checkpoint

    path = tmp_path / "float.ckpt"
    write_random_checkpoint(build(gemma, tokenizer_path), path, torch.float32, seed=5)
    return str(path)


def profile(write_profile: Any, weights: str = "none") -> str:
    return str(
        write_profile(
            f"pickled-{weights}",
            "description: t\nplacement: {device: cpu}\nconfig: {dtype: float32}\n"
            f"quantization: {{weights: {weights}}}\n",
        )
    )


def test_a_profiled_model_pickles_as_gemmas_own_class(
    gemma: Any, tokenizer_path: str, checkpoint: str, write_profile: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: PicklingError "Can't pickle <class 'gemma_profiles.patch.GemmaForCausalLM'>: attribute lookup failed"
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "kernels,fused")  # gemma's own forwards
    with gemma_profiles.use(profile(write_profile)):
        model = build(gemma, tokenizer_path)
        model.load_weights(checkpoint)
    assert type(model) is not gemma.model.GemmaForCausalLM and plan_of(model) is not None
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    again = pickle.loads(pickle.dumps(model))
    expected = model.generate("the cat sees", "cpu", output_len=4, temperature=None)
    for twin in (saved, again):
        assert type(twin) is gemma.model.GemmaForCausalLM and plan_of(twin) is None
        assert not any(key.startswith("_gemma_profile") for key in twin.__dict__)
        assert not twin._forward_pre_hooks, "the loader's check on mapped checkpoint files stays behind"
        ours, theirs = model.state_dict(), twin.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert twin.generate("the cat sees", "cpu", output_len=4, temperature=None) == expected
    # the model itself keeps its profile, and a deep copy is still a profiled model
    assert plan_of(model) is not None and plan_of(copy.deepcopy(model)) is not None


def test_an_unloaded_model_pickles_materialised(gemma: Any, tokenizer_path: str, write_profile: Any) -> None:
    with gemma_profiles.use(profile(write_profile)):
        model = build(gemma, tokenizer_path)
    assert any(p.is_meta for p in model.parameters()), "built lazily"
    twin = pickle.loads(pickle.dumps(model))
    assert type(twin) is gemma.model.GemmaForCausalLM and not any(p.is_meta for p in twin.parameters())


def test_a_model_on_the_profiles_kernels_is_refused_in_one_line(
    gemma: Any, tokenizer_path: str, checkpoint: str, write_profile: Any
) -> None:
    with gemma_profiles.use(profile(write_profile, "int8")):
        model = build(gemma, tokenizer_path)
        model.load_weights(checkpoint)
    with pytest.raises(GemmaProfileError) as caught:
        pickle.dumps(model)
    message = str(caught.value)
    assert "\n" not in message and "profile 'pickled-int8'" in message
    # the first changed module by name (the int8 embedder on a native kernel, else a decoder layer)
    assert "runs embedder on" in message or "model.layers.0" in message, message
    assert "model.state_dict()" in message
