"""The tied embedder, as gemma's sampler reads it, through a fast kernel (torch-touching).

gemma's ``GemmaForCausalLM.forward`` hands ``embedder.weight`` to its ``Sampler``,
which computes the logits as ``torch.matmul(hidden, embedding.t())`` - on a 2b model
a (1 x 2048) x (2048 x 256000) product, a fifth of the bytes of a decode step.  On a
CPU torch runs it at ~30 GB/s from the plain weight.  A forward pre-hook on the
sampler swaps that argument for a `SamplerWeight`: an object gemma's code uses like
the tensor (``.t()``, ``.to(dtype)``, ``torch.matmul``, ``@``) whose product runs
on the kernel the loader set up:

- a full-precision model whose plain weight is a memory-mapped checkpoint tensor: a copy of
  the weight stored for the fast kernel (`gemma_profiles.engine.kernels`: plain bfloat16 on huge
  pages, or oneDNN-packed), in chunks of rows (each chunk's mapped source pages released
  before the next, so loading peaks one chunk above the model): lookups read their rows from
  the file's pages and the memory stays one copy;
- a bfloat16 model whose weight was converted while loading (a float32 checkpoint, as
  ``gemma-profile import`` writes by default), on a CPU with the native bfloat16 kernel: that
  kernel reads plain row-major bfloat16, so the sampler's product runs on the embedder's own
  storage - no copy at all.  Without this the product went to ``torch.matmul`` on the plain
  weight, which oneDNN reorders into a temporary copy on every call (`gemma_profiles.engine.kernels`),
  for the largest product of a small Gemma: 168M of Gemma 3 270M's 268M weights.  Where the
  kernel would need a copy (oneDNN-packed), a converted weight keeps the plain product;
- an int8 model: ``_weight_int8pack_mm`` on the int8 weight and its scaler - the
  embedder stays int8 (half the bytes, half the memory of a dequantized copy) and its
  lookup dequantizes just the rows it gathers.

Any other use of the object gets the dense matrix, so a gemma version that does more
with ``embedding`` keeps working (slower).

The sampler keeps the embedder and a `SamplerProduct` - the product as functions *of the
embedder*, never closures over it - in its ``__dict__``, and the pre-hook is `swap_embedding`,
a plain function that reads them from the sampler it is called on: ``copy.deepcopy`` of the
model gives a sampler that multiplies by the copy's own embedder (before, the hook was a
closure over the original's).  The sampler keeps gemma's class: the ``fused`` stage, which
runs later, swaps it for ``FusedSampler`` (`gemma_profiles.engine.surgery`), and a pre-hook
runs before whichever forward it has.  A packed copy lives in the embedder's ``__dict__`` and
the embedder's class (``SamplerPackedEmbedding``) refills it when a state dict is loaded.

Used by the ``kernels`` builtin (`install_packed`, ``hooks/kernels.py``), and by
`gemma_profiles.engine.quantization` (int8) and `gemma_profiles.engine.half` (float16 storage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gemma_profiles.engine import surgery
from gemma_profiles.log import logger

#: Instance attribute of gemma's sampler, read by `swap_embedding`: (the tied embedder, its `SamplerProduct`).
_HOOK = "_gemma_profile_sampler"
#: Instance attribute of a `SamplerPacked` embedder: its packed copy, in chunks of rows.
_CHUNKS = "_gemma_profile_sampler_chunks"
#: Rows packed at a time: the packed copy is built while one chunk's source pages are resident.
CHUNK_ROWS = 16384
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm}


class SamplerWeight:
    """Stands for a (vocab x hidden) weight, or its ``.t()``; ``hidden @ it.t()`` runs ``project``.

    :param dense: the matrix as a tensor, for any use other than that product.
    :param project: ``hidden (..., hidden_size) -> logits (..., vocab)``.
    """

    def __init__(
        self,
        dense: Callable[[], torch.Tensor],
        project: Callable[[torch.Tensor], torch.Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype,
        transposed: bool = False,
    ) -> None:
        self._dense, self._project = dense, project
        self._shape, self.dtype, self.transposed = shape, dtype, transposed
        self.device = torch.device("cpu")

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape[::-1] if self.transposed else self._shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    def t(self) -> SamplerWeight:
        return SamplerWeight(self._dense, self._project, self._shape, self.dtype, not self.transposed)

    @property
    def T(self) -> SamplerWeight:
        return self.t()

    def dense(self) -> torch.Tensor:
        matrix = self._dense()
        return matrix.t() if self.transposed else matrix

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Itself for a no-op ``.to(dtype)``/``.to("cpu")``; otherwise the dense matrix moved."""

        def same(target: Any) -> bool:
            if isinstance(target, (str, torch.device)):
                return torch.device(target).type == "cpu"
            return bool(target == self.dtype)

        if all(same(t) for t in [*args, *kwargs.values()]):
            return self
        return self.dense().to(*args, **kwargs)

    def __matmul__(self, other: Any) -> Any:
        return torch.matmul(self.dense(), other)

    def __rmatmul__(self, other: Any) -> Any:
        return torch.matmul(other, self)  # type: ignore[arg-type] # dispatched to __torch_function__

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if (
            func in _MATMULS
            and not kwargs
            and len(args) == 2
            and isinstance(args[0], torch.Tensor)
            and isinstance(args[1], SamplerWeight)
            and args[1].transposed
        ):
            hidden, weight = args
            return weight._project(hidden)
        dense = [a.dense() if isinstance(a, SamplerWeight) else a for a in args]
        return func(*dense, **(kwargs or {}))


@dataclass(frozen=True)
class SamplerProduct:
    """The sampler's product for one kind of tied embedder, as functions of the embedder.

    :param dense: ``embedder -> (vocab x hidden)`` matrix, for any use other than the product.
    :param project: ``(embedder, hidden (..., hidden_size)) -> logits (..., vocab)``.
    """

    dense: Callable[[nn.Module], torch.Tensor]
    project: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    shape: tuple[int, int]
    dtype: torch.dtype

    def weight(self, embedder: nn.Module) -> SamplerWeight:
        """What the sampler receives in place of ``embedder.weight``."""
        return SamplerWeight(
            lambda: self.dense(embedder), lambda hidden: self.project(embedder, hidden), self.shape, self.dtype
        )


def swap_embedding(
    sampler: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The sampler's forward pre-hook: `SamplerWeight` in place of its embedder's weight."""
    embedder, product = sampler.__dict__[_HOOK]
    current = getattr(embedder, "weight", None)  # a parameter, or the int8 kernel's buffer
    if current is None:
        return None
    if kwargs.get("embedding") is current:
        return args, {**kwargs, "embedding": product.weight(embedder)}
    if args and args[0] is current:
        return (product.weight(embedder), *args[1:]), kwargs
    return None


def install(model: nn.Module, embedder: nn.Module, product: SamplerProduct) -> bool:
    """Make ``model.sampler`` multiply by ``product`` wherever gemma passes ``embedder.weight``."""
    sampler = getattr(model, "sampler", None)
    if not isinstance(sampler, nn.Module) or _HOOK in sampler.__dict__:
        return False
    sampler.__dict__[_HOOK] = (embedder, product)
    sampler.register_forward_pre_hook(swap_embedding, with_kwargs=True)
    return True


class SamplerPacked(surgery.Surgery):
    """A memory-mapped tied embedder the sampler multiplies through a packed copy of it
    (``__dict__[_CHUNKS]``): a loaded state dict refills the copy."""

    prefix = "SamplerPacked"

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
        super()._load_from_state_dict(  # copies into the (mapped, private) weight
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.__dict__[_CHUNKS][:] = _pack_rows(_weight_of(self))


def install_packed(model: nn.Module, profile: str) -> list[torch.Tensor] | None:
    """Full-precision tied embedder: the sampler's product on the fast kernel, without a second
    copy of the weight in memory.

    Returns what the product reads - a packed copy's chunks (refilled when a state dict is
    loaded) for a mapped weight, ``[weight]`` itself for a converted bfloat16 weight on the
    native kernel - or None when the sampler keeps the plain weight."""
    from gemma_profiles.engine import kernels
    from gemma_profiles.engine.offload import embedder_of
    from gemma_profiles.engine.pages import memory_mapped

    found = embedder_of(model)
    if found is None:
        return None
    name, embedder = found
    weight = embedder._parameters.get("weight")
    if weight is None or weight.dim() != 2 or weight.device.type != "cpu" or kernels.available(weight.dtype):
        return None
    shape = (weight.shape[0], weight.shape[1])
    if not memory_mapped(weight):
        if weight.dtype == torch.bfloat16 and kernels.native_bf16():
            # The native kernel reads plain bfloat16: multiply the embedder itself (the current
            # parameter at every call, so a loaded state dict is used as it is).
            plain = SamplerProduct(_weight_of, _project_in_place, shape, weight.dtype)
            return [weight] if install(model, embedder, plain) else None
        logger.debug(
            "[{}] the sampler reads the plain {}.weight (not memory-mapped: a packed copy would double it)",
            profile,
            name,
        )
        return None
    sampler = getattr(model, "sampler", None)
    if not isinstance(sampler, nn.Module) or _HOOK in sampler.__dict__:
        return None
    chunks = _pack_rows(weight)
    embedder.__dict__[_CHUNKS] = chunks
    surgery.swap(embedder, SamplerPacked)
    install(model, embedder, SamplerProduct(_weight_of, _project_packed, shape, weight.dtype))
    return chunks


def _pack_rows(weight: torch.Tensor) -> list[torch.Tensor]:
    """Packed copies of ``weight``, CHUNK_ROWS rows each; each chunk's mapped pages dropped once read."""
    from gemma_profiles.engine.kernels import pack
    from gemma_profiles.engine.pages import release_pages

    chunks = []
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        rows = weight[start : start + CHUNK_ROWS]
        chunks.append(pack(rows))
        release_pages(rows)  # lookups read single rows back from the file
    return chunks


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = module._parameters["weight"]
    assert weight is not None
    return weight


def _project_packed(embedder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    from gemma_profiles.engine.kernels import packed_linear

    chunks: list[torch.Tensor] = embedder.__dict__[_CHUNKS]
    return torch.cat([packed_linear(hidden, chunk) for chunk in chunks], dim=-1)


def _project_in_place(embedder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    from gemma_profiles.engine.kernels import packed_linear

    return packed_linear(hidden, _weight_of(embedder))
