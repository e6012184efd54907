"""Full-precision linear weights stored for fast CPU matmuls after loading (torch-touching).

Used by the ``kernels`` builtin (``hooks/kernels.py``).

A decode step on a CPU is one matrix-vector product per weight: its speed is the
rate at which the weight streams from memory.  ``F.linear`` on a plain row-major
weight reads it at 23 GB/s (float32) / 30 GB/s (bfloat16) on the 2-core AVX-512
box of ``benchmarks/cpu_decode.py``, where a plain ``sum()`` reads 43-88 GB/s
(the host's bandwidth drifts).  So after loading, each full-precision gemma ``Linear`` on
the CPU swaps its weight for a copy made for a faster kernel - one tensor at a time, the
memory-mapped source pages released as it goes, so the peak stays one tensor above the
model:

- **bfloat16 on a CPU with AVX-512 BF16** (and the native library, `gemma_profiles.engine.native`):
  the weight stays plain row-major, copied onto 2 MiB pages (`gemma_profiles.engine.hugepages`),
  and up to `NATIVE_ROWS` rows of activations go through ``csrc/bf16_matmul.c``.  On the
  2-core Zen 4 box, interleaved in one process with memory at 84-89 GB/s, the 2b decoder's
  products streamed at 0.92-0.94 of ``sum()``'s rate this way, 0.85-0.89 with the same
  kernel on 4 KiB pages, and 0.86-0.87 on oneDNN's packed copy - which oneDNN allocates
  itself, on 4 KiB pages.  Longer inputs (a prompt) take ``F.linear`` on the plain weight:
  oneDNN reorders it on each call, 1.12-1.15x the packed product's time at 640 rows,
  1.3-1.4x at 64, 1.6-1.9x at 8-16 (where this kernel is used instead);
- **bfloat16 on a CPU with AVX2 + FMA but no AVX-512 BF16** (Haswell, Zen 1-3; and the
  library): the same plain weight on 2 MiB pages and the same kernel, on its AVX2 path (float32
  FMAs on the widened weight; one row of activations streams at memory speed where oneDNN's
  bfloat16 product read at 0.3-0.65x a ``sum()``'s rate - ``benchmarks/bf16_avx2.py``), up to
  `NATIVE_ROWS_AVX2` rows.  Longer inputs never reach torch's bfloat16 GEMM, which has no fast
  kernel on such CPUs (prompts 9.5x slower than float32: docs/benchmarks.md): `widened_linear`
  widens the weight to float32 `WIDEN_BYTES` at a time into one reused buffer per thread and
  runs torch's float32 GEMM, rounding the sums to bfloat16 once;
- **otherwise** (float32, or neither path): the weight reordered once by
  ``torch.ops.mkldnn._reorder_linear_weight`` (what ``torch.compile`` does with frozen CPU
  weights), an opaque ``_mkldnn`` tensor that ``torch.ops.mkldnn._linear_pointwise`` reads
  at 45-73 GB/s in both dtypes; prompt-sized batches get faster too.

The stored weight is kept as the module's ``weight`` buffer, and the module becomes a
``PackedLinear`` (`Packed` on top of gemma's ``Linear``: `gemma_profiles.engine.surgery`):
``state_dict()`` gives the plain tensor back and ``load_state_dict`` stores it again, so saving
and reloading work.  Moving the model off the CPU or changing its dtype afterwards is a
`GemmaProfileError` raised before anything converts (`PinnedToCpu`, and `pin_to_cpu` for the
whole model), and int8 layers keep their own kernel (`gemma_profiles.engine.quantization`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from gemma_profiles.engine import hugepages, native, surgery
from gemma_profiles.engine.pages import release_pages, trim_heap
from gemma_profiles.errors import GemmaProfileError

PACKED_DTYPES = (torch.float32, torch.bfloat16)
#: Rows of activations up to which a bfloat16 product runs on the native kernel's AVX-512 BF16
#: path: at 16 rows it takes as long as ``F.linear`` on the plain weight (benchmarks/cpu_decode.py's
#: box; at 8 rows 0.85-0.9x oneDNN's packed product, at 32 1.3x), beyond that it is compute-bound.
NATIVE_ROWS = 16
#: The same for the kernel's AVX2 + FMA path, against `widened_linear` (2-core AVX2 EPYC, one
#: thread, interleaved, widened's time over the kernel's: at 64 rows 0.96-1.9x over 2048x640,
#: 640x2048, 1536x640, 16384x2048, 2048x16384, 1152x6912; at 128 0.77-1.22x; at 256 0.85-1.03x).
NATIVE_ROWS_AVX2 = 64
#: float32 bytes of weight rows `widened_linear` widens at a time (one buffer per thread, reused).
WIDEN_BYTES = 8 << 20

_scratch = threading.local()


def native_bf16() -> bool:
    """Whether bfloat16 weights go to the native kernel here (AVX-512 BF16 or AVX2 + FMA, and the library)."""
    return native.bf16_unavailable() is None


@functools.lru_cache(maxsize=4)
def _avx512_bf16(library: Any) -> bool:
    """Whether the loaded library's bfloat16 kernel takes its AVX-512 BF16 path (``gp_bf16_supported() == 2``)."""
    return bool(library.gp_bf16_supported() == 2)


def native_path() -> str | None:
    """Which path of the native bfloat16 kernel runs here: ``"avx512-bf16"``, ``"avx2"``, or None."""
    library = native.bf16_library()
    if isinstance(library, str):
        return None
    return "avx512-bf16" if _avx512_bf16(library) else "avx2"


def native_rows() -> int:
    """Rows of activations up to which a bfloat16 product runs on the native kernel here."""
    return NATIVE_ROWS if native_path() == "avx512-bf16" else NATIVE_ROWS_AVX2


def kernel_name(dtype: torch.dtype) -> str:
    """What computes with stored weights of ``dtype``, for the log."""
    if dtype != torch.bfloat16 or not native_bf16():
        return "oneDNN-packed weights"
    if native_path() == "avx512-bf16":
        return "the native bfloat16 kernel"
    return "the native bfloat16 kernel (AVX2; prompts in float32)"


def available(dtype: torch.dtype) -> str | None:
    """None when weights of ``dtype`` can be stored for a fast kernel here; else why not."""
    if dtype not in PACKED_DTYPES:
        return f"no packed kernel for {str(dtype).removeprefix('torch.')}"
    if dtype == torch.bfloat16 and native_bf16():
        return None
    mkldnn = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    if not mkldnn or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN (mkldnn) CPU kernels"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bfloat16 kernels for this CPU"
    return None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out x in, on the CPU) stored for `packed_linear`: a plain bfloat16 copy on
    huge pages for the native kernel, else reordered for oneDNN's ``_linear_pointwise``."""
    if weight.dtype == torch.bfloat16 and native_bf16():
        stored = hugepages.empty(tuple(weight.shape), torch.bfloat16)
        stored.copy_(weight.detach())
        return stored
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    return packed


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` against the stored weight, in ``x``'s dtype.

    gemma computes in the parameters' dtype; an input in another one is cast both ways.
    """
    if x.dtype != packed.dtype:
        return packed_linear(x.to(packed.dtype), packed).to(x.dtype)
    if packed.is_mkldnn:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return out
    n, k = packed.shape
    flat = x.reshape(-1, k)
    library = native.bf16_library()
    assert not isinstance(library, str), library
    if flat.shape[0] > (NATIVE_ROWS if _avx512_bf16(library) else NATIVE_ROWS_AVX2):
        if _avx512_bf16(library):
            return torch.nn.functional.linear(x, packed)
        return widened_linear(flat, packed).reshape(*x.shape[:-1], n)
    if flat.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    flat = flat.contiguous()
    y = torch.empty(flat.shape[0], n, dtype=torch.bfloat16)
    status = library.gp_bf16_matmul(flat.data_ptr(), flat.shape[0], k, packed.data_ptr(), n, y.data_ptr())
    if status != 0:
        raise RuntimeError(f"gemma-profiles bfloat16 kernel failed ({status}) for {tuple(x.shape)} x {(n, k)}")
    return y.reshape(*x.shape[:-1], n)


def widened_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for bfloat16 ``x`` (m x k) and ``weight`` (n x k) through torch's float32
    GEMM: the weight widened to float32 `WIDEN_BYTES` at a time into one buffer per thread, the
    float32 sums rounded once to bfloat16 (nearest even) - what the native kernel computes, in
    another order.  For prompts on a CPU without AVX-512 BF16, where torch's bfloat16 GEMM has no
    fast kernel."""
    m, k = x.shape
    n = weight.shape[0]
    rows = max(1, min(n, WIDEN_BYTES // (4 * k)))
    buffer: torch.Tensor | None = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < rows * k:
        with torch.inference_mode(False):  # a normal tensor: writable in and outside inference mode
            buffer = _scratch.buffer = torch.empty(rows * k, dtype=torch.float32)
    wide = x.float()
    y = torch.empty(m, n, dtype=torch.bfloat16)
    out = torch.empty(m * rows, dtype=torch.float32)
    for start in range(0, n, rows):
        count = min(n, start + rows) - start
        block = buffer[: count * k].view(count, k)
        block.copy_(weight[start : start + count])
        product = out[: m * count].view(m, count)
        torch.mm(wide, block.t(), out=product)
        y[:, start : start + count].copy_(product)
    return y


def stored_weights(model: nn.Module) -> list[torch.Tensor]:
    """The plain weights of ``model``'s packed layers (the native bfloat16 kernel's), each once."""
    found = (module._buffers.get("weight") for module in model.modules() if is_packed(module))
    weights = {id(w): w for w in found if isinstance(w, torch.Tensor) and not w.is_mkldnn}
    return list(weights.values())


def is_packed(module: nn.Module) -> bool:
    return isinstance(module, Packed)


def state_weight(
    state_dict: dict[str, Any],
    prefix: str,
    names: tuple[str, ...],
    shape: tuple[int, ...],
    dtype: torch.dtype | None,
    strict: bool,
    missing_keys: list[str],
    error_msgs: list[str],
) -> list[torch.Tensor] | None:
    """The tensors ``names`` from a state dict for a module whose ``weight`` is stored packed,
    with ``nn.Module``'s own bookkeeping: absent keys are missing (when strict), a ``weight`` of
    another shape (or of another dtype, when ``dtype`` is given) is a size mismatch; None then."""
    keys = [prefix + name for name in names]
    absent = [key for key in keys if key not in state_dict]
    if absent:
        if strict:
            missing_keys.extend(absent)
        return None
    values = [state_dict[key] for key in keys]
    weight = values[names.index("weight")]
    if tuple(weight.shape) != tuple(shape) or (dtype is not None and weight.dtype != dtype):
        kind = "" if dtype is None else f" ({weight.dtype})"
        wanted = "" if dtype is None else f" ({dtype})"
        error_msgs.append(
            f"size mismatch for {prefix}weight: copying a param with shape {tuple(weight.shape)}{kind}, "
            f"the shape in current model is {tuple(shape)}{wanted}."
        )
        return None
    return values


def refuse_move(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], what: str, dtype: torch.dtype) -> None:
    """Raise a one-line `GemmaProfileError` when the ``_apply`` function ``fn`` (``.to(cuda)``,
    ``.half()``...) would move a tensor off the CPU, or cast one away from ``dtype``; moves and
    casts that change nothing pass.

    :param dtype: the compute dtype a cast must keep; ``torch.int8`` for int8 weights, where
        only a device move is refused (``.to(dtype)`` leaves integer tensors alone).
    """
    probe = fn(torch.zeros(1, dtype=torch.float32 if dtype == torch.int8 else dtype))
    if probe.device.type != "cpu" or (dtype != torch.int8 and probe.dtype != dtype):
        target = f"{probe.device}" if probe.device.type != "cpu" else str(probe.dtype).removeprefix("torch.")
        raise GemmaProfileError(
            f"{what} holds weights packed for the CPU kernels; they cannot move to {target}",
            where=surgery.original_class(module).__name__,
            hint="choose the device and dtype in the profile (placement.device, config.dtype), "
            "or load with GEMMA_PROFILE_DISABLE_PLUGINS=kernels,quantization",
        )


class PinnedToCpu(surgery.Surgery):
    """Its ``weight`` buffer is in a CPU kernel's layout: ``.to(cuda)``/``.half()`` is a one-line
    error raised before anything converts, not an oneDNN/ctypes failure later, and a cast that
    changes nothing leaves the buffer alone (`refuse_move`)."""

    #: What the error calls the module, and the dtype a cast must keep (None: the weight's).
    pinned_as: ClassVar[str] = "this layer"
    pinned_dtype: ClassVar[torch.dtype | None] = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        buffer = self._buffers["weight"]
        assert buffer is not None
        refuse_move(self, fn, self.pinned_as, self.pinned_dtype or buffer.dtype)
        del self._buffers["weight"]  # the cast skips the packed weight
        try:
            return super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        finally:
            self._buffers["weight"] = buffer


class Packed(PinnedToCpu):
    """A full-precision ``Linear`` whose weight is a buffer stored for `packed_linear` (`pack`):
    ``state_dict()`` gives the plain tensor back and ``load_state_dict`` packs it again."""

    prefix = "Packed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight)  # type: ignore[arg-type]

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight.to_dense()  # type: ignore[operator]

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        current: torch.Tensor = self.weight  # type: ignore[assignment]
        found = state_weight(state_dict, prefix, ("weight",), current.shape, None, strict, missing_keys, error_msgs)
        if found is not None:
            self._buffers["weight"] = pack(found[0].to(device="cpu", dtype=current.dtype))


def pin_to_cpu(model: nn.Module, what: str, dtype: torch.dtype) -> None:
    """Make ``.to(cuda)``/``.half()`` on a whole model holding CPU-kernel layers fail before any of
    its modules converts (its layers refuse too, but ``_apply`` reaches them after the embedder).

    The model's class is gemma's profiled one (`gemma_profiles.runtime.patch`), so this is an
    ``_apply`` of the instance: a ``functools.partial`` of `_pinned_apply` (a deep copy of the
    model gets its own)."""
    previous = model.__dict__.get("_apply")  # pinned already (int8 and packed layers): both checks
    object.__setattr__(model, "_apply", functools.partial(_pinned_apply, model, what, dtype, previous))


def _pinned_apply(
    model: nn.Module, what: str, dtype: torch.dtype, previous: Any, fn: Any, recurse: bool = True
) -> nn.Module:
    refuse_move(model, fn, what, dtype)
    result: nn.Module = (previous or functools.partial(type(model)._apply, model))(fn, recurse)
    return result


def pack_module(module: nn.Module) -> None:
    """Swap a plain float ``Linear``'s weight parameter for the packed buffer; the module becomes
    a `Packed` one (``PackedLinear``)."""
    weight = module._parameters["weight"]
    assert weight is not None
    packed = pack(weight)
    del module._parameters["weight"]
    module.register_buffer("weight", packed)
    release_pages(weight)  # a memory-mapped checkpoint tensor: its pages are not needed any more
    del weight
    trim_heap()
    surgery.swap(module, Packed)


def packable(module: nn.Module) -> bool:
    """A gemma ``Linear`` with a full-precision 2-D weight on the CPU (int8 layers have their own kernel)."""
    if type(module).__name__ != "Linear" or getattr(module, "quant", True) or is_packed(module):
        return False
    weight = module._parameters.get("weight")
    return (
        weight is not None
        and weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.dtype in PACKED_DTYPES
        and not weight.is_meta
    )
