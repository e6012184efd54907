"""Our log records, on a loguru logger of our own: ``from gemma_profiles.log import logger``.

A library runs inside someone else's program, and loguru's ``logger`` is that
program's: its handlers, its levels.  So every module here logs through `logger`
below, a loguru logger with a core (and handlers) of its own.  Activating a
profile then never adds, removes or reconfigures a handler of the program's, our
records are never printed a second time by loguru's default handler, and the
program's own records never pass through ours.

`enable` (activation and the CLI call it) adds our one handler: ``gemma-profiles |
LEVEL | message`` on whatever ``sys.stderr`` is at the time; ``GEMMA_PROFILE_LOG``
sets its level (default INFO).  To get our records in a sink of your own:
``gemma_profiles.log.logger.add(sink)``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

import loguru

if TYPE_CHECKING:
    from loguru import Logger

LEVEL_ENV = "GEMMA_PROFILE_LOG"
FORMAT = "gemma-profiles | {level} | {message}"
_MARK = "gemma_profiles"


def _own_logger() -> tuple[Logger, bool]:
    """A loguru logger with handlers of its own (built as loguru builds its global one), and True.

    Should loguru's internals ever change shape: its global logger, bound so our handler
    picks out our records, and False (then loguru's default handler, if the program
    keeps it, prints them as well).
    """
    try:
        internals: Any = importlib.import_module("loguru._logger")
        own = internals.Logger(
            core=internals.Core(),
            exception=None,
            depth=0,
            record=False,
            lazy=False,
            colors=False,
            raw=False,
            capture=True,
            patchers=[],
            extra={},
        )
        own.bind(**{_MARK: True})  # the same calls ours make: fail here, not at the first record
        return own, True
    except Exception:
        return loguru.logger.bind(**{_MARK: True}), False


logger, INDEPENDENT = _own_logger()
_handler_id: int | None = None


def _is_ours(record: Any) -> bool:
    return bool(INDEPENDENT or record["extra"].get(_MARK))


def _to_stderr(message: Any) -> None:
    """Write to the current ``sys.stderr`` (a test runner or a program may swap it)."""
    stream = sys.stderr
    if stream is None:
        return
    stream.write(str(message))
    flush = getattr(stream, "flush", None)
    if flush is not None:
        flush()


def enable(level: str | None = None) -> None:
    """Show our records on stderr (idempotent); nothing of the program's logging is touched."""
    global _handler_id
    if _handler_id is not None:
        return
    if not INDEPENDENT:
        loguru.logger.enable("gemma_profiles")
    chosen = (level or os.environ.get(LEVEL_ENV) or "INFO").upper()
    try:
        _handler_id = logger.add(_to_stderr, level=chosen, filter=_is_ours, format=FORMAT)
    except (ValueError, TypeError):  # an unknown GEMMA_PROFILE_LOG level
        _handler_id = logger.add(_to_stderr, level="INFO", filter=_is_ours, format=FORMAT)


def disable() -> None:
    """Remove our handler again (tests; a program that wants us quiet)."""
    global _handler_id
    if _handler_id is not None:
        logger.remove(_handler_id)
        _handler_id = None
