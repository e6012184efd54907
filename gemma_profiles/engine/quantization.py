"""int8 weights computed without rebuilding the full-precision weight on every call.

Torch-touching; used by the ``quantization`` builtin (``hooks/quantization.py``).

gemma's int8 ``Linear`` computes ``F.linear(x, weight * weight_scaler[:, None])``:
a full-precision copy of every weight on every forward (two on the CPU, where
torch materialises the int8 -> float cast) - 16x slower than bf16 on a CPU
(docs/design.md).  After loading, each int8 ``Linear`` gets a forward that reads the
int8 weight directly - it becomes an ``Int8Linear``, or a ``NativeInt8Linear`` on the native
kernel (mixins on top of gemma's class: `gemma_profiles.engine.surgery`):

- CPU with AVX-512 VNNI, float32 or bfloat16 activations: our native kernel
  (`gemma_profiles.engine.native`: the weight repacked once, multiplied as int8 against
  24-bit integer activations; 1.3-2x ``_weight_int8pack_mm`` here, which converts
  every weight to float first);
- other CPUs with bfloat16 activations: ``torch.ops.aten._weight_int8pack_mm``
  (int8 weight, per-row scale; 2.6x faster than a bf16 matvec on 16384x2048 here);
- elsewhere (CUDA, float32/float16 activations): the int8 weight is converted
  into one scratch buffer per device and dtype, reused by every layer, so no
  weight-sized tensor is allocated per call.  In float32 and bfloat16 the per-row
  scale is applied to the output (``x @ (q*s).T == (x @ q.T) * s``); in float16 the
  buffer holds ``q * s`` (gemma's order), since ``x @ q.T`` overflows float16's
  65504 where the true product does not.

gemma's forward otherwise rebuilds the whole (vocab x hidden) tied embedder for the
lookup and again for the sampler, every step.  On a CPU where one of the first two
kernels runs, the embedder stays int8: its lookup dequantizes just the rows it
gathers, and the sampler's product runs on that kernel (`gemma_profiles.engine.tied`);
elsewhere it is dequantized once into the compute dtype.  ``model.config.quant`` is
then False, so gemma's forward hands the weight to the sampler as it is.  A kept embedder is an
``Int8Embedding`` (or ``NativeInt8Embedding``) whose ``state_dict()`` is in gemma's per-row format.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gemma_profiles.engine import native, surgery
from gemma_profiles.engine.kernels import PinnedToCpu, state_weight
from gemma_profiles.engine.lazy import remove_parameter
from gemma_profiles.engine.loading import COLUMN_SCALER, GROUP_SCALER
from gemma_profiles.engine.pages import memory_mapped

_NATIVE = "_gemma_profile_int8"

_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch_for(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    key = (weight.device, dtype)
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < weight.numel():
        # a normal tensor even when made under inference mode (gemma's generate): an inference
        # tensor could not be written by a forward outside it
        with torch.inference_mode(False):
            buffer = torch.empty(weight.numel(), dtype=dtype, device=weight.device)
        _scratch[key] = buffer
    return buffer[: weight.numel()].view(weight.shape)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scaler: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight * scaler[:, None])`` without a per-call weight-sized allocation."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.shape[0] % 4 == 0:
        # (int8pack returns garbage, or crashes, for a row count that is not a multiple of 4)
        flat = x.reshape(-1, x.shape[-1])
        out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(flat, weight, scaler.to(x.dtype))
        return out.reshape(*x.shape[:-1], weight.shape[0])
    dense = _scratch_for(weight, x.dtype)
    if x.dtype != torch.float16:
        dense.copy_(weight)
        return F.linear(x, dense) * scaler.to(x.dtype)
    # float16 tops out at 65504: ``x @ q.T`` with int8 values up to 127 overflows long before
    # the true product does (activations of std 16 over 2048 columns: sums near 10^5 for
    # outputs near 60).  Dequantize first, as gemma does, into the same scratch buffer.
    dequantize_into(dense, weight, scaler)
    return F.linear(x, dense)


def dequantize_into(dense: torch.Tensor, weight: torch.Tensor, scaler: torch.Tensor) -> None:
    """``dense[:] = weight * scaler[:, None]`` in ``dense``'s dtype, with no weight-sized temporary."""
    scale = scaler.to(dense.dtype).unsqueeze(1)
    if dense.device.type == "cpu":
        # (a CPU product of int8 by float casts the int8 operand into a weight-sized temporary)
        dense.copy_(weight).mul_(scale)
    else:
        torch.mul(weight, scale, out=dense)  # one pass: CUDA casts inside the kernel


class Int8Matmul(surgery.Surgery):
    """An int8 ``Linear`` computing on its int8 weight directly (`int8_linear`)."""

    prefix = "Int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scaler)  # type: ignore[arg-type]


def direct_linear(module: nn.Module) -> None:
    """An int8 ``Linear`` computing on its int8 weight without the native kernel (``Int8Linear``)."""
    surgery.swap(module, Int8Matmul)


def column_scaler(module: nn.Module) -> torch.Tensor | None:
    """The per-column scales of an int8 embedder quantized with row and column scales (the
    `COLUMN_SCALER` buffer `gemma_profiles.engine.loading` adds), or None for gemma's per-row format."""
    return module._buffers.get(COLUMN_SCALER)


def group_scaler(module: nn.Module) -> torch.Tensor | None:
    """The scales per group of columns of an int8 ``Linear`` quantized for the native kernel's AVX2
    path (the `GROUP_SCALER` buffer `gemma_profiles.engine.loading` adds), or None (per row)."""
    return module._buffers.get(GROUP_SCALER)


def to_per_row(module: nn.Module) -> None:
    """An int8 ``Linear`` with scales per group of columns that will not run on the kernel that
    computes them: requantized to gemma's per-row format (rounded once more), so every other
    int8 path - torch's, CUDA's, gemma's own - computes it right."""
    from gemma_profiles.engine.loading import per_row

    groups = module._buffers.pop(GROUP_SCALER, None)
    if groups is None:
        return
    weight, scaler = module._parameters["weight"], module._parameters["weight_scaler"]
    assert weight is not None and scaler is not None
    q, rows = per_row(weight.detach().cpu(), scaler.detach().cpu(), None, groups.cpu())
    with torch.no_grad():
        weight.copy_(q.to(weight.device))
        scaler.copy_(rows.to(scaler.device))


def dequantize_embedder(model: Any, name: str, dtype: torch.dtype) -> None:
    """Turn the int8 tied embedder into a plain ``dtype`` weight (once, in row chunks)."""
    from gemma_profiles.engine.loading import dequantize_rows

    module = model.get_submodule(name)
    columns = module._buffers.pop(COLUMN_SCALER, None)
    weight = dequantize_rows(
        module.weight.cpu(), module.weight_scaler.cpu(), dtype, None if columns is None else columns.cpu()
    ).to(module.weight.device)
    module._parameters["weight"] = torch.nn.Parameter(weight, requires_grad=False)
    remove_parameter(model, f"{name}.weight_scaler")
    module.quant = False


def _scaled_rows(rows: torch.Tensor, row_scales: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """Gathered int8 rows times their scales (gemma's order and rounding when there are no column
    scales; otherwise computed in float32 and rounded once)."""
    if columns is None:
        return rows.to(row_scales.dtype) * row_scales
    return (rows.to(torch.float32) * row_scales.to(torch.float32) * columns).to(row_scales.dtype)


def _columns_applied(hidden: torch.Tensor, columns: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The sampler's input in ``dtype``, times the column scales (in float32, rounded once)."""
    if columns is None:
        return hidden.to(dtype)
    return (hidden.to(torch.float32) * columns).to(dtype)


def int8_lookup(self: Any, x: torch.Tensor) -> torch.Tensor:
    """gemma's int8 ``Embedding.forward`` (``F.embedding(x, weight * scaler)``) on the gathered rows only."""
    scaler = self.weight_scaler
    return _scaled_rows(F.embedding(x, self.weight), F.embedding(x, scaler.unsqueeze(-1)), column_scaler(self))


def native_kernel(module: nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``module``'s int8 weight can run on the native kernel here."""
    weight = module._parameters.get("weight")
    return weight is not None and native.supports(weight, dtype) and native.unavailable() is None


def _install_native(module: nn.Module, kind: type[NativeInt8]) -> native.Int8Weight:
    """Swap the int8 weight parameter for the kernel's layout (a buffer); the module becomes a
    ``kind`` (a `NativeInt8`: ``state_dict()`` unpacks it)."""
    weight = module._parameters["weight"]
    scaler = module._parameters["weight_scaler"]
    assert weight is not None and scaler is not None
    # The parameter is dropped next: pack in its memory, unless that is a mapped checkpoint's
    # (an int8 checkpoint), whose pages are copied onto huge pages and dropped as they go.
    mapped = memory_mapped(weight)
    groups = group_scaler(module)
    if groups is not None and not (native.grouped_path() and native.groups_fit(weight.shape[1], native_group(module))):
        to_per_row(module)  # (the loader groups only for this path: a weight changed since)
        groups = None
    packed = native.Int8Weight.pack(weight, scaler, in_place=not mapped, release=mapped, groups=groups)
    del module._parameters["weight"]
    module.register_buffer("weight", packed.data)
    object.__setattr__(module, _NATIVE, packed)
    surgery.swap(module, kind)
    return packed


def native_group(module: nn.Module) -> int:
    """Columns per scale group of ``module``'s int8 weight (0: per row)."""
    groups = group_scaler(module)
    weight = module._parameters.get("weight")
    if groups is None or weight is None or groups.shape[1] == 0:
        return 0
    return int(weight.shape[1]) // int(groups.shape[1])


def native_weights(model: nn.Module) -> list[native.Int8Weight]:
    """The int8 weights of ``model`` on the native kernel (each once)."""
    found = (module.__dict__.get(_NATIVE) for module in model.modules())
    return list({id(packed): packed for packed in found if packed is not None}.values())


def _to_gemmas_format(module: nn.Module, destination: dict[str, Any], prefix: str) -> None:
    """A weight with column scales or scales per group of columns is saved in gemma's per-row
    format (rounded once more), so gemma's own loader reads the state dict right; those scales
    are not saved."""
    from gemma_profiles.engine.loading import per_row

    columns, groups = column_scaler(module), _packed_groups(module)
    if columns is not None or groups is not None:
        weight, scaler = destination[prefix + "weight"], destination[prefix + "weight_scaler"]
        q, rows = per_row(
            weight.detach().cpu(),
            scaler.detach().cpu(),
            None if columns is None else columns.cpu(),
            None if groups is None else groups.cpu(),
        )
        destination[prefix + "weight"] = q.to(weight.device)
        destination[prefix + "weight_scaler"] = rows.to(scaler.device)


def _packed_groups(module: nn.Module) -> torch.Tensor | None:
    packed = module.__dict__.get(_NATIVE)
    return packed.groups if packed is not None else group_scaler(module)


def _loaded_gemmas_format(module: nn.Module) -> None:
    """A state dict in gemma's per-row format was loaded: no column or group scales any more."""
    columns = column_scaler(module)
    if columns is not None:
        with torch.no_grad():
            columns.fill_(1.0)
    module._buffers.pop(GROUP_SCALER, None)


class NativeInt8(PinnedToCpu):
    """An int8 module whose weight is a buffer in the native kernel's layout (`native.Int8Weight`,
    kept in ``_gemma_profile_int8``): ``state_dict()`` unpacks it, in gemma's per-row format, and
    ``load_state_dict`` packs it again; it stays on the CPU (`PinnedToCpu`)."""

    prefix = "NativeInt8"
    pinned_as = "this int8 layer"
    pinned_dtype = torch.int8

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.__dict__[_NATIVE].unpack()
        scaler = self._parameters["weight_scaler"]
        assert scaler is not None
        destination[prefix + "weight_scaler"] = scaler if keep_vars else scaler.detach()
        _to_gemmas_format(self, destination, prefix)

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
        packed: native.Int8Weight = self.__dict__[_NATIVE]
        names = ("weight", "weight_scaler")
        found = state_weight(state_dict, prefix, names, packed.shape, torch.int8, strict, missing_keys, error_msgs)
        if found is None:
            return
        weight, scaler = found
        own = self._parameters["weight_scaler"]
        assert own is not None
        with torch.no_grad():
            own.copy_(scaler)
        packed = native.Int8Weight.pack(weight, own)
        object.__setattr__(self, _NATIVE, packed)
        self._buffers["weight"] = packed.data
        _loaded_gemmas_format(self)


class NativeInt8Matmul(NativeInt8):
    """An int8 ``Linear`` computing on the native kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed: native.Int8Weight = self.__dict__[_NATIVE]
        if x.dtype in (torch.float32, torch.bfloat16):
            return packed.matmul(x)
        return packed.matmul(x.float()).to(x.dtype)


class NativeInt8Lookup(NativeInt8):
    """The int8 tied embedder on the native kernel: gemma's lookup on the gathered rows of the
    packed weight (the sampler's product: `keep_int8_embedder`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaler: torch.Tensor = self.weight_scaler  # type: ignore[assignment]
        packed: native.Int8Weight = self.__dict__[_NATIVE]
        return _scaled_rows(packed.rows(x), F.embedding(x, scaler.unsqueeze(-1)), column_scaler(self))


class Int8Lookup(surgery.Surgery):
    """The int8 tied embedder kept int8: gemma's lookup on the gathered rows only (`int8_lookup`);
    with column scales, ``state_dict()`` gives gemma's per-row format (rounded once more) and a
    loaded state dict (gemma's format) drops them."""

    prefix = "Int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_lookup(self, x)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        _to_gemmas_format(self, destination, prefix)

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
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        _loaded_gemmas_format(self)


def native_linear(module: nn.Module) -> None:
    """An int8 ``Linear`` computing on the native kernel (``NativeInt8Linear``; check `native_kernel` first)."""
    _install_native(module, NativeInt8Matmul)


def keep_int8_embedder(model: Any, name: str, dtype: torch.dtype) -> bool:
    """Keep the tied embedder int8 on a CPU: row lookups, and the sampler's product on an int8 kernel."""
    from gemma_profiles.engine.loading import dequantize_rows
    from gemma_profiles.engine.tied import _HOOK, SamplerProduct, install

    module = model.get_submodule(name)
    weight, scaler = module.weight, module.weight_scaler
    sampler = getattr(model, "sampler", None)
    if weight.device.type != "cpu" or weight.dim() != 2 or sampler is None or _HOOK in sampler.__dict__:
        return False
    use_native = native_kernel(module, dtype)
    if not use_native and (dtype != torch.bfloat16 or weight.shape[0] % 4):
        return False
    if scaler.dtype != dtype:
        module._parameters["weight_scaler"] = torch.nn.Parameter(scaler.to(dtype), requires_grad=False)
    shape = (weight.shape[0], weight.shape[1])
    if use_native:
        _install_native(module, NativeInt8Lookup)

        # functions of the embedder, not closures over it: a deep copy multiplies by its own
        def project(embedder: Any, hidden: torch.Tensor) -> torch.Tensor:
            current: native.Int8Weight = embedder.__dict__[_NATIVE]  # load_state_dict repacks
            return current.matmul(_columns_applied(hidden, column_scaler(embedder), dtype)).to(hidden.dtype)

        def dense(embedder: Any) -> torch.Tensor:
            unpacked = embedder.__dict__[_NATIVE].unpack()
            return dequantize_rows(unpacked, embedder.weight_scaler, dtype, column_scaler(embedder))

    else:

        def project(embedder: Any, hidden: torch.Tensor) -> torch.Tensor:
            scaled = _columns_applied(hidden, column_scaler(embedder), dtype)
            return int8_linear(scaled, embedder.weight, embedder.weight_scaler).to(hidden.dtype)

        def dense(embedder: Any) -> torch.Tensor:
            return dequantize_rows(embedder.weight, embedder.weight_scaler, dtype, column_scaler(embedder))

        surgery.swap(module, Int8Lookup)
    install(model, module, SamplerProduct(dense, project, shape, dtype))
    return True
