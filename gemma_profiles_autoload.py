"""Arms gemma-profiles at interpreter start; imported by ``gemma_profiles.pth``.

This runs in every Python process of the environment, so it does almost nothing
(standard library only, see docs/pth.md):

- ``GEMMA_PROFILE`` set (and not ``off``): a profile is wanted;
- else one ``stat`` of the applied-profile file: anything there (even a FIFO or a
  file that is no state at all) means a profile may be wanted.

Nothing is opened or read, nothing printed, nothing raised.  When a profile may be
wanted, a small finder goes first on ``sys.meta_path``; when gemma's model module is
imported it imports ``gemma_profiles.runtime.session``, which reads the choice and arms the
patch then.  A wrong value or a broken state file is reported there, when a model is
built, by a `GemmaProfileError` - never by a line at every interpreter start.

This module imports the package (lazily, when gemma is imported); the package never imports
it.  Importing any ``gemma_profiles`` module at start would run the package's ``__init__``, so
the few facts both need are copied here and tests/test_settings.py checks each copy against
the package's: `OFF_VALUES` (`gemma_profiles.settings.PROFILE_OFF_WORDS`), `PATCHED_MODULES`
and `ARM_ON` (`gemma_profiles.runtime.session`), `state_file` (`gemma_profiles.runtime.state.state_path`),
and the attribute marking the finder (`gemma_profiles.runtime.session.ARMING_FINDER`).
"""

import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing would cost every interpreter start milliseconds
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType
    from typing import Any

ENV_VAR = "GEMMA_PROFILE"
STATE_DIR_ENV = "GEMMA_PROFILE_STATE_DIR"
STATE_FILE_NAME = "applied.json"
OFF_VALUES = ("off", "none", "0", "false", "no")
#: gemma_pytorch modules holding the classes the profile patches (the runtime's import hook list).
PATCHED_MODULES = ("gemma.model", "gemma.gemma3_model")
#: Modules whose import arms the chosen profile: gemma's, and those the builtin plugins name in
#: ``gemma_profile_watched_modules`` (tests/test_transformers.py checks the two lists agree).
#: A third-party plugin's modules are served by the runtime's hook once a session is armed.
ARM_ON = (*PATCHED_MODULES, "transformers.modeling_utils")


def state_file() -> "str | None":
    """The applied-profile file of this Python environment; None when ``GEMMA_PROFILE_STATE_DIR``
    names no folder every process agrees on (relative, an unknown ``~user``, a NUL): the
    runtime says why (`gemma_profiles.runtime.state.state_path`, the same rule with the reasons)."""
    value = os.environ.get(STATE_DIR_ENV, "")
    if not value.strip():
        return os.path.join(sys.prefix, "etc", "gemma-profiles", STATE_FILE_NAME)
    expanded = os.path.expanduser(value)
    if "\0" in value or expanded.startswith("~") or not os.path.isabs(expanded):
        return None
    return os.path.join(os.path.normpath(expanded), STATE_FILE_NAME)


def wanted() -> bool:
    """True when a profile may be wanted here: the cheap check run at every interpreter start.

    Never raises and never opens the state file: a value or a state that is wrong counts
    as wanted, so the runtime reports it when a model is built instead of gemma building
    unpatched without a word.
    """
    try:
        value = os.environ.get(ENV_VAR, "").strip()
        if value:
            return value.lower() not in OFF_VALUES
        path = state_file()
        if path is None:
            return True  # a bad GEMMA_PROFILE_STATE_DIR: said when a model is built
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except Exception:  # a bad GEMMA_PROFILE_STATE_DIR, a folder we may not search, a name too long
        return True
    return True


class ArmOnGemmaImport:
    """First on ``sys.meta_path`` while a profile is wanted but not armed yet.

    Answers only for the modules in `ARM_ON`: imports ``gemma_profiles.runtime.session`` (which arms
    the session and removes this finder) and hands the import to the runtime's own hook,
    which patches the module once gemma's code has run.
    """

    #: How the runtime knows this finder on ``sys.meta_path`` without importing this module.
    gemma_profiles_arming = True

    def find_spec(
        self, fullname: str, path: "Sequence[str] | None" = None, target: "ModuleType | None" = None
    ) -> "Any":
        if fullname not in ARM_ON:
            return None
        from gemma_profiles.runtime import session

        return session.spec_after_arming(fullname, path, target)


def pending() -> bool:
    """True while the finder waits for gemma (no session armed or chosen in this process yet)."""
    return any(isinstance(finder, ArmOnGemmaImport) for finder in sys.meta_path)


def disarm() -> None:
    """Remove the finder: the runtime armed a session, or the program chose (or dropped) one itself."""
    if pending():
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, ArmOnGemmaImport)]


def install() -> None:
    """What the .pth runs: put the finder first when a profile may be wanted.  Never raises or prints."""
    try:
        if not wanted() or pending():
            return
        sys.meta_path.insert(0, ArmOnGemmaImport())
        if any(name in sys.modules for name in ARM_ON):  # gemma came first (a sitecustomize)
            from gemma_profiles.runtime import session  # noqa: F401  (arms on import)
    except Exception:  # never break interpreter start-up; the runtime reports problems at model construction
        pass


install()
