"""Tensor parallel over ``torch.distributed``: each rank holds a slice of every attention and MLP.

Torch-touching; used by the ``parallel`` builtin (``hooks/parallel.py``), which passes plain
values (rank, world size, process group).  How to use it and the scaling model: docs/parallel.md.

The layout (Megatron-LM's, the one gemma_pytorch's XLA-only ``xla_model_parallel.py`` also
uses; written here from the shapes, not from that file):

- attention: rank ``r`` of ``N`` keeps query heads ``[r*H/N, (r+1)*H/N)`` of the fused
  ``qkv_proj`` (a column slice of q, k and v together) and the matching input columns of
  ``o_proj``; the key/value heads its queries read: ``KV/N`` of them when there are at
  least as many KV heads as ranks, else the one KV head its query group shares
  (multi-query / grouped-query with fewer KV heads than ranks: replicated);
- MLP: rows ``[r*I/N, (r+1)*I/N)`` of ``gate_proj`` and ``up_proj`` (column-parallel),
  the same columns of ``down_proj`` (row-parallel);
- after each layer's attention and MLP, an all-reduce sums the ranks' partial outputs;
  norms, the embedder and the sampler are replicated, and the sampled tokens are
  broadcast from the group's first rank, so every rank continues with the same tokens
  even when sampling with temperature.

gemma's modules are built from the config: the ``parallel`` builtin rewrites a copy of it
to one rank's head counts and MLP width (gemma then builds the rank's shapes and sizes
the KV cache in ``generate`` from ``num_key_value_heads``: per rank too); `slice_shards`
makes the loader hand each rank only its rows and columns of the checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gemma_profiles.errors import GemmaProfileError

#: torchrun's environment (``torch.distributed.run``): a rank started any other way lacks these.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

_LAYER = re.compile(r"^model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))\.")
_COLUMN = ("gate_proj", "up_proj")  # output rows split; qkv_proj by heads
_ROW = ("o_proj", "down_proj")  # input columns split; outputs summed


@dataclass(frozen=True)
class Layout:
    """One rank's share of a model: the full sizes and where this rank's slice starts."""

    rank: int
    world: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def heads(self) -> int:
        return self.num_heads // self.world

    @property
    def kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.world)

    @property
    def kv_start(self) -> int:
        """The first KV head this rank keeps."""
        if self.num_kv_heads >= self.world:
            return self.rank * self.kv_heads
        return (self.rank * self.heads) // (self.num_heads // self.num_kv_heads)

    @property
    def intermediate(self) -> int:
        return self.intermediate_size // self.world

    def piece(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of checkpoint tensor ``name`` (a view where the part is contiguous)."""
        found = _LAYER.match(name)
        if found is None or not (name.endswith(".weight") or name.endswith(".weight_scaler")):
            return tensor
        kind = found.group(2) or found.group(3)
        scaler = name.endswith(".weight_scaler")
        if kind in _ROW:
            if scaler:  # one scale per output row: outputs are whole on every rank
                return tensor
            width = self.heads * self.head_dim if kind == "o_proj" else self.intermediate
            return tensor.narrow(1, self.rank * width, width)
        if kind in _COLUMN:
            return tensor.narrow(0, self.rank * self.intermediate, self.intermediate)
        q, kv, hd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        rows = [
            (self.rank * self.heads * hd, self.heads * hd),
            (q + self.kv_start * hd, self.kv_heads * hd),
            (q + kv + self.kv_start * hd, self.kv_heads * hd),
        ]
        return torch.cat([tensor.narrow(0, start, length) for start, length in rows])

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape `piece` gives a tensor of ``shape`` (checked before anything is read)."""
        return tuple(self.piece(name, torch.empty(shape, device="meta")).shape)


_LAYOUTS: weakref.WeakKeyDictionary[Any, Layout] = weakref.WeakKeyDictionary()


def register(model: Any, layout: Layout, group: Any = None) -> None:
    """Make ``model`` (built with one rank's shapes) compute its rank's share: the all-reduce
    after each layer's attention and MLP, the token broadcast after the sampler; and have the
    loader give it its slice of the checkpoint (`slice_shards`)."""
    import torch.distributed as dist

    _LAYOUTS[model] = layout
    source = dist.get_global_rank(group, 0) if group is not None else 0

    def all_reduce(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    def same_tokens(module: Any, args: Any, output: Any) -> Any:
        tokens = output[0]
        shared = tokens if tokens.is_contiguous() else tokens.contiguous()
        dist.broadcast(shared, src=source, group=group)
        if shared is not tokens:
            tokens.copy_(shared)
        return output

    layers = model.model.layers
    for layer in layers:
        layer.self_attn.register_forward_hook(all_reduce)
        layer.mlp.register_forward_hook(all_reduce)
    model.sampler.register_forward_hook(same_tokens)


def layout_of(model: Any) -> Layout | None:
    return _LAYOUTS.get(model)


def slice_shards(model: Any, shards: list[Any]) -> list[Any]:
    """The loader's opened checkpoint files, each tensor cut to ``model``'s rank (unchanged
    for a model that is not tensor parallel).  Row slices stay views of the memory map (no
    copy, only their pages are read); q/k/v and column slices are copied, one tensor at a
    time, and their source pages dropped: a rank holds ~1/N of the sharded weights."""
    layout = _LAYOUTS.get(model)
    if layout is None:
        return shards
    from gemma_profiles.engine.pages import memory_mapped, release_pages

    def sliced(shard: Any) -> Any:
        read = shard.read

        def read_sliced() -> Iterator[tuple[str, torch.Tensor, bool]]:
            for name, tensor, mapped in read():
                piece = layout.piece(name, tensor)
                if piece is not tensor and (
                    piece.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
                    or not piece.is_contiguous()
                ):
                    piece = piece.contiguous()
                    if mapped:
                        release_pages(tensor)
                    mapped = False
                elif piece is not tensor:
                    mapped = mapped and memory_mapped(piece)
                yield name, piece, mapped

        headers = {name: (layout.shape(name, shape), dtype) for name, (shape, dtype) in shard.headers.items()}
        return dataclasses.replace(shard, headers=headers, read=read_sliced)

    return [sliced(shard) for shard in shards]


def parameter_bytes(model: Any) -> int:
    """Bytes of the parameters and buffers this process holds (meta tensors count nothing)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


# -- the process group ---------------------------------------------------------------


def environment_problem(world: int, environ: dict[str, str] | None = None) -> str | None:
    """Why this process cannot be one of ``world`` torchrun ranks, or None."""
    env = os.environ if environ is None else environ
    missing = [key for key in TORCHRUN_ENV if not env.get(key)]
    if missing:
        return (
            f"this process was not started by torchrun ({', '.join(missing)} unset): "
            f"run it as 'torchrun --nproc-per-node {world} SCRIPT ...'"
        )
    found = env["WORLD_SIZE"]
    if found != str(world):
        return f"torchrun started {found} rank(s), the profile shards over {world}: use --nproc-per-node {world}"
    return None


def backend_for(device: str) -> str:
    """``nccl`` for CUDA when every rank has a GPU of its own (NCCL refuses two ranks on one
    GPU: "Duplicate GPU detected"), else ``gloo`` (CPU tensors; CUDA tensors through the host)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if torch.distributed.is_nccl_available() and local <= torch.cuda.device_count():
            return "nccl"
    return "gloo"


def device_problem(device: str, backend: str) -> str | None:
    """Why ``device`` cannot be every rank's device with ``backend``, or None."""
    if backend == "nccl" and device.startswith("cuda:"):
        return (
            f"placement.device {device} would put every rank on one GPU, which NCCL refuses: "
            "write 'device: cuda' (each rank then takes the GPU of its LOCAL_RANK)"
        )
    return None


def join(world: int, timeout_s: float, device: str, where: str) -> tuple[int, Any]:
    """Join torchrun's process group (once per process): this rank and the group (None: the
    default group).  Ranks that do not all join within ``timeout_s`` give one
    `GemmaProfileError` on each rank that did, instead of a hang."""
    import torch.distributed as dist

    problem = environment_problem(world)
    if problem is not None:
        raise GemmaProfileError(f"tensor_parallel: {world}: {problem}", where=where)
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise GemmaProfileError(
                f"tensor_parallel: {world}, but the script's process group has {dist.get_world_size()} rank(s)",
                where=where,
                hint=f"launch {world} ranks, or set tensor_parallel to the group's size",
            )
        return dist.get_rank(), None
    backend = backend_for(device)
    problem = device_problem(device, backend)
    if problem is not None:
        raise GemmaProfileError(f"tensor_parallel: {world}: {problem}", where=where)
    if backend == "nccl":
        # Each rank on its own GPU: a plain "cuda" in the profile then means the rank's GPU.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    rank = int(os.environ["RANK"])
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        dist.barrier()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise GemmaProfileError(
            f"rank {rank} of {world}: the other ranks did not join the {backend} process group "
            f"within {timeout_s:g} s ({type(exc).__name__}: {first})",
            where=where,
            hint="see the other ranks' errors; placement.tensor_parallel_timeout sets the wait",
        ) from None
    return rank, None
