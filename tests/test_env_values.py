"""Environment values and what the CLI prints from profile data (issue 13 item 11).

Every ``GEMMA_PROFILE*`` value, however wrong, gets one clear line naming the variable (or a
sane default), never a traceback and never a hang; a file that is not a profile is never
read, so no line of it can be echoed; and nothing the CLI prints from a profile, a path or a
variable can drive the terminal (control characters and bidi overrides come out escaped).
The last part fuzzes ``GEMMA_PROFILE`` and ``GEMMA_PROFILE_PATH`` through the CLI.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gemma_profiles.settings as variables
from gemma_profiles import log
from gemma_profiles.cli.main import cli
from gemma_profiles.errors import _UNPRINTABLE
from gemma_profiles.plugin import manager
from gemma_profiles.spec import registry

pytestmark = pytest.mark.usefixtures("fresh_log_handler")

CONSOLE_SCRIPT = Path(sys.executable).with_name("gemma-profile")
LONG = "a" * 300  # a path component longer than any file system allows (255 bytes)
SECRET = "s3cr3t-hash-$6$abcdefgh"
#: Raw characters the CLI must never write (a line break only between lines).
RAW = set(_UNPRINTABLE) - {"\n"}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="gemma-profile", env=env)


def gemma_profile(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The real console script, so our loguru lines reach the captured stderr too."""
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "gemma_profiles.cli.main"]
    merged = {**os.environ, **(env or {})}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=merged, timeout=timeout)


def one_error(completed: subprocess.CompletedProcess[str] | Result, code: int = 2) -> str:
    returncode = completed.exit_code if isinstance(completed, Result) else completed.returncode
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert returncode == code, (returncode, completed.stdout, completed.stderr)
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("gemma-profile: error: "), lines[0]
    assert "Traceback" not in completed.stdout + completed.stderr
    return lines[0]


def no_raw_control_characters(text: str) -> None:
    found = sorted(RAW & set(text))
    assert not found, (found, text)


# -- GEMMA_PROFILE_PATH and GEMMA_PROFILE_USER_DIR ---------------------------------------------------


def test_a_path_component_over_255_characters_is_skipped_with_one_line(tmp_path):
    # Before: OSError [Errno 36] File name too long, as a traceback.
    completed = gemma_profile("list", env={"GEMMA_PROFILE_PATH": f"{tmp_path}/{LONG}"})
    assert completed.returncode == 0, completed.stderr
    assert "t4" in completed.stdout
    (line,) = completed.stderr.splitlines()
    assert "(GEMMA_PROFILE_PATH) are skipped: File name too long" in line
    assert "at most 255 bytes" in line
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("variable", ["GEMMA_PROFILE_PATH", "GEMMA_PROFILE_USER_DIR"])
def test_an_unknown_user_in_a_path_variable_names_the_variable(variable):
    # Before: "plugin 'sources' (package 'gemma-profiles') raised RuntimeError ... Could not determine
    # home directory", blamed on the builtin, and every command failed.
    completed = gemma_profile("list", env={variable: "~nosuchuser-gp/profiles"})
    assert completed.returncode == 0, completed.stderr
    assert "t4" in completed.stdout
    (line,) = completed.stderr.splitlines()
    assert f"{variable} entry '~nosuchuser-gp/profiles' is skipped: there is no user 'nosuchuser-gp' here" in line
    assert "'sources'" not in line


def test_path_entries_that_cannot_be_expanded_are_skipped_but_the_rest_count(tmp_path, write_profile):
    write_profile("from-path", "description: found\n", tmp_path / "good")
    result = invoke("show", "from-path", env={"GEMMA_PROFILE_PATH": f"~nosuchuser-gp/x:{tmp_path / 'good'}"})
    assert result.exit_code == 0, result.stderr
    assert "from-path: found" in result.stdout


def test_an_unreadable_profile_folder_is_skipped_with_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as a user who may read any folder")
        completed = gemma_profile("list", env={"GEMMA_PROFILE_PATH": str(locked)})
    finally:
        locked.chmod(0o755)
    assert completed.returncode == 0
    assert "Permission denied" in completed.stderr and "Traceback" not in completed.stderr


# -- GEMMA_PROFILE naming a path ---------------------------------------------------------------------


def test_a_too_long_gemma_profile_path_says_so():
    line = one_error(invoke("current", env={"GEMMA_PROFILE": f"/tmp/{LONG}.yaml"}))
    assert line.startswith("gemma-profile: error: GEMMA_PROFILE=/tmp/aaa")
    assert "cannot be looked up: File name too long (a name in a path may have at most 255 bytes" in line
    assert "does not exist" not in line


def test_an_unknown_user_in_gemma_profile_names_the_variable_and_the_user():
    line = one_error(invoke("current", env={"GEMMA_PROFILE": "~nosuchuser-gp/x.yaml"}))
    assert line == (
        "gemma-profile: error: GEMMA_PROFILE=~nosuchuser-gp/x.yaml: profile file '~nosuchuser-gp/x.yaml' cannot be "
        "found: there is no user 'nosuchuser-gp' here (write the path out)"
    )


@pytest.fixture
def secret_files(tmp_path: Path) -> dict[str, Path]:
    """Files that are not profiles: a shadow-like file, a key: value config, a binary, a folder, a FIFO."""
    shadow = tmp_path / "shadow"
    shadow.write_text(f"root:{SECRET}:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n", encoding="utf-8")
    config = tmp_path / "app.conf"
    config.write_text(f"password: {SECRET}\n{SECRET}: 1\n", encoding="utf-8")
    binary = tmp_path / "program"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + SECRET.encode() + b"\xff\xfe\x00" * 40)
    folder = tmp_path / "folder"
    folder.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo_yaml = tmp_path / "fifo.yaml"
    os.mkfifo(fifo_yaml)
    zero_yaml = tmp_path / "zero.yaml"
    zero_yaml.symlink_to("/dev/zero")
    return {
        "shadow": shadow,
        "config": config,
        "binary": binary,
        "folder": folder,
        "fifo": fifo,
        "fifo.yaml": fifo_yaml,
        "zero.yaml": zero_yaml,
    }


@pytest.mark.parametrize("kind", ["shadow", "config", "binary", "folder", "fifo", "fifo.yaml", "zero.yaml"])
def test_gemma_profile_naming_a_file_that_is_no_profile_never_echoes_it(secret_files, kind):
    # Before: GEMMA_PROFILE=/etc/shadow said "unknown key 'root:<the hash>:...'": a line of the file.
    path = secret_files[kind]
    completed = gemma_profile("current", env={"GEMMA_PROFILE": str(path)}, timeout=30)  # a FIFO read would hang
    line = one_error(completed)
    assert line.startswith(f"gemma-profile: error: GEMMA_PROFILE={path}: ")
    assert SECRET not in completed.stdout + completed.stderr
    if kind in ("fifo.yaml", "zero.yaml"):
        assert "not a regular file" in line
    else:
        assert "is not a profile file: profile files are named *.yaml or *.yml, and nothing else is read" in line


@pytest.mark.parametrize("kind", ["shadow", "config", "binary"])
def test_show_and_validate_never_echo_a_file_that_is_no_profile(secret_files, kind):
    path = str(secret_files[kind])
    shown = invoke("show", path)
    assert SECRET not in shown.output
    one_error(shown)
    validated = invoke("validate", path)
    assert validated.exit_code == 1
    assert SECRET not in validated.output
    assert validated.stderr.strip() == (
        f"{path}: not a profile file (profile files are named *.yaml or *.yml); not read"
    )


def test_extends_naming_a_file_that_is_no_profile_never_echoes_it(secret_files, write_profile):
    child = write_profile("child", f"description: x\nextends: {secret_files['config']}\n")
    result = invoke("show", str(child))
    assert SECRET not in result.output
    line = one_error(result)
    assert "is not a profile file" in line


def test_validate_a_too_long_name_is_a_problem_not_a_traceback():
    result = invoke("validate", f"/tmp/{LONG}.yaml", f"/tmp/{LONG}")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stderr.count("cannot look this up: File name too long") == 2


# -- nothing printed from profile data drives the terminal ---------------------------------------------


HOSTILE_DESCRIPTION = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\x1b[0m \u202etxt.exe\u202c\rfake\x85line"


def test_show_escapes_control_characters_in_every_field(tmp_path, write_profile):
    # Before: show wrote the description's escape sequences raw (clearing the screen, retitling it).
    folder = tmp_path / "evil\x1b[5mdir"
    path = write_profile(
        "evil",
        f'description: "{HOSTILE_DESCRIPTION.encode("unicode_escape").decode()}"\n'
        'hardware: {device: cuda, gpu: ["Evil\\e[8mGPU"]}\n',
        folder,
    )
    result = invoke("show", str(path))
    assert result.exit_code == 0, result.output
    no_raw_control_characters(result.output)
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mred\\x1b[0m \\u202etxt.exe\\u202c\\rfake\\x85line" in result.stdout
    assert "evil\\x1b[5mdir" in result.stdout  # the file's folder
    assert "Evil\\u001b[8mGPU" in result.stdout  # a list value, shown as JSON
    assert result.stdout.splitlines()[0].startswith("evil: \\x1b]0;owned")


def test_list_and_errors_escape_control_characters(tmp_path, write_profile):
    write_profile("evil", f'description: "{HOSTILE_DESCRIPTION.encode("unicode_escape").decode()}"\n', tmp_path)
    listed = invoke("list", env={"GEMMA_PROFILE_PATH": str(tmp_path)})
    assert listed.exit_code == 0
    no_raw_control_characters(listed.output)
    failed = invoke("current", env={"GEMMA_PROFILE": "t4\x1b[2J\u202e"})
    no_raw_control_characters(failed.output)
    assert "GEMMA_PROFILE=t4\\x1b[2J\\u202e" in one_error(failed)


def test_undecodable_bytes_in_gemma_profile_are_one_line(tmp_path):
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "gemma_profiles.cli.main"]
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
    env[b"GEMMA_PROFILE"] = b"\xff\xfe\x1b[31m.yaml"
    completed = subprocess.run([*command, "current"], capture_output=True, env=env, timeout=60)
    stderr = completed.stderr.decode("utf-8")  # valid UTF-8: the bytes come out escaped
    assert completed.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "\\udcff\\udcfe\\x1b[31m.yaml" in stderr
    no_raw_control_characters(stderr + completed.stdout.decode("utf-8"))


# -- the other variables -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["bogus", "10", "-1", "debug,info", "\x1b[31m", " ", "TRACE"])
def test_a_bad_log_level_falls_back_to_info(value):
    completed = gemma_profile("list", env={"GEMMA_PROFILE_LOG": value, "GEMMA_PROFILE_PATH": f"/tmp/{LONG}"})
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    assert "File name too long" in completed.stderr  # warnings still shown


@pytest.mark.parametrize("value", [",,,", " , ", "\x1b[31m", "loadng", "a" * 5000, "sources,,sources"])
def test_junk_in_disable_plugins_is_one_line_or_nothing(value):
    result = invoke("plugins", env={"GEMMA_PROFILE_DISABLE_PLUGINS": value})
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    no_raw_control_characters(result.output)
    names = {n.strip() for n in value.split(",") if n.strip()} - {name for name, _ in manager.DEFAULT_PLUGINS}
    assert len(result.stderr.splitlines()) == len(names)


@pytest.mark.parametrize(
    "variable", ["GEMMA_PROFILE_NATIVE", "GEMMA_PROFILE_HUGEPAGES", "GEMMA_PROFILE_OFFLOAD_STREAM_CPU"]
)
def test_switch_variables_with_junk_keep_their_default(variable):
    result = invoke("detect", env={variable: "\x1b[31m maybe \u202e"})
    assert result.exit_code == 0, result.output
    assert "best profile" in result.stdout
    no_raw_control_characters(result.output)


# -- fuzzing: GEMMA_PROFILE / GEMMA_PROFILE_PATH through the CLI ----------------------------------------

EXAMPLES = int(os.environ.get("GEMMA_PROFILE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

HOSTILE_PARTS = [
    "~",
    "~nosuchuser-gp",
    "~root",
    "/",
    "/etc/shadow",
    "/etc/passwd",
    "/dev/zero",
    "/dev/null",
    "/proc/self/mem",
    LONG,
    ".yaml",
    ".yml",
    "t4",
    "auto",
    "off",
    "base-cuda",
    "..",
    ":",
    "\x1b[2J",
    "\u202e",
    "\x85",
    "\udcff",
    "*",
    "$HOME",
]
#: What an environment value can hold: anything but NUL (undecodable bytes come as "\udcff" parts).
ENV_TEXT = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
VALUES = st.lists(
    st.one_of(st.sampled_from(HOSTILE_PARTS), ENV_TEXT, st.sampled_from(["FIFO", "FOLDER", "SECRET"])),
    max_size=5,
)
#: A command-line argument, NUL included (CliRunner passes it; the CLI must still say one line).
ARGUMENTS = st.lists(
    st.one_of(st.sampled_from(HOSTILE_PARTS), st.text(max_size=12), st.sampled_from(["FIFO", "FOLDER", "SECRET"])),
    max_size=5,
)


@contextlib.contextmanager
def fresh_process_state() -> Iterator[None]:
    """What a new ``gemma-profile`` process starts with: no plugin manager, no log handler, nothing said yet."""
    manager.reset_plugin_manager()
    variables._said.clear()
    registry._unreadable.clear()
    log.disable()
    try:
        yield
    finally:
        log.disable()
        manager.reset_plugin_manager()


def realize(parts: list[str], places: dict[str, Path]) -> str:
    return "".join(str(places[p]) if p in places else p for p in parts)


@pytest.fixture
def places(secret_files: dict[str, Path]) -> dict[str, Path]:
    return {"FIFO": secret_files["fifo"], "FOLDER": secret_files["folder"], "SECRET": secret_files["shadow"]}


@FUZZ
@given(profile=VALUES, path=VALUES, command=st.sampled_from([("current",), ("list",), ("show", "t4")]))
def test_fuzz_gemma_profile_and_path_through_the_cli(places, profile, path, command):
    env = {"GEMMA_PROFILE": realize(profile, places), "GEMMA_PROFILE_PATH": realize(path, places)}
    with fresh_process_state():
        result = invoke(*command, env=env)
    output = result.output
    assert result.exit_code in (0, 1, 2), (result.exit_code, env, output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        env,
        repr(result.exception),
    )
    assert "Traceback" not in output
    assert SECRET not in output
    no_raw_control_characters(output)


@FUZZ
@given(reference=ARGUMENTS)
def test_fuzz_a_profile_reference_given_to_show(places, reference):
    with fresh_process_state():
        result = invoke("show", realize(reference, places) or "x")
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert SECRET not in result.output
    no_raw_control_characters(result.output)


def test_fuzzed_values_in_a_real_process_never_hang(places):
    # The console script with the nastiest fixed values at once: FIFOs, /dev/zero, a long name.
    env = {
        "GEMMA_PROFILE": str(places["FIFO"]),
        "GEMMA_PROFILE_PATH": f"{places['FIFO']}:/dev/zero:/tmp/{LONG}:~nosuchuser-gp:{places['FOLDER']}",
        "GEMMA_PROFILE_USER_DIR": "/dev/zero",
        "GEMMA_PROFILE_LOG": "\x1b[2J",
        "GEMMA_PROFILE_DISABLE_PLUGINS": "\x1b[2J",
    }
    for command in (["current"], ["list"], ["show", "t4"], ["plugins"], ["validate", str(places["FIFO"])]):
        completed = gemma_profile(*command, env=env, timeout=30)
        assert completed.returncode in (0, 1, 2), (command, completed.stderr)
        assert "Traceback" not in completed.stderr
        no_raw_control_characters(completed.stdout + completed.stderr)
