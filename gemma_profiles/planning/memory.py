"""Memory estimate for a gemma_pytorch model, from its shape and settings alone (no torch).

Every figure follows what gemma_pytorch allocates (docs/design.md):

- weights: embedder (tied output) + per layer qkv/o/gate/up/down + norms; with int8,
  one byte per linear/embedding weight plus a ``weight_scaler`` per output row in
  the compute dtype;
- rope tables: ``2 * max_position_embeddings x head_dim/2`` complex64, one table
  (Gemma 1/2) or two (Gemma 3);
- KV cache: ``layers x batch x seq x kv_heads x head_dim x 2`` in the compute dtype;
- masks: float32 ``seq x seq``, plus a local one with sliding windows; building
  them takes one more for a moment, and each forward copies the rows of its
  positions out of each (``prompt x seq`` in the prefill): the larger of the two;
- dequantization workspace: gemma's int8 layers rebuild ``weight * weight_scaler``
  on every forward; the largest is the (vocab x hidden) embedder.  On the CPU
  torch first converts the int8 tensor to the scaler's dtype (TensorIterator
  materialises input casts there), so two full-precision copies are alive at
  once (measured: 3.9 GiB for a 256000 x 2048 float32 one); CUDA kernels cast
  on the fly, so one copy;
- activation peak: the larger of the MLP (gate, up, product), attention (scores in
  the compute dtype, scores plus the float32 mask and their float32 softmax, the
  softmax back in a 16-bit compute dtype; K/V repeated for GQA) and the logits;
- checkpoint pages: gemma's ``load_weights`` memory-maps the file and copies into
  the parameters, so RSS holds both at the peak (2.0x for a bf16 2b, measured);
  those pages are file-backed and reclaimable, so they count towards the RSS peak
  but not towards what must fit;
- CUDA context and a reserve margin on accelerators (max(2 %, 512 MiB), as
  mistral.rs; llama.cpp keeps 1 GiB).

On an accelerator nothing is reclaimable: what loading holds for a moment (the int8
embedder while it is dequantized, an embedder loaded there before it moves to the
CPU) must fit beside the weights, so there ``required`` is the peak.

Two placements change the rows:

- **the tied embedder off the accelerator** (``embedder_device="cpu"``): its lookup
  and the sampler's product run on the CPU, so the embedder (dequantized into the
  compute dtype, with int8) is host memory.  The lean loader reads it straight into
  host memory (`EMBEDDER_LOADED_ON_DEVICE` is False) and, with int8, it is dequantized
  there, so the accelerator never holds it.  ``embedder_loaded_on_device=True`` models
  a loader that puts it on the execution device first and lets ``hooks/offload.py``
  move it once the weights are in (what a model materialised before loading gets from
  gemma's own loader): then the accelerator holds it - with int8, its int8 copy and
  the dequantized one at once - while loading, beside the resident layers;
- **float16 storage** (``weight_storage="float16"``, compute in float32): every
  floating weight - the embedder too - takes 2 bytes; each linear layer's weight is
  converted into one reused float32 scratch buffer (the largest linear), the embedder's
  lookup converts just the rows it gathers, and the sampler's product runs over
  `SAMPLER_CHUNK_ROWS` rows of it at a time through a scratch of that size.  KV cache
  and activations stay float32.

``engine="gemma"`` describes gemma_pytorch as it ships (the items above);
``engine="profiles"`` - what runs while a profile is active - differs in three
ways: the lean loader assigns memory-mapped tensors (no second copy when the
checkpoint's dtype is the compute dtype; otherwise one source tensor's pages at
a time), the int8 path never rebuilds a full-precision weight for a decode step
(int8 kernels on a bf16 CPU, where the tied embedder stays int8 - with the native
kernel a prompt of ``DEQUANTIZE_ROWS`` tokens or more multiplies a dequantized
copy of one weight at a time; elsewhere one reused scratch buffer the size of the
largest linear, and the tied embedder dequantized once into the compute dtype), and
tensors go straight to the execution device (no full CPU copy before a GPU).
Packing weights for the CPU kernels (``kernels`` builtin) replaces each mapped
tensor by a packed copy one tensor (or one 16384-row chunk of the embedder) at a
time: one more transient; the native int8 kernel's layout is made in place (8 MiB
at a time), so it adds none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from gemma_profiles.settings import DEQUANTIZE_ROWS, DEQUANTIZE_ROWS_AVX2
from gemma_profiles.spec.variants import VARIANTS, family_of_architecture

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "bfloat16": 2}
CUDA_CONTEXT_BYTES = 500 * 2**20
MIN_RESERVE_BYTES = 512 * 2**20
RESERVE_FRACTION = 0.02
#: What one process can address on x86-64 and arm64 Linux (47-bit user space): no plan needs more.
ADDRESSABLE_BYTES = 2**47
#: Whether the loader puts the tied embedder on the execution device even when the plan
#: keeps it on the CPU (the offload hook then moves it after loading, and with int8 after
#: dequantizing it there).  False: the lean loader reads it into host memory directly
#: (`gemma_profiles.hooks.loading.planned_embedder_device`).
EMBEDDER_LOADED_ON_DEVICE = False
#: float16 storage: rows of the (vocab x hidden) embedder converted to float32 at a time
#: for the sampler's product (tied.CHUNK_ROWS).
SAMPLER_CHUNK_ROWS = 16384
#: ``weight_storage`` values: how weights are kept when it is not the compute dtype.
WEIGHT_STORAGE = ("float16",)


@dataclass(frozen=True)
class ModelShape:
    """The numbers the estimate needs; from a variant name or a GemmaConfig."""

    family: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window_size: int | None = None

    @classmethod
    def of_variant(cls, variant: str) -> ModelShape:
        shape = VARIANTS[variant]
        return cls(**{f.name: getattr(shape, f.name) for f in fields(cls)})

    @classmethod
    def of_config(cls, config: Any) -> ModelShape:
        return cls(
            family_of_architecture(config.architecture) or "gemma1",
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.vocab_size,
            config.max_position_embeddings,
            config.sliding_window_size,
        )

    def with_overrides(self, config: Mapping[str, Any]) -> ModelShape:
        """This shape with a profile's ``config:`` values (GemmaConfig field names) applied.

        ``architecture`` (``"GEMMA_2"``) sets the family; fields that do not change the
        shape (dtype, tokenizer...) are ignored.
        """
        names = {f.name for f in fields(self)} - {"family"}
        changes: dict[str, Any] = {k: v for k, v in config.items() if k in names and v is not None}
        family = family_of_architecture(config.get("architecture"))
        if family is not None:
            changes["family"] = family
        return dataclasses.replace(self, **changes) if changes else self

    # -- tensor parallel (docs/parallel.md) -----------------------------------------------

    def tensor_parallel_problem(self, ranks: int) -> str | None:
        """Why this shape cannot be split over ``ranks`` ranks by heads and MLP rows, or None."""
        h, kv, i = self.num_attention_heads, self.num_key_value_heads, self.intermediate_size
        if h % ranks:
            return f"the model's {h} attention heads do not split over {ranks} ranks"
        if kv % ranks and ranks % kv:
            return f"the model's {kv} KV heads neither split over {ranks} ranks nor divide them"
        if i % ranks:
            return f"the model's MLP width {i} does not split over {ranks} ranks"
        if self.hidden_size % (h // ranks):
            return f"gemma needs hidden_size {self.hidden_size} divisible by the {h // ranks} heads of a rank"
        return None

    def per_rank(self, ranks: int) -> ModelShape:
        """One rank's share under tensor parallel: heads, KV heads (replicated when fewer than
        ranks) and MLP width divided; layers, embedder and norms whole."""
        if ranks <= 1:
            return self
        return dataclasses.replace(
            self,
            num_attention_heads=self.num_attention_heads // ranks,
            num_key_value_heads=max(1, self.num_key_value_heads // ranks),
            intermediate_size=self.intermediate_size // ranks,
        )

    # -- parameter counts --------------------------------------------------------------

    @property
    def qkv_out(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def linear_weights_per_layer(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        return h * self.qkv_out + self.num_attention_heads * self.head_dim * h + 3 * h * i

    @property
    def largest_linear_weights(self) -> int:
        """The biggest single linear weight of a layer (qkv, o, or gate/up/down)."""
        h = self.hidden_size
        return max(self.qkv_out * h, h * self.num_attention_heads * self.head_dim, self.intermediate_size * h)

    @property
    def scalers_per_layer(self) -> int:
        """Output rows of the quantized linears (one ``weight_scaler`` each)."""
        return self.qkv_out + self.hidden_size + 2 * self.intermediate_size + self.hidden_size

    @property
    def norm_weights_per_layer(self) -> int:
        extra = self.family in ("gemma2", "gemma3")
        qk_norm = 2 * self.head_dim if self.family == "gemma3" else 0
        return self.hidden_size * (4 if extra else 2) + qk_norm

    @property
    def embedding_weights(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def parameters(self) -> int:
        per_layer = self.linear_weights_per_layer + self.norm_weights_per_layer
        return self.embedding_weights + self.num_hidden_layers * per_layer + self.hidden_size

    def layer_bytes(self, dtype: str, int8: bool) -> int:
        """One decoder layer's weights."""
        size = DTYPE_BYTES[dtype]
        if int8:
            return self.linear_weights_per_layer + (self.scalers_per_layer + self.norm_weights_per_layer) * size
        return (self.linear_weights_per_layer + self.norm_weights_per_layer) * size

    def embedding_bytes(self, dtype: str, int8: bool) -> int:
        size = DTYPE_BYTES[dtype]
        if int8:
            return self.embedding_weights + self.vocab_size * size
        return self.embedding_weights * size

    def weight_bytes(self, dtype: str, int8: bool) -> int:
        return (
            self.embedding_bytes(dtype, int8)
            + self.num_hidden_layers * self.layer_bytes(dtype, int8)
            + self.hidden_size * DTYPE_BYTES[dtype]
        )


@dataclass(frozen=True)
class MemoryItem:
    """One row of the memory table."""

    component: str
    device: str
    bytes: int
    note: str = ""
    reclaimable: bool = False


@dataclass(frozen=True)
class MemoryEstimate:
    """Rows per component and device, and the two peaks that matter.

    ``peak[device]`` is the most resident memory at once (what RSS or
    ``max_memory_allocated`` shows, plus the CUDA context); ``required[device]``
    leaves out reclaimable checkpoint pages: it is what must fit.
    """

    items: tuple[MemoryItem, ...]
    peak: dict[str, int] = field(default_factory=dict)
    required: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": [item.__dict__ for item in self.items],
            "peak": self.peak,
            "required": self.required,
        }


def normalize(device: str) -> str:
    """``cuda`` is ``cuda:0``."""
    return "cuda:0" if device == "cuda" else device


def reserve_for(capacity: int) -> int:
    """Headroom kept free on an accelerator: max(2 %, 512 MiB)."""
    return max(int(capacity * RESERVE_FRACTION), MIN_RESERVE_BYTES)


def estimate_memory(
    shape: ModelShape,
    *,
    dtype: str,
    int8: bool,
    device: str = "cpu",
    batch: int = 1,
    seq_len: int = 1024,
    prefill_tokens: int | None = None,
    checkpoint_dtype: str | None = "bfloat16",
    offloaded_layers: int = 0,
    offload_device: str = "cpu",
    engine: str = "profiles",
    cpu_int8_kernel: bool = False,
    cpu_int8_wide_prompts: bool = False,
    embedder_device: str | None = None,
    weight_storage: str | None = None,
    embedder_loaded_on_device: bool | None = None,
    stages: Mapping[str, int] | None = None,
) -> MemoryEstimate:
    """Estimate the memory of building, loading and generating with one model.

    :param device: where the model runs (``cpu``, ``cuda``, ``cuda:N``, ``mps``).
    :param seq_len: prompt plus generated tokens (sizes the KV cache and masks).
    :param prefill_tokens: the longest prompt (sizes activations); default ``seq_len``.
    :param checkpoint_dtype: the checkpoint file's float dtype; None when loading
        does not go through a memory-mapped file.
    :param offloaded_layers: decoder layers kept on ``offload_device`` (``cpu`` or ``disk``)
        instead, and streamed through two layer-sized slots on ``device``.
    :param engine: ``"profiles"`` (a profile is active) or ``"gemma"`` (gemma_pytorch as-is).
    :param cpu_int8_kernel: the native int8 kernel runs here (`hardware.native_int8_expected`):
        on a CPU an int8 model keeps its tied embedder int8 in float32 compute too.
    :param cpu_int8_wide_prompts: that kernel runs its AVX2 path (`hardware.native_int8_path`),
        where a long bfloat16 prompt's products run in float32: the workspace holds float32.
    :param embedder_device: where the tied embedder stays (``cpu`` or ``disk``) when not on
        ``device``; its lookup and the sampler run there.
    :param weight_storage: ``"float16"``: weights stored in float16, computed in ``dtype``.
    :param embedder_loaded_on_device: the loader puts an ``embedder_device`` embedder on
        ``device`` first; None: `EMBEDDER_LOADED_ON_DEVICE`.
    :param stages: pipeline stages - another accelerator (``cuda:1``) -> how many decoder layers
        compute there instead of on ``device``.  Each stage holds its layers, their share of the
        KV cache, the step's masks and its own activations (and a CUDA context); ``device`` still
        holds the whole KV cache for a moment, since gemma's ``generate`` allocates every layer's
        cache there before the first step moves each to its layer's device.
    """
    if embedder_loaded_on_device is None:
        embedder_loaded_on_device = EMBEDDER_LOADED_ON_DEVICE
    ours = engine == "profiles"
    size = DTYPE_BYTES[dtype]
    storage = weight_storage or dtype  # how float weights are kept
    kind = device.split(":")[0]
    host = "cpu"  # checkpoint pages and offloaded-to-cpu layers live in host memory, whatever the device
    prefill = min(prefill_tokens or seq_len, seq_len)
    stages = {normalize(d): n for d, n in (stages or {}).items() if n > 0 and normalize(d) != normalize(device)}
    layers_here = shape.num_hidden_layers - offloaded_layers - sum(stages.values())
    layer = shape.layer_bytes(storage, int8)
    rope_tables = 2 if shape.family == "gemma3" else 1
    embedder_at = normalize(embedder_device) if embedder_device else device
    embedder_away = embedder_at != device
    # gemma keeps the tied embedder int8; so do we on a bfloat16 CPU (lookups and the sampler read
    # it directly); elsewhere our int8 path dequantizes it once into the compute dtype.
    cpu_kernel = dtype == "bfloat16" or (cpu_int8_kernel and dtype in ("float32", "float"))
    embedder_kept_int8 = ours and kind == "cpu" and cpu_kernel and not offloaded_layers and not embedder_away
    embedder_int8 = int8 and (not ours or embedder_kept_int8)
    embedder = shape.embedding_bytes(storage, embedder_int8)
    embedder_note = "int8 + scalers" if embedder_int8 else storage
    if embedder_away:
        embedder_note += "; its lookup and the sampler run there"
    items = [
        MemoryItem("embedder (tied output)", embedder_at, embedder, embedder_note),
        MemoryItem(f"decoder layers x{layers_here}", device, layers_here * layer, f"{layer / 2**20:.1f} MiB each"),
        MemoryItem("final norm", device, shape.hidden_size * DTYPE_BYTES[storage]),
        MemoryItem(
            "rope tables",
            device,
            rope_tables * 2 * shape.max_position_embeddings * (shape.head_dim // 2) * 8,
            f"{rope_tables} x complex64 (2 x {shape.max_position_embeddings} positions)",
        ),
    ]
    if offloaded_layers:
        items.append(MemoryItem(f"offloaded layers x{offloaded_layers}", offload_device, offloaded_layers * layer))
        # hooks/offload.py streams offloaded layers through two slots on the device:
        # one computing, the next one arriving.
        streamed = min(offloaded_layers, 2)
        items.append(MemoryItem(f"streaming slots x{streamed}", device, streamed * layer, "offloaded layers run here"))
    kv = shape.num_hidden_layers * batch * seq_len * shape.num_key_value_heads * shape.head_dim * 2 * size
    kv_note = f"batch {batch} x {seq_len} tokens" + ("; all of it here until the first step" if stages else "")
    items.append(MemoryItem("KV cache", device, kv, kv_note))
    kept = 2 if shape.sliding_window_size else 1  # the causal mask, and the local one with sliding windows
    # Building them holds one more full mask for a moment; the prefill holds each one's prompt rows too.
    masks = max((kept + 1) * seq_len * seq_len, kept * (seq_len + prefill) * seq_len)
    items.append(MemoryItem("attention masks", device, masks * 4, f"float32, {kept} kept"))
    if int8 and not ours:
        items.append(
            MemoryItem(
                "dequantization workspace",
                device,
                (2 if kind == "cpu" else 1) * shape.embedding_weights * size,
                "gemma rebuilds weight*scaler",
            )
        )
    elif int8 and not (kind == "cpu" and cpu_kernel and not offloaded_layers):
        largest = shape.largest_linear_weights * size
        items.append(MemoryItem("int8 scratch buffer", device, largest, "one, reused by every layer"))
    elif weight_storage is not None and weight_storage != dtype:
        rows = 0 if embedder_away else min(shape.vocab_size, SAMPLER_CHUNK_ROWS) * shape.hidden_size
        largest = max(shape.largest_linear_weights, rows) * size
        items.append(
            MemoryItem(f"{dtype} scratch buffer", device, largest, f"{weight_storage} weights computed in {dtype}")
        )
    elif (
        int8
        and cpu_int8_kernel
        and dtype in ("float32", "float", "bfloat16")
        and batch * prefill >= (DEQUANTIZE_ROWS_AVX2 if cpu_int8_wide_prompts else DEQUANTIZE_ROWS)
    ):
        # The native kernel hands a long prompt's products to a float GEMM on a dequantized copy.
        wide = cpu_int8_wide_prompts and dtype == "bfloat16"
        largest = shape.largest_linear_weights * (4 if wide else size)
        why = "one weight, dequantized to float32 per product" if wide else "one weight, dequantized per product"
        items.append(MemoryItem("int8 prompt workspace", device, largest, why))
    heads = shape.num_attention_heads
    mlp = 3 * batch * prefill * shape.intermediate_size * size + 2 * batch * prefill * shape.hidden_size * size
    # Per score: the scores, their float32 sum with the mask, its float32 softmax, and (16-bit
    # compute) the softmax cast back while the two float32 ones are alive.
    per_score = 4 + 4 + (size if size < 4 else 0)
    attention = batch * heads * prefill * seq_len * per_score + 2 * batch * seq_len * heads * shape.head_dim * size
    logits = batch * shape.vocab_size * (size + 4)
    items.append(MemoryItem("activation peak", device, max(mlp, attention, logits), f"{prefill} prompt tokens"))
    if kind == "cuda":
        items.append(MemoryItem("CUDA context", device, CUDA_CONTEXT_BYTES, "not in max_memory_allocated"))
    for stage, count in sorted(stages.items()):
        items.append(MemoryItem(f"decoder layers x{count}", stage, count * layer, "pipeline stage"))
        share = kv * count // shape.num_hidden_layers
        items.append(MemoryItem("KV cache", stage, share, f"its {count} layers' share, moved here at the first step"))
        # The step's masks (the prompt's rows at the prefill), moved here once per step.
        items.append(MemoryItem("attention masks", stage, kept * prefill * seq_len * 4, "this step's, moved here"))
        items.append(MemoryItem("activation peak", stage, max(mlp, attention), f"{prefill} prompt tokens"))
        # Each device computing int8 or float16-stored layers has its own scratch buffer.
        items += [
            dataclasses.replace(item, device=stage)
            for item in list(items)
            if item.device == device and item.component.endswith("scratch buffer")
        ]
        if stage.startswith("cuda"):
            items.append(MemoryItem("CUDA context", stage, CUDA_CONTEXT_BYTES, "not in max_memory_allocated"))
    if checkpoint_dtype is not None and not ours:
        items.append(
            MemoryItem(
                "checkpoint pages while loading",
                host,
                shape.weight_bytes(checkpoint_dtype, int8),
                "mmap'd by load_weights; reclaimable",
                reclaimable=True,
            )
        )
    elif checkpoint_dtype is not None and (int8 or checkpoint_dtype != storage or kind != "cpu"):
        # Converted (or moved) one tensor at a time; the largest is the embedder.  With
        # int8 its source is read while only its int8 copy exists: the compute-dtype
        # embedder counted above is made from that copy after loading.
        largest = shape.embedding_weights * DTYPE_BYTES[checkpoint_dtype]
        if int8:
            # Quantized 8192 rows at a time: a chunk's source pages (released once read) and,
            # with torch's ops, its float32 copy.  The largest chunk: the embedder's, gate/up's, or all of down_proj.
            h, inter = shape.hidden_size, shape.intermediate_size
            rows = 8192
            chunk = max(min(shape.vocab_size, rows) * h, min(inter, rows) * h, min(h, rows) * inter)
            # The native library quantizes straight from the source; torch's ops need a copy.
            largest = chunk * (DTYPE_BYTES[checkpoint_dtype] + (0 if cpu_int8_kernel and kind == "cpu" else 4))
            if embedder_away:  # dequantized on the host from a copy of the int8 embedder
                largest = max(largest, shape.embedding_weights)
            if not embedder_int8 and not embedder_away:  # the compute-dtype embedder above is made after loading
                largest = max(0, largest + shape.embedding_weights - shape.embedding_weights * size)
        items.append(
            MemoryItem(
                "one checkpoint tensor while loading", host, largest, "converted, then released", reclaimable=True
            )
        )
        if int8 and not embedder_int8 and not embedder_away:
            items.append(
                MemoryItem(
                    "int8 embedder while dequantizing", device, shape.embedding_weights, "once, after loading", True
                )
            )
    if ours and embedder_away and embedder_loaded_on_device:
        # Loaded onto the execution device (with int8: its int8 copy, and the dequantized one
        # made from it), then moved to embedder_at by the offload hook.
        loading = embedder + (shape.embedding_bytes(dtype, True) if int8 and not embedder_int8 else 0)
        what = "int8 + dequantized copies" if int8 and not embedder_int8 else embedder_note.split(";")[0]
        items.append(
            MemoryItem(
                "embedder while loading", device, loading, f"{what}, then moved to {embedder_at}", reclaimable=True
            )
        )

    if (
        ours
        and kind == "cpu"
        and not int8
        and weight_storage in (None, dtype)
        and dtype in ("float32", "bfloat16")
        and not offloaded_layers
    ):
        # hooks/kernels.py packs each weight (the embedder 16384 rows at a time) into a copy,
        # then drops the mapped source's pages: one source tensor is resident twice.
        h = shape.hidden_size
        largest = max(shape.intermediate_size * h, shape.qkv_out * h, min(shape.vocab_size, 16384) * h)
        items.append(
            MemoryItem("one weight while packing", host, largest * size, "CPU kernels; then released", reclaimable=True)
        )

    def total(on: str, *, with_reclaimable: bool) -> int:
        return sum(i.bytes for i in items if i.device == on and (with_reclaimable or not i.reclaimable))

    devices = sorted({item.device for item in items})
    # Made after loading, in this order: the offload hook moves what it moves, then the
    # streamer allocates its slots; so they are not held beside the loading transients.
    peak: dict[str, int] = {}
    required: dict[str, int] = {}
    resident = {d: total(d, with_reclaimable=False) for d in devices}
    for d in devices:
        # Loading and generating do not overlap: checkpoint pages are gone before the
        # KV cache, masks and activations exist.
        running = {"KV cache", "attention masks", "activation peak", "dequantization workspace"}
        # (scratch buffers are allocated by the first forward)
        running |= {i.component for i in items if i.component.startswith("streaming slots")}
        running |= {i.component for i in items if i.component.endswith("scratch buffer")}
        static = sum(i.bytes for i in items if i.device == d and not i.reclaimable and i.component not in running)
        # Loading transients come one after another (a source tensor's pages, then the
        # embedder's int8 copy), so the largest one counts.
        load_phase = static + max((i.bytes for i in items if i.device == d and i.reclaimable), default=0)
        if d == host and kind != "cpu" and not ours:
            # gemma builds the weights on the CPU; they move to the accelerator before loading.
            load_phase = max(load_phase, static + shape.weight_bytes(dtype, int8))
        peak[d] = max(resident[d], load_phase)
        # Accelerator memory has no reclaimable pages: what loading holds must fit too.
        required[d] = peak[d] if d == device and kind in ("cuda", "mps") else resident[d]
    return MemoryEstimate(tuple(items), peak, required)
