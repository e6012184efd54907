"""Offload (hooks/offload.py) against gemma's own flow: real gemma_pytorch when installed, else the stand-in.

Every placement - all resident, CPU-offloaded and streamed through slots (the GPU's
code path, forced on the CPU), disk-offloaded (memory-mapped) - must give exactly the
plain single-device model's greedy tokens and logits; the caller's KV cache must be
written in place; a cache on the wrong device must raise; disk offload must keep the
resident set below the weights, and leave no file behind however the process ends.

What a CPU machine cannot see: here ``cpu`` layers stream through the slots by a plain
copy on the worker thread (``WeightStreamer._to_host_slot``).  The CUDA path - the
``cudaMemcpyAsync`` on the side stream, the events ordering slot reuse, pinned staging
for ``disk`` layers - never runs, so a corrupted or unordered CUDA slot copy passes every
test in this file.  tests/test_offload_gpu.py compares every token's logits with the
plain model's bit for bit on a GPU (and checks that a corrupted copy fails that
comparison); ``benchmarks/gpu_check.sh`` runs it on a lent GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from gemma_profiles.hooks import offload

import gemma_profiles
from gemma_profiles.engine import offload as streaming
from gemma_profiles.engine import surgery
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.planning.memory import ModelShape
from gemma_profiles.planning.plan import Target, compress_layers, expand_layers, make_plan, split_device_map
from gemma_profiles.spec.profile import load_profile
from gemma_profiles.units import format_bytes

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
PROMPT = "the cat sees"
OUTPUT_LEN = 5


def layers_for(variant: str) -> int:
    """Enough layers for the slots to cycle; Gemma 3's pattern (5 local + 1 global) plus one."""
    return 7 if variant == "1b" else 5


def build(gemma: Any, tokenizer: str, variant: str) -> Any:
    """run.py's construction step (float32, as run.py forces) on a tiny config."""
    from gemma_testing import build_tiny_model

    return build_tiny_model(gemma, tokenizer, variant, num_hidden_layers=layers_for(variant), quant=False)


@dataclasses.dataclass
class Run:
    text: str
    logits: list[torch.Tensor]
    model: Any


def generate(model: Any) -> Run:
    logits: list[torch.Tensor] = []
    handle = model.sampler.register_forward_hook(lambda module, args, output: logits.append(output[1].clone()))
    try:
        text = model.generate(PROMPT, "cpu", output_len=OUTPUT_LEN, temperature=None)
    finally:
        handle.remove()
    return Run(text, logits, model)


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, str]:
    """Checkpoint paths by variant, written once per module."""
    return {}


@pytest.fixture
def checkpoint(
    gemma: Any, tokenizer_path: str, tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, str]
) -> Callable[..., str]:
    """``checkpoint(variant)``: a random float32 checkpoint for the tiny variant (cached per module)."""
    from gemma_testing import write_random_checkpoint

    def make(variant: str) -> str:
        if variant not in checkpoints:
            path = tmp_path_factory.mktemp("ckpt") / f"{variant}.ckpt"
            write_random_checkpoint(build(gemma, tokenizer_path, variant), str(path), torch.float32, seed=7)
            checkpoints[variant] = str(path)
        return checkpoints[variant]

    return make


@pytest.fixture
def reference(gemma: Any, tokenizer_path: str, checkpoint: Callable[..., str]) -> Callable[[str], Run]:
    """The plain model - no profile, one device - for a variant."""

    def make(variant: str) -> Run:
        model = build(gemma, tokenizer_path, variant)
        model.load_weights(checkpoint(variant))
        return generate(model.to("cpu").eval())

    return make


@pytest.fixture
def offloaded(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],
    write_profile: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Run]:
    """``offloaded(variant, placement, stream_cpu=False)``: the same flow under a profile with that placement.

    ``FOLDER`` in the placement becomes a temporary offload folder; ``stream_cpu`` streams
    ``cpu`` layers through slots (the GPU's code path) although the execution device is the CPU.
    Packed CPU matmuls and fused layers (``kernels``, ``fused``, tested in test_kernels.py and
    test_fused.py) are off: placements are compared bit for bit with gemma's plain forwards.
    """
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "kernels,fused")
    profiles = iter(range(100))

    def make(variant: str, placement: str, stream_cpu: bool = False) -> Run:
        name = f"offload-{next(profiles)}"
        text = placement.replace("FOLDER", str(tmp_path / "offload"))
        path = write_profile(
            name, f"name: {name}\ndescription: offload test\nconfig: {{dtype: float32}}\nplacement: {text}\n"
        )
        with gemma_profiles.use(str(path)):
            with offload.streaming_on_cpu() if stream_cpu else contextlib.nullcontext():
                model = build(gemma, tokenizer_path, variant)
                model.load_weights(checkpoint(variant))
            return generate(model.to("cpu").eval())

    return make


PLACEMENTS = {
    "resident": ("{device: cpu}", False),
    "cpu-offload-on-cpu": ("{device: cpu, offload: cpu}", False),
    "cpu-streamed": ("{device: cpu, offload: cpu}", True),
    "disk": ("{device: cpu, offload: disk, offload_folder: FOLDER, device_map: {'1-4': disk}}", False),
    "disk-and-cpu-streamed": (
        "{device: cpu, offload: disk, offload_folder: FOLDER, device_map: {'0-1': cpu, '2-4': disk}}",
        True,
    ),
    "disk-with-embedder": (
        "{device: cpu, offload: disk, offload_folder: FOLDER, device_map: {embedder: disk, '0-4': disk}}",
        False,
    ),
}


def same_logits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) == OUTPUT_LEN and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("variant", ["2b", "2b-v2", "1b"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_every_placement_matches_the_plain_model_exactly(
    variant: str, placement: str, reference: Callable[[str], Run], offloaded: Callable[..., Run]
) -> None:
    expected = reference(variant)
    text, stream_cpu = PLACEMENTS[placement]
    run = offloaded(variant, text, stream_cpu)
    assert run.text == expected.text
    assert same_logits(run.logits, expected.logits), "logits differ from the plain model's"
    state = streaming.offload_state(run.model)
    if placement == "resident":
        assert state is None, "no offload asked, nothing installed"
        return
    assert state is not None
    units = {unit.index: unit.kind for unit in state.units}
    if placement == "cpu-streamed":
        assert units == dict.fromkeys(range(layers_for(variant)), "cpu")
        assert state.streamer is not None and state.streamer.copied >= OUTPUT_LEN, "layers were copied per token"
    if placement.startswith("disk"):
        assert "disk" in units.values()
        assert state.folder is not None and not list(state.folder.iterdir()), "the files have no name"
        mapped = deleted_files_mapped(state.folder)
        for unit in state.units:
            if unit.kind == "disk":
                assert any(a <= unit.storage.data_ptr() < b for a, b in mapped), f"{unit.name} is not file-backed"
    if placement == "cpu-offload-on-cpu":
        assert units == {}, "the weights are in CPU memory already"


def test_streamed_weights_go_back_to_their_storage(
    offloaded: Callable[..., Run], reference: Callable[[str], Run]
) -> None:
    run = offloaded("2b", PLACEMENTS["disk-and-cpu-streamed"][0], stream_cpu=True)
    state = streaming.offload_state(run.model)
    assert state is not None and state.streamer is not None
    for unit in state.units:
        start = unit.storage.data_ptr()
        for param in unit.params:
            assert start <= param.data_ptr() < start + unit.nbytes, f"{unit.name} still points at a slot"
    # state_dict() reads the storage: the same tensors the plain model loaded.
    expected = reference("2b").model.state_dict()
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_prefetch_off_gives_the_same_tokens(
    gemma: Any, tokenizer_path: str, checkpoint: Callable[..., str], reference: Callable[[str], Run], tmp_path: Path
) -> None:
    model = build(gemma, tokenizer_path, "2b")
    model.load_weights(checkpoint("2b"))
    layout = streaming.Layout("cpu", {i: "cpu" for i in range(5)} | {3: "disk"}, folder=str(tmp_path))
    state = streaming.apply_offload(model, layout, prefetch=False)
    run = generate(model.eval())
    assert same_logits(run.logits, reference("2b").logits)
    assert state.streamer is not None and state.streamer.copied > 0
    streaming.remove_offload(model)
    assert streaming.offload_state(model) is None
    assert same_logits(generate(model).logits, reference("2b").logits), "the storage still holds the weights"


# -- files on disk: none left behind ---------------------------------------------------------


def deleted_files_mapped(folder: Path, pid: int | str = "self", *, named_too: bool = False) -> list[tuple[int, int]]:
    """Address ranges of process ``pid`` mapped from files in ``folder`` that have no name any more."""
    ranges = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(f"{folder}/") and (named_too or parts[5].endswith(" (deleted)")):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def held_in(folder: Path) -> list[str]:
    """Files in ``folder`` this process still holds (mapped, or open), named or not."""
    held = [f"mapped {a:x}" for a, _ in deleted_files_mapped(folder)]
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{folder}/"):
                held.append(f"fd {fd}")
    return held


def every_file(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


KILLED = """
import dataclasses, sys, time
sys.path.insert(0, {tests!r})
import torch
import gemma_profiles
from gemma_profiles.engine import offload as streaming
from gemma_profiles.engine import surgery
from gemma_testing import tiny_config, write_random_checkpoint
from gemma import config as gemma_config, model as gemma_model

if not {nameless!r}:  # a filesystem without nameless files: named ones in a private subfolder
    init = streaming.DiskFiles.__init__
    def without(self, folder):
        init(self, folder)
        self.nameless = False
    streaming.DiskFiles.__init__ = without
if {stop_writing!r}:  # stop half-way through writing the layers
    write, calls = streaming._write_tensor, []
    def slow(handle, tensor):
        calls.append(1)
        if len(calls) == 12:
            print("writing", flush=True)
            time.sleep(120)
        write(handle, tensor)
    streaming._write_tensor = slow
config = tiny_config(gemma_config, "2b", {tokenizer!r}, dtype="float32")
config = dataclasses.replace(config, num_hidden_layers=5, quant=False)  # test_offload.build's
with gemma_profiles.use({profile!r}):
    model = gemma_model.GemmaForCausalLM(config)
    model.load_weights({ckpt!r})
print("ready", flush=True)
time.sleep(120)
"""


def killed_while_offloading(
    tokenizer: str,
    checkpoint: str,
    profile: Path,
    env: dict[str, str],
    *,
    nameless: bool,
    stop_writing: bool,
) -> int:
    """Run the gemma flow under ``profile`` in a child, ``kill -9`` it once loaded (or half-way): its pid."""
    code = KILLED.format(
        tests=str(HERE), nameless=nameless, stop_writing=stop_writing, tokenizer=tokenizer,
        profile=str(profile), ckpt=checkpoint,
    )  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == ("writing" if stop_writing else "ready"), child.stderr.read() if child.stderr else ""
        folder = Path(env["OFFLOAD"])
        if not stop_writing:
            assert deleted_files_mapped(folder, child.pid, named_too=True), "the layers are mapped from the folder"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        return child.pid
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("default_folder", [False, True], ids=["offload_folder", "default-cache-folder"])
def test_kill_9_leaves_no_layer_files(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],
    write_profile: Callable[..., Path],
    tmp_path: Path,
    default_folder: bool,
) -> None:
    cache = tmp_path / "xdg"
    folder = cache / "gemma-profiles" / "offload" if default_folder else tmp_path / "offload"
    where = "" if default_folder else f"offload_folder: {folder}, "
    profile = write_profile(
        "killed", f"description: t\nconfig: {{dtype: float32}}\nplacement: {{device: cpu, offload: disk, {where}"
        "device_map: {'0-4': disk}}\n",
    )  # fmt: skip
    env = {"XDG_CACHE_HOME": str(cache), "OFFLOAD": str(folder), "GEMMA_PROFILE_DISABLE_PLUGINS": "kernels,fused"}
    ckpt = checkpoint("2b")
    for stop_writing in (False, True):
        killed_while_offloading(tokenizer_path, ckpt, profile, env, nameless=True, stop_writing=stop_writing)
        assert folder.is_dir() and every_file(folder) == [], "nothing left by the killed process"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_named_files_of_a_killed_process_are_removed_by_the_next_start(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],
    write_profile: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """Where the filesystem has no nameless files: a private subfolder, removed once its process is gone."""
    folder = tmp_path / "offload"
    profile = write_profile(
        "killed", f"description: t\nconfig: {{dtype: float32}}\nplacement: {{device: cpu, offload: disk, "
        f"offload_folder: {folder}, device_map: {{'0-4': disk}}}}\n",
    )  # fmt: skip
    env = {"OFFLOAD": str(folder), "GEMMA_PROFILE_DISABLE_PLUGINS": "kernels,fused"}
    pid = killed_while_offloading(tokenizer_path, checkpoint("2b"), profile, env, nameless=False, stop_writing=True)
    left = every_file(folder)
    assert left and all(name.startswith(f".gemma-offload-{pid}-") for name in left), left
    model = build(gemma, tokenizer_path, "2b")
    model.load_weights(checkpoint("2b"))
    streaming.apply_offload(model, streaming.Layout("cpu", {0: "disk"}, folder=str(folder)))
    assert every_file(folder) == [], "the dead process's subfolder is gone; this one's files have no name"


def disk_model(gemma: Any, tokenizer: str, ckpt: str) -> Any:
    model = build(gemma, tokenizer, "2b")
    model.load_weights(ckpt)
    return model


def test_a_full_disk_names_the_folder_and_what_was_needed_and_leaves_nothing(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],
    reference: Callable[[str], Run],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "offload"
    model = disk_model(gemma, tokenizer_path, checkpoint("2b"))
    layers = {i: "disk" for i in range(5)}
    needed = sum(streaming._packed_layout(model.model.layers[i])[2] for i in layers)
    write, calls = streaming._write_tensor, []

    def fills_the_disk(handle: Any, tensor: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 20:  # some layers written, one half-way
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(handle, tensor)

    monkeypatch.setattr(streaming, "_write_tensor", fills_the_disk)
    with pytest.raises(GemmaProfileError) as raised:
        streaming.apply_offload(model, streaming.Layout("cpu", layers, folder=str(folder)))
    message = str(raised.value)
    assert f"disk offload needs {format_bytes(needed)} ({needed} bytes) for 5 module(s) in {folder}, but " in message
    assert "free there (No space left on device)" in message and "offload fewer layers" in message
    assert "\n" not in message
    assert every_file(folder) == [] and held_in(folder) == [], "the partial files are gone now, not with the model"
    assert streaming.offload_state(model) is None
    # The model is as it was: resident, and right.
    assert same_logits(generate(model.eval()).logits, reference("2b").logits)
    assert not model.model.layers[0].__dict__.get("_apply"), "no offload placement left on the layers"
    assert all(surgery.ORIGINAL not in vars(layer) for layer in model.model.layers), "gemma's classes again"


def test_a_folder_without_room_is_refused_before_anything_is_written(
    gemma: Any, tokenizer_path: str, checkpoint: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    folder = tmp_path / "offload"
    model = disk_model(gemma, tokenizer_path, checkpoint("2b"))
    writes: list[int] = []
    monkeypatch.setattr(streaming, "_write_tensor", lambda handle, tensor: writes.append(1))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=4096))
    with pytest.raises(
        GemmaProfileError, match=rf"needs .* for 2 module\(s\) in {folder}, but 4.00 KiB is free there \("
    ):
        streaming.apply_offload(model, streaming.Layout("cpu", {1: "disk", 3: "disk"}, folder=str(folder)))
    assert writes == [] and every_file(folder) == []


# -- the KV cache ------------------------------------------------------------------------


def forward_once(model: Any, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One prefill step the way gemma's generate() calls forward; returns the logits."""
    config = model.config
    ids = torch.tensor([model.tokenizer.encode(PROMPT)])
    length = ids.shape[1]
    size = caches[0][0].shape[1]
    positions = torch.arange(length)
    mask = torch.full((1, 1, size, size), -2.3819763e38).triu(1).index_select(2, positions)
    local = None
    if config.sliding_window_size:
        rows, cols = torch.arange(size).unsqueeze(1), torch.arange(size).unsqueeze(0)
        allowed = (cols <= rows) & (rows - cols < config.sliding_window_size)
        local = torch.where(allowed, 0.0, -2.3819763e38)[None, None].index_select(2, positions)
    _, logits = model(
        input_token_ids=ids,
        input_positions=positions,
        kv_write_indices=None,
        kv_caches=caches,
        mask=mask,
        output_positions=torch.tensor([length - 1]),
        temperatures=None,
        top_ps=torch.tensor([1.0]),
        top_ks=torch.tensor([1]),
        local_mask=local,
    )
    assert isinstance(logits, torch.Tensor)
    return logits


def new_caches(model: Any, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    config = model.config
    shape = (1, 16, config.num_key_value_heads, config.head_dim)
    return [
        (torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in range(config.num_hidden_layers)
    ]


def assert_caches_written(caches: list[tuple[torch.Tensor, torch.Tensor]], expected: list[Any]) -> None:
    """The caller's own cache tensors hold what the plain model wrote into its own."""
    for index, (got, want) in enumerate(zip(caches, expected, strict=True)):
        assert bool(want[0].abs().sum() > 0), "the reference wrote its cache"
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"layer {index}'s cache was not written"


@pytest.mark.parametrize("placement", ["cpu-streamed", "disk", "disk-with-embedder"])
def test_the_callers_kv_cache_is_written_in_place(
    placement: str, reference: Callable[[str], Run], offloaded: Callable[..., Run]
) -> None:
    plain = reference("2b").model
    expected = new_caches(plain)
    want_logits = forward_once(plain, expected)
    text, stream_cpu = PLACEMENTS[placement]
    model = offloaded("2b", text, stream_cpu).model
    caches = new_caches(model)
    assert torch.equal(forward_once(model, caches), want_logits)
    assert_caches_written(caches, expected)


def copy_caches_like_accelerate(model: Any) -> None:
    """What accelerate's hooks do to a layer's inputs on another device: ``.to()`` - a new tensor."""
    for layer in model.model.layers:
        original = layer.forward

        def forward(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            kwargs["kv_cache"] = tuple(t.to("cpu", copy=True) for t in kwargs["kv_cache"])
            return _original(*args, **kwargs)

        layer.forward = forward


def test_a_copied_kv_cache_is_wrong_silently_and_the_written_check_catches_it(
    reference: Callable[[str], Run],
) -> None:
    plain = reference("2b").model
    expected = new_caches(plain)
    forward_once(plain, expected)
    copying = reference("2b").model
    copy_caches_like_accelerate(copying)
    caches = new_caches(copying)
    forward_once(copying, caches)  # no error ...
    with pytest.raises(AssertionError, match="was not written"):
        assert_caches_written(caches, expected)  # ... but the cache stayed empty
    assert generate(copying).logits[-1].ne(reference("2b").logits[-1]).any(), "decoding went wrong"


@pytest.mark.parametrize("placement", ["cpu-offload-on-cpu", "cpu-streamed", "disk"])
def test_a_kv_cache_on_another_device_raises_instead_of_being_copied(
    placement: str, offloaded: Callable[..., Run]
) -> None:
    text, stream_cpu = PLACEMENTS[placement]
    model = offloaded("2b", text, stream_cpu).model
    copy_caches_like_accelerate(model)  # our check runs before any wrapper could move the cache
    with pytest.raises(GemmaProfileError, match=r"decoder layer 0 runs on cpu but its KV cache is on meta"):
        forward_once(model, new_caches(model, "meta"))


# -- placement and policy -----------------------------------------------------------------


def test_model_to_keeps_offloaded_layers_and_refuses_a_dtype_change(offloaded: Callable[..., Run]) -> None:
    run = offloaded("2b", PLACEMENTS["disk"][0])
    model = run.model
    layer = model.model.layers[2]
    before = layer.mlp.down_proj.weight.data_ptr()
    model.to("cpu")
    assert layer.mlp.down_proj.weight.data_ptr() == before, "still the memory-mapped storage"
    with pytest.raises(GemmaProfileError, match=r"decoder layer 1 is offloaded in torch\.float32"):
        model.to(torch.float16)
    # The offloaded layers show it in their class (no method bound to the instance, gemma's class untouched).
    kind = surgery.original_class(layer)
    assert type(layer).__name__ == f"Offloaded{kind.__name__}" and isinstance(layer, kind)
    assert "_apply" not in vars(layer) and "_apply" not in vars(kind)


def test_removing_offload_gives_the_layers_their_class_back(
    gemma: Any, tokenizer_path: str, checkpoint: Callable[..., str], tmp_path: Path
) -> None:
    model = build(gemma, tokenizer_path, "2b")
    model.load_weights(checkpoint("2b"))
    layer = model.model.layers[3]
    kind = type(layer)
    streaming.apply_offload(model, streaming.Layout("cpu", {3: "disk"}, folder=str(tmp_path)))
    assert type(layer).__name__ == f"Offloaded{kind.__name__}" and type(model.model.layers[2]) is kind
    streaming.remove_offload(model)
    assert type(layer) is kind and surgery.ORIGINAL not in vars(layer)
    model.to(torch.float16)  # a plain layer again: it converts
    assert layer.mlp.down_proj.weight.dtype == torch.float16


def test_without_a_profile_device_generate_runs_on_the_execution_device(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],
    reference: Callable[[str], Run],
    write_profile: Callable[..., Path],
    tmp_path: Path,
) -> None:
    path = write_profile(
        "no-device",
        "name: no-device\ndescription: t\nconfig: {dtype: float32}\n"
        f"placement: {{offload: disk, offload_folder: {tmp_path}, device_map: {{'0-4': disk}}}}\n",
    )
    with gemma_profiles.use(str(path)):
        model = build(gemma, tokenizer_path, "2b")
        model.load_weights(checkpoint("2b"))
        state = streaming.offload_state(model)
        assert state is not None and state.layout.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
        if not torch.cuda.is_available():
            assert model.generate(PROMPT, "meta", output_len=OUTPUT_LEN, temperature=None) == reference("2b").text


def test_loading_twice_reapplies_offload(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],
    reference: Callable[[str], Run],
    write_profile: Callable[..., Path],
    tmp_path: Path,
) -> None:
    path = write_profile(
        "twice",
        "name: twice\ndescription: t\nconfig: {dtype: float32}\n"
        f"placement: {{device: cpu, offload: disk, offload_folder: {tmp_path}, device_map: {{'0-4': disk}}}}\n",
    )
    with gemma_profiles.use(str(path)):
        model = build(gemma, tokenizer_path, "2b")
        model.load_weights(checkpoint("2b"))
        first = streaming.offload_state(model)
        model.load_weights(checkpoint("2b"))
        second = streaming.offload_state(model)
        run = generate(model.eval())
    assert first is not None and second is not None and first is not second
    assert len(model.model.layers[0]._forward_pre_hooks) == 2, "one KV check and one streaming hook, not two of each"
    assert same_logits(run.logits, reference("2b").logits)


def test_a_layer_on_a_gpu_beside_a_cpu_model_is_refused(offloaded: Callable[..., Run]) -> None:
    # (layers on a second GPU beside a CUDA execution device are a pipeline: test_pipeline.py)
    with pytest.raises(GemmaProfileError, match=r"layers on cuda:1 need the model to run on a CUDA device too"):
        offloaded("2b", "{device: cpu, device_map: {'3': 'cuda:1'}}")
    with pytest.raises(GemmaProfileError, match=r"'mps' is not a device layers can run on"):
        offloaded("2b", "{device: cpu, device_map: {'3': mps}}")


def test_a_device_map_naming_something_else_is_refused(offloaded: Callable[..., Run]) -> None:
    with pytest.raises(GemmaProfileError, match=r"'model\.norm' names neither"):
        offloaded("2b", "{device: cpu, device_map: {model.norm: disk}}")
    with pytest.raises(GemmaProfileError, match="decoder layers 0-4"):
        offloaded("2b", "{device: cpu, device_map: {'layers.5': disk}}")


def test_int8_weights_offload_to_disk_like_resident(
    gemma: Any, tokenizer_path: str, write_profile: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int8 layers (weight + weight_scaler) stream like float ones: same tokens as resident under int8.

    Both on torch's int8 path (the native kernel, for resident CPU models only, is tested in test_kernels.py).
    """
    from gemma_testing import build_tiny_model, write_random_checkpoint

    from gemma_profiles.engine import native

    monkeypatch.setenv(native.ENV, "0")
    native.reset()

    quant = build_tiny_model(gemma, tokenizer_path, num_hidden_layers=4, quant=True)
    ckpt = tmp_path / "int8.ckpt"
    write_random_checkpoint(quant, str(ckpt), torch.float32, seed=3)
    runs = []
    for name, placement in (
        ("int8-resident", "{device: cpu}"),
        ("int8-disk", f"{{device: cpu, offload: disk, offload_folder: {tmp_path}, device_map: {{'0-3': disk}}}}"),
    ):
        path = write_profile(
            name,
            f"name: {name}\ndescription: t\nconfig: {{dtype: float32}}\nquantization: {{weights: int8}}\n"
            f"placement: {placement}\n",
        )
        with gemma_profiles.use(str(path)):
            model = build_tiny_model(gemma, tokenizer_path, num_hidden_layers=4)
            model.load_weights(str(ckpt))
            runs.append(generate(model.eval()))
    assert runs[0].text == runs[1].text
    assert same_logits(runs[0].logits, runs[1].logits)


def test_without_a_sized_plan_max_memory_decides_how_many_layers_stay(
    gemma: Any, tokenizer_path: str, write_profile: Callable[..., Path]
) -> None:
    """No target (the profile's device is missing here, or MPS): the split comes from max_memory, else all go."""
    model = build(gemma, tokenizer_path, "2b")
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    rest = sum(p.numel() * p.element_size() for p in model.parameters()) - 5 * layer
    rest += sum(b.numel() * b.element_size() for b in model.buffers())
    budget = rest + (2 + 2) * layer + layer // 2  # two slots, two resident layers, half a layer spare
    for limits, resident in ((f"max_memory: {{cpu: {budget}}}, ", 2), ("", 0)):
        path = write_profile(
            f"unsized-{resident}",
            f"name: unsized-{resident}\ndescription: t\nplacement: {{device: cpu, {limits}offload: disk}}\n",
        )
        plan = make_plan(load_profile(path), "2b")
        assert plan.layers == {} and plan.target is None
        layout = offload.decide_layout(model, plan, "cpu")
        assert layout.offloaded == {i: "disk" for i in range(resident, 5)}, layout


# -- peak RSS ------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_under_disk_offload_stays_below_the_weights(
    gemma: Any, tokenizer_path: str, tmp_path: Path, write_profile: Callable[..., Path]
) -> None:
    from gemma_testing import write_random_checkpoint
    from offload_rss import rss_config

    layers = 16
    config = rss_config(gemma.config, tokenizer_path, layers)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in gemma.model.GemmaForCausalLM(config).named_parameters()}
    ckpt = tmp_path / "wide.ckpt"
    write_random_checkpoint(shapes, str(ckpt), torch.float32, seed=5)
    profile = write_profile(
        "disk-rss",
        "name: disk-rss\ndescription: all layers on disk\nconfig: {dtype: float32}\n"
        f"placement: {{device: cpu, offload: disk, offload_folder: {tmp_path / 'offload'}, "
        f"device_map: {{'0-{layers - 1}': disk}}}}\n",
    )
    completed = subprocess.run(
        [
            sys.executable,
            str(HERE / "offload_rss.py"),
            "--tokenizer",
            tokenizer_path,
            "--ckpt",
            str(ckpt),
            "--profile",
            str(profile),
            "--layers",
            str(layers),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    weights = report["weights"]
    assert weights > 200 * 2**20
    generating = report["peak_generate"] - report["baseline"]
    # Two layers in flight (one computing, one faulted in ahead), plus the small resident rest.
    assert generating < weights / 2, report
    assert report["after_load"] - report["baseline"] < weights / 2, report
    if report["lazy_loader"]:  # a loader that memory-maps the checkpoint: loading stays below the weights too
        assert report["peak_load"] - report["baseline"] < weights, report


# -- the planner (no torch) ----------------------------------------------------------------------


def test_planner_offloads_to_disk_on_a_cpu_target_when_ram_is_short(write_profile: Callable[..., Path]) -> None:
    path = write_profile(
        "small-ram",
        "name: small-ram\ndescription: t\nconfig: {dtype: bfloat16}\nplacement: {device: cpu, offload: disk}\n",
    )
    target = Target("cpu", host_memory=12 * 2**30, cpu_isa=("avx2",), source="test")
    plan = make_plan(load_profile(path), "7b", target=target)
    assert plan.verdict is not None and plan.verdict.fits, plan.verdict
    devices = expand_layers(plan.layers)
    on_disk = [i for i, d in devices.items() if d == "disk"]
    assert on_disk and on_disk == list(range(min(on_disk), 28)), plan.layers
    assert plan.memory is not None
    rows = {item.component: item for item in plan.memory.items}
    assert rows[f"offloaded layers x{len(on_disk)}"].device == "disk"
    assert rows["streaming slots x2"].device == "cpu"


def test_planner_follows_an_explicit_device_map(write_profile: Callable[..., Path]) -> None:
    path = write_profile(
        "mapped",
        "name: mapped\ndescription: t\nconfig: {dtype: float16}\n"
        "placement: {device: cuda, device_map: {'0-9': cuda, model.layers.10-17: cpu}}\n",
    )
    target = Target("cuda:0", "T4", (7, 5), 15 * 2**30, 32 * 2**30, source="test")
    plan = make_plan(load_profile(path), "2b", target=target, shape=ModelShape.of_variant("2b"))
    assert plan.layers == {"0-9": "cuda:0", "10-17": "cpu"}
    assert plan.offloads


def test_device_map_helpers() -> None:
    layers, embedder = split_device_map({"embedder": "cpu", "0-2": "cuda", "model.layers.3": "disk"}, 4)
    assert layers == {0: "cuda:0", 1: "cuda:0", 2: "cuda:0", 3: "disk"} and embedder == "cpu"
    assert compress_layers(["cuda:0", "cuda:0", "cpu", "disk"]) == {"0-1": "cuda:0", "2-2": "cpu", "3-3": "disk"}
    assert expand_layers({"0-1": "cuda:0", "2": "cpu"}) == {0: "cuda:0", 1: "cuda:0", 2: "cpu"}
    with pytest.raises(GemmaProfileError, match="names neither"):
        split_device_map({"sampler": "cpu"}, 4)


def test_the_engine_and_the_planner_name_the_embedder_alike() -> None:
    """The engine finds the tied embedder by gemma's attribute names; a profile's device_map names
    it with the same words (the planner's).  Two modules that may not import each other: held equal here."""
    from gemma_profiles.engine import offload as engine_offload
    from gemma_profiles.planning import plan

    assert engine_offload.EMBEDDER_KEYS == plan.EMBEDDER_KEYS
