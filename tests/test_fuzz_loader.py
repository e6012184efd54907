"""Property-based fuzzing of the checkpoint loader (issue 13: "hypothesis fuzzing grows to the loader").

Whatever checkpoint it is given - tensors dropped, reshaped, retyped (float16, bfloat16,
float64, int8 with and without its scaler, int32, int64, bool, uint8, complex), NaN or
Inf values, extra tensors (scaler-like names too), in torch's zip format (wrapped in
``model_state_dict`` or plain), torch's pre-1.6 format or safetensors; truncated at any
byte before loading, or after loading while the model reads it memory-mapped - the
loader either loads every parameter equal to its source after the model's conversion,
or raises a one-line `GemmaProfileError` naming the file.  Any other exception, a crash
or a differing value is a bug.  The oracle says which: a checkpoint that fits loads;
one that does not is refused.

Truncation runs in a child interpreter (one for all its examples): a ``Bus error``
there fails the test instead of ending the suite.  Byte flips inside tensor data are
not fuzzed: no checkpoint format here carries a checksum the loader could verify, so a
flipped value loads as written (as with gemma's own loader; docs/loading.md).

``GEMMA_PROFILE_FUZZ_EXAMPLES`` (default 40 here; CI's default) sets the examples per property:

    GEMMA_PROFILE_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz_loader.py -q -p no:cacheprovider
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import gemma_profiles
from gemma_profiles.errors import GemmaProfileError

HERE = Path(__file__).parent
EXAMPLES = int(os.environ.get("GEMMA_PROFILE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OTHERS = [torch.int8, torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64]
FORMATS = ["zip", "zip-plain", "legacy", "safetensors"]


def tiny(gemma: Any, tokenizer: str) -> Any:
    from gemma_testing import tiny_config

    return tiny_config(gemma.config, "2b", tokenizer, dtype="float32")


@pytest.fixture(scope="module")
def base(gemma: Any, tokenizer_path: str) -> dict[str, torch.Tensor]:
    """The tiny model's parameters, random (float32, small values)."""
    torch.set_default_dtype(torch.float32)
    with torch.device("meta"):
        shapes = {
            n: tuple(p.shape) for n, p in gemma.model.GemmaForCausalLM(tiny(gemma, tokenizer_path)).named_parameters()
        }
    generator = torch.Generator().manual_seed(0)
    return {n: torch.randn(shape, generator=generator) * 0.02 for n, shape in shapes.items()}


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("fuzz-profiles")
    out = {}
    for dtype in ("float32", "bfloat16"):
        path = folder / f"fuzz-{dtype}.yaml"
        path.write_text(f"description: fuzz\nplacement: {{device: cpu}}\nconfig: {{dtype: {dtype}}}\n")
        out[dtype] = str(path)
    return out


def save(state: dict[str, torch.Tensor], form: str, folder: Path) -> Path:
    if form == "safetensors":
        from safetensors.torch import save_file

        path = folder / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path
    path = folder / "model.ckpt"
    wrapped: Any = state if form == "zip-plain" else {"model_state_dict": state}
    torch.save(wrapped, path, _use_new_zipfile_serialization=form != "legacy")
    return path


def retyped(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return tensor > 0
    if dtype in (torch.uint8, torch.int8, torch.int32, torch.int64):
        return (tensor * 1000).to(dtype)
    return tensor.to(dtype)


def shapes_near(shape: tuple[int, ...]) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes that are wrong: one size off, a dimension more or fewer, transposed, empty."""
    options = [st.just((1,)), st.just(()), st.just((*shape, 1)), st.just((0, *shape[1:]))]

    def off(index: int, by: int) -> tuple[int, ...]:
        return tuple(size + by if j == index else size for j, size in enumerate(shape))

    options.append(st.builds(off, st.integers(0, len(shape) - 1), st.sampled_from([-1, 1, 7])))
    if len(shape) == 2 and shape[0] != shape[1]:
        options.append(st.just(shape[::-1]))
    return st.one_of(*options).filter(lambda s: s != shape and all(n >= 0 for n in s))


def check_error(exc: GemmaProfileError, folder: Path) -> None:
    text = str(exc)
    assert text.splitlines() == [text], f"not one line: {text!r}"
    assert str(folder) in (exc.where or ""), f"the error does not name the file: {text!r}"


@FUZZ
@given(data=st.data())
def test_fuzzed_checkpoints_load_exactly_or_are_refused(
    gemma: Any, tokenizer_path: str, base: dict[str, torch.Tensor], profiles: dict[str, str], data: st.DataObject
) -> None:
    names = sorted(base)
    pick = st.sampled_from(names)
    matrices = [n for n in names if base[n].dim() == 2]
    # Half the examples only change what must still load: float dtypes, gemma's int8 layout, extras.
    damage = data.draw(st.booleans(), label="damage")
    nothing: st.SearchStrategy[Any] = st.just({})
    drop = data.draw(st.sets(pick, max_size=2) if damage else st.just(set()), label="drop")
    reshape = data.draw(st.dictionaries(pick, st.just(None), max_size=2) if damage else nothing, label="reshape")
    reshape = {n: data.draw(shapes_near(tuple(base[n].shape)), label=f"shape of {n}") for n in reshape}
    kinds = st.sampled_from(FLOATS + OTHERS if damage else FLOATS)
    retype = data.draw(st.dictionaries(pick, kinds, max_size=3), label="retype")
    int8 = data.draw(st.sets(st.sampled_from(matrices), max_size=2), label="int8 with scaler")
    values = st.sampled_from([math.nan, math.inf, -math.inf])
    bad_value = data.draw(st.dictionaries(pick, values, max_size=1) if damage else nothing, label="NaN/Inf")
    scaler_like = st.sampled_from([n + "_scaler" for n in names if n not in int8 and n not in retype])
    extra_name = st.one_of(st.from_regex(r"\Aextra\.[a-z0-9_.]{1,12}\Z"), scaler_like)
    extra_tensor = st.tuples(st.lists(st.integers(0, 5), max_size=3), st.sampled_from(FLOATS + OTHERS))
    extra = data.draw(st.dictionaries(extra_name, extra_tensor, max_size=3), label="extra")
    form = data.draw(st.sampled_from(FORMATS), label="format")
    dtype = data.draw(st.sampled_from(sorted(profiles)), label="model dtype")

    state: dict[str, torch.Tensor] = {}
    fits = not drop
    for name in names:
        if name in drop:
            continue
        tensor = base[name]
        if name in reshape:
            tensor = torch.randn(reshape[name]) * 0.02
            fits = False
        elif name in int8:
            rows = tensor.shape[0]
            state[name + "_scaler"] = torch.rand(rows) * 1e-3 + 1e-4
            tensor = torch.randint(-127, 128, tuple(tensor.shape), dtype=torch.int8)
        elif name in retype:
            tensor = retyped(tensor, retype[name])
            fits &= retype[name] in FLOATS
        if name in bad_value and tensor.is_floating_point() and tensor.numel():
            tensor = tensor.clone()
            tensor.view(-1)[0] = bad_value[name]
            fits = False
        state[name] = tensor
    for name, (shape, kind) in extra.items():
        if name not in state:
            state[name] = retyped(torch.randn(shape), kind)
    if form == "safetensors" and any(t.is_complex() for t in state.values()):
        form = "zip"
    event(f"{form}: {'fits' if fits else 'does not fit'}")

    want = getattr(torch, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = save(state, form, folder)
        with gemma_profiles.use(profiles[dtype]):
            torch.set_default_dtype(torch.float32)
            model = gemma.model.GemmaForCausalLM(tiny(gemma, tokenizer_path))
            try:
                model.load_weights(str(path))
            except GemmaProfileError as exc:
                check_error(exc, folder)
                assert not fits, f"a checkpoint that fits was refused: {exc}"
                return
            assert fits, "a checkpoint that does not fit was loaded"
            loaded = {n: p.detach() for n, p in model.named_parameters()}
    for name, got in loaded.items():
        source = state[name]
        if source.dtype == torch.int8:
            expected = (source.float() * state[name + "_scaler"].float().unsqueeze(1)).to(want)
        else:
            expected = source.to(want)
        assert got.dtype == want and torch.equal(got, expected), name


CHILD = textwrap.dedent(
    """
    import json, os, sys, tempfile
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from hypothesis import HealthCheck, given, settings, strategies as st
    import gemma_profiles
    from gemma import config as gemma_config, model as gemma_model
    from gemma_profiles.errors import CheckpointChangedError, GemmaProfileError
    from gemma_testing import tiny_config
    from test_fuzz_loader import save, tiny
    from test_loading import logits

    base = {{k: v for k, v in torch.load({base!r}, weights_only=True).items()}}
    counts = {{}}

    class G:
        config, model = gemma_config, gemma_model

    def build():
        torch.set_default_dtype(torch.float32)
        return gemma_model.GemmaForCausalLM(tiny(G, {tokenizer!r}))

    @settings(max_examples={examples}, deadline=None, suppress_health_check=list(HealthCheck))
    @given(form=st.sampled_from(["zip", "zip-plain", "legacy", "safetensors"]),
           when=st.sampled_from(["before", "after"]), cut=st.floats(0.0, 1.0, exclude_max=True),
           tail=st.integers(1, 64), by_tail=st.booleans())
    def truncated(form, when, cut, tail, by_tail):
        with tempfile.TemporaryDirectory() as tmp:
            path = save(dict(base), form, Path(tmp))
            size = os.path.getsize(path)
            keep = max(0, size - tail) if by_tail else int(size * cut)
            with gemma_profiles.use({profile!r}):
                model = build()
                try:
                    if when == "after":
                        model.load_weights(str(path))
                    os.truncate(path, keep)
                    if when == "before":
                        model.load_weights(str(path))
                        raise AssertionError(f"a truncated file loaded ({{form}}, {{keep}} of {{size}} bytes)")
                    logits(model, [2, 5, 7])
                    # nothing of the file is mapped any more (pre-1.6 format: read whole): nothing to refuse
                    assert form == "legacy", f"a model read a truncated file ({{form}}, {{keep}} of {{size}} bytes)"
                    outcome = "after: legacy format, copied, unaffected"
                except CheckpointChangedError as exc:
                    assert when == "after" and str(path) in str(exc), str(exc)
                    outcome = "after: CheckpointChangedError"
                except GemmaProfileError as exc:
                    assert when == "before" and "\\n" not in str(exc) and str(path) in str(exc), str(exc)
                    outcome = "before: " + type(exc).__name__
        counts[outcome] = counts.get(outcome, 0) + 1

    truncated()
    print(json.dumps(counts))
    """
)


def test_truncated_checkpoints_never_crash(
    gemma: Any, tokenizer_path: str, base: dict[str, torch.Tensor], profiles: dict[str, str], tmp_path: Path
) -> None:
    """Truncated before loading: refused.  Truncated while the model reads it mapped: refused before the forward."""
    torch.save(base, tmp_path / "base.pt")
    code = CHILD.format(
        tests=str(HERE),
        base=str(tmp_path / "base.pt"),
        tokenizer=tokenizer_path,
        examples=EXAMPLES,
        profile=profiles["float32"],
    )
    env = {**os.environ, "GEMMA_PROFILE_DISABLE_PLUGINS": "kernels,fused", "GEMMA_PROFILE_LOG": "error"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"exit {done.returncode} (-7 is SIGBUS): {done.stderr[-3000:]}"
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert sum(counts.values()) >= min(EXAMPLES, 10), counts
    assert any(key.startswith("before") for key in counts) and "after: CheckpointChangedError" in counts, counts
    print(counts)  # with -s: how the examples ended
