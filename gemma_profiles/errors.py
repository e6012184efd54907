"""One exception family for everything a user can get wrong.

Every error carries *what* failed, *where* (``file:line``, profile, plugin) and
*what to do*.  The CLI prints ``str(error)`` as one line on stderr and exits
non-zero; nothing here is meant to surface as a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: Everything ``str.splitlines`` breaks on, every other control character (a terminal escape
#: sequence starts with one) and the bidirectional overrides, written as its escape.
_UNPRINTABLE = (
    [chr(c) for c in range(0x20) if chr(c) != "\t"]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + list("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
)
_LINE_BREAKS = str.maketrans({c: c.encode("unicode_escape").decode("ascii") for c in _UNPRINTABLE})


def printable(text: object) -> str:
    """``text`` with line breaks, terminal control characters and bidi overrides escaped (``\\x1b``).

    Everything shown to a user from a profile, a path or an environment value goes through
    this, so a value can neither break a one-line message nor drive the terminal.
    """
    shown = str(text).translate(_LINE_BREAKS)
    try:
        shown.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes of a file name or environment value
        shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")
    return shown


class GemmaProfileError(Exception):
    """Base class: a problem the user can act on.

    :param message: what is wrong, in one sentence.
    :param where: where it is (``path:line``, ``profile 'x'``, ``plugin 'y'``).
    :param hint: what to do about it.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        # A value quoted from a file may hold a line break or a terminal escape; the error stays one plain line.
        return printable(text)


class ProfileError(GemmaProfileError):
    """A profile file is malformed or inconsistent."""


class ProfileNotFoundError(GemmaProfileError):
    """No profile by that name or path."""


class PluginError(GemmaProfileError):
    """A plugin failed to load or misbehaved."""


class PatchError(GemmaProfileError):
    """Applying a profile to gemma_pytorch failed."""


class GemmaNotAvailableError(GemmaProfileError):
    """gemma_pytorch is missing, or the ``gemma`` installed is another package."""


class StateError(GemmaProfileError):
    """The applied-profile state could not be read or written."""


class CheckpointError(GemmaProfileError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


class CheckpointChangedError(CheckpointError):
    """A checkpoint file changed on disk while the model still reads weights from it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` when a close match exists, else ``""``."""
    options = list(choices)
    folded = {option.lower().replace("_", "-"): option for option in options}
    exact = folded.get(word.lower().replace("_", "-"))
    close = [exact] if exact else difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the ways torch, Python and the OS say memory ran out: ``torch.OutOfMemoryError``,
    ``MemoryError``, ``ENOMEM``, a ``RuntimeError`` saying so.  The loader lets these through
    (never a `CheckpointError`); the ``oom`` builtin turns them into one line with the plan's numbers."""
    import errno
    import sys

    torch = sys.modules.get("torch")  # never imported here: whatever raised it has
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type)):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OUT_OF_MEMORY)
