"""The profile applied with ``gemma-profile apply``, one per Python environment.

Stored as JSON in ``<sys.prefix>/etc/gemma-profiles/applied.json`` (the
``GEMMA_PROFILE_STATE_DIR`` variable moves it; ``~`` expands, a relative value is
refused), so each virtualenv has its own.  Writes are atomic: a temporary file in
the same directory is renamed over the old one, so a killed writer leaves the old
state or the new, never half.

Reads never block and are bounded: only a regular file of at most
`MAX_STATE_BYTES` is read (a FIFO, a device or a huge file is refused from its
``stat``).  A state that exists but cannot be used raises `StateError`: the user
asked for a profile, so gemma must not quietly build without one.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gemma_profiles.settings as settings
from gemma_profiles.errors import StateError

#: The file in the state folder (``gemma_profiles_autoload.STATE_FILE_NAME`` too).
STATE_FILE_NAME = "applied.json"

#: No state this tool writes comes near this; anything larger is not ours.
MAX_STATE_BYTES = 64 * 1024
_REPAIR = "run 'gemma-profile reset', or 'gemma-profile apply NAME' to write a new one"
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@dataclass(frozen=True)
class ActiveReference:
    """Which profile is active and why: ``source`` is "env", "applied" or "none"."""

    reference: str | None
    source: str
    detail: str


def state_path() -> Path:
    """The applied-profile file; a `StateError` when ``GEMMA_PROFILE_STATE_DIR`` cannot name one.

    The variable moves the folder (``~`` and ``~user`` expand); a relative value is refused,
    since processes started in other folders would each find another state.  The ``.pth``
    module finds the same file with its own standard-library copy of this rule
    (``gemma_profiles_autoload.state_file``; tests/test_settings.py checks they agree).
    """
    name = settings.STATE_DIR.name
    value = os.environ.get(name, "")
    if not value.strip():
        return Path(sys.prefix) / "etc" / "gemma-profiles" / STATE_FILE_NAME
    shown = ascii(value) if not value.isprintable() else repr(value)
    if "\0" in value:
        problem = f"{name}={shown} holds a NUL character"
    else:
        expanded = os.path.expanduser(value)
        if expanded.startswith("~"):
            user = expanded[1:].split(os.sep, 1)[0]
            problem = f"{name}={shown}: cannot expand '~{user}' (no such user here)"
        elif not os.path.isabs(expanded):
            problem = f"{name}={shown} is a relative path; processes started in other folders would not find it"
        else:
            return Path(os.path.normpath(expanded)) / STATE_FILE_NAME
    raise StateError(problem, hint="set it to an absolute path, or unset it")


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _read_bounded(path: Path) -> bytes | None:
    """The bytes of ``path``, or None when there is no file; never blocks, never reads more than the cap."""
    try:
        before = os.stat(path)  # decide from stat alone: a FIFO or a device is never opened
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read the applied-profile state: {_why(exc)}", where=str(path), hint=_REPAIR) from None
    _check_regular(path, before)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None  # removed since the stat: nothing applied
    except OSError as exc:
        raise StateError(f"cannot read the applied-profile state: {_why(exc)}", where=str(path), hint=_REPAIR) from None
    try:
        _check_regular(path, os.fstat(fd))  # what was opened, in case it was swapped after the stat
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_STATE_BYTES:
            chunk = os.read(fd, MAX_STATE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise StateError(f"cannot read the applied-profile state: {_why(exc)}", where=str(path), hint=_REPAIR) from None
    finally:
        os.close(fd)
    if size > MAX_STATE_BYTES:
        _too_big(path, size)
    return b"".join(chunks)


def _check_regular(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise StateError(
            f"the applied-profile state is {_kind(info.st_mode)}, not a file this tool wrote",
            where=str(path),
            hint=_REPAIR,
        )
    if info.st_size > MAX_STATE_BYTES:
        _too_big(path, info.st_size)


def _too_big(path: Path, size: int) -> None:
    raise StateError(
        f"the applied-profile state is {size} bytes, more than any state this tool writes ({MAX_STATE_BYTES} at most)",
        where=str(path),
        hint=_REPAIR,
    )


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


def read_applied() -> str | None:
    """The applied profile reference, or None when nothing is applied.

    :raises StateError: the state file is there but is no state this tool wrote (not a
        regular file, too large, not UTF-8, not our JSON), or ``GEMMA_PROFILE_STATE_DIR``
        is wrong.  The message names the file and never quotes its content.
    """
    path = state_path()
    data = _read_bounded(path)
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateError(
            f"the applied-profile state is not UTF-8 text (byte {exc.start} of {len(data)})",
            where=str(path),
            hint=_REPAIR,
        ) from None
    try:
        reference = json.loads(text)["profile"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        reference = None
    if not isinstance(reference, str) or not reference.strip() or "\0" in reference:
        raise StateError(
            "the applied-profile state is not the JSON this tool writes (no 'profile' name in it)",
            where=str(path),
            hint=_REPAIR,
        )
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
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise StateError(f"cannot remove the applied profile: {exc.strerror}", where=str(state_path())) from None
    return True


def active_reference() -> ActiveReference:
    """What is active here, without loading anything: env var first, then applied."""
    variable, value = settings.PROFILE.name, settings.PROFILE.raw()
    if value:
        if settings.profile_off(value):
            return ActiveReference(None, "env", f"{variable}={value} turns profiles off")
        return ActiveReference(value, "env", f"{variable}={value}")
    applied = read_applied()
    if applied:
        return ActiveReference(applied, "applied", f"applied in {state_path()}")
    return ActiveReference(None, "none", "no GEMMA_PROFILE and nothing applied")
