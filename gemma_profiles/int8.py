"""int8 weights computed without rebuilding the full-precision weight on every call.

Torch-touching; used by the ``quantization`` builtin (``hooks/quantization.py``).

gemma's int8 ``Linear`` computes ``F.linear(x, weight * weight_scaler[:, None])``:
a full-precision copy of every weight on every forward (two on the CPU, where
torch materialises the int8 -> float cast) - 16x slower than bf16 on a CPU
(DESIGN.md).  After loading, each int8 ``Linear`` gets a forward that reads the
int8 weight directly:

- CPU with bfloat16 activations: ``torch.ops.aten._weight_int8pack_mm`` (int8
  weight, per-row scale; 2.6x faster than a bf16 matvec on 16384x2048 here);
- elsewhere (CUDA, float32/float16 activations): the int8 weight is converted
  into one scratch buffer per device and dtype, reused by every layer, and the
  per-row scale is applied to the output (``x @ (q*s).T == (x @ q.T) * s``), so no
  weight-sized tensor is allocated per call.

gemma's forward otherwise rebuilds the whole (vocab x hidden) tied embedder for the
lookup and again for the sampler, every step.  On a CPU with bfloat16 activations
the embedder stays int8: its lookup dequantizes just the rows it gathers, and the
sampler's product runs on ``_weight_int8pack_mm`` (`gemma_profiles.tied`); elsewhere it
is dequantized once into the compute dtype.  ``model.config.quant`` is then False, so
gemma's forward hands the weight to the sampler as it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .lazy import remove_parameter

_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch_for(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    key = (weight.device, dtype)
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < weight.numel():
        buffer = torch.empty(weight.numel(), dtype=dtype, device=weight.device)
        _scratch[key] = buffer
    return buffer[: weight.numel()].view(weight.shape)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scaler: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight * scaler[:, None])`` without a per-call weight-sized allocation."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        flat = x.reshape(-1, x.shape[-1])
        out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(flat, weight, scaler.to(x.dtype))
        return out.reshape(*x.shape[:-1], weight.shape[0])
    dense = _scratch_for(weight, x.dtype)
    dense.copy_(weight)
    return F.linear(x, dense) * scaler.to(x.dtype)


def fast_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return int8_linear(x, self.weight, self.weight_scaler)


def dequantize_embedder(model: Any, name: str, dtype: torch.dtype) -> None:
    """Turn the int8 tied embedder into a plain ``dtype`` weight (once, in row chunks)."""
    from .loader import dequantize_rows

    module = model.get_submodule(name)
    weight = dequantize_rows(module.weight.cpu(), module.weight_scaler.cpu(), dtype).to(module.weight.device)
    module._parameters["weight"] = torch.nn.Parameter(weight, requires_grad=False)
    remove_parameter(model, f"{name}.weight_scaler")
    module.quant = False


def int8_lookup(self: Any, x: torch.Tensor) -> torch.Tensor:
    """gemma's int8 ``Embedding.forward`` (``F.embedding(x, weight * scaler)``) on the gathered rows only."""
    scaler = self.weight_scaler
    return F.embedding(x, self.weight).to(scaler.dtype) * F.embedding(x, scaler.unsqueeze(-1))


def keep_int8_embedder(model: Any, name: str, dtype: torch.dtype) -> bool:
    """Keep the tied embedder int8 (CPU, bfloat16 compute): row lookups and an int8 sampler product."""
    import types

    from .tied import SamplerWeight, install

    module = model.get_submodule(name)
    weight, scaler = module.weight, module.weight_scaler
    if dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
        return False

    def project(hidden: torch.Tensor) -> torch.Tensor:
        return int8_linear(hidden.to(dtype), module.weight, module.weight_scaler).to(hidden.dtype)

    def dense() -> torch.Tensor:
        from .loader import dequantize_rows

        return dequantize_rows(module.weight, module.weight_scaler, dtype)

    if not install(model, module, SamplerWeight(dense, project, (weight.shape[0], weight.shape[1]), dtype)):
        return False
    if scaler.dtype != dtype:
        module._parameters["weight_scaler"] = torch.nn.Parameter(scaler.to(dtype), requires_grad=False)
    module.forward = types.MethodType(int8_lookup, module)
    return True
