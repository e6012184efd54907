"""The applied-profile state: atomic writes, corrupt files ignored, env var first."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from gemma_profiles.errors import StateError
from gemma_profiles.runtime import state
from gemma_profiles.runtime.state import active_reference, clear_applied, read_applied, state_path, write_applied


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "applied.json")


def test_state_lives_under_the_state_dir(isolated_env):
    assert state_path() == isolated_env / "state" / "applied.json"


def test_write_read_clear_round_trip():
    assert read_applied() is None
    path = write_applied("t4")
    assert path == state_path()
    assert json.loads(path.read_text(encoding="utf-8"))["profile"] == "t4"
    assert read_applied() == "t4"
    write_applied("/abs/path/mine.yaml")
    assert read_applied() == "/abs/path/mine.yaml"
    assert leftovers(path.parent) == []
    assert clear_applied() is True
    assert not path.exists()
    assert read_applied() is None
    assert clear_applied() is False


def test_active_reference_precedence(monkeypatch):
    assert active_reference().source == "none"
    assert active_reference().reference is None

    write_applied("t4")
    active = active_reference()
    assert (active.reference, active.source) == ("t4", "applied")
    assert str(state_path()) in active.detail

    monkeypatch.setenv("GEMMA_PROFILE", "cpu-32gb")
    active = active_reference()
    assert (active.reference, active.source) == ("cpu-32gb", "env")
    assert "GEMMA_PROFILE=cpu-32gb" in active.detail


@pytest.mark.parametrize("value", ["off", "OFF", "none", "0", "false", "no"])
def test_env_off_values_turn_profiles_off_even_when_applied(monkeypatch, value):
    write_applied("t4")
    monkeypatch.setenv("GEMMA_PROFILE", value)
    active = active_reference()
    assert active.reference is None
    assert active.source == "env"


def test_blank_env_falls_through_to_applied(monkeypatch):
    write_applied("t4")
    monkeypatch.setenv("GEMMA_PROFILE", "   ")
    assert active_reference().source == "applied"


@pytest.mark.parametrize(
    "text",
    ["not json at all", '{"applied_at": "yesterday"}', '{"profile": ""}', '{"profile": 42}', '["t4"]', "", "{"],
    ids=["not-json", "no-profile", "empty-profile", "number", "list", "empty-file", "truncated"],
)
def test_corrupt_state_is_a_state_error_naming_the_file(text):
    """The user applied a profile: a broken state must not read as 'nothing applied' (gemma would build unpatched)."""
    path = state_path()
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")
    for read in (read_applied, active_reference):
        with pytest.raises(StateError) as caught:
            read()
        message = str(caught.value)
        assert message.startswith(f"{path}: the applied-profile state is not the JSON this tool writes")
        assert "gemma-profile reset" in message and "\n" not in message
    write_applied("t4")  # and a new apply repairs it
    assert read_applied() == "t4"


def test_a_directory_at_the_state_path_is_a_state_error():
    state_path().mkdir(parents=True)
    with pytest.raises(StateError, match=r"the applied-profile state is a directory, not a file this tool wrote"):
        read_applied()


def test_gemma_profile_set_wins_over_a_broken_state(monkeypatch):
    state_path().parent.mkdir(parents=True)
    state_path().write_bytes(b"\xff\xfe")
    monkeypatch.setenv("GEMMA_PROFILE", "cpu-32gb")
    assert active_reference().reference == "cpu-32gb"
    monkeypatch.setenv("GEMMA_PROFILE", "off")
    assert active_reference().reference is None


def test_failed_replace_keeps_the_old_state(monkeypatch):
    write_applied("t4")
    before = state_path().read_text(encoding="utf-8")

    def refuse(src: str, dst: str) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as patch, pytest.raises(StateError) as caught:
        patch.setattr(state.os, "replace", refuse)
        write_applied("cpu-32gb")

    message = str(caught.value)
    assert "\n" not in message
    assert "Permission denied" in message
    assert str(state_path()) in message
    assert "GEMMA_PROFILE" in message  # says what to do instead
    assert state_path().read_text(encoding="utf-8") == before
    assert read_applied() == "t4"
    assert leftovers(state_path().parent) == []


def test_failed_write_keeps_the_old_state(monkeypatch):
    write_applied("t4")

    def fail_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch, pytest.raises(StateError, match="No space left"):
        patch.setattr(state.os, "fsync", fail_fsync)
        write_applied("cpu-32gb")
    assert read_applied() == "t4"
    assert leftovers(state_path().parent) == []


def test_interrupted_write_leaves_no_temp_file(monkeypatch):
    write_applied("t4")

    def interrupt(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(state.os, "replace", interrupt)
        write_applied("cpu-32gb")
    assert read_applied() == "t4"
    assert leftovers(state_path().parent) == []


def test_unwritable_state_dir_is_a_state_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv("GEMMA_PROFILE_STATE_DIR", str(blocker / "state"))
    with pytest.raises(StateError) as caught:
        write_applied("t4")
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code != 0


def test_concurrent_applies_leave_a_valid_file():
    values = ("t4", "cpu-32gb")
    write_applied(values[0])
    errors: list[BaseException] = []
    seen: set[str | None] = set()
    stop = threading.Event()

    def writer(value: str) -> None:
        try:
            for _ in range(50):
                write_applied(value)
        except BaseException as exc:  # report in the main thread
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            seen.add(read_applied())

    threads = [threading.Thread(target=writer, args=(value,)) for value in values]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    stop.set()
    watcher.join(timeout=30)

    assert errors == []
    assert read_applied() in values
    assert json.loads(state_path().read_text(encoding="utf-8"))["profile"] in values
    assert seen <= set(values), seen  # a reader never saw a half-written file
    assert leftovers(state_path().parent) == []


def test_state_file_name_matches_the_autoload_hook(isolated_env):
    import gemma_profiles_autoload

    write_applied("t4")
    assert os.path.exists(gemma_profiles_autoload.state_file())
    assert gemma_profiles_autoload.wanted() is True
    clear_applied()
    assert gemma_profiles_autoload.wanted() is False
