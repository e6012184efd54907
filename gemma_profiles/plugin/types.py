"""Small values that cross the plugin boundary."""

from __future__ import annotations

import dataclasses
import enum
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma_profiles.errors import PatchError, did_you_mean


@dataclass(frozen=True)
class ProfileSource:
    """A directory of profile files, or one file, that profiles come from.

    :param path: a directory (every ``*.yaml``/``*.yml`` in it) or a file.
    :param label: shown by ``gemma-profile list`` ("bundled", "user", a plugin name).
    :param precedence: the higher one wins when two sources define one name.
    """

    path: Path
    label: str
    precedence: int = 10


@dataclass(frozen=True)
class Change:
    """One GemmaConfig field rewritten before construction."""

    field: str
    before: Any
    after: Any
    reason: str


@dataclass
class ConfigRewrite:
    """A copy of the caller's GemmaConfig that plugins edit through `set`."""

    config: Any
    profile: str
    changes: list[Change] = field(default_factory=list)

    def set(self, name: str, value: Any, *, reason: str) -> None:
        """Set GemmaConfig field ``name``; enum fields accept member names."""
        names = [f.name for f in dataclasses.fields(self.config)]
        if name not in names:
            raise PatchError(
                f"this gemma's GemmaConfig has no field '{name}'{did_you_mean(name, names)}",
                where=reason,
                hint=f"valid fields: {', '.join(names)}",
            )
        before = getattr(self.config, name)
        after = self._coerce(name, value)
        setattr(self.config, name, after)
        self.changes.append(Change(name, before, after, reason))

    def _coerce(self, name: str, value: Any) -> Any:
        """Turn ``"GEMMA_2"``/``"GLOBAL"`` into gemma's own enum members."""
        module = sys.modules.get(type(self.config).__module__)
        if name == "architecture" and isinstance(value, str):
            return _enum_member(type(self.config.architecture), value)
        attention = getattr(module, "AttentionType", None)
        if attention is not None and name == "attn_types" and value is not None:
            return [_enum_member(attention, item) for item in value]
        if attention is not None and name == "rope_wave_length" and value is not None:
            return {_enum_member(attention, key): length for key, length in value.items()}
        return value


def _enum_member(enum_type: type[enum.Enum], value: Any) -> Any:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type[str(value)]
    except KeyError:
        raise PatchError(
            f"{enum_type.__name__} has no member '{value}'", hint=f"use one of {', '.join(enum_type.__members__)}"
        ) from None
