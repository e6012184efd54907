"""The .pth autoload and the library's manners inside a user's process (issue 13, items 1, 2 and 11).

The ``.pth`` runs at every interpreter start in the environment, so whatever sits at
the state path (a FIFO, a link to /dev/zero, 300 MB, bytes that are not UTF-8, a
folder) start-up never blocks, reads nothing, prints nothing and imports nothing
heavy; the problem is said in one line by ``gemma-profile current`` and raised when a
model is built, which then never builds unpatched.  Inside the user's program,
``sys.excepthook`` and loguru's handlers stay the program's.

Start-up is checked in real interpreters of this environment (the ``.pth`` is
installed in it), under a memory limit so a runaway read fails instead of swapping.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import gemma_profiles
import gemma_profiles_autoload as autoload
from gemma_profiles.errors import StateError
from gemma_profiles.runtime import session, state

HERE = Path(__file__).parent
CONSOLE_SCRIPT = Path(sys.executable).with_name("gemma-profile")
HEAVY = ("gemma_profiles", "loguru", "pydantic", "yaml", "torch", "pluggy", "gemma")
#: What a fresh interpreter reports about itself: heavy modules loaded, and whether our finder waits.
REPORT = (
    "import json, sys; "
    f"print(json.dumps({{'heavy': sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}), "
    "'finder': [type(f).__name__ for f in sys.meta_path if type(f).__name__ == 'ArmOnGemmaImport']}))"
)


def limited() -> None:
    """Runs in the child: 2 GiB of address space, so an unbounded read fails rather than eating the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def python(code: str, env: dict[str, str], timeout: float = 20, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def gemma_profile(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "gemma_profiles.cli.main"]
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def child_env(isolated_env: Path) -> dict[str, str]:
    """The environment of a child process: this test's state folder, no GEMMA_PROFILE."""
    env = dict(os.environ)
    env.pop("GEMMA_PROFILE", None)
    env["GEMMA_PROFILE_STATE_DIR"] = str(isolated_env / "state")
    return env


@pytest.fixture(autouse=True)
def no_finder_left() -> Iterator[None]:
    """Tests that call `autoload.install` here must not leave the finder in pytest's own import system."""
    yield
    autoload.disarm()


# -- what can sit at the state path ----------------------------------------------------------------

HOSTILE = ("fifo", "dev-zero", "300MB", "not-utf8", "directory", "not-json")


def make_hostile(kind: str, path: Path) -> str:
    """Put ``kind`` at ``path``; return the words the one-line error uses for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
        return "is a FIFO"
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
        return "is a character device"
    if kind == "300MB":
        with open(path, "wb") as handle:  # sparse: a valid start, then 300 MB of nothing on disk
            handle.write(b'{"profile": "t4"}')
            handle.truncate(300 * 2**20)
        return f"is {300 * 2**20} bytes, more than any state this tool writes"
    if kind == "not-utf8":
        path.write_bytes(b'{"profile": "t4\xff\xfe"}')
        return "is not UTF-8 text (byte 15 of 19)"
    if kind == "directory":
        path.mkdir()
        return "is a directory"
    path.write_text("{profile: t4", encoding="utf-8")
    return "is not the JSON this tool writes"


@pytest.mark.parametrize("kind", HOSTILE)
def test_start_up_with_anything_at_the_state_path_is_instant_silent_and_light(kind, child_env):
    make_hostile(kind, state.state_path())
    started = time.monotonic()
    completed = python(REPORT, child_env, preexec_fn=limited)
    elapsed = time.monotonic() - started
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""  # no warning at every interpreter start
    report = json.loads(completed.stdout)
    assert report == {"heavy": [], "finder": ["ArmOnGemmaImport"]}  # armed, to report it when gemma is used
    assert elapsed < 15


@pytest.mark.parametrize("kind", HOSTILE)
def test_current_says_what_is_at_the_state_path_in_one_line(kind, child_env):
    words = make_hostile(kind, state.state_path())
    completed = gemma_profile("current", env=child_env)
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    (line,) = completed.stderr.splitlines()
    assert line.startswith(f"gemma-profile: error: {state.state_path()}: the applied-profile state {words}")
    assert "gemma-profile reset" in line
    assert "t4" not in line.replace(str(state.state_path()), "")  # the file's content is never quoted


@pytest.mark.parametrize("kind", HOSTILE)
def test_reading_a_hostile_state_is_bounded_and_raises(kind, monkeypatch):
    words = make_hostile(kind, state.state_path())
    read: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        assert n <= state.MAX_STATE_BYTES + 1
        data = real_read(fd, n)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting_read)
    with pytest.raises(StateError) as caught:
        state.read_applied()
    assert f"the applied-profile state {words}" in str(caught.value)
    assert sum(read) <= state.MAX_STATE_BYTES + 1
    if kind in ("fifo", "dev-zero", "300MB", "directory"):
        assert read == [], "refused from its stat, never read"


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_model_built_under_a_hostile_state_raises_and_is_never_built_unpatched(kind, gemma, tokenizer_path):
    from gemma_testing import tiny_config

    words = make_hostile(kind, state.state_path())
    assert session.arm_from_environment() is session.current()  # what the finder does when gemma is imported
    with pytest.raises(StateError, match=re.escape(f"the applied-profile state {words}")):
        gemma.model.GemmaForCausalLM(tiny_config(gemma.config, "2b", tokenizer_path, dtype="float32"))


@pytest.mark.parametrize("kind", ["fifo", "not-utf8"])
def test_a_script_under_a_hostile_state_stops_with_our_error(kind, child_env, gemma, tokenizer_path):
    """The real path: the .pth's finder arms when the script imports gemma; the model is refused."""
    words = make_hostile(kind, state.state_path())
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
        "from gemma_testing import tiny_config\n"
        "from gemma import config, model\n"
        f"model.GemmaForCausalLM(tiny_config(config, '2b', {tokenizer_path!r}, dtype='float32'))\n"
        "print('built')\n"
    )
    completed = python(code, child_env, timeout=120)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "built" not in completed.stdout
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gemma_profiles.errors.StateError: {state.state_path()}: the applied-profile state {words}")


# -- arming costs nothing until gemma is imported ---------------------------------------------------


@pytest.mark.parametrize("how", ["GEMMA_PROFILE", "applied"])
def test_an_armed_profile_imports_nothing_at_start(how, child_env):
    if how == "GEMMA_PROFILE":
        child_env["GEMMA_PROFILE"] = "t4"
    else:
        state.write_applied("t4")
    completed = python(REPORT, child_env)
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr
    assert json.loads(completed.stdout) == {"heavy": [], "finder": ["ArmOnGemmaImport"]}


@pytest.mark.parametrize("value", ["off", "OFF", "no", ""])
def test_no_profile_installs_nothing(value, child_env):
    child_env["GEMMA_PROFILE"] = value
    completed = python(REPORT, child_env)
    assert json.loads(completed.stdout) == {"heavy": [], "finder": []}


def test_importing_the_runtime_arms_the_environment_profile_before_gemma(child_env):
    """A program that asks gemma_profiles first sees the profile GEMMA_PROFILE chose, and `use` gives it back."""
    child_env["GEMMA_PROFILE"] = "t4"
    code = (
        "import json, sys\n"
        "import gemma_profiles\n"
        "from gemma_profiles.runtime import session as runtime\n"
        "before = (runtime.current().label, runtime.current().source)\n"
        "with gemma_profiles.use('cpu-32gb'):\n"
        "    inside = runtime.current().label\n"
        "after = runtime.current().label\n"
        "print(json.dumps([before, inside, after, 'torch' in sys.modules, 'gemma.model' in sys.modules]))\n"
    )
    completed = python(code, child_env, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == [["t4", "env"], "cpu-32gb", "t4", False, False]


def test_deactivating_before_gemma_is_imported_is_the_programs_choice(child_env, gemma, tokenizer_path, cpu_fp16):
    child_env["GEMMA_PROFILE"] = str(cpu_fp16)
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
        "import gemma_profiles\n"
        "gemma_profiles.deactivate()\n"
        "import torch\n"
        "from gemma_testing import tiny_config\n"
        "from gemma import config, model\n"
        f"m = model.GemmaForCausalLM(tiny_config(config, '2b', {tokenizer_path!r}, dtype='float32'))\n"
        "print(next(m.parameters()).dtype)\n"
    )
    completed = python(code, child_env, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "torch.float32"


def test_a_profile_armed_by_the_finder_patches_gemma_imported_after_start(child_env, gemma, tokenizer_path, cpu_fp16):
    child_env["GEMMA_PROFILE"] = str(cpu_fp16)
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
        "from gemma_testing import tiny_config\n"
        "import gemma.gemma3_model\n"  # the second patched module first: still armed once, both patched
        "from gemma import config, model\n"
        f"m = model.GemmaForCausalLM(tiny_config(config, '2b', {tokenizer_path!r}, dtype='float32'))\n"
        "print(next(m.parameters()).dtype, [type(f).__name__ for f in sys.meta_path].count('ArmOnGemmaImport'))\n"
    )
    completed = python(code, child_env, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["torch.float16", "0"]


@pytest.fixture
def cpu_fp16(write_profile: Callable[..., Path]) -> Path:
    return write_profile(
        "cpu-fp16",
        "name: cpu-fp16\ndescription: float16 on the CPU\nplacement: {device: cpu}\nconfig: {dtype: float16}\n",
    )


# -- manners: loguru and sys.excepthook stay the program's --------------------------------------------


def test_loguru_stays_the_programs(child_env, gemma, tokenizer_path, cpu_fp16):
    """(a) logger.remove(0) still works after a profile is armed and used, (b) our line is printed once,
    (c) the program's own records and sinks see nothing of ours."""
    child_env["GEMMA_PROFILE"] = str(cpu_fp16)
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r})\n"
        "from loguru import logger\n"
        "from gemma_testing import tiny_config\n"
        "from gemma import config, model\n"
        "logger.info('program-before')\n"
        f"model.GemmaForCausalLM(tiny_config(config, '2b', {tokenizer_path!r}, dtype='float32'))\n"
        "logger.remove(0)\n"  # loguru's default handler is still the program's to remove
        "mine = []\n"
        "logger.add(mine.append, level='TRACE')\n"
        "logger.info('program-after')\n"
        f"model.GemmaForCausalLM(tiny_config(config, '2b', {tokenizer_path!r}, dtype='float32'))\n"
        "print(json.dumps([str(m) for m in mine]))\n"
    )
    completed = python(code, child_env, timeout=120)
    assert completed.returncode == 0, completed.stderr
    rewrite = "config.dtype: 'float32' -> 'float16'"
    ours = [line for line in completed.stderr.splitlines() if rewrite in line]
    assert len(ours) == 2, completed.stderr  # one line per model built, none doubled by loguru's default handler
    assert all(line.startswith("gemma-profiles | INFO | [cpu-fp16] ") for line in ours)
    assert completed.stderr.count("program-before") == 1  # the program's record, by its default handler
    assert "program-after" not in completed.stderr  # that handler was removed, as the program asked
    mine = json.loads(completed.stdout)
    assert len(mine) == 1 and "program-after" in mine[0]  # and nothing of ours in the program's sink


def test_activation_leaves_loguru_handlers_and_levels_alone():
    from loguru import logger

    sink = logger.add(lambda message: None)
    try:
        gemma_profiles.activate("cpu-32gb")
        logger.remove(sink)  # still there, still the program's
    finally:
        gemma_profiles.deactivate()
    from gemma_profiles import log

    assert log.INDEPENDENT, "our records go to a logger of our own (loguru's internals changed?)"
    assert log.logger is not logger


def test_activation_leaves_sys_excepthook_alone(child_env, gemma):
    """In a fresh interpreter (an earlier activation in this process could hide a replaced hook)."""
    child_env["GEMMA_PROFILE"] = "cpu-32gb"
    code = (
        "import json, sys\n"
        "def mine(*args): pass\n"
        "sys.excepthook = mine\n"
        "import gemma.model\n"  # the .pth's finder arms GEMMA_PROFILE here
        "armed = sys.excepthook is mine\n"
        "import gemma_profiles\n"
        "gemma_profiles.activate('t4')\n"
        "print(json.dumps([armed, sys.excepthook is mine]))\n"
    )
    completed = python(code, child_env, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == [True, True]


def test_no_module_logs_through_the_programs_loguru_logger():
    """Every module logs through gemma_profiles.log.logger: loguru's global one is the program's."""
    root = HERE.parent
    offenders = [
        str(path.relative_to(root))
        for folder in ("gemma_profiles", "hooks")
        for path in sorted((root / folder).rglob("*.py"))
        if path.name not in ("log.py", "__init__.py")  # __init__ only disables our name in the program's logger
        and "from loguru import logger" in path.read_text(encoding="utf-8")
    ]
    assert offenders == [], "use 'from gemma_profiles.log import logger' in: " + ", ".join(offenders)


# -- GEMMA_PROFILE_STATE_DIR --------------------------------------------------------------------------


def test_a_state_dir_under_home_expands_and_current_agrees_from_anywhere(tmp_path, child_env):
    home = tmp_path / "home"
    home.mkdir()
    child_env.update(HOME=str(home), GEMMA_PROFILE_STATE_DIR="~/st")
    applied = gemma_profile("apply", "t4", env=child_env)
    assert applied.returncode == 0, applied.stderr
    assert (home / "st" / "applied.json").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "gemma_profiles.cli.main"]
    current = subprocess.run(
        [*command, "current", "--json"], env=child_env, cwd=elsewhere, capture_output=True, text=True, timeout=60
    )
    assert current.returncode == 0, current.stderr
    data = json.loads(current.stdout)
    assert (data["profile"], data["source"]) == ("t4", "applied")
    assert str(home / "st" / "applied.json") in data["detail"]
    assert not (tmp_path / "~").exists() and not (elsewhere / "~").exists()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("st", " is a relative path"),
        ("./st", " is a relative path"),
        ("~nosuchuser-gp/st", ": cannot expand '~nosuchuser-gp' (no such user here)"),
    ],
)
def test_a_state_dir_no_process_could_agree_on_is_refused_in_one_line(value, words, tmp_path, child_env):
    child_env["GEMMA_PROFILE_STATE_DIR"] = value
    for command in (["apply", "t4"], ["current"], ["reset"]):
        completed = subprocess.run(
            [sys.executable, "-m", "gemma_profiles.cli.main", *command],
            env=child_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert completed.returncode == 2, (command, completed.stdout, completed.stderr)
        (line,) = completed.stderr.splitlines()
        assert line.startswith(f"gemma-profile: error: GEMMA_PROFILE_STATE_DIR={value!r}{words}"), line
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere
    start = python(REPORT, child_env, cwd=tmp_path)
    assert start.returncode == 0 and start.stderr == ""
    assert json.loads(start.stdout)["finder"] == ["ArmOnGemmaImport"]  # so gemma says so instead of building plain


def test_a_bad_state_dir_is_raised_when_a_model_is_built(monkeypatch, gemma, tokenizer_path):
    from gemma_testing import tiny_config

    monkeypatch.setenv("GEMMA_PROFILE_STATE_DIR", "relative/st")
    session.arm_from_environment()
    with pytest.raises(StateError, match=r"GEMMA_PROFILE_STATE_DIR='relative/st' is a relative path"):
        gemma.model.GemmaForCausalLM(tiny_config(gemma.config, "2b", tokenizer_path, dtype="float32"))


def test_state_dir_values(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GEMMA_PROFILE_STATE_DIR", "~/a/../st")
    assert state.state_path() == tmp_path / "st" / "applied.json"
    monkeypatch.setenv("GEMMA_PROFILE_STATE_DIR", "   ")
    assert state.state_path() == Path(sys.prefix) / "etc" / "gemma-profiles" / "applied.json"
    monkeypatch.setenv("GEMMA_PROFILE_STATE_DIR", "st")
    with pytest.raises(StateError, match="set it to an absolute path, or unset it"):
        state.state_path()
    assert autoload.wanted() is True  # never raises at start: a wrong value is reported when gemma is used
