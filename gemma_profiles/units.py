"""Memory sizes in the Hugging Face notation ("4.5GiB", "500MB", "12 GB")."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
# A sanity bound: nothing we describe has more than a petabyte.
MAX_BYTES = 2**50


def parse_memory(text: str | int) -> int:
    """Parse ``"4.5GiB"`` into bytes.

    :raises ValueError: with a message saying what forms are accepted.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a memory size like '4.5GiB', got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _PATTERN.match(str(text))
        if not match:
            raise ValueError(
                f"bad memory size {text!r}: use a number and a unit, like '4.5GiB', "
                "'500MB' or '16GB' (KiB/MiB/GiB/TiB are powers of 2, KB/MB/GB/TB of 10)"
            )
        number, unit = match.groups()
        scaled = float(number) * _UNITS[(unit or "").upper()]
        value = int(scaled) if scaled <= MAX_BYTES else MAX_BYTES + 1  # a long digit string is inf
    if value < 0 or value > MAX_BYTES:
        raise ValueError(f"memory size {text!r} is out of range (0 to 1PiB)")
    return value


def format_bytes(n: int | float) -> str:
    """Format bytes in binary units with two decimals: ``4.50 GiB``."""
    try:
        value = float(n)
    except OverflowError:  # past float's range: a profile may ask for any batch size
        return f"{int(n) // 1024**4} TiB"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
