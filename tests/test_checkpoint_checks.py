"""A checkpoint is checked against the model before any weight is used (issue 13, items 3 and 4).

Names, shapes and dtypes are refused before a tensor is converted; NaN/Inf weights are
refused by name (never quantized or converted into numbers); files that are not
checkpoints get one line naming the file; a memory-mapped checkpoint changed on disk
after loading is a clear error before the next forward, not a ``Bus error`` or different
logits.  What is checked, and the mmap trade-off: docs/loading.md.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from gemma_testing import tiny_config, write_random_checkpoint

import gemma_profiles
from gemma_profiles.engine.loading import WATCH_ATTRIBUTE
from gemma_profiles.errors import CheckpointChangedError, CheckpointError, GemmaProfileError

HERE = Path(__file__).parent
UP = "model.layers.0.mlp.up_proj.weight"
NORM = "model.norm.weight"


def build(gemma: Any, tokenizer: str, dtype: str = "float32", quant: bool = False) -> Any:
    config = tiny_config(gemma.config, "2b", tokenizer, dtype=dtype)
    config.quant = quant
    torch.set_default_dtype(torch.float32)
    return gemma.model.GemmaForCausalLM(config)


@pytest.fixture
def profile(write_profile: Callable[..., Path]) -> Callable[..., str]:
    def make(dtype: str = "float32", weights: str = "none", mmap: bool = True) -> str:
        return str(
            write_profile(
                f"checks-{dtype}-{weights}-{'mmap' if mmap else 'copy'}",
                f"description: t\nplacement: {{device: cpu}}\nconfig: {{dtype: {dtype}}}\n"
                f"quantization: {{weights: {weights}}}\nloading: {{mmap: {str(mmap).lower()}}}\n",
            )
        )

    return make


@pytest.fixture
def state(gemma: Any, tokenizer_path: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    return write_random_checkpoint(build(gemma, tokenizer_path), tmp_path / "good.ckpt", torch.float32, seed=3)


def save(path: Path, state: dict[str, torch.Tensor]) -> str:
    torch.save({"model_state_dict": state}, path)
    return str(path)


def changed(state: dict[str, torch.Tensor], name: str, value: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = dict(state)
    if value is None:
        del out[name]
    else:
        out[name] = value
    return out


def with_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    out = tensor.clone()
    out.view(-1)[5] = value
    return out


# -- names, shapes, dtypes --------------------------------------------------------------

BAD_HEADERS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], str]] = {
    # found: loads under cpu-32gb and generates garbage with exit 0 (gemma's own loader refuses it)
    "norm of shape [1]": (
        lambda s: changed(s, NORM, torch.ones(1)),
        r"1 tensor\(s\) of the wrong shape: model\.norm\.weight is \[1\] \(the model's is \[64\]\)",
    ),
    "transposed weight": (
        lambda s: changed(s, UP, s[UP].t().contiguous()),
        r"wrong shape: .*up_proj\.weight is \[64, 128\]",
    ),
    # found: all-zero logits with exit 0 under cpu-8gb
    "int32 weight": (lambda s: changed(s, UP, s[UP].to(torch.int32)), r"up_proj\.weight is int32 \(float32: floating"),
    "bool weight": (lambda s: changed(s, UP, s[UP] > 0), r"up_proj\.weight is bool"),
    "complex weight": (lambda s: changed(s, UP, s[UP].to(torch.complex64)), r"up_proj\.weight is complex64"),
    "missing norm": (
        lambda s: changed(s, NORM, None),
        r"checkpoint lacks 1 tensor\(s\) the model needs: model\.norm\.weight",
    ),
    "int8 weight without its scaler": (
        lambda s: changed(s, UP, s[UP].to(torch.int8)),
        r"up_proj\.weight is int8 without its model\.layers\.0\.mlp\.up_proj\.weight_scaler",
    ),
    "int8 weight with a scaler of the wrong shape": (
        lambda s: {**changed(s, UP, s[UP].to(torch.int8)), UP + "_scaler": torch.ones(3)},
        r"up_proj\.weight_scaler is float32 \[3\] \(floating point \[128\] expected",
    ),
    "nothing the model knows": (
        lambda s: {"encoder." + k: v for k, v in s.items()},
        r"checkpoint lacks \d+ tensor\(s\) the model needs",
    ),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_a_checkpoint_that_does_not_fit_is_refused_before_loading(
    gemma: Any, tokenizer_path: str, state: Any, profile: Any, tmp_path: Path, case: str
) -> None:
    mutate, message = BAD_HEADERS[case]
    path = save(tmp_path / "bad.ckpt", mutate(state))
    with gemma_profiles.use(profile()):
        model = build(gemma, tokenizer_path)
        with pytest.raises(CheckpointError, match=message) as caught:
            model.load_weights(path)
        assert all(p.is_meta for n, p in model.named_parameters() if n.endswith("proj.weight")), "nothing was loaded"
    assert caught.value.where == path and "is it a checkpoint for this variant?" in str(caught.value)


@pytest.mark.parametrize("case", ["norm of shape [1]", "int32 weight", "bool weight", "missing norm"])
def test_gemmas_own_loader_path_gets_the_same_checks(
    gemma: Any, tokenizer_path: str, state: Any, profile: Any, tmp_path: Path, case: str
) -> None:
    """A model materialised before loading goes through gemma's loader, after the same checks."""
    mutate, message = BAD_HEADERS[case]
    path = save(tmp_path / "bad.ckpt", mutate(state))
    with gemma_profiles.use(profile()):
        model = build(gemma, tokenizer_path)
        model.load_state_dict(state, strict=False)  # eager now: gemma's own loader would copy
        with pytest.raises(CheckpointError, match=message):
            model.load_weights(path)


def test_gemmas_own_loader_path_refuses_a_float_checkpoint_for_an_int8_model(
    gemma: Any, tokenizer_path: str, state: Any, profile: Any, tmp_path: Path
) -> None:
    """gemma's copy would truncate float weights into int8 ones; only this loader quantizes."""
    path = save(tmp_path / "float.ckpt", state)
    with gemma_profiles.use(profile(weights="int8")):
        model = build(gemma, tokenizer_path)
        model.load_state_dict({}, strict=False)  # materialised: gemma's loader next
        with pytest.raises(CheckpointError, match=r"of a type the model cannot use: \S+ is float32 \(int8 expected\)"):
            model.load_weights(path)


def test_extra_tensors_are_ignored_as_gemma_ignores_them(
    gemma: Any, tokenizer_path: str, state: Any, profile: Any, tmp_path: Path, log_messages: list[str]
) -> None:
    path = save(
        tmp_path / "extra.ckpt", {**state, "vision_tower.weight": torch.ones(3), "optimizer_step": torch.ones(1)}
    )
    with gemma_profiles.use(profile()):
        model = build(gemma, tokenizer_path)
        model.load_weights(path)
        assert torch.equal(model.state_dict()[UP], state[UP])
    assert any("ignored 2 checkpoint tensor(s)" in m and "vision_tower.weight" in m for m in log_messages)


# -- NaN and Inf ------------------------------------------------------------------------

NON_FINITE = {
    "nan, same dtype": ("float32", "none", float("nan")),
    "inf, converted to bfloat16": ("bfloat16", "none", float("inf")),
    # found: int8 quantization mapped a NaN weight to a finite value
    "nan, quantized to int8": ("float32", "int8", float("nan")),
    "-inf, quantized to int8 (bfloat16)": ("bfloat16", "int8", float("-inf")),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_weights_are_refused_by_name(
    gemma: Any, tokenizer_path: str, state: Any, profile: Any, tmp_path: Path, case: str
) -> None:
    dtype, weights, value = NON_FINITE[case]
    path = save(tmp_path / "nan.ckpt", changed(state, UP, with_value(state[UP], value)))
    with gemma_profiles.use(profile(dtype, weights)):
        model = build(gemma, tokenizer_path)
        with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight holds 1 NaN/Inf"):
            model.load_weights(path)


def test_a_nan_scaler_of_an_int8_checkpoint_is_refused(
    gemma: Any, tokenizer_path: str, profile: Any, tmp_path: Path
) -> None:
    quant = write_random_checkpoint(build(gemma, tokenizer_path, quant=True), tmp_path / "q.ckpt", torch.float32)
    scaler = UP + "_scaler"
    path = save(tmp_path / "qnan.ckpt", changed(quant, scaler, with_value(quant[scaler], float("nan"))))
    for weights in ("int8", "none"):  # kept int8, or dequantized into a float model
        with gemma_profiles.use(profile(weights=weights)):
            model = build(gemma, tokenizer_path)
            with pytest.raises(CheckpointError, match=r"tensor .*up_proj\.weight_scaler holds 1 NaN/Inf"):
                model.load_weights(path)


def test_a_value_float16_cannot_hold_is_refused(
    gemma: Any, tokenizer_path: str, state: Any, profile: Any, tmp_path: Path
) -> None:
    path = save(tmp_path / "big.ckpt", changed(state, UP, with_value(state[UP], 1e6)))
    with gemma_profiles.use(profile("float16")):
        model = build(gemma, tokenizer_path)
        with pytest.raises(CheckpointError, match=r"tensor .*up_proj\.weight overflows when converted"):
            model.load_weights(path)


def test_gemmas_own_loader_path_refuses_nan(
    gemma: Any, tokenizer_path: str, state: Any, profile: Any, tmp_path: Path
) -> None:
    path = save(tmp_path / "nan.ckpt", changed(state, NORM, with_value(state[NORM], float("nan"))))
    with gemma_profiles.use(profile()):
        model = build(gemma, tokenizer_path)
        model.load_state_dict(state, strict=False)
        with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight holds 1 NaN/Inf"):
            model.load_weights(path)


# -- files that are not checkpoints ----------------------------------------------------


def _safetensors_lie(good: Path, target: Path) -> None:
    from safetensors.torch import save_file

    state = torch.load(good, weights_only=True)["model_state_dict"]
    plain = target.with_suffix(".plain")
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))
    raw = plain.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    header[NORM]["data_offsets"][1] += 10**9  # says the tensor runs a gigabyte past the file's end
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


def _index(folder: Path, weight_map: Any) -> None:
    folder.mkdir()
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


UNREADABLE: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    # found: EOFError blamed on the 'loading' plugin
    "zero-byte file": (
        lambda good, d: (d / "zero.ckpt", (d / "zero.ckpt").write_bytes(b""))[0],
        r"is empty \(0 bytes\)",
    ),
    # found: IndexError: pop from empty list
    "text file": (
        lambda good, d: (d / "notes.ckpt", (d / "notes.ckpt").write_text("secret line\n" * 40))[0],
        r"not a checkpoint: neither a PyTorch file \(zip or pickle\) nor safetensors",
    ),
    "truncated zip": (
        lambda good, d: (d / "cut.ckpt", (d / "cut.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2]))[
            0
        ],
        r"not a readable PyTorch checkpoint \(RuntimeError: PytorchStreamReader failed",
    ),
    "damaged pickle": (
        lambda good, d: (d / "old.ckpt", (d / "old.ckpt").write_bytes(b"\x80\x02garbage that is no pickle"))[0],
        r"not a readable PyTorch checkpoint",
    ),
    "folder without an index": (lambda good, d: (d / "folder", (d / "folder").mkdir())[0], r"checkpoint folder has no"),
    "missing file": (lambda good, d: d / "nope.ckpt", r"checkpoint not found"),
    "fifo": (lambda good, d: (d / "pipe.ckpt", os.mkfifo(d / "pipe.ckpt"))[0], r"not a regular file"),
    "safetensors header lie": (
        lambda good, d: (d / "lie.safetensors", _safetensors_lie(good, d / "lie.safetensors"))[0],
        r"not a readable safetensors file \(Error while deserializing header",
    ),
    "truncated safetensors": (
        lambda good, d: (
            d / "cut.safetensors",
            _safetensors_lie(good, d / "whole.safetensors"),
            (d / "cut.safetensors").write_bytes((d / "whole.plain").read_bytes()[:5000]),
        )[0],
        r"not a readable safetensors file",
    ),
    "index that is not JSON": (
        lambda good, d: (
            d / "sharded",
            (d / "sharded").mkdir(),
            (d / "sharded" / "pytorch_model.bin.index.json").write_text("{"),
        )[0],
        r"pytorch_model\.bin\.index\.json: the index is not readable JSON",
    ),
    "index naming a missing shard": (
        lambda good, d: (d / "sharded", _index(d / "sharded", {NORM: "shard-1.bin"}))[0],
        r"shard-1\.bin: checkpoint file not found",
    ),
    "index naming a file outside its folder": (
        lambda good, d: (d / "sharded", _index(d / "sharded", {NORM: "../good.ckpt"}))[0],
        r"the index names a shard outside its folder",
    ),
    "state dict holding a number": (
        lambda good, d: (d / "num.ckpt", torch.save({"model_state_dict": {NORM: 3}}, d / "num.ckpt"))[0],
        r"the state dict holds a int under 'model\.norm\.weight', not a tensor",
    ),
    "a list instead of a state dict": (
        lambda good, d: (d / "list.ckpt", torch.save([torch.ones(2)], d / "list.ckpt"))[0],
        r"the checkpoint holds a list, not a state dict",
    ),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_checkpoints_get_one_line_naming_the_file(
    gemma: Any, tokenizer_path: str, state: Any, profile: Any, tmp_path: Path, case: str
) -> None:
    make, message = UNREADABLE[case]
    path = make(tmp_path / "good.ckpt", tmp_path)
    with gemma_profiles.use(profile()):
        model = build(gemma, tokenizer_path)
        with pytest.raises(CheckpointError, match=message) as caught:
            model.load_weights(str(path))
    text = str(caught.value)
    assert "\n" not in text and caught.value.hint and str(tmp_path) in (caught.value.where or "")
    assert "secret line" not in text, "never echo a file's contents"


def test_the_cli_says_it_in_one_line(gemma: Any, tokenizer_path: str, tmp_path: Path, write_profile: Any) -> None:
    from gemma_profiles.cli.main import cli

    profile = write_profile(
        "tiny-cli",
        f"description: t\nplacement: {{device: cpu}}\nconfig: {{dtype: float32, tokenizer: {tokenizer_path}}}\n",
    )
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    result = CliRunner().invoke(cli, ["bench", str(profile), "--variant", "2b", "--ckpt", str(empty), "--tokens", "2"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "plugin 'loading'" not in result.output
    assert f"{empty}: the checkpoint file is empty (0 bytes)" in result.stderr


# -- memory-mapped weights and a file changed on disk ----------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, shutil, sys
    import torch
    sys.path.insert(0, {tests!r})
    import gemma_profiles
    from gemma import config as gemma_config, model as gemma_model
    from gemma_profiles.errors import GemmaProfileError
    from gemma_testing import tiny_config
    from test_loading import logits
    ckpt, other, how, profile = sys.argv[1:5]
    config = tiny_config(gemma_config, "2b", {tokenizer!r}, dtype=sys.argv[5])
    tokens = [2, 17, 33, 5, 60, 12]
    with gemma_profiles.use(profile):
        torch.set_default_dtype(torch.float32)
        model = gemma_model.GemmaForCausalLM(config)
        model.load_weights(ckpt)
        before = logits(model, tokens)
        if how == "truncate":
            os.truncate(ckpt, os.path.getsize(ckpt) // 3)
        elif how == "overwrite":  # in place: same inode, same size, other numbers
            with open(ckpt, "r+b") as f:
                f.write(open(other, "rb").read())
        elif how == "replace":  # a new file renamed over it: the mapping keeps the old inode
            shutil.copy(other, ckpt + ".new")
            os.replace(ckpt + ".new", ckpt)
        try:
            after = logits(model, tokens)
            text = model.generate("the cat", "cpu", output_len=3, temperature=None)
        except GemmaProfileError as exc:
            print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
            sys.exit(3)
    print(json.dumps({{"same": bool(torch.equal(before, after)), "watched": "{watch}" in model.__dict__}}))
    """
)


@pytest.fixture
def two_checkpoints(gemma: Any, tokenizer_path: str, tmp_path: Path) -> tuple[Path, Path]:
    model = build(gemma, tokenizer_path)
    first, second = tmp_path / "one.ckpt", tmp_path / "two.ckpt"  # one zip entry prefix length
    write_random_checkpoint(model, first, torch.float32, seed=1)
    write_random_checkpoint(model, second, torch.float32, seed=2)
    assert first.stat().st_size == second.stat().st_size
    return first, second


def run_child(
    tokenizer: str, ckpt: Path, other: Path, how: str, profile: str, dtype: str = "float32"
) -> tuple[int, Any]:
    code = CHILD.format(tests=str(HERE), tokenizer=tokenizer, watch=WATCH_ATTRIBUTE)
    env = {**os.environ, "GEMMA_PROFILE_DISABLE_PLUGINS": "kernels,fused"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(ckpt), str(other), how, profile, dtype],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = done.stdout.strip().splitlines()
    return done.returncode, (json.loads(lines[-1]) if lines else done.stderr[-2000:])


def test_truncated_after_load_is_a_clear_error_not_a_bus_error(
    tokenizer_path: str, two_checkpoints: Any, profile: Any, gemma: Any
) -> None:
    first, second = two_checkpoints
    code, out = run_child(tokenizer_path, first, second, "truncate", profile())
    assert code == 3, f"exit {code} (-7 is SIGBUS): {out}"  # found: Bus error
    assert out["error"] == "CheckpointChangedError" and "truncated after loading" in out["message"]
    assert str(first) in out["message"] and "loading: {mmap: false}" in out["message"]


def test_overwritten_in_place_is_a_clear_error_not_other_logits(
    tokenizer_path: str, two_checkpoints: Any, profile: Any, gemma: Any
) -> None:
    first, second = two_checkpoints
    code, out = run_child(tokenizer_path, first, second, "overwrite", profile())
    assert code == 3, f"exit {code}: {out}"  # found: different logits, exit 0
    assert out["error"] == "CheckpointChangedError" and "rewritten after loading" in out["message"]


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_mmap_false_is_immune(tokenizer_path: str, two_checkpoints: Any, profile: Any, gemma: Any, how: str) -> None:
    first, second = two_checkpoints
    code, out = run_child(tokenizer_path, first, second, how, profile(mmap=False))
    assert code == 0, out
    assert out == {"same": True, "watched": False}


def test_a_file_replaced_by_a_new_one_changes_nothing(
    tokenizer_path: str, two_checkpoints: Any, profile: Any, gemma: Any
) -> None:
    first, second = two_checkpoints
    code, out = run_child(tokenizer_path, first, second, "replace", profile())
    assert code == 0, out
    assert out == {"same": True, "watched": True}


def test_nothing_mapped_nothing_watched(tokenizer_path: str, two_checkpoints: Any, profile: Any, gemma: Any) -> None:
    """float32 weights into a bfloat16 model are all converted: the file can change freely."""
    first, second = two_checkpoints
    code, out = run_child(tokenizer_path, first, second, "truncate", profile("bfloat16"), "bfloat16")
    assert code == 0, out
    assert out == {"same": True, "watched": False}


def test_the_watch_costs_one_stat_per_file_and_forward(
    gemma: Any, tokenizer_path: str, two_checkpoints: Any, profile: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = two_checkpoints
    with gemma_profiles.use(profile()):
        model = build(gemma, tokenizer_path)
        model.load_weights(str(first))
        watched = {stamp.fd for stamp in model.__dict__[WATCH_ATTRIBUTE].stamps}
        assert len(watched) == 1
        stats: list[int] = []
        forwards: list[int] = []
        real = os.fstat
        monkeypatch.setattr(os, "fstat", lambda fd: (stats.append(fd) if fd in watched else None, real(fd))[1])
        model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        model.generate("the cat", "cpu", output_len=3, temperature=None)
    assert len(forwards) >= 3 and len(stats) == len(forwards)


def test_load_weights_again_after_the_file_changed(
    gemma: Any, tokenizer_path: str, two_checkpoints: Any, profile: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading again into the same model copies into memory of its own, never through the old mapping."""
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "kernels,fused")
    first, second = two_checkpoints
    new = torch.load(second, weights_only=True)["model_state_dict"]
    with gemma_profiles.use(profile()):
        model = build(gemma, tokenizer_path)
        model.load_weights(str(first))
        shutil.copyfile(second, first)  # in place
        with pytest.raises(CheckpointChangedError):
            model.generate("the cat", "cpu", output_len=2, temperature=None)
        model.load_weights(str(first))
        assert WATCH_ATTRIBUTE not in model.__dict__
        for name, tensor in new.items():
            assert torch.equal(model.state_dict()[name], tensor), name
        model.generate("the cat", "cpu", output_len=2, temperature=None)


def test_other_exceptions_are_gemma_profile_errors() -> None:
    assert issubclass(CheckpointChangedError, CheckpointError) and issubclass(CheckpointError, GemmaProfileError)
