"""gemma's decoder layers on the CPU in a few native calls: see ``csrc/decode.c`` for why.

Torch-touching; installed by the ``fused`` builtin (`gemma_profiles.hooks.fused`) on a
model that runs on the CPU.  Each gemma module of a known kind gets its own ``forward``: it
becomes a ``FusedRMSNorm``, ``FusedGemmaMLP``, ``FusedGemmaAttention`` or ``FusedSampler`` (a
`Fused` mixin on top of gemma's class, `gemma_profiles.engine.surgery`; gemma's classes and
files are untouched):

- ``RMSNorm``: one call for the whole norm;
- ``GemmaMLP``: its three projections as they are, ``gelu(gate) * up`` in one call;
- ``GemmaAttention``: its projections (and Gemma 3's q/k norms) as they are, then one call
  for the rotary embedding, the KV-cache write, scores, softcapping, mask and softmax,
  and the weighted values - no ``repeat_interleave`` of the cache, no bfloat16 ``bmm``;
- ``Sampler``: greedy decoding (``temperatures is None``) takes its argmax in one call
  (torch's argmax over 256 000 bfloat16 logits costs 0.85 ms here); sampling is gemma's.

The kernels run on x86-64 CPUs with AVX-512 (F, BW, VL), or else AVX2 + FMA (`path` says
which; the two differ only in the order of float32 sums).

Every forward hands anything it does not cover (a dtype other than float32/bfloat16, a
tensor off the CPU, an unexpected shape) to gemma's own forward.  Before a kind is
installed, its forward is run against gemma's on random inputs (a private generator: the
user's RNG is not touched) through the loaded model's first module of that kind; if they
disagree - a gemma version whose forward changed - that kind keeps gemma's forward and a
warning says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from gemma_profiles.engine import native, surgery
from gemma_profiles.log import logger

_DTYPES = (torch.float32, torch.bfloat16)
#: Relative L2 distance allowed between gemma's forward and ours in the install-time check.
_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def unavailable() -> str | None:
    """None when the kernels run here; else why not (one line)."""
    library = native.decode_library()
    return library if isinstance(library, str) else None


def path() -> str | None:
    """The kernels' path on this CPU - ``"AVX-512"`` (F, BW, VL) or ``"AVX2 + FMA"`` - or None when they do not run."""
    library = native.decode_library()
    if isinstance(library, str):
        return None
    return {1: "AVX-512", 2: "AVX2 + FMA"}.get(library.gp_decode_path())


def _library() -> Any:
    library = native.decode_library()
    assert not isinstance(library, str), library
    return library


def _cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors)


def _bf16(tensor: torch.Tensor) -> int:
    return int(tensor.dtype == torch.bfloat16)


# -- the forwards ------------------------------------------------------------
# Each takes the gemma module as ``self``, whether it is a `Fused` one yet or not (the install
# check runs them first), and hands what it does not cover to gemma's forward: `_gemmas`.


def _gemmas(module: Any) -> Any:
    """gemma's class of ``module`` (its forward is the fallback)."""
    return surgery.original_class(module)


def rms_norm(self: Any, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if not _cpu(x, weight) or weight.dim() != 1 or x.shape[-1] != weight.shape[0] or x.numel() == 0:
        return cast(torch.Tensor, _gemmas(self).forward(self, x))
    flat, weight = x.contiguous(), weight.detach().contiguous()
    out = torch.empty_like(flat)
    width = weight.shape[0]
    # (transformers' Gemma norms have no such flag: they all scale by 1 + weight)
    offset = 1.0 if getattr(self, "add_unit_offset", True) else 0.0
    _library().gp_rms_norm(
        flat.data_ptr(), _bf16(flat), flat.numel() // width, width, weight.data_ptr(), _bf16(weight), offset,
        float(self.eps), out.data_ptr(),
    )  # fmt: skip
    return out


def mlp(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not _cpu(x):
        return cast(torch.Tensor, _gemmas(self).forward(self, x))
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not _cpu(gate) or gate.dtype != up.dtype or gate.shape != up.shape:
        return cast(torch.Tensor, self.down_proj(F.gelu(gate, approximate="tanh") * up))
    gate, up = gate.contiguous(), up.contiguous()
    fused = torch.empty_like(gate)
    _library().gp_gelu_mul(gate.data_ptr(), up.data_ptr(), _bf16(gate), gate.numel(), fused.data_ptr())
    return cast(torch.Tensor, self.down_proj(fused))


def attention(
    self: Any,
    hidden_states: torch.Tensor,
    freqs_cis: torch.Tensor,
    kv_write_indices: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    local_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    def gemma() -> torch.Tensor:
        return cast(
            torch.Tensor,
            _gemmas(self).forward(self, hidden_states, freqs_cis, kv_write_indices, kv_cache, mask, local_mask),
        )

    local = getattr(self.attn_type, "name", None) == "LOCAL_SLIDING" and self.sliding_window_size is not None
    chosen = local_mask if local and local_mask is not None else mask
    k_cache, v_cache = kv_cache
    if not _usable(hidden_states, freqs_cis, kv_write_indices, k_cache, v_cache, chosen, self.head_dim):
        return gemma()
    batch, length, _ = hidden_states.shape
    heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
    qkv = self.qkv_proj(hidden_states)
    if qkv.dtype != k_cache.dtype or qkv.shape != (batch, length, (heads + 2 * kv_heads) * head_dim):
        return gemma()
    qkv = qkv.contiguous()
    xq, xk, xv = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
    if self.query_norm is not None and self.key_norm is not None:
        xq = self.query_norm(xq.reshape(batch, length, heads, head_dim)).reshape(batch, length, -1)
        xk = self.key_norm(xk.reshape(batch, length, kv_heads, head_dim)).reshape(batch, length, -1)
        if xq.dtype != qkv.dtype or xk.dtype != qkv.dtype:
            return gemma()
    freqs = torch.view_as_real(freqs_cis).contiguous()
    positions = kv_write_indices.contiguous()
    out = torch.empty(batch, length, heads * head_dim, dtype=qkv.dtype)
    mask_batch = chosen.stride(0) if chosen.shape[0] == batch and batch > 1 else 0
    softcap = self.attn_logit_softcapping
    status = _library().gp_attend(
        xq.data_ptr(), xq.stride(0), xq.stride(1), xk.data_ptr(), xk.stride(0), xk.stride(1),
        xv.data_ptr(), xv.stride(0), xv.stride(1), batch, length, heads, kv_heads, head_dim,
        freqs.data_ptr(), positions.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1],
        chosen.data_ptr(), mask_batch, chosen.stride(2), float(self.scaling), float(softcap or 0.0), _bf16(qkv),
        out.data_ptr(),
    )  # fmt: skip
    if status == -1:
        return gemma()  # a position outside the cache: nothing was written; gemma raises its own error
    if status != 0:
        raise MemoryError(f"gemma-profiles attention kernel: out of memory ({tuple(hidden_states.shape)})")
    return cast(torch.Tensor, self.o_proj(out))


def _usable(
    hidden: torch.Tensor,
    freqs: torch.Tensor,
    positions: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    mask: torch.Tensor,
    head_dim: int,
) -> bool:
    """Whether the inputs are what the kernel takes (else gemma's forward runs)."""
    if not (_cpu(hidden, k_cache, v_cache) and hidden.dim() == 3 and positions is not None):
        return False
    batch, length, _ = hidden.shape
    cache_shape = k_cache.shape
    return (
        k_cache.dtype == v_cache.dtype == hidden.dtype
        and k_cache.dim() == 4
        and v_cache.shape == cache_shape
        and cache_shape[0] == batch
        and cache_shape[3] == head_dim
        and head_dim % 2 == 0
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and freqs.dtype == torch.complex64
        and freqs.device.type == "cpu"
        and tuple(freqs.shape) == (length, head_dim // 2)
        and positions.dtype == torch.int64
        and positions.device.type == "cpu"
        and tuple(positions.shape) == (length,)
        and mask.dtype == torch.float32
        and mask.device.type == "cpu"
        and mask.dim() == 4
        and mask.shape[0] in (1, batch)
        and mask.shape[1] == 1
        and tuple(mask.shape[2:]) == (length, cache_shape[1])
        and mask.stride(3) == 1
    )


def sampler(
    self: Any,
    embedding: Any,
    hidden_states: torch.Tensor,
    output_positions: torch.Tensor,
    temperatures: torch.Tensor | None,
    top_ps: torch.Tensor,
    top_ks: torch.Tensor,
    embedding_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    def gemma() -> tuple[torch.Tensor, torch.Tensor]:
        return _gemmas(self).forward(  # type: ignore[no-any-return]
            self, embedding, hidden_states, output_positions, temperatures, top_ps, top_ks, embedding_bias
        )

    if temperatures is not None or not _cpu(hidden_states) or getattr(embedding, "dtype", None) != hidden_states.dtype:
        return gemma()
    with torch.no_grad():
        last = hidden_states.index_select(1, output_positions).squeeze(dim=1)
        logits = torch.matmul(last, embedding.t())
        if embedding_bias is not None:
            logits = logits + embedding_bias
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if not _cpu(logits) or logits.dim() != 2:
            return torch.argmax(logits, dim=-1).squeeze(dim=-1), logits
        flat = logits.contiguous()
        ids = torch.empty(flat.shape[0], dtype=torch.int64)
        _library().gp_argmax(flat.data_ptr(), _bf16(flat), flat.shape[0], flat.shape[1], ids.data_ptr())
        return ids.squeeze(dim=-1), logits


# -- the classes ---------------------------------------------------------------


class Fused(surgery.Surgery):
    """A gemma module whose forward runs in the native decode library (`gemma_profiles.engine.fused`)."""

    prefix = "Fused"


class FusedNorm(Fused):
    """``RMSNorm`` in one call (`rms_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(self, x)


class FusedMLP(Fused):
    """``GemmaMLP`` with ``gelu(gate) * up`` in one call (`mlp`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(self, x)


class FusedAttention(Fused):
    """``GemmaAttention`` with everything between the projections in one call (`attention`)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        freqs_cis: torch.Tensor,
        kv_write_indices: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        local_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return attention(self, hidden_states, freqs_cis, kv_write_indices, kv_cache, mask, local_mask)


class FusedSampling(Fused):
    """``Sampler`` with greedy decoding's argmax in one call (`sampler`)."""

    def forward(
        self,
        embedding: Any,
        hidden_states: torch.Tensor,
        output_positions: torch.Tensor,
        temperatures: torch.Tensor | None,
        top_ps: torch.Tensor,
        top_ks: torch.Tensor,
        embedding_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sampler(self, embedding, hidden_states, output_positions, temperatures, top_ps, top_ks, embedding_bias)


# -- recognising gemma's modules, checking, installing --------------------------

_ATTENTION: tuple[str, ...] = ("qkv_proj", "o_proj", "num_heads", "num_kv_heads", "head_dim", "q_size", "kv_size")
_ATTENTION += ("scaling", "attn_type", "sliding_window_size", "attn_logit_softcapping", "query_norm", "key_norm")
#: transformers' Gemma, Gemma 2 and Gemma 3 norms (``(1 + weight) * x / rms(x)``, as gemma's) and MLPs
#: (``down(gelu_tanh(gate(x)) * up(x))``): the norm and MLP forwards serve them too (hooks/transformers.py).
HF_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
HF_MLPS = ("Gemma2MLP", "Gemma3MLP")  # (transformers' Gemma 1 MLP is called GemmaMLP, as gemma's)
#: kind -> (class names, attributes the forward reads, the `Fused` class its modules get)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], type[Fused]]] = {
    "norms": (("RMSNorm", *HF_NORMS), ("weight", "eps"), FusedNorm),
    "MLPs": (("GemmaMLP", *HF_MLPS), ("gate_proj", "up_proj", "down_proj"), FusedMLP),
    "attention layers": (("GemmaAttention",), _ATTENTION, FusedAttention),
    "sampler": (("Sampler",), ("config",), FusedSampling),
}


def _of_kind(model: nn.Module, kind: str) -> list[nn.Module]:
    names, attributes, _ = KINDS[kind]
    return [m for m in model.modules() if type(m).__name__ in names and all(hasattr(m, a) for a in attributes)]


def is_fused(module: nn.Module) -> bool:
    return isinstance(module, Fused)


def install(model: nn.Module, dtype: torch.dtype, hidden_size: int, owner: str = "gemma's") -> dict[str, int]:
    """Give every recognised module of ``model`` its fused forward; returns how many per kind.

    :param dtype: the dtype activations flow in (the model config's), for the checks.
    :param hidden_size: the width of the residual stream (the config's), for the checks.
    :param owner: whose forwards the fused ones replace, for the log (``transformers'``).
    """
    installed: dict[str, int] = {}
    for kind, (_, _, fused) in KINDS.items():
        modules = _of_kind(model, kind)
        if not modules:
            continue
        problem = _check(kind, modules[0], fused.forward, dtype if dtype in _DTYPES else torch.float32, hidden_size)
        if problem:
            logger.warning("{} own {} forward kept: {}", owner, kind, problem)
            continue
        for module in modules:
            surgery.swap(module, fused)
        installed[kind] = len(modules)
    return installed


def _close(expected: Any, got: Any, dtype: torch.dtype) -> str | None:
    """None when the two results agree; else what differs."""
    if isinstance(expected, tuple):
        for e, g in zip(expected, got, strict=True):
            if problem := _close(e, g, dtype):
                return problem
        return None
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return f"gives {tuple(got.shape)} {got.dtype}, gemma {tuple(expected.shape)} {expected.dtype}"
    if not expected.is_floating_point():
        return None if torch.equal(expected, got) else "picks other tokens than gemma"
    e, g = expected.double(), got.double()
    scale = e.norm().item() or 1.0
    distance = (e - g).norm().item() / scale
    if not distance <= _TOLERANCE[dtype]:  # NaN fails too
        return f"differs from gemma's by {distance:.2g} (relative L2)"
    return None


def _check(kind: str, module: Any, forward: Callable[..., Any], dtype: torch.dtype, hidden_size: int) -> str | None:
    """Run gemma's forward and ours on the same random inputs; None when they agree."""
    generator = torch.Generator().manual_seed(1234)

    def randn(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dt)

    try:
        with torch.inference_mode():
            if kind == "norms":
                width = module.weight.shape[0]
                x = randn(3, width)
                return _close(_gemmas(module).forward(module, x), forward(module, x), dtype)
            if kind == "MLPs":
                x = randn(1, 2, getattr(module.gate_proj, "in_features", hidden_size))
                return _close(_gemmas(module).forward(module, x), forward(module, x), dtype)
            if kind == "attention layers":
                return _check_attention(module, forward, randn, dtype, hidden_size)
            width = 64
            hidden, embedding = randn(2, 3, width), randn(50, width)
            args = (embedding, hidden, torch.tensor([1]), None, torch.tensor([0.95, 0.95]), torch.tensor([64, 64]))
            one = (embedding, hidden[:1], torch.tensor([2]), *args[3:])
            return _close(_gemmas(module).forward(module, *args), forward(module, *args), dtype) or _close(
                _gemmas(module).forward(module, *one), forward(module, *one), dtype
            )
    except Exception as exc:  # a forward that cannot run on what gemma's takes is not a fit
        return f"{type(exc).__name__}: {exc}"


def _check_attention(
    module: Any,
    forward: Callable[..., Any],
    randn: Callable[..., torch.Tensor],
    dtype: torch.dtype,
    width: int,
) -> str | None:
    """A 3-token prefill then a 1-token decode step into fresh caches, through both forwards."""
    head_dim, kv_heads = module.head_dim, module.num_kv_heads
    max_seq = 5
    causal = torch.triu(torch.full((1, 1, max_seq, max_seq), -2.3819763e38), diagonal=1)
    angles = torch.rand(max_seq, head_dim // 2, generator=torch.Generator().manual_seed(7)) * 6.28
    freqs = torch.polar(torch.ones_like(angles), angles)
    size = (1, max_seq, kv_heads, head_dim)
    caches = [(torch.zeros(size, dtype=dtype), torch.zeros(size, dtype=dtype)) for _ in range(2)]
    prefill = randn(1, 3, width)
    step = randn(1, 1, width)
    results = []
    for run, cache in zip((_gemmas(module).forward, forward), caches, strict=True):
        positions = torch.arange(3)
        mask = causal.index_select(2, positions)
        first = run(module, prefill, freqs[:3], positions, cache, mask, mask)
        positions = torch.tensor([3])
        mask = causal.index_select(2, positions)
        second = run(module, step, freqs[3:4], positions, cache, mask, mask)
        results.append((first, second, cache[0], cache[1]))
    return _close(results[0], results[1], dtype)
