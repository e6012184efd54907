"""The native kernels' build cache (engine/build.py) against hostile states of the cache and the compiler.

The kernels need AVX-512 to *run*, but building, checking and loading the library do
not: everything here runs on any x86-64 Linux machine.  Tests that need a library with
the kernels' entry points build the real one once (with ``$CC``, else ``cc``; skipped
without a compiler); the others use fake compilers written as shell scripts.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gemma_profiles.engine import build, native

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"),
    reason="the kernels are built for x86-64 Linux",
)


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test with its own cache (``XDG_CACHE_HOME``) and no build time limit from the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(build.BUILD_TIMEOUT_ENV, raising=False)
    native.reset()
    yield
    native.reset()


def cache(tmp_path: Path) -> Path:
    """``_cache_dir()`` under the test's ``XDG_CACHE_HOME``."""
    return tmp_path / "xdg" / "gemma-profiles" / "native"


def script(path: Path, body: str) -> str:
    """An executable ``sh`` script: a fake compiler.  ``$out`` is its ``-o`` argument."""
    path.write_text(
        '#!/bin/sh\nout=\nfor a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; done\n' + textwrap.dedent(body)
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture(scope="module")
def real_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernels built once by the real compiler (what a good build writes)."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ('{cc}')")
    try:
        return build.build(cc, tmp_path_factory.mktemp("real"))
    except build.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def copying_cc(tmp_path: Path, real_library: Path) -> tuple[str, Path]:
    """A compiler that writes the real library (fast) and counts its runs in a file."""
    runs = tmp_path / "runs"
    return script(tmp_path / "copying-cc", f'echo run >> "{runs}"\ncp "{real_library}" "$out"\n'), runs


def runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def load_in_a_subprocess(cc: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """A fresh process loading the kernels from the test's cache (a SIGBUS kills only it)."""
    env = dict(os.environ, CC=cc, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop(native.ENV, None)
    code = "from gemma_profiles.engine import build\nr = build._load()\nprint(r if isinstance(r, str) else 'loaded')"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def leftovers(folder: Path) -> list[str]:
    """Every file in the cache but checked libraries and the failure record."""
    return sorted(p.name for p in folder.iterdir() if not (p.name.endswith(".failed") or is_checked(p)))


def is_checked(path: Path) -> bool:
    digest = path.name.removesuffix(".so").rsplit("-", 1)[-1]
    return path.suffix == ".so" and hashlib.sha256(path.read_bytes()).hexdigest() == digest


def process_gone(pid: int, wait: float = 5.0) -> bool:
    """True once ``pid`` has exited (a zombie waiting for init counts as gone: it runs nothing)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


# -- a damaged or foreign library in the cache ---------------------------------------------


def test_a_truncated_library_is_built_again_never_loaded(copying_cc: tuple[str, Path], tmp_path: Path) -> None:
    cc, counter = copying_cc
    library = build.build(cc, cache(tmp_path))
    whole = library.read_bytes()
    library.write_bytes(whole[: len(whole) // 2])  # a disk full or a killed copy, as it were
    assert build._checked(cache(tmp_path), library.name.split("-")[1], remove=False) is None, "the digest refuses it"
    done = load_in_a_subprocess(cc, tmp_path)
    assert done.returncode == 0, f"the loading process died ({done.returncode}: -7 is SIGBUS): {done.stderr[-500:]}"
    assert done.stdout.strip() == "loaded"
    assert runs(counter) == 2, "built again"
    assert library.read_bytes() == whole and is_checked(library)
    assert leftovers(cache(tmp_path)) == []


def test_a_foreign_library_at_the_cached_name_is_not_run(copying_cc: tuple[str, Path], tmp_path: Path) -> None:
    """Any library at the cache's name, even a valid one, is replaced by a build before anything loads."""
    cc, counter = copying_cc
    library = build.build(cc, cache(tmp_path))
    source = tmp_path / "foreign.c"
    source.write_text(
        "#include <unistd.h>\n"
        '__attribute__((constructor)) static void hello(void) { write(1, "FOREIGN CODE RAN\\n", 17); }\n'
        "int gp_int8_supported(void) { return 1; }\n"
    )
    foreign = tmp_path / "foreign.so"
    subprocess.run([os.environ.get("CC") or "cc", "-shared", "-fPIC", "-o", str(foreign), str(source)], check=True)
    whole = library.read_bytes()
    for name in (library.name, f"cpu_kernels-{library.name.split('-')[1]}.so"):  # this naming and the old one
        shutil.copyfile(foreign, cache(tmp_path) / name)
    done = load_in_a_subprocess(cc, tmp_path)
    assert "FOREIGN CODE RAN" not in done.stdout, "the foreign library's code ran"
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr[-500:]
    assert runs(counter) == 2 and library.read_bytes() == whole
    assert leftovers(cache(tmp_path)) == [], "the foreign files are gone"


def test_a_library_changed_after_loading_does_not_reach_the_process(
    copying_cc: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process runs the bytes it checked (a memfd copy), not the file: truncating it later is harmless."""
    cc, _ = copying_cc
    monkeypatch.setenv("CC", cc)
    loaded = build._load()
    assert not isinstance(loaded, str), loaded
    (library,) = cache(tmp_path).glob("*.so")
    library.write_bytes(b"")
    assert isinstance(loaded.gp_int8_supported(), int), "still callable: the code is not mapped from the file"


# -- the compiler ----------------------------------------------------------------------------


def test_a_hanging_compiler_is_stopped_with_everything_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = tmp_path / "pids"
    cc = script(tmp_path / "hanging-cc", f'sleep 600 &\necho $! > "{pids}"\necho $$ >> "{pids}"\nsleep 600\n')
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv(build.BUILD_TIMEOUT_ENV, "1.5")
    started = time.monotonic()
    why = native.unavailable()
    took = time.monotonic() - started
    assert why is not None and "hanging-cc took over 1.5 s: stopped it" in why, why
    assert took < 12, f"blocked {took:.1f} s"
    children = [int(line) for line in pids.read_text().split()]
    assert len(children) == 2 and all(process_gone(pid) for pid in children), "the compiler's group was killed"
    assert leftovers(cache(tmp_path)) == [], "no partial output left"
    # Later processes do not wait for the same compiler again: the failure is remembered.
    native.reset()
    started = time.monotonic()
    again = native.unavailable()
    assert again is not None and "took over 1.5 s" in again and "remembered" in again
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('echo "cc1: error: garbage" >&2\nhead -c 5000 /dev/urandom > "$out"\nexit 1\n', "failed: cc1: error: garbage"),
        ('head -c 5000 /dev/urandom > "$out"\nexit 0\n', "gave no usable library: not an ELF file"),
        ('printf "\\177ELF" > "$out"\nhead -c 100 /dev/zero >> "$out"\nexit 0\n', "not a 64-bit little-endian"),
        (": > /dev/null\nexit 0\n", "wrote no library"),
    ],
    ids=["garbage-exit-1", "garbage-exit-0", "not-64-bit", "no-output"],
)
def test_garbage_from_the_compiler_leaves_nothing(tmp_path: Path, body: str, expected: str) -> None:
    folder = cache(tmp_path)
    with pytest.raises(build.Unavailable, match=expected):
        build.build(script(tmp_path / "bad-cc", body), folder)
    assert leftovers(folder) == [], "no output of a failed build stays"
    assert [p.suffix for p in folder.iterdir()] == [".failed"], "only the one-line record of the failure"


def test_a_truncated_build_output_is_refused_not_loaded(real_library: Path, tmp_path: Path) -> None:
    """A compiler that exits 0 with half a library: loading it would be a SIGBUS; it is refused."""
    half = real_library.stat().st_size // 2
    cc = script(tmp_path / "half-cc", f'head -c {half} "{real_library}" > "$out"\n')
    with pytest.raises(build.Unavailable, match=r"gave no usable library: truncated"):
        build.build(cc, cache(tmp_path))
    assert leftovers(cache(tmp_path)) == []


def test_a_remembered_failure_is_retried_when_the_compiler_changes(tmp_path: Path) -> None:
    cc = tmp_path / "cc"
    script(cc, "echo 'error: broken' >&2\nexit 1\n")
    with pytest.raises(build.Unavailable, match=r"failed: error: broken$"):
        build.build(str(cc), cache(tmp_path))
    with pytest.raises(build.Unavailable, match=r"failed: error: broken \(remembered from .*\.failed to retry\)"):
        build.build(str(cc), cache(tmp_path))
    (memo,) = cache(tmp_path).glob("*.failed")
    memo.write_text("building failed: \x1b[31mred\x1b[0m\n")  # our file, yet no control codes reach a terminal
    with pytest.raises(build.Unavailable, match=r"^building failed: \?\[31mred\?\[0m \(remembered"):
        build.build(str(cc), cache(tmp_path))
    later = time.time() + 2
    os.utime(cc, (later, later))  # a newer compiler
    with pytest.raises(build.Unavailable, match=r"failed: error: broken$"):
        build.build(str(cc), cache(tmp_path))


def test_the_time_limit_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "sh")  # found on PATH; never run
    for value in ("soon", "-1", "nan", "0"):
        monkeypatch.setenv(build.BUILD_TIMEOUT_ENV, value)
        native.reset()
        assert native.unavailable() == f"{build.BUILD_TIMEOUT_ENV}={value} is not a number of seconds (0 < s <= 86400)"


# -- leftovers of builds that died, and builds at the same time -------------------------------


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_partial_files_of_dead_builds_are_removed(tmp_path: Path) -> None:
    folder = cache(tmp_path)
    folder.mkdir(parents=True)
    cc = script(tmp_path / "failing-cc", "exit 1\n")
    key = build.cache_key(cc)
    dead, other = dead_pid(), "0123456789abcdef"
    stale = [
        f"cpu_kernels-{key}.{dead}.1a2b.partial",  # this key: no build is running (it would hold the lock)
        f"cpu_kernels-{key}.{os.getpid()}.3c4d.partial",
        f"cpu_kernels-{other}.{dead}.5e6f.partial",  # another version's, its process gone
        f"cpu_kernels-{other}old1234.so.partial",  # the old naming, two days old
    ]
    kept = [f"cpu_kernels-{other}.{os.getpid()}.7a8b.partial", f"cpu_kernels-{other}new5678.so.partial"]
    for name in stale + kept:
        (folder / name).write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    os.utime(folder / stale[-1], (two_days_ago, two_days_ago))
    with pytest.raises(build.Unavailable):
        build.build(cc, folder)
    assert sorted(p.name for p in folder.glob("*.partial")) == sorted(kept)


def test_processes_building_at_once_build_once_and_load_the_same_library(real_library: Path, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    cc = script(tmp_path / "slow-cc", f'echo run >> "{counter}"\nsleep 1\ncp "{real_library}" "$out"\n')
    env = dict(os.environ, CC=cc, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop(native.ENV, None)
    code = "from gemma_profiles.engine import build\nr = build._load()\nprint(r if isinstance(r, str) else 'loaded')"
    processes = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    outputs = [process.communicate(timeout=180)[0].strip() for process in processes]
    assert outputs == ["loaded"] * 4
    assert runs(counter) == 1, "one build; the others waited for it and loaded its library"
    (library,) = cache(tmp_path).iterdir()
    assert is_checked(library) and library.read_bytes() == real_library.read_bytes()


# -- one decision: the planner's estimate and the engine ---------------------------------------

VNNI = ("avx2", "avx512f", "avx512_vnni")


def test_the_planner_and_the_engine_agree_when_the_build_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that is there but cannot build the kernels: before, the planner still expected the
    native int8 kernel (it only looked for a compiler) while the engine fell back to torch's, so the
    estimate counted an int8 embedder that was float32 at run time.  Now the planner reads the
    engine's outcome: in this process once the engine has tried, in a later one from the cache's
    remembered failure - and without building anything itself."""
    from gemma_profiles.planning.hardware import native_int8_expected

    cc = script(tmp_path / "broken-cc", 'echo "cc1: error: no" >&2\nexit 1\n')
    monkeypatch.setenv("CC", cc)
    assert build.int8_verdict(VNNI) is None and native_int8_expected(VNNI), "not tried yet: expected"
    assert not cache(tmp_path).exists(), "asking builds nothing"
    why = native.unavailable()
    assert why is not None and "failed: cc1: error: no" in why, why
    assert build.int8_verdict(VNNI) == why, "the engine's outcome, word for word"
    assert not native_int8_expected(VNNI)
    native.reset()  # a later process: the failure the cache remembers
    remembered = build.int8_verdict(VNNI)
    assert remembered is not None and "failed: cc1: error: no" in remembered and "remembered" in remembered
    assert not native_int8_expected(VNNI)
    assert native.unavailable() == remembered, "the engine reads the same memo"


def test_the_planner_and_the_engine_agree_off_and_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switched off or on another architecture, neither expects the kernel (the planner used to
    expect it on an ARM CPU it was told had VNNI flags)."""
    from gemma_profiles.planning.hardware import native_int8_expected

    monkeypatch.setenv("CC", "sh")  # found on PATH: only the switch and the architecture decide here
    monkeypatch.setenv(native.ENV, "0")
    native.reset()
    assert native.unavailable() == build.int8_verdict(VNNI) == f"turned off ({native.ENV}=0)"
    assert not native_int8_expected(VNNI)
    monkeypatch.delenv(native.ENV)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    native.reset()
    assert native.unavailable() == build.int8_verdict(VNNI) == "x86-64 AVX2/AVX-512 kernels; this CPU is aarch64"
    assert not native_int8_expected(VNNI)


def test_a_cpu_without_avx2_is_never_expected_to_run_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "sh")
    assert build.int8_verdict(("sse4_2",)) == "this CPU lacks AVX2 (and AVX-512 VNNI)"
    assert build.int8_verdict(("avx2", "avx512f")) is None, "AVX2 without VNNI: the float32 path"
    assert build.int8_verdict(("avx2", "avx512f", "avx512_bf16")) is None, "every AVX-512 BF16 CPU has VNNI"
