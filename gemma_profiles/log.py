"""loguru set-up: our records go to stderr as ``gemma-profiles | LEVEL | message``.

The library disables its loggers at import (loguru's advice for libraries);
`enable` is called by activation and by the CLI.  ``GEMMA_PROFILE_LOG`` sets
the level (default INFO).  loguru's untouched default handler is replaced by
an equivalent one that skips our records, so nothing prints twice.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from loguru import logger

LEVEL_ENV = "GEMMA_PROFILE_LOG"
_OURS = ("gemma_profiles",)
_handler_id: int | None = None


def _is_ours(record: Any) -> bool:
    return str(record["name"] or "").startswith(_OURS)


def enable(level: str | None = None) -> None:
    """Turn on our log records (idempotent)."""
    global _handler_id
    logger.enable("gemma_profiles")
    if _handler_id is not None:
        return
    chosen = (level or os.environ.get(LEVEL_ENV) or "INFO").upper()
    try:
        logger.remove(0)  # loguru's default handler, if nobody removed it yet
    except ValueError:
        pass
    else:
        logger.add(sys.stderr, level=os.environ.get("LOGURU_LEVEL", "DEBUG"), filter=lambda r: not _is_ours(r))
    try:
        _handler_id = logger.add(
            sys.stderr, level=chosen, filter=_is_ours, format="gemma-profiles | {level} | {message}"
        )
    except ValueError:
        _handler_id = logger.add(
            sys.stderr, level="INFO", filter=_is_ours, format="gemma-profiles | {level} | {message}"
        )
