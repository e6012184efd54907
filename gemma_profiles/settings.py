"""The ``GEMMA_PROFILE*`` environment variables: each one's name and meaning, and one on/off rule.

Every variable the package reads is declared here once, with the line ``docs/settings.md``
shows for it (tests/test_settings.py keeps that table, the test fixture that isolates
each test, and the names used in the code in step with `VARIABLES`).  Read a variable
through its `Variable`: ``settings.NATIVE.name`` for messages, ``settings.switch(settings.NATIVE)``
for its value.

One rule reads every on/off switch: ``0``, ``false``, ``no``, ``off`` turn it off;
``1``, ``true``, ``yes``, ``on`` turn it on (case and surrounding blanks ignored);
unset, empty or anything else leaves the switch at its default.  ``GEMMA_PROFILE``
itself names a profile, and the same off words (plus ``none``) mean "no profile".

It also holds the one tunable the planner and the engine share, `DEQUANTIZE_ROWS` (the
engine may import nothing of the planner, and the planner nothing of the engine).

Standard library only and cheap to import: the CLI, the planner and the engine read
it.  The ``.pth`` module (``gemma_profiles_autoload``) cannot import it - importing any
``gemma_profiles`` module runs the package ``__init__`` (pluggy, loguru) at every
interpreter start - so it keeps its own copy of `PROFILE_OFF_WORDS`; a test checks the
two agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Values that turn a switch off, and on (compared lower-cased, blanks stripped).
OFF_WORDS = ("0", "false", "no", "off")
ON_WORDS = ("1", "true", "yes", "on")
#: Values of ``GEMMA_PROFILE`` that ask for no profile (``gemma_profiles_autoload.OFF_VALUES`` too).
PROFILE_OFF_WORDS = ("off", "none", "0", "false", "no")
#: Rows of activations (batch x prompt tokens) from which the native int8 kernel hands a
#: product to a float GEMM on a dequantized copy of the weight (`gemma_profiles.engine.native`);
#: the planner counts that copy's memory from the same number (`gemma_profiles.planning.memory`).
DEQUANTIZE_ROWS = 160
#: The same on the kernel's AVX2 path (float32 sums; `DEQUANTIZE_ROWS` is the VNNI path's).  With
#: a scale per 64 columns, float32 activations and one thread, the kernel (rows of x in pairs)
#: takes 0.48x the float32 GEMM's time (dequantization included) at 64 rows of 2b's shapes, 0.78x
#: at 128, 0.99x at 192, 1.05x at 256; on the 270M's small weights, whose dequantized copy stays in
#: cache, 0.80x at 32, 1.11x at 64, 1.24x at 128 (``OMP_NUM_THREADS=1 python
#: benchmarks/int8_rows.py --shapes 2b|270m --scales groups,rows``, docs/benchmarks.md).  The
#: crossover depends on the weight's size (~190 rows for 2b's, ~48 for the 270M's): 128 stays,
#: between the two.
DEQUANTIZE_ROWS_AVX2 = 128


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, what it takes (``default`` when unset) and what it does."""

    name: str
    takes: str
    default: str
    doc: str

    def raw(self) -> str:
        """The value as set, blanks stripped; "" when unset."""
        return os.environ.get(self.name, "").strip()

    def __str__(self) -> str:
        return self.name


PROFILE = Variable(
    "GEMMA_PROFILE",
    "a profile name, a path to a YAML file, `auto`, or `off`",
    "unset: the profile applied with `gemma-profile apply`, else none",
    "the profile every gemma model built in this process uses; it takes precedence over "
    "`gemma-profile apply`, and `off` (or `none`, `0`, `false`, `no`) means gemma_pytorch as it ships",
)
PATH = Variable(
    "GEMMA_PROFILE_PATH",
    "folders separated by `:` (`;` on Windows)",
    "unset",
    "more folders of profiles; they win a name clash over the user folder, plugins and the "
    "bundled profiles, the leftmost first",
)
USER_DIR = Variable(
    "GEMMA_PROFILE_USER_DIR",
    "a folder",
    "`~/.config/gemma-profiles/profiles` (platformdirs' user config folder)",
    "the user's own profiles (`gemma-profile new` writes there unless given `-o`)",
)
STATE_DIR = Variable(
    "GEMMA_PROFILE_STATE_DIR",
    "an absolute folder (`~` expands)",
    "`<sys.prefix>/etc/gemma-profiles`",
    "where `gemma-profile apply` keeps the applied profile of this Python environment",
)
DISABLE_PLUGINS = Variable(
    "GEMMA_PROFILE_DISABLE_PLUGINS",
    "plugin names separated by `,`",
    "unset",
    "plugins not to load, builtin ones included (`gemma-profile plugins` lists the names)",
)
LOG = Variable(
    "GEMMA_PROFILE_LOG",
    "a level: `DEBUG`, `INFO`, `WARNING`, `ERROR`",
    "`INFO`",
    "the lowest level of the log lines shown on stderr once a profile is active",
)
NATIVE = Variable(
    "GEMMA_PROFILE_NATIVE",
    "a switch",
    "on",
    "our native C kernels (int8 and bfloat16 products, fused layers) where the CPU has "
    "AVX2 + FMA or AVX-512; off computes with torch's kernels and gemma's own layer forwards",
)
NATIVE_BUILD_TIMEOUT = Variable(
    "GEMMA_PROFILE_NATIVE_BUILD_TIMEOUT",
    "seconds, more than 0 and at most 86400",
    "`120`",
    "the time limit for compiling the native kernels on first use",
)
HUGEPAGES = Variable(
    "GEMMA_PROFILE_HUGEPAGES",
    "a switch",
    "on",
    "int8 weights on 2 MiB transparent huge pages where the kernel allows them",
)
OFFLOAD_STREAM_CPU = Variable(
    "GEMMA_PROFILE_OFFLOAD_STREAM_CPU",
    "a switch",
    "off",
    "stream `offload: cpu` layers through slots even when the model computes on the CPU "
    "(the GPU's code path, to test or measure it)",
)
IMPORT_DIR = Variable(
    "GEMMA_PROFILE_IMPORT_DIR",
    "a folder",
    "`imports` in the user cache folder (`~/.cache/gemma-profiles/imports`)",
    "where `make demo`, the quality tool, the benchmarks and the tests keep imported GGUF models",
)

#: Every variable the package reads, in the order docs/settings.md lists them.
VARIABLES = (
    PROFILE,
    PATH,
    USER_DIR,
    STATE_DIR,
    DISABLE_PLUGINS,
    LOG,
    NATIVE,
    NATIVE_BUILD_TIMEOUT,
    HUGEPAGES,
    OFFLOAD_STREAM_CPU,
    IMPORT_DIR,
)


def parse_switch(value: str, default: bool) -> bool:
    """The on/off rule: an off word is False, an on word True, anything else `default`."""
    word = value.strip().lower()
    if word in OFF_WORDS:
        return False
    if word in ON_WORDS:
        return True
    return default


def switch(variable: Variable) -> bool:
    """The switch ``variable`` as set here (its default when unset or not an on/off word)."""
    if variable.default not in ("on", "off"):
        raise ValueError(f"{variable.name} is not a switch")
    return parse_switch(variable.raw(), variable.default == "on")


def profile_off(value: str) -> bool:
    """Whether a ``GEMMA_PROFILE`` value asks for no profile (``off``, ``none``, ``0``, ...)."""
    return value.strip().lower() in PROFILE_OFF_WORDS


#: (variable, value) pairs already warned about by `expand`: one line each per process.
_said: set[tuple[str, str]] = set()


def expand(value: str, variable: str) -> Path | None:
    """``value`` of ``variable`` as a path with ``~`` expanded; None (after one warning) when it cannot be.

    ``~nosuchuser/x`` names a user this machine lacks, and ``~/x`` without a home directory
    cannot be expanded either: the entry is skipped, and the warning names the variable.
    """
    try:
        return Path(value).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        from gemma_profiles.errors import printable
        from gemma_profiles.log import logger

        user = value[1:].split("/", 1)[0].split(os.sep, 1)[0]
        why = f"there is no user '{printable(user)}' here" if user else "there is no home directory to expand '~' to"
        if (variable, value) not in _said:
            _said.add((variable, value))
            logger.warning("{}", f"{variable} entry '{printable(value)}' is skipped: {why} (write the path out)")
        return None


def user_dir() -> Path | None:
    """The user's profile folder: `USER_DIR`, else ``~/.config/gemma-profiles/profiles`` on Linux
    (platformdirs' user config folder); None when the variable names a path that cannot be expanded."""
    value = os.environ.get(USER_DIR.name)
    if value:
        return expand(value, USER_DIR.name)
    import platformdirs

    return Path(platformdirs.user_config_dir("gemma-profiles")) / "profiles"


def import_dir() -> Path:
    """`IMPORT_DIR` with ``~`` expanded, else ``imports`` in the user cache folder."""
    value = IMPORT_DIR.raw()
    if value:
        return Path(value).expanduser()
    from platformdirs import user_cache_dir  # lazily: nothing else here needs it

    return Path(user_cache_dir("gemma-profiles")) / "imports"


def markdown_table() -> str:
    """The table of docs/settings.md, from `VARIABLES` (``python -m gemma_profiles.settings`` prints it)."""
    rows = ["| variable | takes | default | what it does |", "| --- | --- | --- | --- |"]
    rows += [f"| `{v.name}` | {v.takes} | {v.default} | {v.doc} |" for v in VARIABLES]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover - a maintainer's helper
    import sys

    sys.stdout.write(markdown_table())
