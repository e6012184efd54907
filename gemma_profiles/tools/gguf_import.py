"""``gemma-profile import GGUF DIR``: a Gemma GGUF -> gemma_pytorch's checkpoint, tokenizer and config.

Writes three files into ``DIR``:

- ``model.ckpt``: ``torch.save({'model_state_dict': ...})`` with gemma_pytorch's names and
  layouts (``embedder.weight`` tied to the output, ``model.layers.N.self_attn.qkv_proj.weight``
  = q, k and v rows stacked, ``model.norm.weight``, ...), in float32 by default: every
  GGUF type is dequantized to its exact float32 values (``--dtype bfloat16`` halves the file
  and rounds them);
- ``tokenizer.model``: a SentencePiece model rebuilt from ``tokenizer.ggml.*``;
- ``config.json``: the ``GemmaConfig`` fields (``gemma_config``), what was imported
  (``source``: path, size, sha256) and the files written, for the up-to-date check;
- ``<model-name>.yaml`` (e.g. ``gemma-3-270m.yaml``): a profile whose ``config:`` rewrites
  the config of gemma's smallest variant of the family (``RUN_PY_VARIANTS``) into this
  model's shape, so gemma's own unmodified ``scripts/run.py --variant 1b`` runs the import
  under ``GEMMA_PROFILE=DIR/<model-name>.yaml``; it ``extends: auto`` by default, so the
  machine's profile still chooses dtype, int8 and placement (see `run_profile_text`).

`load_config` turns ``DIR`` into gemma's own ``GemmaConfig`` (tokenizer path set), for
``GemmaForCausalLM(config)`` + ``load_weights(DIR/model.ckpt)``.

What a GGUF stores differently from gemma_pytorch (llama.cpp's converter, facts checked in its
``convert_hf_to_gguf.py`` and ``llama-model.cpp``):

- RMSNorm weights are stored as ``weight + 1`` (gemma computes ``x * (1 + weight)``, llama.cpp
  ``x * weight``), every ``*norm.weight`` of gemma, gemma2 and gemma3: we subtract 1;
- q and k rows are not permuted for Gemma (llama.cpp runs Gemma with NeoX-style rope, the
  half-split rotation gemma_pytorch uses), so q, k and v are stacked as they are;
- the sliding-window pattern and the local rope base are not in the file: llama.cpp fixes them
  per architecture (gemma2: every 2nd layer global; gemma3: every 6th, local base 10000), and
  so do we; the attention scale is 1/sqrt(head_dim) except for Gemma 2 27b (46 layers) and
  Gemma 3 27b (62 layers), which use 1/sqrt(hidden/heads);
- the tokenizer's user-defined whitespace pieces are stored with spaces (llama.cpp's
  "pre-normalized" form) and gemma's turn markers ``<start_of_turn>``/``<end_of_turn>`` as
  control tokens; SentencePiece needs ``▁`` in a user-defined piece and user-defined turn
  markers for gemma_pytorch's chat prompts to encode them as one token each, as gemma's own
  tokenizer does: both are put back.

``gguf`` (and ``protobuf``, for SentencePiece's model format) is an optional extra:
``pip install "gemma-profiles[gguf]"``; imported only here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from gemma_profiles.errors import GemmaProfileError

CHECKPOINT = "model.ckpt"
TOKENIZER = "tokenizer.model"
CONFIG = "config.json"
#: The name of the profile `import_gguf` writes when its GGUF names no model (and none is given).
DEFAULT_MODEL_NAME = "imported-gemma"
#: Bumped whenever what the importer writes changes: an import by another version is redone.
FORMAT = "gemma-profiles gguf import 1"
ARCHITECTURES = {"gemma": "GEMMA_1", "gemma2": "GEMMA_2", "gemma3": "GEMMA_3"}
#: GGUF tensor types we dequantize (through the gguf package); what ollama and LM Studio ship and more.
SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
)
DTYPES = ("float32", "bfloat16")
#: Rows dequantized at a time (bounds the temporaries of the gguf package's numpy code).
CHUNK_ROWS = 16384
PROGRESS_EVERY = 24
_TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")
_MAGIC = b"GGUF"
#: gemma_pytorch's named variant whose config the run.py profile rewrites, per architecture:
#: the smallest of each family, whose optional fields (None in gemma's config) are the ones an
#: import leaves None too - a profile can set a GemmaConfig field but not clear one.
RUN_PY_VARIANTS = {"gemma": "2b", "gemma2": "2b-v2", "gemma3": "1b"}
#: The optional fields those variants set (gemma's ``get_config_for_2b_v2``: both soft-caps).
_RUN_PY_VARIANT_SETS = {"2b-v2": ("final_logit_softcapping", "attn_logit_softcapping")}
#: GemmaConfig fields the run.py profile leaves to the profile it extends (the machine's choice).
_MACHINE_FIELDS = ("dtype", "quant")
_PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # schema's profile-name rule
# SentencePiece piece types (sentencepiece_model.proto), which GGUF's token types follow.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

Progress = Callable[[str], None]


class GgufImportError(GemmaProfileError):
    """A GGUF file that cannot be imported (not a GGUF, truncated, not a text Gemma, unsupported)."""


@dataclass(frozen=True)
class ImportResult:
    """What `import_gguf` did (``reused``: the directory was already up to date)."""

    directory: Path
    config: dict[str, Any]
    reused: bool
    seconds: float
    tensors: int
    #: ``DIR/<model-name>.yaml``, the profile that lets gemma's ``scripts/run.py`` run the import
    #: (None when this model's config cannot be written as a profile: `run_profile_text` says why).
    profile: Path | None = None

    @property
    def checkpoint(self) -> Path:
        return self.directory / CHECKPOINT

    @property
    def tokenizer(self) -> Path:
        return self.directory / TOKENIZER


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GgufImportError(
            "importing a GGUF needs the gguf package", hint="pip install 'gemma-profiles[gguf]'"
        ) from None
    return gguf


def _require_sentencepiece_proto() -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:
        missing = "protobuf" if "google" in str(exc) or "protobuf" in str(exc) else "sentencepiece"
        raise GgufImportError(
            f"writing tokenizer.model needs the {missing} package", hint="pip install 'gemma-profiles[gguf]'"
        ) from None
    return sentencepiece_model_pb2


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# -- reading the GGUF -------------------------------------------------------------------


class _Metadata:
    """The GGUF's key/value fields, read with the file named in every error."""

    def __init__(self, fields: dict[str, Any], where: str):
        self._fields, self.where = fields, where

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GgufImportError(f"metadata '{key}' is missing", where=self.where, hint="not a complete Gemma GGUF")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.require(key) if default is None else self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise GgufImportError(
                f"metadata '{key}' is {_describe(value)}, expected a positive integer", where=self.where
            )
        return value

    def number(self, key: str, default: float | None) -> float | None:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise GgufImportError(
                f"metadata '{key}' is {_describe(value)}, expected a positive number", where=self.where
            )
        return float(f"{value:.7g}")  # float32 in the file: 9.99999997e-07 -> 1e-06


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _shown(text: str, limit: int = 80) -> str:
    """Text from the file as it may be shown in an error: cut, control characters escaped."""
    return repr(text[:limit])[1:-1] + ("..." if len(text) > limit else "")


def _check_magic(path: Path) -> None:
    where = str(path)
    if not path.is_file():
        raise GgufImportError("GGUF file not found" if not path.exists() else "not a file", where=where)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise GgufImportError(f"cannot read the file ({exc.strerror or type(exc).__name__})", where=where) from None
    if magic != _MAGIC:
        raise GgufImportError(
            "not a GGUF file (it does not start with the GGUF magic)", where=where, hint="pass a .gguf model file"
        )


class _Truncated(Exception):
    """A read past the end of the file."""


@dataclass(frozen=True)
class _Tensor:
    """One tensor's entry in the GGUF: ``shape`` in GGUF order (the row length first)."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    qtype: Any  # gguf.GGMLQuantizationType, or None for a type the gguf package does not know
    start: int
    nbytes: int
    buffer: Any

    @property
    def data(self) -> Any:
        """The raw bytes as (rows, bytes per row), read in place from the memory map."""
        import numpy as np

        rows = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        return np.frombuffer(self.buffer, np.uint8, self.nbytes, self.start).reshape(rows, -1)


class _Reader:
    """GGUF v2/v3 (little-endian) header, metadata and tensor table, read from a memory map.

    gguf's own ``GGUFReader`` builds an array per element of every metadata array (15-40 s for
    Gemma 3's 262144-token vocabulary here); this reads the same layout in about a second, with
    every length checked against the file's size; the tensors are dequantized by the gguf package.
    """

    _SCALARS: ClassVar[dict[int, str]] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
    _SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
    _NUMPY: ClassVar[dict[int, str]] = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4"}
    _NUMPY.update({7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"})
    _STRING, _ARRAY = 8, 9

    def __init__(self, path: Path):
        import mmap
        import struct

        self._struct = struct
        with open(path, "rb") as handle:
            self.buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self.buffer)
        self.pos = 4
        version = self._scalar(4)
        if version & 0xFFFF == 0:
            raise GgufImportError("big-endian GGUF files are not supported", where=str(path))
        if version not in (2, 3):
            raise GgufImportError(f"GGUF version {version} is not supported (2 and 3 are)", where=str(path))
        tensor_count, kv_count = self._scalar(10), self._scalar(10)
        if tensor_count > 1 << 20 or kv_count > 1 << 20:
            raise GgufImportError("the GGUF header's counts are implausible: corrupt file", where=str(path))
        self.fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            self.fields[key] = self._value(self._scalar(4))
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GgufImportError("metadata 'general.alignment' is not a power of two", where=str(path))
        entries = []
        for _ in range(tensor_count):
            name = self._string()
            dims = self._scalar(4)
            if not 1 <= dims <= 4:
                raise GgufImportError(f"tensor '{_shown(name)}' has {dims} dimensions: corrupt file", where=str(path))
            shape = tuple(self._scalar(10) for _ in range(dims))
            entries.append((name, shape, self._scalar(4), self._scalar(10)))
        data_start = -(-self.pos // alignment) * alignment
        self.tensors = [self._tensor(path, data_start, *entry) for entry in entries]

    def _take(self, count: int) -> int:
        if count < 0 or self.pos + count > self.size:
            raise _Truncated
        start = self.pos
        self.pos += count
        return start

    def _scalar(self, kind: int) -> Any:
        fmt = self._SCALARS.get(kind)
        if fmt is None:
            raise ValueError(f"unknown metadata type {kind}")
        size = self._struct.calcsize(fmt)
        return self._struct.unpack_from(fmt, self.buffer, self._take(size))[0]

    def _string(self) -> str:
        length = self._scalar(10)
        start = self._take(length)
        return bytes(self.buffer[start : start + length]).decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind == self._STRING:
            return self._string()
        if kind != self._ARRAY:
            return self._scalar(kind)
        item, count = self._scalar(4), self._scalar(10)
        if item in self._NUMPY:
            import numpy as np

            dtype = np.dtype(self._NUMPY[item])
            values = np.frombuffer(self.buffer, dtype, count, self._take(count * dtype.itemsize))
            return [bool(v) for v in values] if item == 7 else values.tolist()
        if count > self.size - self.pos:  # every element takes a byte at least
            raise _Truncated
        return [self._value(item) for _ in range(count)]

    def _tensor(self, path: Path, data_start: int, name: str, shape: tuple[int, ...], raw: int, offset: int) -> _Tensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qtype = GGMLQuantizationType(raw)
        except ValueError:
            return _Tensor(name, shape, f"type {raw}", None, 0, 0, self.buffer)
        block, block_bytes = GGML_QUANT_SIZES.get(qtype, (0, 0))
        if not block:
            return _Tensor(name, shape, qtype.name, None, 0, 0, self.buffer)
        if shape[0] % block:
            raise GgufImportError(
                f"tensor '{_shown(name)}' has rows of {shape[0]}, not a multiple of {qtype.name}'s {block}: corrupt",
                where=str(path),
            )
        nbytes = math.prod(shape[1:]) * (shape[0] // block) * block_bytes
        start = data_start + offset
        if start + nbytes > self.size:
            raise GgufImportError(
                f"tensor '{_shown(name)}' ends {start + nbytes - self.size} bytes past the end of the file: truncated",
                where=str(path),
                hint="download or assemble it again",
            )
        return _Tensor(name, shape, qtype.name, qtype, start, nbytes, self.buffer)


def _open(path: Path) -> tuple[_Reader, _Metadata]:
    where = str(path)
    _require_gguf()
    try:
        reader = _Reader(path)
    except _Truncated:
        raise GgufImportError(
            "the GGUF ends inside its header: truncated", where=where, hint="download or assemble it again"
        ) from None
    except (ValueError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise GgufImportError(f"the GGUF header is corrupt ({type(exc).__name__})", where=where) from None
    except OSError as exc:
        raise GgufImportError(f"cannot read the file ({exc.strerror or type(exc).__name__})", where=where) from None
    return reader, _Metadata(reader.fields, where)


def _architecture(meta: _Metadata) -> str:
    arch = meta.require("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        shown = _shown(arch, 40) if isinstance(arch, str) else _describe(arch)
        raise GgufImportError(
            f"architecture '{shown}' is not a text Gemma",
            where=meta.where,
            hint=f"gemma_pytorch runs {', '.join(ARCHITECTURES)}",
        )
    return arch


def gemma_config_fields(meta: _Metadata, arch: str, vocab_size: int) -> dict[str, Any]:
    """The ``GemmaConfig`` fields for this GGUF, JSON-ready (enums by name)."""
    layers = meta.integer(f"{arch}.block_count")
    hidden = meta.integer(f"{arch}.embedding_length")
    heads = meta.integer(f"{arch}.attention.head_count")
    kv_heads = meta.integer(f"{arch}.attention.head_count_kv", heads)
    head_dim = meta.integer(f"{arch}.attention.key_length", hidden // heads)
    value_dim = meta.integer(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise GgufImportError(f"value length {value_dim} differs from key length {head_dim}", where=meta.where)
    if heads % kv_heads or hidden % heads:
        raise GgufImportError(
            f"{heads} heads, {kv_heads} key/value heads and width {hidden} do not divide as gemma needs",
            where=meta.where,
        )
    fields: dict[str, Any] = {
        "architecture": ARCHITECTURES[arch],
        "vocab_size": vocab_size,
        "max_position_embeddings": meta.integer(f"{arch}.context_length", 8192),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_size": hidden,
        "intermediate_size": meta.integer(f"{arch}.feed_forward_length"),
        "head_dim": head_dim,
        "rms_norm_eps": meta.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "dtype": "float32",
        "quant": False,
        "tokenizer": TOKENIZER,
        "attn_types": None,
        "sliding_window_size": None,
        "final_logit_softcapping": meta.number(f"{arch}.final_logit_softcapping", None),
        "attn_logit_softcapping": meta.number(f"{arch}.attn_logit_softcapping", None),
        "query_pre_attn_scalar": None,
        "use_pre_ffw_norm": arch != "gemma",
        "use_post_ffw_norm": arch != "gemma",
        "rope_wave_length": None,
        "use_qk_norm": arch == "gemma3",
        "rope_scaling_factor": None,
    }
    rope_base = meta.number(f"{arch}.rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0)
    if arch == "gemma":
        _fixed_rope(meta, arch, rope_base)
        return fields
    # gemma2/gemma3: sliding-window layers, local first; llama.cpp's fixed period unless the file says.
    fields["sliding_window_size"] = meta.integer(f"{arch}.attention.sliding_window")
    fields["attn_types"] = _attention_pattern(meta, arch, layers)
    big = (arch, layers) in (("gemma2", 46), ("gemma3", 62))  # the 27b models scale by hidden/heads
    scale = meta.number(f"{arch}.attention.scale", None)
    fields["query_pre_attn_scalar"] = round(scale**-2) if scale else (hidden // heads if big else head_dim)
    if arch == "gemma2":
        _fixed_rope(meta, arch, rope_base)
        return fields
    local_base = meta.number(f"{arch}.rope.freq_base_swa", 10_000.0)
    fields["rope_wave_length"] = {"LOCAL_SLIDING": _whole(local_base), "GLOBAL": _whole(rope_base)}
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.number(f"{arch}.rope.scaling.factor", None)
    if kind not in (None, "none") or (factor not in (None, 1.0) and kind is None):
        if kind != "linear" or factor is None or factor != int(factor):
            raise GgufImportError(
                f"rope scaling {kind!r} x{factor} is not gemma_pytorch's (linear, a whole factor)", where=meta.where
            )
        fields["rope_scaling_factor"] = int(factor)
    return fields


def _whole(value: float | None) -> int | float:
    assert value is not None
    return int(value) if value == int(value) else value


def _fixed_rope(meta: _Metadata, arch: str, base: float | None) -> None:
    if base != 10_000.0:
        raise GgufImportError(
            f"rope base {base} differs from the 10000 that gemma_pytorch fixes for {arch}", where=meta.where
        )


def _attention_pattern(meta: _Metadata, arch: str, layers: int) -> list[str]:
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == layers and all(isinstance(p, bool) for p in pattern):
        return ["LOCAL_SLIDING" if local else "GLOBAL" for local in pattern]
    period = {"gemma2": 2, "gemma3": 6}[arch]
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        period = pattern
    elif pattern is not None:
        raise GgufImportError(
            f"metadata '{arch}.attention.sliding_window_pattern' is {_describe(pattern)}", where=meta.where
        )
    return ["GLOBAL" if i % period == period - 1 else "LOCAL_SLIDING" for i in range(layers)]


# -- tensors ----------------------------------------------------------------------------


def _layer_names(arch: str) -> dict[str, str]:
    """GGUF per-layer tensor -> gemma_pytorch name (``{}`` = the layer index); q/k/v handled apart."""
    names = {
        "attn_norm": "model.layers.{}.input_layernorm.weight",
        "attn_output": "model.layers.{}.self_attn.o_proj.weight",
        "ffn_gate": "model.layers.{}.mlp.gate_proj.weight",
        "ffn_up": "model.layers.{}.mlp.up_proj.weight",
        "ffn_down": "model.layers.{}.mlp.down_proj.weight",
    }
    if arch == "gemma":  # Gemma 1: the norm before the MLP is gemma's post_attention_layernorm
        names["ffn_norm"] = "model.layers.{}.post_attention_layernorm.weight"
        return names
    names.update(
        {
            "post_attention_norm": "model.layers.{}.post_attention_layernorm.weight",
            "ffn_norm": "model.layers.{}.pre_feedforward_layernorm.weight",
            "post_ffw_norm": "model.layers.{}.post_feedforward_layernorm.weight",
        }
    )
    if arch == "gemma3":
        names["attn_q_norm"] = "model.layers.{}.self_attn.query_norm.weight"
        names["attn_k_norm"] = "model.layers.{}.self_attn.key_norm.weight"
    return names


def expected_shapes(fields: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """gemma_pytorch's parameter names and shapes for these config fields."""
    hidden, inter, head_dim = fields["hidden_size"], fields["intermediate_size"], fields["head_dim"]
    q, kv = fields["num_attention_heads"] * head_dim, fields["num_key_value_heads"] * head_dim
    arch = {v: k for k, v in ARCHITECTURES.items()}[fields["architecture"]]
    per_layer: dict[str, tuple[int, ...]] = {
        "model.layers.{}.self_attn.qkv_proj.weight": (q + 2 * kv, hidden),
        "model.layers.{}.self_attn.o_proj.weight": (hidden, q),
        "model.layers.{}.mlp.gate_proj.weight": (inter, hidden),
        "model.layers.{}.mlp.up_proj.weight": (inter, hidden),
        "model.layers.{}.mlp.down_proj.weight": (hidden, inter),
    }
    for name in _layer_names(arch).values():
        if name.endswith("norm.weight"):
            per_layer[name] = (head_dim,) if "self_attn" in name else (hidden,)
    shapes: dict[str, tuple[int, ...]] = {"embedder.weight": (fields["vocab_size"], hidden)}
    for i in range(fields["num_hidden_layers"]):
        shapes.update({name.format(i): shape for name, shape in per_layer.items()})
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def _plan_tensors(reader: _Reader, meta: _Metadata, arch: str, fields: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """[(gemma name, [GGUF tensors it is made of])], every tensor checked for type and shape first."""
    by_name = {t.name: t for t in reader.tensors}
    names = _layer_names(arch)
    plan: list[tuple[str, list[Any]]] = [("embedder.weight", ["token_embd.weight"])]
    for i in range(fields["num_hidden_layers"]):
        plan.append((f"model.layers.{i}.self_attn.qkv_proj.weight", [f"blk.{i}.attn_{x}.weight" for x in "qkv"]))
        plan.extend((ours.format(i), [f"blk.{i}.{theirs}.weight"]) for theirs, ours in names.items())
    plan.append(("model.norm.weight", ["output_norm.weight"]))
    used = {source for _, sources in plan for source in sources}
    if "output.weight" in by_name:
        raise GgufImportError(
            "the GGUF has its own output.weight; gemma_pytorch ties the output to the embedder", where=meta.where
        )
    extra = sorted(set(by_name) - used)
    if extra:
        raise GgufImportError(
            f"unexpected tensor '{_shown(extra[0])}' ({len(extra)} in all) for a text {arch} model", where=meta.where
        )
    shapes = expected_shapes(fields)
    resolved: list[tuple[str, list[Any]]] = []
    for ours, sources in plan:
        tensors = []
        for source in sources:
            tensor = by_name.get(source)
            if tensor is None:
                raise GgufImportError(
                    f"tensor '{source}' is missing", where=meta.where, hint="not a complete Gemma GGUF"
                )
            kind = tensor.type_name
            if kind not in SUPPORTED_TYPES or tensor.qtype is None:
                raise GgufImportError(
                    f"tensor '{source}' has type {kind}, which the importer does not dequantize",
                    where=meta.where,
                    hint=f"supported: {', '.join(SUPPORTED_TYPES)}",
                )
            tensors.append(tensor)
        got = [_numpy_shape(t) for t in tensors]
        want = shapes[ours]
        rows = sum(shape[0] for shape in got)
        if any(len(s) != len(want) or s[1:] != want[1:] for s in got) or rows != want[0]:
            shown = " + ".join("x".join(map(str, s)) for s in got)
            raise GgufImportError(
                f"tensor {' + '.join(sources)} is {shown}, expected {'x'.join(map(str, want))} from the metadata",
                where=meta.where,
            )
        resolved.append((ours, tensors))
    return resolved


def _numpy_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(list(tensor.shape)))  # GGUF lists ne0 (the row length) first


def _dequantize(tensor: Any, out: Any, row_offset: int) -> None:
    """Dequantize ``tensor`` into rows ``row_offset..`` of the torch tensor ``out``, in row chunks."""
    import numpy as np
    import torch
    from gguf import quants

    shape = _numpy_shape(tensor)
    data = tensor.data
    rows = data.shape[0]
    for start in range(0, rows, CHUNK_ROWS):
        block = data[start : start + CHUNK_ROWS]
        try:
            values = quants.dequantize(block, tensor.qtype)
        except NotImplementedError:
            raise GgufImportError(
                f"tensor '{tensor.name}' has type {tensor.type_name}, which this gguf package cannot dequantize",
                hint="pip install -U gguf",
            ) from None
        except (ValueError, IndexError) as exc:
            raise GgufImportError(f"tensor '{tensor.name}' cannot be decoded: truncated or corrupt ({exc})") from None
        values = np.array(values, dtype=np.float32).reshape(block.shape[0], -1)  # a writable copy for torch
        if len(shape) == 1:
            out.copy_(torch.from_numpy(values.reshape(-1)))
        else:
            out[row_offset + start : row_offset + start + block.shape[0]].copy_(torch.from_numpy(values))


def _convert(
    plan: list[tuple[str, list[Any]]], dtype: str, progress: Progress | None, where: str
) -> Iterator[tuple[str, Any]]:
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    total = sum(len(sources) for _, sources in plan)
    done, start = 0, time.perf_counter()
    for name, tensors in plan:
        shapes = [_numpy_shape(t) for t in tensors]
        full = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes[0]) > 1 else shapes[0]
        # float32 while assembling: the norm shift below is exact there, then one rounding to dtype.
        out = torch.empty(full, dtype=torch.float32)
        offset = 0
        for tensor, shape in zip(tensors, shapes, strict=True):
            try:
                _dequantize(tensor, out, offset)
            except GgufImportError as exc:
                raise GgufImportError(exc.message, where=where, hint=exc.hint) from None
            offset += shape[0]
            done += 1
            if progress is not None and (done % PROGRESS_EVERY == 0 or done == total):
                progress(f"{done}/{total} tensors ({time.perf_counter() - start:.1f} s)")
        if not torch.isfinite(out).all():
            raise GgufImportError(f"tensor {name} has non-finite values after dequantizing", where=where)
        if name.endswith("norm.weight"):
            out -= 1.0  # llama.cpp stores gemma's (1 + weight); gemma adds the 1 itself
        yield name, out if torch_dtype == torch.float32 else out.to(torch_dtype)


# -- the tokenizer ----------------------------------------------------------------------


def _tokenizer_proto(meta: _Metadata, pieces_expected: int) -> bytes:
    model = meta.require("tokenizer.ggml.model")
    if model != "llama":
        shown = _shown(model, 40) if isinstance(model, str) else _describe(model)
        raise GgufImportError(
            f"tokenizer '{shown}' is not SentencePiece (GGUF 'llama' tokenizer), which gemma's Tokenizer loads",
            where=meta.where,
        )
    tokens = meta.require("tokenizer.ggml.tokens")
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    n = len(tokens) if isinstance(tokens, list) else -1
    if n != pieces_expected:
        raise GgufImportError(
            f"the tokenizer has {n} tokens but the embedder {pieces_expected} rows; gemma needs them equal",
            where=meta.where,
        )
    if not isinstance(scores, list) or len(scores) != n or not isinstance(types, list) or len(types) != n:
        raise GgufImportError("tokenizer scores or token types are missing or of another length", where=meta.where)
    ids = {
        role: meta.get(f"tokenizer.ggml.{key}_token_id")
        for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
    }
    for role, token_id in ids.items():
        if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < n):
            raise GgufImportError(f"tokenizer {role} id {_describe(token_id)} is out of range", where=meta.where)
    pb2 = _require_sentencepiece_proto()
    proto = pb2.ModelProto()
    specials = {v for v in ids.values() if v is not None}
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if not isinstance(text, str) or not text:
            raise GgufImportError(f"token {i} is empty or not text", where=meta.where)
        if kind not in (_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE):
            kind = _NORMAL
        if kind == _CONTROL and i not in specials and text in _TURN_MARKERS:
            kind = _USER_DEFINED  # gemma's SentencePiece model has its turn markers user-defined
        if kind == _USER_DEFINED:
            text = text.replace(" ", "\u2581")  # undo llama.cpp's pre-normalized spaces
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, float(score), kind
    # SentencePiece needs exactly one piece of type UNKNOWN; llama.cpp may type <unk> CONTROL.
    typed = [i for i, p in enumerate(proto.pieces) if p.type == _UNKNOWN]
    unk = ids["unk"] if ids["unk"] is not None else (typed[0] if len(typed) == 1 else None)
    if unk is None:
        raise GgufImportError("the tokenizer names no unknown token, which SentencePiece needs", where=meta.where)
    for i in typed:
        proto.pieces[i].type = _CONTROL
    proto.pieces[unk].type = _UNKNOWN
    spec = proto.trainer_spec
    spec.model_type = pb2.TrainerSpec.BPE  # every Gemma tokenizer is a SentencePiece BPE model
    spec.vocab_size = n
    spec.byte_fallback = any(p.type == _BYTE for p in proto.pieces)
    spec.unk_id, spec.unk_piece = unk, proto.pieces[unk].piece
    for role in ("bos", "eos", "pad"):
        token_id = ids[role]
        if token_id is not None and proto.pieces[token_id].type == _CONTROL:
            setattr(spec, f"{role}_id", token_id)
            setattr(spec, f"{role}_piece", proto.pieces[token_id].piece)
        else:
            setattr(spec, f"{role}_id", -1)
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", False)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(add_prefix)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return bytes(proto.SerializeToString())


# -- the import -------------------------------------------------------------------------


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``DIR/config.json`` as written by `import_gguf`; a clear error when it is not one."""
    path = Path(directory) / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GgufImportError(
            f"no {CONFIG} here", where=str(directory), hint="run 'gemma-profile import GGUF DIR' first"
        ) from None
    except (OSError, ValueError) as exc:
        raise GgufImportError(f"{CONFIG} cannot be read ({type(exc).__name__})", where=str(path)) from None
    if not isinstance(data, dict) or not isinstance(data.get("gemma_config"), dict):
        raise GgufImportError(f"{CONFIG} was not written by 'gemma-profile import'", where=str(path))
    return data


def load_config(directory: str | os.PathLike[str], dtype: str | None = None) -> Any:
    """gemma's ``GemmaConfig`` for an imported directory, its tokenizer path made absolute.

    :param dtype: the compute dtype (``float32``, ``bfloat16``, ``float16``); default: the
        checkpoint's dtype.  A profile may rewrite it, as it does for gemma's own configs.
    """
    from gemma import config as gemma_config

    data = read_config(directory)
    fields = dict(data["gemma_config"])
    fields["architecture"] = gemma_config.Architecture[fields["architecture"]]
    if fields.get("attn_types") is not None:
        fields["attn_types"] = [gemma_config.AttentionType[a] for a in fields["attn_types"]]
    if fields.get("rope_wave_length") is not None:
        fields["rope_wave_length"] = {gemma_config.AttentionType[k]: v for k, v in fields["rope_wave_length"].items()}
    fields["tokenizer"] = str((Path(directory) / fields["tokenizer"]).resolve())
    if dtype is not None:
        fields["dtype"] = dtype
    known = set(getattr(gemma_config.GemmaConfig, "__dataclass_fields__", {}))
    if known:
        unknown = sorted(k for k, v in fields.items() if k not in known and v is not None)
        if unknown:
            raise GgufImportError(
                f"this gemma's GemmaConfig has no field '{unknown[0]}', which the imported model needs",
                where=str(Path(directory) / CONFIG),
                hint="update gemma_pytorch",
            )
        fields = {k: v for k, v in fields.items() if k in known}
    return gemma_config.GemmaConfig(**fields)


def _profile_name(text: Any) -> str | None:
    """``text`` as a profile name (lower case, runs of other characters as ``-``), or None."""
    if not isinstance(text, str):
        return None
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).lstrip("-._")[:64].rstrip("-._")
    return name if _PROFILE_NAME.match(name) else None


def _model_name_of(meta: _Metadata, source: Path) -> str:
    """``gemma-3-270m`` from ``general.basename`` and ``general.size_label``, else the GGUF's
    ``general.name``, else its file name."""
    base, size = meta.get("general.basename"), meta.get("general.size_label")
    joined = f"{base}-{size}" if isinstance(base, str) and isinstance(size, str) else None
    for candidate in (joined, meta.get("general.name"), source.stem):
        name = _profile_name(candidate)
        if name is not None:
            return name
    return DEFAULT_MODEL_NAME


def model_name(data: dict[str, Any]) -> str:
    """The model name of an import (its ``config.json`` data): the run.py profile's name and file stem."""
    source = data.get("source") or {}
    for candidate in (data.get("model_name"), source.get("name"), Path(str(source.get("path", ""))).stem):
        name = _profile_name(candidate)
        if name is not None:
            return name
    return DEFAULT_MODEL_NAME


_PROFILE_MARK = "written by 'gemma-profile import'"


def run_profile_text(directory: str | os.PathLike[str], data: dict[str, Any], extends: str | None = "auto") -> str:
    """The profile (YAML) that makes gemma's ``scripts/run.py --variant V`` build this import's model.

    run.py builds its config from a named variant; the profile's ``config:`` sets every
    GemmaConfig field the import knows (tokenizer: an absolute path) except dtype and quant,
    which stay with the profile it ``extends`` (default ``auto``: the one that fits the
    machine), and the runtime rewrites a copy of the variant's config with them. V is
    `RUN_PY_VARIANTS`' variant of the model's family.

    :raises GgufImportError: the model cannot be written as such a profile (a field the variant
        sets is None here, or a value outside what a profile may set).
    """
    from pydantic import ValidationError

    from gemma_profiles.spec.schema import GemmaConfigOverrides

    folder = Path(directory).resolve()
    fields, source = data["gemma_config"], data.get("source") or {}
    arch = {v: k for k, v in ARCHITECTURES.items()}[fields["architecture"]]
    variant = RUN_PY_VARIANTS[arch]
    for field in _RUN_PY_VARIANT_SETS.get(variant, ()):
        if fields.get(field) is None:
            raise GgufImportError(
                f"gemma's {variant} config sets {field} and this model has none; a profile cannot clear it"
            )
    config = {k: v for k, v in fields.items() if k not in _MACHINE_FIELDS and v is not None}
    config["tokenizer"] = str(folder / fields["tokenizer"])
    try:
        GemmaConfigOverrides.model_validate(config)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise GgufImportError(f"config.{where} cannot be a profile value: {first['msg']}") from None
    name = model_name(data)
    gguf_name = Path(str(source.get("path", ""))).name or "a GGUF"
    title = f"{source.get('name') or name} ({arch}, {fields['num_hidden_layers']} layers x {fields['hidden_size']})"
    description = f"{title}, imported from {gguf_name}"
    body: dict[str, Any] = {"name": name, "description": description}
    if extends:
        body["extends"] = extends
    body["config"] = config
    import shlex

    import yaml

    header = [f"# {name}: a profile {_PROFILE_MARK} (written again by every import into this folder)."]
    command = (
        f"GEMMA_PROFILE={shlex.quote(str(folder / f'{name}.yaml'))} python scripts/run.py --variant {variant} "
        f"--ckpt {shlex.quote(str(folder / CHECKPOINT))} --prompt 'The capital of France is'"
    )
    header.append(f"# It turns gemma_pytorch's {variant} config into this model's, so gemma's own run.py runs it:")
    if command.isprintable():  # a line break in a path must not end the comment
        header.append(f"#   cd gemma_pytorch && {command}")
    if extends:
        header.append(f"# extends {extends}: dtype, int8 and placement are that profile's.")
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True)
    return "\n".join(header) + "\n" + text


def write_run_profile(directory: str | os.PathLike[str], data: dict[str, Any], extends: str | None = "auto") -> Path:
    """Write `run_profile_text` to ``DIR/<model-name>.yaml`` (left as it is when already so)."""
    path = Path(directory) / f"{model_name(data)}.yaml"
    text = run_profile_text(directory, data, extends)
    try:
        if path.read_text(encoding="utf-8") == text:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    _write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def _remove_old_profile(directory: Path, name: str) -> None:
    """A run.py profile an earlier import wrote under another model name (never a file of the user's)."""
    path = directory / f"{name}.yaml"
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError):
        return
    if _PROFILE_MARK in first:
        path.unlink(missing_ok=True)


def _profile_for(directory: Path, data: dict[str, Any], extends: str | None, progress: Progress | None) -> Path | None:
    try:
        return write_run_profile(directory, data, extends)
    except GgufImportError as exc:
        if progress is not None:
            progress(f"no profile for gemma's run.py: {exc.message}")
        return None


def _up_to_date(directory: Path, sha256: str, dtype: str) -> dict[str, Any] | None:
    try:
        data = read_config(directory)
    except GgufImportError:
        return None
    if data.get("format") != FORMAT or data.get("checkpoint_dtype") != dtype:
        return None
    if data.get("source", {}).get("sha256") != sha256:
        return None
    for name, size in data.get("files", {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return data if data.get("files") else None


def _write_atomic(path: Path, write: Callable[[Path], object]) -> int:
    """Write through a temporary file in the same folder, then rename: no half-written file remains."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it 0600; a plain file's mode instead
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def import_gguf(
    gguf_path: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    force: bool = False,
    progress: Progress | None = None,
    extends: str | None = "auto",
) -> ImportResult:
    """Import a Gemma GGUF into ``directory`` (see the module doc); reuses an up-to-date import.

    :param extends: what the run.py profile (``DIR/<model-name>.yaml``) extends: a profile
        name or path; None or ``""`` for none (the planner then picks the dtype, as for any profile naming none).
    """
    start = time.perf_counter()
    source, target = Path(gguf_path).expanduser(), Path(directory).expanduser()
    if dtype not in DTYPES:
        raise GgufImportError(f"checkpoint dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if target.exists() and not target.is_dir():
        raise GgufImportError("the output exists and is not a folder", where=str(target))
    _check_magic(source)
    sha256 = _sha256(source)
    reused = None if force else _up_to_date(target, sha256, dtype)
    if reused is not None:
        profile = _profile_for(target, reused, extends, progress)
        return ImportResult(target, reused, True, time.perf_counter() - start, 0, profile)
    reader, meta = _open(source)
    arch = _architecture(meta)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise GgufImportError("tensor 'token_embd.weight' is missing", where=meta.where)
    vocab = _numpy_shape(embed)[0]
    fields = gemma_config_fields(meta, arch, vocab)
    plan = _plan_tensors(reader, meta, arch, fields)
    tokenizer = _tokenizer_proto(meta, vocab)
    if progress is not None:  # only once every check has passed: an error stays the one line on stderr
        progress(f"read {source.name}: {arch}, {len(reader.tensors)} tensors ({time.perf_counter() - start:.1f} s)")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GgufImportError(
            f"cannot create the output folder ({exc.strerror or type(exc).__name__})", where=str(target)
        ) from None
    with contextlib.suppress(GgufImportError):  # no earlier import here
        _remove_old_profile(target, model_name(read_config(target)))
    (target / CONFIG).unlink(missing_ok=True)  # a half-done import must not look up to date
    files = {TOKENIZER: _write_atomic(target / TOKENIZER, lambda p: p.write_bytes(tokenizer))}
    if progress is not None:
        progress(f"dequantizing {sum(len(s) for _, s in plan)} tensors to {dtype}")
    state = dict(_convert(plan, dtype, progress, meta.where))
    if progress is not None:
        progress(f"writing {CHECKPOINT}")
    import torch

    def save(path: Path) -> None:
        torch.save({"model_state_dict": state}, path)

    files[CHECKPOINT] = _write_atomic(target / CHECKPOINT, save)
    state.clear()
    data = {
        "format": FORMAT,
        "model_name": _model_name_of(meta, source),
        "source": {
            "path": str(source.resolve()),
            "size": source.stat().st_size,
            "sha256": sha256,
            "architecture": arch,
            "name": meta.get("general.name"),
            "tensor_types": sorted({t.type_name for _, ts in plan for t in ts}),
        },
        "checkpoint_dtype": dtype,
        "files": files,
        "gemma_config": {**fields, "dtype": dtype},
    }
    _write_atomic(target / CONFIG, lambda p: p.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))
    profile = _profile_for(target, data, extends, progress)
    return ImportResult(target, data, False, time.perf_counter() - start, sum(len(s) for _, s in plan), profile)


def generate_text(
    directory: str | os.PathLike[str],
    prompt: str,
    *,
    tokens: int = 32,
    profile: Any = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Greedy generation from an imported folder: gemma's ``GemmaForCausalLM``, ``load_weights``
    and ``generate``, under ``profile`` when given (else whatever profile is active).

    Returns the text, the token count, timings and the parameter dtypes.
    """
    import torch
    from gemma import model as gemma_model

    from gemma_profiles.runtime import session as runtime

    checkpoint = Path(directory) / CHECKPOINT
    config = load_config(directory, dtype)
    if not checkpoint.is_file():
        raise GgufImportError(f"no {CHECKPOINT} here", where=str(directory), hint="run 'gemma-profile import' again")
    scope = runtime.use(profile) if profile is not None else contextlib.nullcontext()
    previous = torch.get_default_dtype()
    with scope:
        start = time.perf_counter()
        torch.set_default_dtype(config.get_dtype())  # gemma builds its parameters in the default dtype
        try:
            model = gemma_model.GemmaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        model.load_weights(str(checkpoint))
        model = model.eval()
        load_s = time.perf_counter() - start
        steps: list[float] = []

        def before(module: Any, args: Any, kwargs: Any) -> None:
            steps.append(time.perf_counter())

        def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            steps[-1] = time.perf_counter() - steps[-1]

        handles = [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            device = next(model.parameters()).device
            text = model.generate(prompt, device, output_len=tokens, temperature=None)
        finally:
            for handle in handles:
                handle.remove()
    decode = steps[1:]
    session = runtime.current() if profile is None else None
    return {
        "text": text,
        "tokens": len(steps),
        "prompt_tokens": len(model.tokenizer.encode(prompt)),
        "load_s": load_s,
        "prefill_s": steps[0] if steps else 0.0,
        "tokens_per_s": len(decode) / sum(decode) if decode and sum(decode) > 0 else 0.0,
        "profile": profile.name if profile is not None else (session.label if session is not None else None),
        "dtypes": ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})),
    }
