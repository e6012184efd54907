"""The profile applied with ``gemma-profile apply``, one per Python environment.

Stored as JSON in ``<sys.prefix>/etc/gemma-profiles/applied.json`` (the
``GEMMA_PROFILE_STATE_DIR`` variable moves it), so each virtualenv has its own.
Writes are atomic: a temporary file in the same directory is renamed over the
old one, so a killed writer leaves the old state or the new, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from gemma_profiles_autoload import ENV_VAR, OFF_VALUES, state_file

from .errors import StateError


@dataclass(frozen=True)
class ActiveReference:
    """Which profile is active and why: ``source`` is "env", "applied" or "none"."""

    reference: str | None
    source: str
    detail: str


def state_path() -> Path:
    return Path(state_file())


def read_applied() -> str | None:
    """The applied profile reference, or None.  A corrupt file is reported and ignored."""
    path = state_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("ignoring unreadable applied-profile state {}: {}", path, exc.strerror)
        return None
    try:
        data = json.loads(text)
        reference = data["profile"]
        if not isinstance(reference, str) or not reference:
            raise ValueError("no profile")
    except (ValueError, KeyError, TypeError):
        logger.warning("ignoring corrupt applied-profile state {} (run 'gemma-profile reset')", path)
        return None
    return reference


def write_applied(reference: str) -> Path:
    """Atomically record ``reference`` as this environment's applied profile."""
    path = state_path()
    payload = json.dumps({"profile": reference, "applied_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".applied-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StateError(
            f"cannot write the applied profile: {exc.strerror}",
            where=str(path),
            hint="use a virtualenv you own, set GEMMA_PROFILE_STATE_DIR, or use GEMMA_PROFILE instead",
        ) from None
    return path


def clear_applied() -> bool:
    """Forget the applied profile; True when there was one."""
    try:
        state_path().unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StateError(f"cannot remove the applied profile: {exc.strerror}", where=str(state_path())) from None
    return True


def active_reference() -> ActiveReference:
    """What is active here, without loading anything: env var first, then applied."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value:
        if value.lower() in OFF_VALUES:
            return ActiveReference(None, "env", f"{ENV_VAR}={value} turns profiles off")
        return ActiveReference(value, "env", f"{ENV_VAR}={value}")
    applied = read_applied()
    if applied:
        return ActiveReference(applied, "applied", f"applied in {state_path()}")
    return ActiveReference(None, "none", "no GEMMA_PROFILE and nothing applied")
