"""Hugging Face transformers' Gemma configs as our model shape (torch-free, network-free).

A transformers checkpoint describes its model in ``config.json`` (``model_type`` ``gemma``,
``gemma2``, ``gemma3_text``, or ``gemma3`` with the text model under ``text_config``).  This
module turns one into a `ModelShape` and a gemma family, so that the same planner - memory
table, dtype rules, verdict - serves ``from_pretrained`` (the ``transformers`` builtin) and
``gemma-profile plan PROFILE --model DIR_OR_HUB_ID``.

`read_config` reads a local folder, a ``config.json`` path, or a Hub id already in the Hugging
Face cache (``HF_HUB_CACHE``, ``HF_HOME/hub``, ``~/.cache/huggingface/hub``); it never
downloads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.planning.memory import ModelShape
from gemma_profiles.spec.variants import identify_variant

#: transformers ``model_type`` -> our gemma family.  ``gemma3`` is the multimodal Gemma 3,
#: whose text model (the part we plan) is its ``text_config``.
MODEL_TYPES: dict[str, str] = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
#: Our family -> gemma_pytorch's architecture name (what `identify_variant` matches on).
ARCHITECTURES = {"gemma1": "GEMMA_1", "gemma2": "GEMMA_2", "gemma3": "GEMMA_3"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def model_type(config: Any) -> str | None:
    """The config's ``model_type`` (a transformers ``PretrainedConfig`` or its ``config.json`` dict)."""
    value = _get(config, "model_type")
    return value if isinstance(value, str) else None


def family_of(config: Any) -> str | None:
    """``gemma1``/``gemma2``/``gemma3`` for a Gemma text model's config, None for any other model."""
    return MODEL_TYPES.get(model_type(config) or "")


def text_config(config: Any) -> Any:
    """The part of ``config`` that describes the text decoder (``text_config`` for multimodal Gemma 3)."""
    if model_type(config) == "gemma3":
        inner = _get(config, "text_config")
        if inner is not None:
            return inner
    return config


def shape_of(config: Any) -> ModelShape:
    """The `ModelShape` of a transformers Gemma config.

    :raises GemmaProfileError: not a Gemma text model, or a field the shape needs is missing.
    """
    family = family_of(config)
    if family is None:
        raise GemmaProfileError(
            f"model_type {model_type(config)!r} is not a Gemma text model",
            hint=f"gemma-profiles plans model_type {', '.join(MODEL_TYPES)}",
        )
    text = text_config(config)
    values: dict[str, int] = {}
    for name in (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
    ):
        value = _get(text, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise GemmaProfileError(
                f"the {model_type(config)} config has no usable {name} (got {value!r})",
                hint="is this config.json complete?",
            )
        values[name] = value
    head_dim = _get(text, "head_dim") or values["hidden_size"] // values["num_attention_heads"]
    window = _get(text, "sliding_window") if family != "gemma1" else None
    return ModelShape(
        family=family,
        head_dim=int(head_dim),
        sliding_window_size=int(window) if isinstance(window, int) and window > 0 else None,
        **values,
    )


class _AsGemmaConfig:
    """Just enough of a GemmaConfig for `identify_variant`."""

    def __init__(self, shape: ModelShape):
        self.architecture = ARCHITECTURES[shape.family]
        for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
            setattr(self, name, getattr(shape, name))
        self.num_key_value_heads = shape.num_key_value_heads


def variant_of(shape: ModelShape) -> str | None:
    """The gemma_pytorch variant with this shape (``2b``, ``1b``...), or None (e.g. the 270M)."""
    return identify_variant(_AsGemmaConfig(shape))


def describe(config: Any) -> str:
    """``Gemma 3 (gemma3_text, 1b-shaped)`` / ``Gemma 3 (gemma3_text, 18 layers x 640)``, for log lines."""
    shape = shape_of(config)
    variant = variant_of(shape)
    size = f"{variant}-shaped" if variant else f"{shape.num_hidden_layers} layers x {shape.hidden_size}"
    return f"Gemma {shape.family.removeprefix('gemma')} ({model_type(config)}, {size})"


# -- finding config.json without the network ------------------------------------------------------------


def hub_cache() -> Path:
    """Where huggingface_hub keeps downloaded repositories (its own environment variables, in its order)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(name)
        if value:
            return Path(value).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def config_path(reference: str) -> Path:
    """The ``config.json`` for a folder, a ``config.json`` path, or a Hub id (``org/name[@revision]``) in the cache.

    :raises GemmaProfileError: nothing there; the message says where it looked.
    """
    path = Path(reference).expanduser()
    if path.is_dir():
        found = path / "config.json"
        if found.is_file():
            return found
        raise GemmaProfileError(
            f"{reference}: a folder without config.json",
            hint="point --model at a transformers checkpoint folder (the one save_pretrained wrote)",
        )
    if path.is_file():
        return path
    repo, _, revision = reference.partition("@")
    if _HUB_ID.match(repo):
        cache = hub_cache()
        folder = cache / ("models--" + repo.replace("/", "--"))
        ref = folder / "refs" / (revision or "main")
        commit = ref.read_text().strip() if ref.is_file() else (revision or "")
        snapshots = [folder / "snapshots" / commit] if commit else sorted((folder / "snapshots").glob("*"))
        for snapshot in snapshots:
            if (snapshot / "config.json").is_file():
                return snapshot / "config.json"
        raise GemmaProfileError(
            f"{reference}: not in the Hugging Face cache ({cache}); gemma-profiles never downloads",
            hint=f"download it first (huggingface-cli download {repo} config.json), or pass its folder",
        )
    raise GemmaProfileError(
        f"{reference}: no such folder or file, and not a Hub id (org/name)",
        hint="pass a transformers checkpoint folder, its config.json, or a Hub id already downloaded",
    )


def read_config(reference: str) -> dict[str, Any]:
    """The parsed ``config.json`` of a transformers checkpoint (see `config_path`)."""
    path = config_path(reference)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GemmaProfileError(f"cannot read {path}: {exc}", hint="is it a transformers config.json?") from None
    if not isinstance(data, dict):
        raise GemmaProfileError(f"{path} holds no JSON object", hint="is it a transformers config.json?")
    return data
