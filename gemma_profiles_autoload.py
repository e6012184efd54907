"""Arms gemma-profiles at interpreter start; imported by ``gemma_profiles.pth``.

With neither ``GEMMA_PROFILE`` set nor a profile applied in this environment it
does one environment lookup and one ``stat`` and returns: no torch, no YAML, no
import of the gemma_profiles package.  It never raises: a bad value is reported
when a Gemma model is constructed, not here.
"""

import os
import sys

ENV_VAR = "GEMMA_PROFILE"
STATE_DIR_ENV = "GEMMA_PROFILE_STATE_DIR"
OFF_VALUES = ("off", "none", "0", "false", "no")


def state_file() -> str:
    """The applied-profile file of this Python environment."""
    directory = os.environ.get(STATE_DIR_ENV) or os.path.join(sys.prefix, "etc", "gemma-profiles")
    return os.path.join(directory, "applied.json")


def wanted() -> bool:
    """True when a profile should be armed in this interpreter."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value:
        return value.lower() not in OFF_VALUES
    return os.path.exists(state_file())


def _arm() -> None:
    if not wanted():
        return
    try:
        from gemma_profiles import runtime

        runtime.arm_from_environment()
    except Exception as exc:  # never break interpreter start-up
        sys.stderr.write(f"gemma-profiles: autoload failed, gemma will fail to build a model: {exc}\n")


_arm()
