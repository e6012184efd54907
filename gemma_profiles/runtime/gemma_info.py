"""Which ``gemma`` is installed, found without importing it (or torch)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from gemma_profiles.errors import GemmaNotAvailableError


@dataclass(frozen=True)
class GemmaStatus:
    """``kind`` is "gemma_pytorch", "standin", "jax" or "missing"."""

    kind: str
    location: str | None
    version: str | None

    def describe(self) -> str:
        names = {
            "gemma_pytorch": "google/gemma_pytorch",
            "standin": "gemma-profiles' stand-in for gemma_pytorch (tests only)",
            "jax": "DeepMind's JAX 'gemma' from PyPI (not gemma_pytorch)",
            "missing": "not installed",
        }
        where = f" at {self.location}" if self.location else ""
        return f"{names[self.kind]}{where}"


def gemma_status() -> GemmaStatus:
    try:
        spec = importlib.util.find_spec("gemma")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return GemmaStatus("missing", None, None)
    locations = list(spec.submodule_search_locations or [])
    folder = Path(locations[0]) if locations else Path(spec.origin or ".").parent
    try:
        version: str | None = metadata.version("gemma")
    except metadata.PackageNotFoundError:
        version = None
    if (folder / "model.py").is_file() and (folder / "config.py").is_file():
        init = folder / "__init__.py"
        standin = init.is_file() and "__standin__" in init.read_text(encoding="utf-8", errors="replace")
        return GemmaStatus("standin" if standin else "gemma_pytorch", str(folder), version)
    return GemmaStatus("jax", str(folder), version)


def require_gemma_pytorch() -> GemmaStatus:
    """The status, or an error saying what to install."""
    status = gemma_status()
    if status.kind == "missing":
        raise GemmaNotAvailableError(
            "gemma_pytorch is not installed in this Python environment",
            where=sys.prefix,
            hint="see the README: fetch google/gemma_pytorch and pip install --no-deps -e it",
        )
    if status.kind == "jax":
        raise GemmaNotAvailableError(
            "the installed 'gemma' is DeepMind's JAX library, not gemma_pytorch",
            where=status.location,
            hint="pip uninstall gemma, then install google/gemma_pytorch (see the README)",
        )
    return status
