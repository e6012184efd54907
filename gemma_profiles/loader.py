"""Lean checkpoint loading: memory-mapped, tensor by tensor, assigned instead of copied.

Torch-touching; used by the ``loading`` builtin (``hooks/loading.py``).

gemma's own ``load_weights`` loads the whole state dict and copies it into the
parameters (peak RSS 2.0x the checkpoint, DESIGN.md) and loads with
``strict=False``, so a missing tensor or a float checkpoint in an int8 model
passes silently.  This loader, used whenever a profile is active:

- reads single files, sharded folders (``pytorch_model.bin.index.json``) and
  safetensors (a ``.safetensors`` file or ``model.safetensors.index.json``)
  through memory maps, with ``weights_only=True``;
- puts each tensor straight into the lazily built (meta) model: the mapped
  tensor itself when dtype and device already match (no copy), else one
  converted tensor at a time;
- quantizes float weights to gemma's int8 format (int8 weight + per-row
  ``weight_scaler``) when the plan says ``int8``, and dequantizes an int8
  checkpoint into a float model, in row chunks;
- places each tensor on its layer's device (the plan's layer map; offloaded
  layers stay on the CPU), and reports missing tensors by name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import pickle
import re
from collections.abc import Iterator
from typing import Any

import torch
from loguru import logger

from . import hugepages
from .errors import GemmaProfileError
from .lazy import assign, meta_tensors, set_lazy
from .plan import Plan

INDEX_FILE = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SCALER = "_scaler"
CHUNK_ROWS = 8192
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def check_checkpoint(path: str) -> None:
    """A missing checkpoint is a user error with a clear message, not a traceback."""
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, index)) for index in (INDEX_FILE, SAFETENSORS_INDEX)):
            raise GemmaProfileError(
                f"checkpoint folder has no {INDEX_FILE} or {SAFETENSORS_INDEX}",
                where=path,
                hint="pass the .ckpt file or a sharded checkpoint folder",
            )
        return
    raise GemmaProfileError("checkpoint not found", where=path, hint="check the --ckpt path")


# -- reading ------------------------------------------------------------------------


Item = tuple[str, torch.Tensor, bool]  # name, tensor, memory-mapped from the file


def _torch_file(path: str) -> Iterator[Item]:
    mapped = True
    try:
        try:
            state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            logger.warning("{} is not in the zip format torch can memory-map; reading it whole", path)
            state = torch.load(path, weights_only=True, map_location="cpu")
            mapped = False
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL [\w.]+", str(exc))
        first = found.group(0) if found else type(exc).__name__
        raise GemmaProfileError(
            f"refused: the checkpoint holds Python objects, not only tensors ({first[:160]})",
            where=path,
            hint="gemma-profiles loads checkpoints with weights_only=True; use a plain state-dict checkpoint",
        ) from None
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise GemmaProfileError("checkpoint does not hold a state dict", where=path)
    # Hand tensors out one by one and drop our reference, so converted ones can be freed.
    for name in list(state):
        yield name, state.pop(name), mapped


def _safetensors_file(path: str) -> Iterator[Item]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise GemmaProfileError(
            "reading .safetensors needs the safetensors package", where=path, hint="pip install safetensors"
        ) from None
    with safe_open(path, framework="pt", device="cpu") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            yield name, handle.get_tensor(name), False


def iter_checkpoint(path: str) -> Iterator[Item]:
    """(name, tensor, mapped) of a checkpoint, memory-mapped where the format allows."""
    if os.path.isfile(path):
        yield from (_safetensors_file(path) if path.endswith(".safetensors") else _torch_file(path))
        return
    for index_name, reader in ((SAFETENSORS_INDEX, _safetensors_file), (INDEX_FILE, _torch_file)):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle).get("weight_map", {}).values()))
            for shard in shards:
                yield from reader(os.path.join(path, shard))
            return


# -- converting ---------------------------------------------------------------------


def _pages(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The whole pages inside a CPU tensor's bytes, ``[first, last)``; None if there are none."""
    if _LIBC is None or tensor.device.type != "cpu" or tensor.is_mkldnn or tensor.is_meta:
        return None
    start, length = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first = -(-start // _PAGE) * _PAGE
    last = (start + length) // _PAGE * _PAGE
    return (first, last) if last > first else None


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a memory-mapped source tensor we are done with (Linux).

    The mapping is private and never written, so the kernel re-reads the file if
    the pages are touched again; without this, every converted tensor's source
    pages stay in RSS until the whole checkpoint mapping goes away.
    """
    pages = _pages(tensor)
    if pages is not None and _LIBC is not None and _file_backed(*pages):
        _LIBC.madvise(ctypes.c_void_p(pages[0]), ctypes.c_size_t(pages[1] - pages[0]), _MADV_DONTNEED)


def memory_mapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (contiguous) lies in a private file mapping: a mapped checkpoint's."""
    pages = _pages(tensor)
    return pages is not None and _file_backed(*pages)


def _file_backed(first: int, last: int) -> bool:
    """Whether ``[first, last)`` lies in one private file mapping (``/proc/self/maps``).

    ``MADV_DONTNEED`` on anonymous memory zeroes it: only a mapped checkpoint's pages,
    which the kernel re-reads from the file, may be dropped.
    """
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, _, high = fields[0].partition("-")
                if int(low, 16) <= first < int(high, 16):
                    return last <= int(high, 16) and fields[4] != "0" and fields[1].endswith("p")
    except (OSError, ValueError, IndexError):
        return False
    return False


def quantize_rows(
    weight: torch.Tensor, scaler_dtype: torch.dtype, mapped: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight ~= q * scaler[:, None]``, in chunks of rows.

    ``weight`` is left as it was; when it is ``mapped`` (a memory-mapped checkpoint tensor),
    each chunk's pages are released once read, so a source tensor is never resident whole.
    """
    from . import native

    rows = weight.shape[0]
    # The native kernel streams these every token: onto huge pages (hugepages.py).  torch's
    # int8 kernel is compute-bound, and the float32 temporaries below would be left in the
    # heap that q no longer reuses (+0.35 GiB peak for 2b): ordinary memory there.
    allocate = hugepages.empty if native.unavailable() is None else torch.empty
    q = allocate(tuple(weight.shape), dtype=torch.int8)
    scaler = torch.empty(rows, dtype=torch.float32)
    for start in range(0, rows, CHUNK_ROWS):
        source = weight[start : start + CHUNK_ROWS]
        if native.quantize_rows_into(source, q[start : start + CHUNK_ROWS], scaler[start : start + CHUNK_ROWS]):
            if mapped:  # the same numbers, without float32 copies (the native kernel, when built)
                release_pages(source)
            continue
        block = source.to(torch.float32, copy=True)
        if mapped:
            release_pages(source)
        scale = block.abs().amax(dim=1).clamp_(min=1e-12).div_(127.0)
        q[start : start + CHUNK_ROWS] = block.div_(scale.unsqueeze(1)).round_().clamp_(-127, 127)
        scaler[start : start + CHUNK_ROWS] = scale
    return q, scaler.to(scaler_dtype)


def dequantize_rows(weight: torch.Tensor, scaler: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=dtype)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        out[rows] = (weight[rows].to(torch.float32) * scaler[rows].to(torch.float32).unsqueeze(1)).to(dtype)
    return out


def execution_devices(plan: Plan, pending: str | None = None) -> tuple[str, dict[int, str]]:
    """The device resident tensors go to, and per-layer devices from the plan's layer map.

    :param pending: a device the script asked for with ``.to()`` before loading.
    """
    from .hooks.placement import device_problem

    device = "cpu"
    wanted = str(plan.device.value) if plan.device is not None else pending
    if wanted is not None:
        device = wanted if device_problem(wanted) is None else "cpu"
    layers: dict[int, str] = {}
    for span, where in plan.layers.items():
        first, _, last = span.partition("-")
        for index in range(int(first), int(last or first) + 1):
            layers[index] = "cpu" if where in ("cpu", "disk") or device == "cpu" else device
    return device, layers


def lean_load(model: Any, path: str, plan: Plan) -> None:
    """Load ``path`` into a lazily built ``model`` following ``plan``."""
    from .lazy import pending_device

    device, layer_devices = execution_devices(plan, pending_device(model))
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    int8_in_model = {name for name, t in targets.items() if t.dtype == torch.int8}
    pending_int8: dict[str, torch.Tensor] = {}
    pending_scalers: dict[str, torch.Tensor] = {}
    loaded: set[str] = set()
    unexpected: list[str] = []

    def device_for(name: str) -> str:
        match = _LAYER.match(name.removeprefix("model.") if name.startswith("model.model.") else name)
        return layer_devices.get(int(match.group(1)), device) if match else device

    def place(name: str, tensor: torch.Tensor) -> torch.Tensor:
        target = targets[name]
        wanted = device_for(name)
        if tensor.dtype != target.dtype:
            tensor = tensor.to(target.dtype)
        if str(tensor.device) != wanted:
            tensor = tensor.to(wanted)
        assign(model, name, tensor)
        loaded.add(name)
        return tensor

    def float_from_int8(name: str) -> None:
        place(name, dequantize_rows(pending_int8.pop(name), pending_scalers.pop(name + SCALER), targets[name].dtype))

    for name, tensor, mapped in iter_checkpoint(path):
        if name not in targets:
            if name.endswith(SCALER) and name[: -len(SCALER)] in targets:
                pending_scalers[name] = tensor  # an int8 checkpoint for a float model
                if name[: -len(SCALER)] in pending_int8:
                    float_from_int8(name[: -len(SCALER)])
                continue
            unexpected.append(name)
            continue
        if name in int8_in_model and tensor.is_floating_point():
            q, scaler = quantize_rows(tensor, targets[name + SCALER].dtype, mapped)
            place(name, q)
            place(name + SCALER, scaler)
            if mapped:
                release_pages(tensor)
        elif name.endswith(SCALER) and name in loaded:
            continue  # we produced this scaler by quantizing the float weight
        elif tensor.dtype == torch.int8 and name not in int8_in_model and targets[name].is_floating_point():
            pending_int8[name] = tensor
            if name + SCALER in pending_scalers:
                float_from_int8(name)
        else:
            if place(name, tensor) is not tensor and mapped:
                release_pages(tensor)  # converted or moved: the mapped source is done with
    missing = [name for name in meta_tensors(model) if name not in loaded]
    if missing or pending_int8:
        shown = ", ".join((missing + list(pending_int8))[:6])
        raise GemmaProfileError(
            f"checkpoint lacks {len(missing) + len(pending_int8)} tensor(s) the model needs: {shown}",
            where=path,
            hint=f"is it a checkpoint for this variant? (profile '{plan.profile}')",
        )
    # Whatever gemma computed at construction (rope tables) follows the resident weights.
    for name, buffer in model.named_buffers():
        if name not in loaded and str(buffer.device) != device_for(name):
            assign(model, name, buffer.to(device_for(name)))
    if unexpected:
        logger.debug("[{}] ignored {} checkpoint tensors the model has no place for", plan.profile, len(unexpected))
    set_lazy(model, False)
    logger.info("[{}] loaded {} tensors from {} (memory-mapped; {})", plan.profile, len(loaded), path, device)
