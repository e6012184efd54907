"""What every ``gemma-profile`` command module shares: how a line is shown, JSON, loading a profile.

The command modules (`main`, `model`, `contrib`) import this and never each other, except
`main` adding the other modules' commands to its group.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from gemma_profiles.errors import printable

if TYPE_CHECKING:
    from gemma_profiles.spec.profile import Profile


def echo(text: str, *, err: bool = False) -> None:
    """``click.echo`` for one line that may hold profile data, a path or an environment value:
    control characters (terminal escapes, line breaks) and bidi overrides are shown escaped."""
    click.echo(printable(text), err=err)


def warn(line: str) -> None:
    echo(f"gemma-profile: warning: {line}", err=True)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))  # ensure_ascii: control characters come out escaped


def load_any(reference: str) -> Profile:
    """A profile by name or path, or ``auto`` (built from detected hardware)."""
    from gemma_profiles.spec.registry import default_registry

    return default_registry().load(reference)
