"""Lean checkpoint loading: checked first, memory-mapped, tensor by tensor, assigned instead of copied.

Torch-touching; used by the ``loading`` builtin (``hooks/loading.py``), which reads the
Plan and hands `lean_load` plain values (`LoadOptions`).  What is checked and the
memory-map trade-off: docs/loading.md.

gemma's own ``load_weights`` loads the whole state dict and copies it into the
parameters (peak RSS 2.0x the checkpoint) with ``strict=False``, so a missing
tensor, a float checkpoint in an int8 model or an integer weight passes
silently.  This loader, used whenever a profile is active:

- opens single files, sharded folders (``pytorch_model.bin.index.json``) and
  safetensors (a ``.safetensors`` file or ``model.safetensors.index.json``)
  through memory maps, with ``weights_only=True``; a file that is none of
  these, or is truncated or damaged, is one `CheckpointError` naming it;
- checks every tensor's name, shape and dtype against the model *before*
  converting any of them (only the headers are read): every parameter the
  model has must be there, of the model's shape, floating point where the
  model is (int8 only as gemma's quantized layout, with its ``weight_scaler``);
  tensors the model has no place for are ignored, as gemma ignores them;
- puts each tensor straight into the lazily built (meta) model: the mapped
  tensor itself when dtype and device already match (no copy; ``loading:
  {mmap: false}`` copies it), else one converted tensor at a time, refusing
  NaN/Inf values (and values a conversion overflows) with the tensor's name;
- quantizes float weights to gemma's int8 format (int8 weight + per-row
  ``weight_scaler``) where the model has int8 weights, and dequantizes an int8
  checkpoint into a float model, in row chunks;
- places each tensor on its layer's device (`LoadOptions`'s layer map; offloaded
  layers stay on the CPU);
- watches the files the model still reads memory-mapped weights from: a file
  truncated or rewritten after loading is a `CheckpointChangedError` before the
  next forward, not a ``Bus error`` or different numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import stat
import struct
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from gemma_profiles.engine import hugepages, native, parallel
from gemma_profiles.engine.half import stored_names
from gemma_profiles.engine.lazy import assign, meta_tensors, set_lazy
from gemma_profiles.engine.offload import EMBEDDER_KEYS
from gemma_profiles.engine.pages import mapped_ranges, memory_mapped, release_pages
from gemma_profiles.errors import CheckpointChangedError, CheckpointError, is_out_of_memory
from gemma_profiles.log import logger

INDEX_FILE = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SCALER = "_scaler"
#: The tied embedder's per-column scales when it is quantized while loading (a buffer of the
#: embedder, not saved: ``state_dict()`` gives gemma's per-row format; `gemma_profiles.engine.quantization`).
COLUMN_SCALER = "weight_column_scaler"
#: The decoder's int8 weights' scales per group of `INT8_GROUP_COLUMNS` columns when quantized
#: while loading for the native kernel's AVX2 path (a float32 ``n x k/group`` buffer of the
#: ``Linear``, not saved: ``state_dict()`` gives gemma's per-row format).
GROUP_SCALER = "weight_group_scaler"
#: Columns per int8 scale group (llama.cpp's Q8_0: 32).  On the real Gemma 3 270M in float32
#: compute, groups of 128 / 64 / 32 gave a mean KL to float32 of 0.0018 / 0.0015 / 0.0012
#: against 0.0033 per row (docs/engine.md); 64 is the smallest the packed layout's 64-byte
#: blocks take whole.
INT8_GROUP_COLUMNS = 64
CHUNK_ROWS = 8192
#: Bytes summed at a time by the NaN/Inf check: few enough calls that each call's thread start-up
#: is lost in it (4 Mi elements at a time ran at a fifth of the speed), one chunk resident at a time.
FINITE_CHUNK_BYTES = 64 << 20
_DAMAGED = "the file is truncated or damaged: download or save it again"
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def check_checkpoint(path: str) -> None:
    """A checkpoint path that is not a file or a sharded folder: one line, before any reading."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError("checkpoint not found", where=path, hint="check the --ckpt path") from None
    except OSError as exc:
        raise CheckpointError(
            f"cannot read the checkpoint ({exc.strerror})", where=path, hint="check the path and its permissions"
        ) from None
    if stat.S_ISDIR(info.st_mode):
        if not any(os.path.isfile(os.path.join(path, index)) for index in (INDEX_FILE, SAFETENSORS_INDEX)):
            raise CheckpointError(
                f"checkpoint folder has no {INDEX_FILE} or {SAFETENSORS_INDEX}",
                where=path,
                hint="pass the .ckpt file or a sharded checkpoint folder",
            )
        return
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(
            "not a regular file (a pipe, socket or device is never read as a checkpoint)",
            where=path,
            hint="pass the .ckpt file or a sharded checkpoint folder",
        )


# -- opening ------------------------------------------------------------------------


Item = tuple[str, torch.Tensor, bool]  # name, tensor, memory-mapped from the file


@dataclass(frozen=True)
class Stamp:
    """A checkpoint file as it was when it was opened: an open descriptor and what it said."""

    path: str
    fd: int
    inode: int
    size: int
    mtime_ns: int


@dataclass
class Shard:
    """One opened checkpoint file: its tensors' headers, and a reader that hands them out."""

    path: str
    stamp: Stamp
    headers: dict[str, tuple[tuple[int, ...], torch.dtype | str]]
    read: Callable[[], Iterator[Item]]


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _stamp(path: str) -> Stamp:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(
            "checkpoint file not found", where=path, hint="a sharded checkpoint needs every shard its index names"
        ) from None
    except OSError as exc:
        raise CheckpointError(
            f"cannot open the checkpoint file ({exc.strerror})", where=path, hint="check its permissions"
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        _close(fd)
        raise CheckpointError("not a regular file", where=path, hint="pass the .ckpt file or a sharded folder")
    return Stamp(path, fd, info.st_ino, info.st_size, info.st_mtime_ns)


def _sniff(stamp: Stamp) -> str:
    """``zip``, ``pickle``, ``safetensors`` - or a CheckpointError saying what the file is not."""
    if stamp.size == 0:
        raise CheckpointError("the checkpoint file is empty (0 bytes)", where=stamp.path, hint=_DAMAGED)
    head = os.pread(stamp.fd, 9, 0)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80") and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"  # torch.save's format before 1.6
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < stamp.size:
        return "safetensors"
    raise CheckpointError(
        f"not a checkpoint: neither a PyTorch file (zip or pickle) nor safetensors ({stamp.size} bytes)",
        where=stamp.path,
        hint="pass the model's .ckpt file (or a folder with pytorch_model.bin.index.json)",
    )


def _first_sentence(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.split(". ")[0].rstrip(".")
    return text[:160] + ("..." if len(text) > 160 else "")


def _state_dict(state: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(
            f"the checkpoint holds a {type(state).__name__}, not a state dict of tensors",
            where=path,
            hint="save {'model_state_dict': model.state_dict()} or a plain state dict",
        )
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            shown = repr(name)[:80]
            raise CheckpointError(
                f"the state dict holds a {type(value).__name__} under {shown}, not a tensor",
                where=path,
                hint="a checkpoint's state dict maps tensor names to tensors",
            )
    return state


def _open_torch(stamp: Stamp, kind: str) -> Shard:
    path = stamp.path
    mapped = kind == "zip"
    try:
        state = torch.load(path, mmap=mapped, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL [\w.]+", str(exc))
        if found is None:
            raise CheckpointError(
                "not a readable PyTorch checkpoint (its pickle is damaged)", where=path, hint=_DAMAGED
            ) from None
        raise CheckpointError(
            f"refused: the checkpoint holds Python objects, not only tensors ({found.group(0)[:160]})",
            where=path,
            hint="gemma-profiles loads checkpoints with weights_only=True; use a plain state-dict checkpoint",
        ) from None
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise CheckpointError(
            f"not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_sentence(exc)})",
            where=path,
            hint=_DAMAGED,
        ) from None
    if not mapped:
        logger.warning("{} is in torch's old (pre-1.6) format, which cannot be memory-mapped: read whole", path)
    tensors = _state_dict(state, path)
    headers: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = {
        name: (tuple(t.shape), t.dtype) for name, t in tensors.items()
    }

    def read() -> Iterator[Item]:
        # Hand tensors out one by one and drop our reference, so converted ones can be freed.
        for name in list(tensors):
            yield name, tensors.pop(name), mapped

    return Shard(path, stamp, headers, read)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _open_safetensors(stamp: Stamp, stack: contextlib.ExitStack) -> Shard:
    path = stamp.path
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(
            "reading .safetensors needs the safetensors package", where=path, hint="pip install safetensors"
        ) from None
    try:
        handle = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        headers: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = {}
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            piece = handle.get_slice(name)
            kind = str(piece.get_dtype())
            headers[name] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(kind, kind))
    except Exception as exc:
        raise CheckpointError(
            f"not a readable safetensors file ({_first_sentence(exc)})", where=path, hint=_DAMAGED
        ) from None

    def read() -> Iterator[Item]:
        for name in headers:
            try:
                tensor = handle.get_tensor(name)
            except Exception as exc:
                raise CheckpointError(
                    f"cannot read tensor {name} ({_first_sentence(exc)})", where=path, hint=_DAMAGED
                ) from None
            yield name, tensor, memory_mapped(tensor)  # safetensors maps the file too

    return Shard(path, stamp, headers, read)


def _open_file(path: str, stack: contextlib.ExitStack) -> Shard:
    stamp = _stamp(path)
    stack.callback(_close, stamp.fd)  # a watch that keeps the file takes its own descriptor
    kind = _sniff(stamp)
    shard = _open_safetensors(stamp, stack) if kind == "safetensors" else _open_torch(stamp, kind)
    try:
        now = os.stat(path)
    except OSError:
        now = None
    if now is None or now.st_ino != stamp.inode:
        raise CheckpointChangedError(
            "the checkpoint file was replaced while it was being opened", where=path, hint="load it again"
        )
    return shard


def _shard_files(folder: str, index_name: str) -> list[str]:
    index = os.path.join(folder, index_name)
    try:
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"the index is not readable JSON with a weight_map ({type(exc).__name__})",
            where=index,
            hint="a sharded checkpoint's index maps tensor names to shard files",
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            "the index has no weight_map of tensor names to shard file names",
            where=index,
            hint="a sharded checkpoint's index maps tensor names to shard files",
        )
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not shard or os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise CheckpointError(
                f"the index names a shard outside its folder: {shard[:80]!r}", where=index, hint="shards sit beside it"
            )
    return [os.path.join(folder, shard) for shard in shards]


def open_checkpoint(path: str, stack: contextlib.ExitStack) -> list[Shard]:
    """Open every file of the checkpoint at ``path`` (headers only; tensors stay on disk or mapped)."""
    check_checkpoint(path)
    if not os.path.isdir(path):
        return [_open_file(path, stack)]
    index_name = SAFETENSORS_INDEX if os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)) else INDEX_FILE
    return [_open_file(shard, stack) for shard in _shard_files(path, index_name)]


# -- checking -----------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _shown(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_fits(shards: list[Shard], model: Any, path: str, profile: str, *, quantizes: bool = True) -> list[str]:
    """Refuse a checkpoint whose names, shapes or dtypes do not fit ``model``; return the ignored names.

    Every parameter (and every buffer still without data) must be in the checkpoint, or be
    made by the loader (the ``weight_scaler`` of a float weight quantized to int8), with the
    model's shape; floating point where the model is floating point, or gemma's int8 layout
    (int8 ``weight`` and a floating ``weight_scaler`` of one value per row).  ``quantizes``:
    the loader converts between float and int8 (this loader); gemma's own copies values as
    they are, so there int8 goes only into int8.  Tensors the model has no place for are
    returned, not refused: gemma's ``load_weights`` ignores them too (``strict=False``).
    """
    headers: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = {}
    owner: dict[str, str] = {}
    twice: list[str] = []
    for shard in shards:
        for name, header in shard.headers.items():
            if name in headers:
                twice.append(f"{name} ({os.path.basename(owner[name])}, {os.path.basename(shard.path)})")
            headers[name] = header
            owner[name] = shard.path
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    required = {name for name, _ in model.named_parameters()} | set(meta_tensors(model))
    shapes: list[str] = []
    dtypes: list[str] = []
    provided: set[str] = set()
    extra: list[str] = []
    for name, (shape, dtype) in headers.items():
        target = targets.get(name)
        if target is None:
            base = name[: -len(SCALER)] if name.endswith(SCALER) else None
            if base is None or base not in targets or headers.get(base, (None, None))[1] != torch.int8:
                extra.append(name)
            continue  # an int8 weight's scaler: checked with the weight
        provided.add(name)
        if shape != tuple(target.shape):
            shapes.append(f"{name} is {list(shape)} (the model's is {list(target.shape)})")
            continue
        problem = _dtype_problem(name, dtype, target, headers, targets, quantizes)
        if problem:
            dtypes.append(problem)
        if target.dtype == torch.int8 and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            provided.add(name + SCALER)  # made by quantizing
    missing = sorted(required - provided)
    problems = []
    if missing:
        problems.append(f"checkpoint lacks {len(missing)} tensor(s) the model needs: {_shown(missing, 6)}")
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) of the wrong shape: {_shown(shapes, 2)}")
    if dtypes:
        problems.append(f"{len(dtypes)} tensor(s) of a type the model cannot use: {_shown(dtypes, 2)}")
    if twice:
        problems.append(f"{len(twice)} tensor(s) in two shards: {_shown(twice, 2)}")
    if problems:
        raise CheckpointError(
            "; ".join(problems),
            where=path,
            hint=f"is it a checkpoint for this variant? (profile '{profile}')",
        )
    return extra


def _dtype_problem(
    name: str,
    dtype: torch.dtype | str,
    target: torch.Tensor,
    headers: dict[str, tuple[tuple[int, ...], torch.dtype | str]],
    targets: dict[str, torch.Tensor],
    quantizes: bool,
) -> str | None:
    found = _dtype_name(dtype)
    wanted = _dtype_name(target.dtype)
    if not isinstance(dtype, torch.dtype):
        return f"{name} is {found}, a type torch does not read here"
    if target.dtype == torch.int8:  # gemma's quantized layout
        if dtype == torch.int8 or (quantizes and dtype.is_floating_point):
            return None
        return f"{name} is {found} (int8{' or floating point' if quantizes else ''} expected)"
    if target.is_floating_point():
        if dtype.is_floating_point:
            return None
        if dtype == torch.int8 and quantizes and target.dim() == 2 and name + SCALER not in targets:
            scaler = headers.get(name + SCALER)
            if scaler is None:
                return f"{name} is int8 without its {name}{SCALER}"
            shape, kind = scaler
            if not (isinstance(kind, torch.dtype) and kind.is_floating_point) or shape != (target.shape[0],):
                return (
                    f"{name}{SCALER} is {_dtype_name(kind)} {list(shape)} "
                    f"(floating point [{target.shape[0]}] expected for the int8 {name})"
                )
            return None
        return f"{name} is {found} ({wanted}: floating point expected)"
    if target.is_complex():
        return None if dtype.is_complex else f"{name} is {found} (complex expected)"
    return None if dtype == target.dtype else f"{name} is {found} ({wanted} expected)"


class _NonFinite(Exception):
    """NaN or Inf values in a tensor being converted (``count``; 0 = some, not counted)."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def count_non_finite(tensor: torch.Tensor, release: bool = False) -> int:
    """NaN and Inf values in ``tensor``: one summing pass, chunk by chunk, when there are none.

    A sum is NaN or Inf when any value is; a finite chunk whose sum overflows (float16: sums
    beyond 65504) is counted exactly, element by element, and comes out 0.  ``release``: ``tensor`` is a
    memory-mapped checkpoint tensor that stays mapped - each chunk's pages are dropped once
    read (`release_pages`), so checking never makes the whole checkpoint resident.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return 0
    flat = tensor.reshape(-1)
    step = max(1, FINITE_CHUNK_BYTES // tensor.element_size())
    bad = 0
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        total = chunk.float().sum() if chunk.element_size() == 1 else chunk.sum()  # float8: no sum
        if not bool(torch.isfinite(total)):
            bad += int((~torch.isfinite(chunk.float() if chunk.element_size() == 1 else chunk)).sum())
        if release:
            release_pages(chunk)
    return bad


# -- converting ---------------------------------------------------------------------


def column_scales(weight: torch.Tensor, mapped: bool = False) -> torch.Tensor:
    """float32 per-column scales for int8 with row and column scales: each column's largest
    ``|value|`` over the largest of all (so the largest is 1), read in chunks of rows (a mapped
    source's pages released as they go).  A NaN or Inf in ``weight`` makes them NaN, which
    `quantize_rows` then refuses; an all-zero weight gets ones."""
    top = torch.zeros(weight.shape[1], dtype=torch.float32)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        chunk = weight[start : start + CHUNK_ROWS]
        torch.maximum(top, chunk.abs().amax(0).float(), out=top)
        if mapped:
            release_pages(chunk)
    largest = top.max()
    if bool(largest == 0):
        return torch.ones_like(top)
    return top.div_(largest).clamp_(min=torch.finfo(torch.float32).tiny)


def quantize_rows(
    weight: torch.Tensor,
    scaler_dtype: torch.dtype,
    mapped: bool = False,
    *,
    finite: bool = False,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight ~= q * scaler[:, None]``, in chunks of rows.

    ``weight`` is left as it was; when it is ``mapped`` (a memory-mapped checkpoint tensor),
    each chunk's pages are released once read, so a source tensor is never resident whole.
    ``finite``: raise `_NonFinite` for a NaN or Inf weight instead of turning it into an
    int8 number (torch's row maximum carries NaN into the scale, which is checked; the native
    kernel's maximum may drop a NaN, so its chunks are checked before they are quantized).
    ``columns`` (float32, one per column; `column_scales`): quantize ``weight / columns``
    instead, so ``weight ~= q * scaler[:, None] * columns``.
    """
    rows = weight.shape[0]
    # The native kernel streams these every token: onto huge pages (hugepages.py).  torch's
    # int8 kernel is compute-bound, and the float32 temporaries below would be left in the
    # heap that q no longer reuses (+0.35 GiB peak for 2b): ordinary memory there.
    allocate = hugepages.empty if native.unavailable() is None else torch.empty
    q = allocate(tuple(weight.shape), dtype=torch.int8)
    scaler = torch.empty(rows, dtype=torch.float32)
    for start in range(0, rows, CHUNK_ROWS):
        source = weight[start : start + CHUNK_ROWS]
        if finite and native.unavailable() is None and count_non_finite(source):
            raise _NonFinite(count_non_finite(source))
        if columns is not None:
            source = source.to(torch.float32, copy=True).div_(columns)
            if mapped:
                release_pages(weight[start : start + CHUNK_ROWS])
        if native.quantize_rows_into(source, q[start : start + CHUNK_ROWS], scaler[start : start + CHUNK_ROWS]):
            if mapped and columns is None:  # the same numbers, without float32 copies (the native kernel, when built)
                release_pages(source)
            continue
        block = source if columns is not None else source.to(torch.float32, copy=True)
        if mapped and columns is None:
            release_pages(source)
        scale = block.abs().amax(dim=1).clamp_(min=1e-12).div_(127.0)
        if finite and not bool(torch.isfinite(scale).all()):  # amax keeps NaN and Inf
            raise _NonFinite(count_non_finite(weight[start : start + CHUNK_ROWS]))
        q[start : start + CHUNK_ROWS] = block.div_(scale.unsqueeze(1)).round_().clamp_(-127, 127)
        scaler[start : start + CHUNK_ROWS] = scale
    return q, scaler.to(scaler_dtype)


def quantize_groups(
    weight: torch.Tensor, group: int, mapped: bool = False, *, finite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with a scale per ``group`` columns: ``weight ~= q * scales`` repeated over
    each group (``scales``: float32, ``n x k/group``), in chunks of rows, as `quantize_rows`
    (``mapped``: a mapped source's pages released as read; ``finite``: `_NonFinite` for a NaN
    or Inf weight).  Each group is quantized as gemma quantizes a row."""
    rows, k = weight.shape
    allocate = hugepages.empty if native.unavailable() is None else torch.empty
    q = allocate((rows, k), dtype=torch.int8)
    scales = torch.empty(rows, k // group, dtype=torch.float32)
    for start in range(0, rows, CHUNK_ROWS):
        source = weight[start : start + CHUNK_ROWS]
        block = source.to(torch.float32, copy=True)
        if mapped:
            release_pages(source)
        groups = block.view(block.shape[0], k // group, group)
        scale = groups.abs().amax(dim=2).clamp_(min=1e-12).div_(127.0)
        if finite and not bool(torch.isfinite(scale).all()):  # amax keeps NaN and Inf
            raise _NonFinite(count_non_finite(weight[start : start + CHUNK_ROWS]))
        q[start : start + CHUNK_ROWS] = groups.div_(scale.unsqueeze(2)).round_().clamp_(-127, 127).view(block.shape)
        scales[start : start + CHUNK_ROWS] = scale
    return q, scales


def convert(tensor: torch.Tensor, dtype: torch.dtype, mapped: bool = False) -> torch.Tensor:
    """``tensor.to(dtype)``; a memory-mapped source in chunks of rows, each chunk's pages released
    once converted, so the source is never resident whole (a 2b embedder's float32 pages: 2 GiB)."""
    if not mapped or tensor.dim() < 2 or not tensor.is_contiguous():
        return tensor.to(dtype)
    out = torch.empty(tensor.shape, dtype=dtype)
    for start in range(0, tensor.shape[0], CHUNK_ROWS):
        rows = tensor[start : start + CHUNK_ROWS]
        out[start : start + CHUNK_ROWS] = rows
        release_pages(rows)
    return out


def dequantize_rows(
    weight: torch.Tensor,
    scaler: torch.Tensor,
    dtype: torch.dtype,
    columns: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """``weight * scaler[:, None]`` (times ``columns``, when given) in ``dtype``, in chunks of rows;
    with ``groups`` (scales per group of columns, `quantize_groups`) ``weight`` times those instead."""
    out = torch.empty(weight.shape, dtype=dtype)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        if groups is not None:
            scales = groups[rows].to(torch.float32)
            block = weight[rows].to(torch.float32).view(scales.shape[0], scales.shape[1], -1)
            out[rows] = block.mul_(scales.unsqueeze(2)).view(scales.shape[0], -1).to(dtype)
            continue
        block = weight[rows].to(torch.float32) * scaler[rows].to(torch.float32).unsqueeze(1)
        out[rows] = (block if columns is None else block.mul_(columns.to(torch.float32))).to(dtype)
    return out


def per_row(
    weight: torch.Tensor,
    scaler: torch.Tensor,
    columns: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gemma's own per-row int8 (``q``, ``scaler`` in ``scaler``'s dtype) of an int8 weight with row and
    column scales, or scales per group of columns: what ``state_dict()`` gives for it, so that gemma
    loads it (rounded once more)."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        block = dequantize_rows(
            weight[rows], scaler[rows], torch.float32, columns, None if groups is None else groups[rows]
        )
        scale = block.abs().amax(dim=1).clamp_(min=1e-12).div_(127.0)
        q[rows] = block.div_(scale.unsqueeze(1)).round_().clamp_(-127, 127)
        scales[rows] = scale
    return q, scales.to(scaler.dtype)


# -- watching the files mapped weights come from ---------------------------------------

WATCH_ATTRIBUTE = "_gemma_profile_mapped_files"
_REMEDY = (
    "build the model and load the checkpoint again; to keep a model immune to changes on disk, "
    "set 'loading: {mmap: false}' in the profile (weights copied into memory at load)"
)


class MappedFiles:
    """The checkpoint files a model reads memory-mapped weights from, as they were at load.

    `check` (a forward pre-hook of the model: one ``fstat`` per file, on a descriptor kept
    open, so a file replaced by a new one - whose old inode the mapping still holds - is
    no change) raises `CheckpointChangedError` once a file was truncated or rewritten in
    place: the mapped weights would read past its end (``SIGBUS``) or its new bytes.  A file
    nothing maps any more (every weight copied since, by a kernel) is dropped quietly.
    """

    def __init__(self, stamps: list[Stamp]) -> None:
        self.stamps = [Stamp(s.path, os.dup(s.fd), s.inode, s.size, s.mtime_ns) for s in stamps]
        self.handle: Any = None
        self._finalizer = weakref.finalize(self, _close_all, [s.fd for s in self.stamps])

    def check(self) -> None:
        for stamp in list(self.stamps):
            now = os.fstat(stamp.fd)
            if (now.st_size, now.st_mtime_ns) == (stamp.size, stamp.mtime_ns):
                continue
            ranges = mapped_ranges({stamp.inode})
            if ranges == []:
                self.stamps.remove(stamp)  # nothing reads it any more
                continue
            if now.st_size < stamp.size:
                what = f"truncated after loading ({stamp.size} -> {now.st_size} bytes): reading on would crash (SIGBUS)"
            else:
                what = "rewritten after loading: the model would compute with the new bytes"
            raise CheckpointChangedError(
                f"the checkpoint was {what}; the model reads weights memory-mapped from it",
                where=stamp.path,
                hint=_REMEDY,
            )

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.stamps = []
        self._finalizer()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        _close(fd)


def watch(model: Any, stamps: list[Stamp]) -> None:
    """Check the files of ``stamps`` before each forward of ``model`` (replacing an earlier watch)."""
    unwatch(model)
    if not stamps:
        return
    files = MappedFiles(stamps)
    files.check()  # changed while loading
    files.handle = model.register_forward_pre_hook(lambda module, args: files.check())
    object.__setattr__(model, WATCH_ATTRIBUTE, files)


def unwatch(model: Any) -> MappedFiles | None:
    files: MappedFiles | None = model.__dict__.pop(WATCH_ATTRIBUTE, None)
    if files is not None:
        files.close()
    return files


def unmap(model: Any) -> None:
    """Before gemma's own loader copies into a model this loader filled: every tensor still
    memory-mapped gets memory of its own (uninitialised; the copy fills it), so the copy never
    writes through a mapping of a file that may have been truncated since."""
    files = model.__dict__.get(WATCH_ATTRIBUTE)
    if files is None:
        return
    ranges = mapped_ranges({stamp.inode for stamp in files.stamps}) or []
    unwatch(model)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "cpu" and any(low <= tensor.data_ptr() < high for low, high, _ in ranges):
            assign(model, name, torch.empty_like(tensor))


# -- loading ------------------------------------------------------------------------


def _non_finite_error(
    name: str, count: int, where: str, before: torch.Tensor | None = None, *, float16_storage: bool = False
) -> CheckpointError:
    if before is not None and count_non_finite(before) == 0:
        if float16_storage:
            return CheckpointError(
                f"tensor {name} overflows float16 storage: {count} value(s) beyond float16's 65504",
                where=where,
                hint="drop quantization.weights: float16 (weights then stay float32), or use int8 weights",
            )
        return CheckpointError(
            f"tensor {name} overflows when converted: {count} value(s) beyond the model's dtype",
            where=where,
            hint="compute in bfloat16 or float32 (config: {dtype: bfloat16})",
        )
    counted = f"{count} NaN/Inf value(s)" if count else "NaN/Inf values"
    return CheckpointError(
        f"tensor {name} holds {counted}: refused rather than turned into numbers",
        where=where,
        hint="the checkpoint is damaged or comes from a diverged run: download or save it again",
    )


def check_finite(model: Any, path: str) -> None:
    """Refuse a loaded model with a NaN or Inf weight (after gemma's own loader), naming it."""
    for name, tensor in model.named_parameters():
        if tensor.device.type != "meta":
            count = count_non_finite(tensor)
            if count:
                raise _non_finite_error(name, count, path)


@dataclass(frozen=True)
class LoadOptions:
    """Where and how `lean_load` puts a checkpoint's tensors: plain values (the ``loading``
    builtin reads them off the Plan, ``hooks/loading.py``).

    :param device: where resident tensors go (``cpu``, ``cuda:0``).
    :param layers: decoder layer index -> device, for layers not on ``device`` (offloaded
        layers wait on the CPU: ``cpu``).
    :param embedder: the tied embedder's device when it is not ``device`` (``cpu``: the plan
        offloads it, and loading it onto a small GPU first would not fit), else None.
    :param label: the profile's name, for log lines and hints.
    :param mmap: keep a tensor memory-mapped when its dtype and device already match
        (``loading: {mmap: false}`` copies it).
    :param float16_storage: gemma's Linear/Embedding weights stored in float16
        (``quantization: {weights: float16}``; `gemma_profiles.engine.half`).
    :param column_scales: quantize the tied embedder with row and column scales
        (`column_scaled_names`); False gives gemma's per-row format (the ``quantization``
        builtin, which computes with them, is blocked).
    :param int8_group: quantize the decoder's ``Linear`` weights that stay on the CPU with a scale
        per this many columns (`quantize_groups`; `GROUP_SCALER`) where `native.groups_fit`; 0:
        gemma's per-row format.  Set where the native kernel's AVX2 path computes them.
    """

    device: str = "cpu"
    layers: dict[int, str] = field(default_factory=dict)
    embedder: str | None = None
    label: str = ""
    mmap: bool = True
    float16_storage: bool = False
    column_scales: bool = True
    int8_group: int = 0


def column_scaled_names() -> set[str]:
    """The weights quantized with row and column scales while loading: the tied embedder's.

    Measured on Gemma 3 270M (docs/engine.md): its int8 error is most of on-the-fly int8's
    divergence from float32, and a few of its columns (hidden dimensions) are several times
    larger than the rest, so per-row scales waste most of the int8 range on the others.  Only
    the ``quantization`` builtin computes with these scales (gemma's own int8 forward would
    ignore them): while it is blocked, ``LoadOptions.column_scales`` is False and the embedder
    gets gemma's per-row format.
    """
    return {f"{key}.weight" for key in EMBEDDER_KEYS}


def lean_load(model: Any, path: str, options: LoadOptions) -> None:
    """Check ``path`` against a lazily built ``model``, then load it as ``options`` say."""
    device, layer_devices, label = options.device, options.layers, options.label
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    int8_in_model = {name for name, t in targets.items() if t.dtype == torch.int8}
    keep_mapped = options.mmap
    column_scaled = column_scaled_names() if options.column_scales else set()
    # quantization: {weights: float16} - gemma's Linear/Embedding weights stored in float16 (half.py)
    half_stored = stored_names(model) if options.float16_storage else set()
    pending_int8: dict[str, tuple[torch.Tensor, str]] = {}
    pending_scalers: dict[str, torch.Tensor] = {}
    loaded: set[str] = set()
    mapped_files: dict[str, Stamp] = {}

    def stored_dtype(name: str) -> torch.dtype:
        return torch.float16 if name in half_stored else targets[name].dtype

    embedder_device = options.embedder
    embedder_prefixes = tuple(f"{key}." for key in EMBEDDER_KEYS)

    def device_for(name: str) -> str:
        if embedder_device is not None and name.startswith(embedder_prefixes):
            return embedder_device  # the tied embedder kept on the CPU: never on the GPU
        match = _LAYER.match(name.removeprefix("model.") if name.startswith("model.model.") else name)
        return layer_devices.get(int(match.group(1)), device) if match else device

    def place(name: str, tensor: torch.Tensor, shard: Shard, mapped: bool = False, made: bool = False) -> None:
        """Convert, check and assign one tensor; ``made``: computed here, not read from the file."""
        source = tensor
        stored = stored_dtype(name)
        if tensor.dtype != stored:
            tensor = convert(tensor, stored, mapped)
        # A mapped tensor that stays mapped is read only to be checked: its pages are dropped again.
        count = count_non_finite(tensor, release=mapped and tensor is source and keep_mapped)
        if count:
            before = source if (made or source is not tensor) else None
            raise _non_finite_error(name, count, shard.path, before, float16_storage=name in half_stored)
        wanted = device_for(name)
        if str(tensor.device) != wanted:
            tensor = tensor.to(wanted)
        elif tensor is source and mapped and not keep_mapped:
            tensor = tensor.clone()  # loading: {mmap: false}
        assign(model, name, tensor)
        loaded.add(name)
        if tensor is source and mapped:
            mapped_files[shard.path] = shard.stamp
        elif mapped:
            release_pages(source)  # converted or moved: the mapped source is done with

    def grouped_here(name: str, tensor: torch.Tensor) -> bool:
        """Whether the int8 weight ``name`` gets scales per group of columns (`LoadOptions.int8_group`)."""
        if not options.int8_group or tensor.dim() != 2 or options.device != "cpu" or device_for(name) != "cpu":
            return False
        owner = model.get_submodule(name.rpartition(".")[0])
        return type(owner).__name__ == "Linear" and native.groups_fit(tensor.shape[1], options.int8_group)

    def float_from_int8(name: str) -> None:
        weight, where = pending_int8.pop(name)
        scaler = pending_scalers.pop(name + SCALER)
        count = count_non_finite(scaler)
        if count:
            raise _non_finite_error(name + SCALER, count, where)
        place(name, dequantize_rows(weight, scaler, stored_dtype(name)), shards_by_path[where], made=True)

    with contextlib.ExitStack() as stack:
        shards = open_checkpoint(path, stack)
        shards = parallel.slice_shards(model, shards)  # tensor parallel: this rank's slice of each tensor
        shards_by_path = {shard.path: shard for shard in shards}
        unexpected = check_fits(shards, model, path, label)
        for shard in shards:
            for name, tensor, mapped in shard.read():
                if name not in targets:
                    base = name[: -len(SCALER)]
                    if name.endswith(SCALER) and base in targets:
                        pending_scalers[name] = tensor  # an int8 checkpoint for a float model
                        if base in pending_int8:
                            float_from_int8(base)
                    continue
                if name in int8_in_model and tensor.is_floating_point():
                    scaler_dtype = targets[name + SCALER].dtype
                    columns = column_scales(tensor, mapped) if name in column_scaled and tensor.dim() == 2 else None
                    grouped = columns is None and grouped_here(name, tensor)
                    try:
                        if grouped:
                            q, groups = quantize_groups(tensor, options.int8_group, mapped, finite=True)
                            scaler = groups.amax(dim=1).to(scaler_dtype)  # kept for shape checks; not computed with
                        else:
                            q, scaler = quantize_rows(tensor, scaler_dtype, mapped, finite=True, columns=columns)
                    except _NonFinite as exc:
                        raise _non_finite_error(name, exc.count, shard.path) from None
                    place(name, q, shard)
                    place(name + SCALER, scaler, shard, made=True)
                    owner = model.get_submodule(name.rpartition(".")[0])
                    if columns is not None:
                        owner.register_buffer(COLUMN_SCALER, columns.to(device_for(name)), persistent=False)
                    if grouped:
                        owner.register_buffer(GROUP_SCALER, groups, persistent=False)
                    if mapped:
                        release_pages(tensor)
                elif name.endswith(SCALER) and name in loaded:
                    continue  # we produced this scaler by quantizing the float weight
                elif tensor.dtype == torch.int8 and name not in int8_in_model and targets[name].is_floating_point():
                    pending_int8[name] = (tensor, shard.path)
                    if name + SCALER in pending_scalers:
                        float_from_int8(name)
                else:
                    place(name, tensor, shard, mapped)
        missing = [name for name in meta_tensors(model) if name not in loaded]
        if missing or pending_int8:  # check_fits saw to it; a reader that lied about its headers
            shown = ", ".join((missing + list(pending_int8))[:6])
            raise CheckpointError(
                f"checkpoint lacks {len(missing) + len(pending_int8)} tensor(s) the model needs: {shown}",
                where=path,
                hint=f"is it a checkpoint for this variant? (profile '{label}')",
            )
        # Whatever gemma computed at construction (rope tables) follows the resident weights.
        for name, buffer in model.named_buffers():
            if name not in loaded and str(buffer.device) != device_for(name):
                assign(model, name, buffer.to(device_for(name)))
        watch(model, list(mapped_files.values()))
    if unexpected:
        logger.info(
            "[{}] ignored {} checkpoint tensor(s) the model has no place for ({}), as gemma's loader does",
            label,
            len(unexpected),
            _shown(unexpected, 3),
        )
    set_lazy(model, False)
    how = "memory-mapped" if mapped_files else ("copied: loading.mmap is false" if not keep_mapped else "converted")
    logger.info("[{}] loaded {} tensors from {} ({}; {})", label, len(loaded), path, how, device)


def check_for_gemma(model: Any, path: str, label: str) -> None:
    """Before gemma's own loader copies ``path`` into a materialised ``model``: the same checks
    (names, shapes, dtypes - int8 only into int8: gemma's copy does not quantize), and no
    memory-mapped weight left for that copy to write through."""
    with contextlib.ExitStack() as stack:
        check_fits(open_checkpoint(path, stack), model, path, label, quantizes=False)
    unmap(model)
