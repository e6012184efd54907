"""The offload engine: packed layer storage, weight streaming with prefetch, KV-cache checks (torch-touching).

`apply_offload` places a gemma model as a `Layout` says: resident modules on the
execution device; each offloaded decoder layer packed into one flat buffer (pinned
CPU memory, or a file mapped with torch's ``from_file``) that its parameters view;
forward hooks that bring a layer's weights in just before it runs while the next
one is on its way (`WeightStreamer`), and a check on every layer that its KV cache
is on the execution device.  The policy - which layers, which device - is the
``offload`` builtin's (``hooks/offload.py``); this module only carries it out.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import torch
from torch import nn

from gemma_profiles.engine import surgery
from gemma_profiles.engine.pages import (
    MADV_DONTNEED,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    advise,
    file_mappings,
    process_alive,
)
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.log import logger
from gemma_profiles.units import format_bytes

#: Where a model's offload state lives (a plain attribute, outside nn.Module's registries).
STATE_ATTRIBUTE = "_gemma_profile_offload"
#: Byte alignment of each tensor inside a packed layer: the CUDA caching allocator's, so kernels see what they would.
ALIGNMENT = 512
SLOTS = 2
#: gemma's names for the tied embedder (``Gemma3ForMultimodalLM`` calls it ``text_token_embedder``);
#: a profile's ``device_map`` names it the same way (`gemma_profiles.planning.plan.EMBEDDER_KEYS`,
#: held equal by tests/test_offload.py).
EMBEDDER_KEYS = ("embedder", "text_token_embedder")


@dataclass(frozen=True)
class Layout:
    """Where each part of one model goes.

    :param device: the execution device; every decoder layer runs here.
    :param offloaded: decoder layer index -> ``"cpu"`` or ``"disk"``: where its weights wait.
    :param embedder: ``"cpu"`` or ``"disk"`` when the embedder stays off the execution
        device, else None.
    :param folder: where ``disk`` storage goes (files with no name there: see `DiskFiles`).
    :param reason: where the layer split came from (logged).
    :param layer_map: every layer's device as the log shows it (``0-10 -> cuda:0, 11-17 -> cpu``).
    :param stages: decoder layer index -> the other device that computes it (a pipeline:
        ``cuda:1``); its weights and KV cache live there, activations move (`Pipeline`).
    """

    device: str
    offloaded: dict[int, str]
    embedder: str | None = None
    folder: str | None = None
    reason: str = ""
    layer_map: str = ""
    stages: dict[int, str] = field(default_factory=dict)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise GemmaProfileError(
            f"{type(model).__name__} has no model.layers: not a gemma_pytorch model this plugin knows",
            hint="report it with your gemma_pytorch version",
        )
    return layers


def embedder_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The tied embedder (``Gemma3ForMultimodalLM`` calls it ``text_token_embedder``) and its name."""
    for name in EMBEDDER_KEYS:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return name, module
    return None


# -- storage -----------------------------------------------------------------------------


def _unregister_host(address: int) -> None:
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A flat uint8 CPU buffer, page-locked when ``pin``.

    torch's pinned allocator rounds every block up to a power of two (a 105 MiB layer
    takes 128 MiB); registering an ordinary allocation with ``cudaHostRegister`` pins
    exactly ``nbytes``.  Falls back to ``pin_memory=True`` if registration fails.
    """
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if not pin:
        return buffer
    try:
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        registered = int(cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0)) == 0
    except Exception:  # an older torch without cudart bindings, a driver refusing
        registered = False
    if registered:
        weakref.finalize(buffer, _unregister_host, buffer.data_ptr())
        if buffer.is_pinned():
            return buffer
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


@dataclass
class _Unit:
    """One offloaded module packed into a flat buffer, its parameters viewing into it."""

    name: str
    index: int | None  # decoder layer index; None for the embedder
    module: nn.Module
    kind: str  # "cpu" | "disk"
    params: list[nn.Parameter]
    layout: list[tuple[int, torch.dtype, torch.Size]]
    nbytes: int
    storage: torch.Tensor
    stored: list[torch.Tensor] = field(default_factory=list)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The parameters as views into ``flat`` (the storage, or a slot holding a copy of it)."""
        return [
            flat[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for offset, dtype, shape in self.layout
        ]

    def point_at(self, tensors: list[torch.Tensor]) -> None:
        for param, tensor in zip(self.params, tensors, strict=True):
            param.data = tensor


def _packed_layout(module: nn.Module) -> tuple[list[nn.Parameter], list[tuple[int, torch.dtype, torch.Size]], int]:
    """``module``'s parameters, where each goes in its flat buffer, and the buffer's size."""
    params = list(dict.fromkeys(module.parameters()))
    layout: list[tuple[int, torch.dtype, torch.Size]] = []
    offset = 0
    for param in params:
        layout.append((offset, param.dtype, param.shape))
        offset += -(-param.numel() * param.element_size() // ALIGNMENT) * ALIGNMENT
    return params, layout, max(offset, ALIGNMENT)


#: A private subfolder of the offload folder, where files must have names (see `DiskFiles`).
_PRIVATE = re.compile(r"\.gemma-offload-(?P<pid>\d+)-\w+")


class DiskFiles:
    """Where one model's ``disk`` units live: files that vanish with the process.

    On Linux each unit is a file with no name (``O_TMPFILE``) in the offload folder: once
    mapped, the mapping alone keeps it, so it is gone when the model is - or when the
    process dies, ``kill -9`` included; nothing is ever left to clean up.  Where the
    filesystem (or the OS) has no such files, each is created in a private subfolder
    ``.gemma-offload-<pid>-<random>`` and unlinked as soon as it is mapped (the subfolder
    is removed once the model is placed); subfolders of processes that are gone are removed
    whenever offload starts.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.nameless = hasattr(os, "O_TMPFILE")
        self.private: Path | None = None
        self.left: list[Path] = []  # named files that could not be unlinked while mapped (not POSIX)

    def write(self, name: str, nbytes: int, fill: Callable[[Any], None]) -> torch.Tensor:
        """A file of ``nbytes`` written by ``fill(handle)``, mapped (``MAP_PRIVATE``) as a flat uint8 tensor."""
        fd, path = self._create(name)
        try:
            with open(fd, "wb", closefd=False) as handle:
                handle.truncate(nbytes)
                fill(handle)
            # Written with write(), so the page cache holds large folios, which the map below can
            # use whole (a map written through page by page costs a fault per 4 KiB to read back).
            return torch.from_file(path, shared=False, size=nbytes, dtype=torch.uint8)
        finally:
            os.close(fd)
            if path != f"/proc/self/fd/{fd}":
                try:
                    os.unlink(path)  # the mapping keeps the file: it goes with the model or the process
                except OSError:
                    self.left.append(Path(path))

    def _create(self, name: str) -> tuple[int, str]:
        if self.nameless:
            try:
                fd = os.open(self.folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
                return fd, f"/proc/self/fd/{fd}"
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise
                self.nameless = False  # this filesystem has no nameless files
        if self.private is None:
            self.private = Path(tempfile.mkdtemp(prefix=f".gemma-offload-{os.getpid()}-", dir=self.folder))
        path = self.private / f"{name}.bin"
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600), str(path)

    def placed(self, model: nn.Module) -> None:
        """Every unit is mapped: remove the private subfolder (or leave that to the model's end)."""
        if self.private is None:
            return
        if self.left:
            weakref.finalize(model, shutil.rmtree, str(self.private), True)
        else:
            shutil.rmtree(self.private, ignore_errors=True)

    def failed(self) -> None:
        if self.private is not None and not self.left:
            shutil.rmtree(self.private, ignore_errors=True)


def remove_stale_files(folder: Path) -> list[Path]:
    """Remove the private subfolders (`DiskFiles`) of processes that are gone; returns them."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _PRIVATE.fullmatch(entry.name)
        if match is not None and entry.is_dir(follow_symlinks=False) and not process_alive(int(match["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def pack(
    name: str,
    index: int | None,
    module: nn.Module,
    kind: str,
    files: DiskFiles | None,
    pin: bool,
    file_ranges: list[tuple[int, int]],
) -> _Unit:
    """Copy ``module``'s parameters into one flat buffer (``cpu``) or file (``disk``) and point them there."""
    params, layout, nbytes = _packed_layout(module)
    if kind == "disk":
        assert files is not None

        def fill(handle: Any) -> None:
            for param, (start, _, _) in zip(params, layout, strict=True):
                handle.seek(start)
                _write_tensor(handle, param.data)
                _release_if_mapped(param.data, file_ranges)

        storage = files.write(name, nbytes, fill)
        unit = _Unit(name, index, module, kind, params, layout, nbytes, storage)
    else:
        unit = _Unit(name, index, module, kind, params, layout, nbytes, host_buffer(nbytes, pin))
        for param, view in zip(params, unit.views(unit.storage), strict=True):
            view.copy_(param.data)
            _release_if_mapped(param.data, file_ranges)
    unit.stored = unit.views(unit.storage)
    unit.point_at(unit.stored)
    return unit


def _write_tensor(handle: Any, tensor: torch.Tensor) -> None:
    """Write ``tensor``'s bytes at the file's position, without a copy when it is contiguous on the CPU."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.to("cpu").contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes:
        # Map a memory-mapped source in first: a write() that faults part-way is retried in
        # small pieces, and the page cache then keeps small folios (slow to map back later).
        advise(tensor, MADV_POPULATE_READ)
        handle.write(memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())))


def _release_if_mapped(source: torch.Tensor, file_ranges: list[tuple[int, int]]) -> None:
    """A memory-mapped checkpoint page we will not read again leaves the process now."""
    if source.device.type == "cpu" and any(a <= source.data_ptr() < b for a, b in file_ranges):
        advise(source, MADV_PAGEOUT)


# -- streaming ---------------------------------------------------------------------------


class WeightStreamer:
    """Brings offloaded units to the execution device in a cycle, the next one always on its way.

    Units are used in order (layer k, k+1, ..., the last, then k again at the next
    token).  `acquire` makes a unit's weights ready and starts on the next unit;
    `release` hands the unit back once the compute queued on it is done.

    - *Copied* units (every unit on a GPU; ``cpu`` units on a CPU execution device)
      go through two layer-sized slots: the next unit is copied into the slot not in
      use - on a side CUDA stream, ordered by events, or on the worker thread.  A unit
      still in a slot is not copied again (with one or two offloaded layers nothing
      moves after the first token).
    - *Mapped* units (``disk`` units on a CPU execution device) are used in place,
      zero-copy: the worker thread faults the next unit's file pages in while the
      current one computes, and a released unit's pages leave the process (``madvise``),
      so the resident set holds about two layers, not the weights.
    """

    def __init__(self, units: list[_Unit], device: torch.device, *, prefetch: bool = True):
        self.units = units
        self.device = device
        self.prefetch = prefetch
        self.cuda = device.type == "cuda"
        copied = [unit for unit in units if self.through_slot(unit)]
        size = max((unit.nbytes for unit in copied), default=0)
        count = min(SLOTS, len(copied))
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(count)]
        self.holds: list[int | None] = [None] * count
        self.arrival: list[Future[None] | None] = [None] * count
        self.active: int | None = None
        self.populating: dict[int, Future[None]] = {}
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        #: Units copied into a slot so far (a unit found in its slot is not counted).
        self.copied = 0
        needs_worker = any(unit.kind == "disk" or not self.cuda for unit in units)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="gemma-offload") if needs_worker else None
        if self.worker is not None:
            weakref.finalize(self, self.worker.shutdown, wait=False)
        if self.cuda:
            cuda: Any = torch.cuda  # Stream and Event are untyped
            self.stream = cuda.Stream(device)
            self.ready = [cuda.Event() for _ in range(count)]
            self.released = [cuda.Event() for _ in range(count)]
            self.staged = [cuda.Event() for _ in range(count)]
            staging = any(unit.kind == "disk" for unit in units)
            self.staging = [host_buffer(size, pin=True) for _ in range(count)] if staging else []

    def through_slot(self, unit: _Unit) -> bool:
        """Whether ``unit`` goes through a slot (else it is read in place from its file)."""
        return self.cuda or unit.kind != "disk"

    # -- the cycle ---------------------------------------------------------------

    def acquire(self, position: int) -> list[torch.Tensor]:
        """Wait until unit ``position`` is ready; start on the next one; return its tensors."""
        unit = self.units[position]
        if self.through_slot(unit):
            slot = self._slot_holding(position)
            if slot is None:
                slot = self._free_slot(position)
                self._fetch(position, slot)
            self._arrive(slot)
            self.active = slot
            key = (slot, position)
            if key not in self._views:
                self._views[key] = unit.views(self.slots[slot])
            tensors = self._views[key]
        else:
            pending = self.populating.pop(position, None)
            if pending is not None:
                pending.result()
            tensors = unit.stored
        if self.prefetch:
            self._prefetch((position + 1) % len(self.units))
        return tensors

    def release(self, position: int) -> None:
        """Unit ``position`` has run (its compute is queued): its slot may be refilled after it."""
        if not self.through_slot(self.units[position]):
            advise(self.units[position].storage, MADV_DONTNEED)
            return
        if self.active is not None and self.cuda:
            self.released[self.active].record(torch.cuda.current_stream(self.device))
        self.active = None

    def close(self) -> None:
        """Wait for every copy in flight and stop the worker."""
        for future in [*self.arrival, *self.populating.values()]:
            if future is not None:
                future.result()
        self.populating.clear()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if self.worker is not None:
            self.worker.shutdown(wait=True)

    # -- slots --------------------------------------------------------------------

    def _prefetch(self, position: int) -> None:
        unit = self.units[position]
        if not self.through_slot(unit):
            if position not in self.populating:
                assert self.worker is not None
                self.populating[position] = self.worker.submit(_populate, unit.storage)
            return
        if self._slot_holding(position) is not None:
            return
        free = [slot for slot in range(len(self.slots)) if slot != self.active]
        if free:
            self._fetch(position, free[0])

    def _slot_holding(self, position: int) -> int | None:
        for slot, held in enumerate(self.holds):
            if held == position:
                return slot
        return None

    def _free_slot(self, position: int) -> int:
        """A slot not in use: an empty one, else one not holding the unit that runs next."""
        following = (position + 1) % len(self.units)
        candidates = [slot for slot in range(len(self.slots)) if slot != self.active]
        empty = [slot for slot in candidates if self.holds[slot] is None]
        stale = [slot for slot in candidates if self.holds[slot] != following]
        return (empty or stale or candidates)[0]

    def _fetch(self, position: int, slot: int) -> None:
        previous = self.arrival[slot]
        if previous is not None:
            previous.result()  # a prefetch nobody used: let it land before overwriting
        unit = self.units[position]
        self.holds[slot] = position
        self.copied += 1
        if self.cuda and unit.kind == "cpu":
            self._to_device(unit.storage, slot, unit.nbytes)
            self.arrival[slot] = None
            return
        assert self.worker is not None
        job = self._disk_to_device if self.cuda else self._to_host_slot
        self.arrival[slot] = self.worker.submit(job, unit, slot)

    def _arrive(self, slot: int) -> None:
        future = self.arrival[slot]
        if future is not None:
            future.result()
            self.arrival[slot] = None
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    # -- copies -------------------------------------------------------------------

    def _to_device(self, source: torch.Tensor, slot: int, nbytes: int) -> None:
        """Queue the host->device copy on the side stream, after the slot's last reader."""
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.released[slot])
            self.slots[slot][:nbytes].copy_(source[:nbytes], non_blocking=True)
            self.ready[slot].record(self.stream)
            self.staged[slot].record(self.stream)

    def _disk_to_device(self, unit: _Unit, slot: int) -> None:
        """Worker thread: file pages -> pinned staging buffer -> device slot."""
        self.staged[slot].synchronize()  # the staging buffer's previous copy has left
        staging = self.staging[slot][: unit.nbytes]
        staging.copy_(unit.storage)
        advise(unit.storage, MADV_DONTNEED)
        self._to_device(staging, slot, unit.nbytes)

    def _to_host_slot(self, unit: _Unit, slot: int) -> None:
        """Worker thread, CPU execution: storage -> slot."""
        self.slots[slot][: unit.nbytes].copy_(unit.storage)


def _populate(storage: torch.Tensor) -> None:
    """Map every page of a file-backed buffer in, off the main thread.

    ``MADV_POPULATE_READ`` (Linux 5.14) maps them in one call - the kernel can map a
    page-cache folio whole; elsewhere one byte of each page is read.
    """
    if not advise(storage, MADV_POPULATE_READ):
        storage[:: mmap.PAGESIZE].sum()


# -- applying ----------------------------------------------------------------------------


@dataclass
class OffloadState:
    """What `apply_offload` did to one model, so `remove_offload` can undo it."""

    layout: Layout
    units: list[_Unit]
    streamer: WeightStreamer | None
    handles: list[Any] = field(default_factory=list)
    pinned_modules: list[nn.Module] = field(default_factory=list)
    folder: Path | None = None


def kv_cache_problem(cache: Any, device: torch.device) -> str | None:
    """Why ``cache`` (gemma's ``(k, v)``) cannot be used by a layer running on ``device``."""
    if not isinstance(cache, tuple | list):
        return None
    for tensor in cache:
        if isinstance(tensor, torch.Tensor) and not _same_device(tensor.device, device):
            return f"its KV cache is on {tensor.device}"
    return None


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    if actual.type != wanted.type:
        return False
    return wanted.index is None or actual.index is None or actual.index == wanted.index


def _kv_check(index: int, device: torch.device, label: str) -> Callable[..., None]:
    def check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("kv_cache", args[3] if len(args) > 3 else None)
        problem = kv_cache_problem(cache, device)
        if problem:
            raise GemmaProfileError(
                f"[{label}] decoder layer {index} runs on {device} but {problem}: gemma writes the cache in place "
                "(index_copy_), so moving it would write into a copy and silently give wrong tokens",
                hint=f"allocate every layer's cache on {device}, e.g. model.generate(..., device='{device}')",
            )

    return check


def relocate(tensor: torch.Tensor, device: torch.device) -> None:
    """Move ``tensor`` to ``device`` in place: the same Python object, its data now there.

    gemma's ``generate`` keeps every layer's ``(k, v)`` cache in a list and the layer writes it in
    place (``index_copy_``), so a copy would be written instead of the cache (wrong tokens, no
    error).  Swapping the tensor's data (as ``nn.Module.to`` does for parameters) moves the cache
    itself, once; the list still holds it, and the memory it had is freed.
    """
    moved = tensor.to(device)
    if not torch._has_compatible_shallow_copy_type(tensor, moved):
        raise GemmaProfileError(
            f"a KV cache on {tensor.device} cannot be moved in place to {device} (a {moved.device.type} tensor "
            "is not interchangeable with it)",
            hint="map decoder layers only to CUDA devices (cuda:N), cpu or disk",
        )
    tensor.data = moved


#: A decoder layer's keyword arguments that differ from layer to layer (gemma's names).
_PER_LAYER = ("hidden_states",)


class Pipeline:
    """Decoder layers computed on other devices (`Layout.stages`): each such layer's inputs go to
    its device before it runs, and the final norm's input comes back to the execution device.

    The step's shared inputs (rope table rows, masks, write indices) are moved once per step and
    device, not once per layer: the moved copies are kept until the decoder stack's next call.
    A layer's KV cache is moved in place at its first step (`relocate`) and stays there.
    """

    def __init__(self, device: torch.device, devices: list[torch.device]) -> None:
        self.device = device
        self.devices = devices  # every decoder layer's compute device
        self._moved: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def new_step(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._moved.clear()

    def shared(self, value: Any, device: torch.device) -> Any:
        """``value`` on ``device``: moved once per step (tensors, tuples and lists of them)."""
        if isinstance(value, torch.Tensor):
            if _same_device(value.device, device):
                return value
            key = (id(value), device)
            held = self._moved.get(key)
            if held is None or held[0] is not value:  # (an id can be reused once a tensor is freed)
                held = (value, value.to(device))  # (blocking: a GPU -> CPU copy must be complete when read)
                self._moved[key] = held
            return held[1]
        if isinstance(value, tuple | list):
            return type(value)(self.shared(v, device) for v in value)
        return value

    def layer_hook(self, index: int) -> Callable[..., Any]:
        device = self.devices[index]

        def to_layer(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            cache = kwargs.get("kv_cache")
            if isinstance(cache, tuple | list):
                for tensor in cache:
                    if isinstance(tensor, torch.Tensor) and not _same_device(tensor.device, device):
                        relocate(tensor, device)
            # The hidden states change every layer (moved as they are, at a device boundary only);
            # the rest is the step's (`shared`).
            moved = {key: self._input(key, value, device) for key, value in kwargs.items()}
            return tuple(_move(a, device) for a in args), moved

        return to_layer

    def _input(self, key: str, value: Any, device: torch.device) -> Any:
        if key == "kv_cache":
            return value
        return _move(value, device) if key in _PER_LAYER else self.shared(value, device)

    def home_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return tuple(_move(a, self.device) for a in args), {k: _move(v, self.device) for k, v in kwargs.items()}

    def install(self, model: nn.Module) -> list[Any]:
        layers = decoder_layers(model)
        stack = model.model
        assert isinstance(stack, nn.Module)  # (decoder_layers checked model.model.layers)
        handles = [stack.register_forward_pre_hook(self.new_step, with_kwargs=True)]
        previous = self.device
        for index, layer in enumerate(layers):
            here = self.devices[index]
            if here != self.device or previous != here:
                handles.append(layer.register_forward_pre_hook(self.layer_hook(index), with_kwargs=True, prepend=True))
            previous = here
        norm = getattr(stack, "norm", None)
        if previous != self.device and isinstance(norm, nn.Module):
            handles.append(norm.register_forward_pre_hook(self.home_hook, with_kwargs=True))
        return handles


def _stream_hooks(streamer: WeightStreamer, position: int) -> tuple[Callable[..., None], Callable[..., None]]:
    unit = streamer.units[position]

    def bring_in(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        unit.point_at(streamer.acquire(position))

    def send_back(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        unit.point_at(unit.stored)
        streamer.release(position)

    return bring_in, send_back


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_move(v, device) for v in value)
    return value


def _embedder_hooks(model: nn.Module, embedder: nn.Module, device: torch.device) -> list[Any]:
    """The embedder computes where its weight is; the sampler too (it reads the weight directly)."""

    def lookup_there(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return tuple(_move(a, weight.device) for a in args)

    def back_here(module: nn.Module, args: Any, output: Any) -> Any:
        return _move(output, device)

    def sample_there(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        embedding = kwargs.get("embedding")
        if not isinstance(embedding, torch.Tensor):
            return None
        return _move(args, embedding.device), {k: _move(v, embedding.device) for k, v in kwargs.items()}

    handles = [embedder.register_forward_pre_hook(lookup_there), embedder.register_forward_hook(back_here)]
    sampler = getattr(model, "sampler", None)
    if isinstance(sampler, nn.Module):
        handles.append(sampler.register_forward_pre_hook(sample_there, with_kwargs=True))
        handles.append(sampler.register_forward_hook(back_here))
    return handles


class KeepPlacement(surgery.Surgery):
    """An offloaded module: ``model.to(device)`` leaves it where offload put it (its weights
    stream in from their storage), a dtype change is an error naming it."""

    prefix = "Offloaded"

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        what, floating = self.__dict__[_PLACED]
        if floating is not None:
            try:
                probe = fn(torch.empty(0, dtype=floating))
            except Exception:  # a device this machine lacks: moving is ignored anyway
                probe = None
            if isinstance(probe, torch.Tensor) and probe.dtype != floating:
                raise GemmaProfileError(
                    f"{what} is offloaded in {floating}; converting it to {probe.dtype} is not supported",
                    hint="set config.dtype in the profile instead of calling .to(dtype) / .half()",
                )
        return self


#: Instance attribute of a `KeepPlacement` module: (what to call it, its floating dtype or None).
_PLACED = "_gemma_profile_offloaded"


def _keep_placement(module: nn.Module, what: str) -> None:
    """``model.to(device)`` leaves ``module`` where offload put it; a dtype change is an error."""
    floating = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    module.__dict__[_PLACED] = (what, floating)
    surgery.swap(module, KeepPlacement)


def _release_placement(module: nn.Module) -> None:
    """Undo `_keep_placement` (other changes to the module's class stay)."""
    surgery.unswap(module, KeepPlacement)
    module.__dict__.pop(_PLACED, None)


def _offload_folder(layout: Layout) -> Path:
    """The offload folder (created), after removing what dead processes left there."""
    base = Path(layout.folder).expanduser() if layout.folder else Path(platformdirs.user_cache_dir("gemma-profiles"))
    if not layout.folder:
        base = base / "offload"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GemmaProfileError(
            f"cannot create the offload folder: {exc.strerror or exc}",
            where=str(base),
            hint="set placement.offload_folder",
        ) from exc
    for stale in remove_stale_files(base):
        logger.info("offload: removed {}, left by a process that is gone", stale)
    return base


def _no_room(folder: Path, needed: int, layers: int, cause: str) -> GemmaProfileError:
    try:
        free = format_bytes(shutil.disk_usage(folder).free)
    except OSError:
        free = "an unknown amount"
    return GemmaProfileError(
        f"disk offload needs {format_bytes(needed)} ({needed} bytes) for {layers} module(s) in {folder}, "
        f"but {free} is free there{cause}",
        where="placement.offload_folder",
        hint="free some space there, set placement.offload_folder to a disk with room, or offload fewer layers",
    )


def _undo(units: list[_Unit], modules: list[nn.Module]) -> None:
    """Packing failed: every packed module gets its weights back in memory and drops its storage (files go now)."""
    with torch.no_grad():
        for unit in units:
            unit.point_at([tensor.clone() for tensor in unit.stored])
            unit.stored = []
            unit.storage = torch.empty(0, dtype=torch.uint8)
    units.clear()
    for module in modules:
        _release_placement(module)


def apply_offload(model: nn.Module, layout: Layout, label: str = "offload", *, prefetch: bool = True) -> OffloadState:
    """Place ``model`` as ``layout`` says and install the streaming and KV-cache hooks.

    Called by the plugin after loading; tests and benchmarks may call it directly.
    Applying again first undoes the previous application (`remove_offload`).

    :raises GemmaProfileError: the offload folder cannot hold the ``disk`` layers (it names
        the folder, the bytes needed and the bytes free); the model is left as it was,
        resident, and nothing stays on disk.
    """
    remove_offload(model)
    device = torch.device(layout.device)
    layers = decoder_layers(model)
    pin = device.type == "cuda"
    found = embedder_of(model)
    on_disk = [layers[i] for i, kind in layout.offloaded.items() if kind == "disk"]
    if layout.embedder == "disk" and found is not None:
        on_disk.append(found[1])
    folder = _offload_folder(layout) if on_disk or layout.embedder == "disk" else None
    files = DiskFiles(folder) if folder is not None else None
    needed = sum(_packed_layout(module)[2] for module in on_disk)
    if folder is not None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < needed:
                raise _no_room(folder, needed, len(on_disk), "")
    file_ranges = file_mappings()
    units: list[_Unit] = []
    packed: list[_Unit] = []  # units and the disk embedder: what to undo on a failure
    state = OffloadState(layout, units, None, folder=folder)
    try:
        with torch.no_grad():
            for index in sorted(layout.offloaded):
                layer = layers[index]
                for sub in layer.modules():  # buffers (none in gemma's layers) stay resident
                    for key, buffer in list(sub._buffers.items()):
                        if buffer is not None:
                            sub._buffers[key] = buffer.to(device)
                unit = pack(f"layer{index:03d}", index, layer, layout.offloaded[index], files, pin, file_ranges)
                units.append(unit)
                packed.append(unit)
                _keep_placement(layer, f"decoder layer {index}")
                state.pinned_modules.append(layer)
            if layout.embedder is not None and found is not None:
                name, embedder = found
                if layout.embedder == "disk":
                    packed.append(pack(name, None, embedder, "disk", files, False, file_ranges))
                else:
                    embedder.to("cpu")
                _keep_placement(embedder, name)
                state.pinned_modules.append(embedder)
                state.handles += _embedder_hooks(model, embedder, device)
            for index, stage in sorted(layout.stages.items()):
                layers[index].to(stage)  # (the loader put its weights there already: a no-op then)
                _keep_placement(layers[index], f"decoder layer {index} (computed on {stage})")
                state.pinned_modules.append(layers[index])
            # Everything else (resident layers, embedder, norm, rope tables) on the execution device.
            nn.Module.to(model, device)
    except BaseException as exc:
        _undo(packed, state.pinned_modules)
        for handle in state.handles:
            handle.remove()
        if files is not None:
            files.failed()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and folder is not None:
            raise _no_room(folder, needed, len(on_disk), f" ({exc.strerror or 'no space left on device'})") from None
        if isinstance(exc, OSError) and folder is not None:
            raise GemmaProfileError(
                f"writing the offloaded layers failed: {exc.strerror or exc}",
                where=str(folder),
                hint="set placement.offload_folder to a writable local disk",
            ) from None
        raise
    if files is not None:
        files.placed(model)
    if units:
        state.streamer = WeightStreamer(units, device, prefetch=prefetch)
    positions = {unit.index: position for position, unit in enumerate(units)}
    if layout.stages:
        devices = [torch.device(layout.stages.get(index, layout.device)) for index in range(len(layers))]
        state.handles += Pipeline(device, devices).install(model)
    for index, layer in enumerate(layers):
        if index not in layout.stages:  # (a stage's cache moves to it: `Pipeline`)
            state.handles.append(layer.register_forward_pre_hook(_kv_check(index, device, label), with_kwargs=True))
        if index in positions and state.streamer is not None:
            bring_in, send_back = _stream_hooks(state.streamer, positions[index])
            state.handles.append(layer.register_forward_pre_hook(bring_in, with_kwargs=True))
            state.handles.append(layer.register_forward_hook(send_back, with_kwargs=True, always_call=True))
    model.__dict__[STATE_ATTRIBUTE] = state
    _log(layout, units, label, len(layers), state)
    return state


def remove_offload(model: nn.Module) -> None:
    """Remove the hooks `apply_offload` installed; offloaded parameters keep pointing at their storage."""
    state: OffloadState | None = model.__dict__.pop(STATE_ATTRIBUTE, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    for module in state.pinned_modules:
        _release_placement(module)
    for unit in state.units:
        unit.point_at(unit.stored)
    if state.streamer is not None:
        state.streamer.close()


def offload_state(model: nn.Module) -> OffloadState | None:
    state = model.__dict__.get(STATE_ATTRIBUTE)
    return state if isinstance(state, OffloadState) else None


def _log(layout: Layout, units: list[_Unit], label: str, count: int, state: OffloadState) -> None:
    spans = layout.layer_map or f"{len(layout.offloaded)} of {count} offloaded"
    if not units and layout.embedder is None:
        logger.info("[{}] offload ({}): every layer resident on {}", label, layout.reason, layout.device)
        return
    streamer = state.streamer
    slotted = [unit for unit in units if streamer is not None and streamer.through_slot(unit)]
    how = []
    if slotted:
        size = format_bytes(max(unit.nbytes for unit in slotted))
        side = "a side CUDA stream" if layout.device.startswith("cuda") else "a worker thread"
        how.append(f"{len(slotted)} copied through {min(SLOTS, len(slotted))} slot(s) of {size} by {side}")
    if len(slotted) < len(units):
        how.append(f"{len(units) - len(slotted)} read in place from their files, the next one mapped ahead")
    logger.info(
        "[{}] offload ({}): layers {}; {} of weights: {}{}{}",
        label,
        layout.reason,
        spans,
        format_bytes(sum(unit.nbytes for unit in units)),
        "; ".join(how),
        f"; embedder on {layout.embedder}" if layout.embedder else "",
        f"; files (unnamed, gone with the process) in {state.folder}" if state.folder else "",
    )
