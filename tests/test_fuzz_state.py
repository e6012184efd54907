"""Property-based fuzzing of the applied-profile state and the variables the .pth reads.

Whatever bytes sit in the state file, and whatever ``GEMMA_PROFILE`` and
``GEMMA_PROFILE_STATE_DIR`` hold: the start-up check (`gemma_profiles_autoload.install`)
never raises, prints or reads the file; reading the state gives a profile name or a
one-line `StateError` naming the file; and ``gemma-profile current`` answers with a
result or one error line, never a traceback.  A few examples run in real interpreters.

``GEMMA_PROFILE_FUZZ_EXAMPLES`` (default 40) sets the examples per property.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gemma_profiles_autoload as autoload
from gemma_profiles import log
from gemma_profiles.cli.main import cli
from gemma_profiles.errors import StateError
from gemma_profiles.runtime import state

EXAMPLES = int(os.environ.get("GEMMA_PROFILE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
HEAVY = ("gemma_profiles", "loguru", "pydantic", "yaml", "torch", "pluggy", "gemma")

#: Text an environment variable can hold (no NUL, nothing the file system encoding refuses).
ENV_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
STATE_BYTES = st.one_of(
    st.binary(max_size=400),
    st.builds(
        lambda value: json.dumps({"profile": value}).encode(),
        st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=3)),
    ),
    st.sampled_from([b'{"profile": "t4"}', b'{"profile": "cpu-32gb"}\n', b"\xef\xbb\xbf{}", b"[" * 5000]),
)
STATE_DIRS = st.one_of(
    ENV_TEXT,
    st.sampled_from(
        [
            "~",
            "~/st",
            "~nosuchuser-gp/st",
            "st",
            "./st",
            "../st",
            "a" * 300,
            "/" + "a" * 300,
            "/dev/null",
            "/proc/self",
            "/etc/passwd",
            "HOME/st",
            "FIFO-DIR",
            "FILE-AS-DIR",
            "",
            "   ",
        ]
    ),
)
PROFILES = st.one_of(ENV_TEXT, st.sampled_from(["", "off", "OFF", " none ", "t4", "cpu-32gb", "pascal5gb", "~", "~x"]))


@pytest.fixture
def places(tmp_path: Path) -> dict[str, str]:
    """Real things for the sampled placeholders: a home, a folder holding a FIFO, a file used as a folder."""
    home = tmp_path / "home"
    home.mkdir()
    fifo_dir = tmp_path / "fifo-dir"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "applied.json")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return {"HOME": str(home), "FIFO-DIR": str(fifo_dir), "FILE-AS-DIR": str(a_file)}


def concrete(value: str, places: dict[str, str]) -> str:
    for name, path in places.items():
        if value.startswith(name):
            return path + value[len(name) :]
    return value


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_start_up(capsys: pytest.CaptureFixture[str]) -> None:
    """What the .pth does: never raises, never prints, never opens the state file."""
    try:
        autoload.wanted()
        autoload.install()
    finally:
        autoload.disarm()
    assert capsys.readouterr() == ("", "")


def check_read() -> None:
    try:
        reference = state.read_applied()
    except StateError as exc:
        message = str(exc)
        assert message.splitlines() == [message]
        return
    assert reference is None or (isinstance(reference, str) and reference.strip())


def check_current() -> None:
    log.disable()
    result = CliRunner().invoke(cli, ["current"], prog_name="gemma-profile")
    log.disable()
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("gemma-profile: error:")]
    assert len(errors) == (1 if result.exit_code == 2 else 0), result.stderr


@FUZZ
@given(data=STATE_BYTES)
def test_fuzz_state_file_bytes(data, capsys, isolated_env):
    path = state.state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    check_start_up(capsys)
    check_read()
    check_current()


@FUZZ
@given(profile=PROFILES, state_dir=STATE_DIRS, data=st.one_of(st.none(), STATE_BYTES))
def test_fuzz_gemma_profile_and_state_dir_values(profile, state_dir, data, places, capsys, isolated_env):
    state.state_path().parent.mkdir(parents=True, exist_ok=True)
    state.state_path().unlink(missing_ok=True)  # what an earlier example left
    if data is not None:
        state.state_path().write_bytes(data)
    with environment(
        HOME=places["HOME"], GEMMA_PROFILE=profile, GEMMA_PROFILE_STATE_DIR=concrete(state_dir, places) or None
    ):
        check_start_up(capsys)
        check_read()
        check_current()


@settings(FUZZ, max_examples=min(EXAMPLES, 12))
@given(profile=PROFILES, state_dir=STATE_DIRS, data=st.one_of(st.none(), STATE_BYTES))
def test_fuzz_start_up_in_real_interpreters(profile, state_dir, data, places, tmp_path):
    folder = tmp_path / "state"
    folder.mkdir(exist_ok=True)
    (folder / "applied.json").unlink(missing_ok=True)
    if data is not None:
        (folder / "applied.json").write_bytes(data)
    env = {k: v for k, v in os.environ.items() if k != "GEMMA_PROFILE_STATE_DIR"}
    env.update(HOME=places["HOME"], GEMMA_PROFILE=profile)
    directory = concrete(state_dir, places) if state_dir else str(folder)
    if directory:
        env["GEMMA_PROFILE_STATE_DIR"] = directory
    code = f"import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert completed.stdout == "[]\n"
