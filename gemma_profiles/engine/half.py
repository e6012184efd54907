"""float16 storage, float32 compute: ``quantization: {weights: float16}`` (torch-touching).

Used by the ``loading`` and ``quantization`` builtins when the plan's ``weight_storage`` is
``"float16"`` (the planner then computes in float32).

Gemma 2 and 3 cannot compute in float16: their residual stream outgrows its 65504 (on Gemma 3
270M it reaches ~1e5 by layer 14, and float16 compute returns nothing useful), so GPUs without
bfloat16 (Pascal, Volta, Turing) run them in float32.  Their *weights* fit float16 well: every
value of a trained Gemma lies far inside its range, and its 11-bit significand rounds a weight
8x more finely than bfloat16.  So the weights are stored in float16 - half of float32's
memory - and every product runs in float32 on a float32 copy of a piece of the weight:

- the lean loader (`gemma_profiles.engine.loading`) converts each gemma ``Linear`` and
  ``Embedding`` weight to float16 while loading (a value beyond float16's range is refused,
  naming the tensor); norms stay float32;
- each such ``Linear`` becomes a ``Float16StoredLinear`` (`Float16StoredMatmul` on top of gemma's
  class: `gemma_profiles.engine.surgery`) and computes ``F.linear(x, weight)`` in ``x``'s dtype (float32) a piece at a
  time: a block of rows of the weight is converted into one scratch buffer per device and dtype,
  reused by every layer, and multiplied; on a CPU the block is small enough (4 MiB) to stay in
  the caches between its conversion and its product, on CUDA it is larger (64 MiB: fewer
  launches).  The arithmetic is float32's - the same sums of the same float32 numbers - so the
  only difference from a float32 model is the weights' rounding to float16;
- the tied embedder (a ``Float16StoredEmbedding``) looks up float32 rows, and the sampler's product (``hidden @
  embedder.T``, which gemma computes on ``embedder.weight`` itself) runs the same way through
  `gemma_profiles.engine.tied`'s stand-in for the weight.

There is no fused kernel: each product converts its weight first, so it reads the float16
weight and writes and reads a float32 block - more work than float32's own product, in half its
memory (docs/engine.md has the measurements).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gemma_profiles.engine import surgery
from gemma_profiles.errors import GemmaProfileError

STORED = torch.float16
#: Elements of a weight converted at a time, per device type: 4 MiB of float32 on a CPU (the
#: 270M's sampler product ran 2.1x faster in blocks of ~1024 rows than through one weight-sized
#: conversion, on the 2-core AVX2 box), 64 MiB on CUDA.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
_DEFAULT_CHUNK = 1 << 24
#: The dtype a float16-stored embedder's lookups return (the model's compute dtype).
_COMPUTE = "_gemma_profile_float16_compute"

_scratch: dict[tuple[torch.device, torch.dtype, bool], torch.Tensor] = {}


def stored_names(model: nn.Module) -> set[str]:
    """The weights stored in float16: the 2-D weight of every gemma ``Linear`` and ``Embedding``
    (gemma's own classes, which carry a ``quant`` flag; not int8 ones)."""
    names = set()
    for prefix, module in model.named_modules():
        if type(module).__name__ not in ("Linear", "Embedding") or getattr(module, "quant", None) is not False:
            continue
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() == 2 and weight.is_floating_point():
            names.add(f"{prefix}.weight" if prefix else "weight")
    return names


def _scratch_for(device: torch.device, dtype: torch.dtype, elements: int) -> torch.Tensor:
    # one per inference mode: a buffer made under it (gemma's generate) cannot be written outside
    key = (device, dtype, torch.is_inference_mode_enabled())
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < elements:
        buffer = torch.empty(elements, dtype=dtype, device=device)
        _scratch[key] = buffer
    return buffer[:elements]


def rows_per_block(weight: torch.Tensor) -> int:
    """Rows of ``weight`` converted at a time on its device."""
    chunk = CHUNK_ELEMENTS.get(weight.device.type, _DEFAULT_CHUNK)
    return max(1, min(weight.shape[0], chunk // max(1, weight.shape[1])))


def half_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight.to(x.dtype))`` computed in ``x``'s dtype, a block of rows at a time,
    without a weight-sized float copy."""
    if x.dtype == weight.dtype:
        return F.linear(x, weight)
    n, k = weight.shape
    rows = rows_per_block(weight)
    scratch = _scratch_for(weight.device, x.dtype, rows * k)
    if rows >= n:
        return F.linear(x, scratch.view(n, k).copy_(weight))
    flat = x.reshape(-1, k)
    out = torch.empty(flat.shape[0], n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        block = weight[start : start + rows]
        dense = scratch[: block.numel()].view(block.shape).copy_(block)
        if flat.shape[0] == 1:
            torch.mm(flat, dense.t(), out=out[:, start : start + block.shape[0]])
        else:
            out[:, start : start + block.shape[0]] = F.linear(flat, dense)
    return out.reshape(*x.shape[:-1], n)


class Float16Stored(surgery.Surgery):
    """A gemma module whose weight is stored in float16 and computed with in another dtype."""

    prefix = "Float16Stored"


class Float16StoredMatmul(Float16Stored):
    """A ``Linear`` with a float16 weight, computing in its input's dtype (`half_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight: torch.Tensor = self.weight  # type: ignore[assignment]
        return half_linear(x, weight)


class Float16StoredLookup(Float16Stored):
    """The tied embedder with a float16 weight: lookups return rows in the compute dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight: torch.Tensor = self.weight  # type: ignore[assignment]
        dtype: torch.dtype = self.__dict__[_COMPUTE]
        return F.embedding(x, weight).to(dtype)


def to_stored(name: str, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in float16, or a `GemmaProfileError` naming it when a value is beyond float16's range."""
    if weight.dtype == STORED:
        return weight
    half = weight.detach().to(STORED)
    overflow = int(torch.isinf(half).sum()) - int(torch.isinf(weight.detach()).sum())
    if overflow:
        raise GemmaProfileError(
            f"{name} has {overflow} value(s) beyond float16's 65504: it cannot be stored in float16",
            where=name,
            hint="drop quantization.weights: float16 (weights then stay float32), or use int8 weights",
        )
    return half


def install(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Store gemma's ``Linear``/``Embedding`` weights in float16 (those still in another dtype:
    gemma's own loader filled them) and compute each in ``dtype``.

    Returns (linear layers, bytes of their weights and the embedder's now stored)."""
    from gemma_profiles.engine.offload import embedder_of
    from gemma_profiles.engine.tied import SamplerProduct
    from gemma_profiles.engine.tied import install as install_sampler

    found = embedder_of(model)
    embedder_name = found[0] if found is not None else None
    layers = stored = 0
    for name in sorted(stored_names(model)):
        prefix = name.rpartition(".")[0]
        module = model.get_submodule(prefix)
        weight = module._parameters["weight"]
        assert weight is not None
        if weight.dtype != STORED:
            module._parameters["weight"] = nn.Parameter(to_stored(name, weight), requires_grad=False)
        stored += weight.numel() * STORED.itemsize
        if type(module).__name__ == "Linear":
            surgery.swap(module, Float16StoredMatmul)
            layers += 1
        elif prefix == embedder_name:
            _install_embedder(model, module, dtype, SamplerProduct, install_sampler)
    return layers, stored


def _install_embedder(model: nn.Module, embedder: nn.Module, dtype: torch.dtype, product: Any, install: Any) -> None:
    object.__setattr__(embedder, _COMPUTE, dtype)
    surgery.swap(embedder, Float16StoredLookup)
    weight = _stored(embedder)
    # functions of the embedder, not closures over it: a deep copy multiplies by its own
    install(
        model,
        embedder,
        product(
            lambda module: _stored(module).to(dtype),
            lambda module, hidden: half_linear(hidden.to(dtype), _stored(module)),
            (weight.shape[0], weight.shape[1]),
            dtype,
        ),
    )


def _stored(module: nn.Module) -> torch.Tensor:
    weight = module._parameters["weight"]
    assert weight is not None
    return weight


def is_stored_half(module: nn.Module) -> bool:
    return isinstance(module, Float16Stored)
