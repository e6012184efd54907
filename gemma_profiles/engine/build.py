"""The native CPU kernels' build and cache, and the one decision whether they run (no torch).

The C files in ``csrc/`` are compiled once per source version with the system C compiler
(``$CC``, else ``cc``; ``-O3 -fopenmp``) into the user cache
(``~/.cache/gemma-profiles/native/``) and reused by every later process; the torch side
(`gemma_profiles.engine.native`) loads them from here.  ``GEMMA_PROFILE_NATIVE=0`` turns
them off.

The cache never runs a library it did not build (docs/engine-safety.md):

- a library is named ``cpu_kernels-<key>-<sha256 of its bytes>.so`` (the key: the sources,
  the compiler's path and the flags); its bytes are read and checked against the name
  before anything is loaded, and loaded from that checked copy (a ``memfd``), so a
  truncated, damaged or replaced file is removed and rebuilt, never ``dlopen``-ed, and a
  file changed later cannot reach a running process;
- a build writes ``cpu_kernels-<key>.<pid>.<random>.partial``, checks that the result is
  a whole ELF library with the kernels' entry points, and renames it into place
  (atomic); builds in one folder take turns (``flock`` on the folder);
- the compiler runs in its own process group with a time limit
  (``GEMMA_PROFILE_NATIVE_BUILD_TIMEOUT``, seconds, default 120); past it the whole
  group is killed;
- a failed build leaves no output; ``.partial`` files of builds that died are removed by
  the next build; the failure itself is remembered (``cpu_kernels-<key>.failed``, one line)
  for an hour or until the compiler changes, so later processes fall back at once instead
  of waiting for the same compiler again.

Whether the int8 kernel runs is decided once, by `int8_verdict`, for the engine and the
planner alike (the planner counts less memory for an int8 model whose kernel runs): the
switch and the architecture, the CPU's ISA (the flags of `INT8_CPU_FLAGS`, which
``gp_int8_supported`` checks with ``cpuid``), and the library: this process's outcome once
the engine has tried to load it, else a compiler and no failure the cache remembers.  No
torch here, so the planner may ask without importing it; nothing is built by asking.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import re
import secrets
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gemma_profiles.settings as settings
from gemma_profiles.engine.pages import process_alive
from gemma_profiles.log import logger

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "int8_matmul.c", CSRC / "bf16_matmul.c", CSRC / "decode.c")
HEADERS = (CSRC / "common.h",)
#: ``0`` turns the native kernels off (the engine computes with torch's).
ENV = settings.NATIVE.name
#: Seconds one build may take before the compiler's process group is killed.
BUILD_TIMEOUT_ENV = settings.NATIVE_BUILD_TIMEOUT.name
BUILD_TIMEOUT = 120.0
#: Seconds a failed build is remembered (later processes fall back without building again).
FAILURE_MEMORY = 3600.0
#: Linux ``/proc/cpuinfo`` flags of a CPU the int8 kernel runs on: AVX2 (its float32 path;
#: ``gp_int8_supported`` also checks FMA, which every AVX2 CPU from Intel and AMD has), or
#: AVX-512 VNNI and the later extensions every CPU with it also has (its integer path).
VNNI_CPU_FLAGS = ("avx512_vnni", "avx512_bf16", "amx_bf16")
INT8_CPU_FLAGS = ("avx2", *VNNI_CPU_FLAGS)
_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")
_PREFIX = "cpu_kernels-"
#: A cached file larger than this is not our library (it is about 60 KiB).
_MAX_LIBRARY_BYTES = 64 << 20
_PARTIAL = re.compile(r"cpu_kernels-(?P<key>[0-9a-f]{16})\.(?P<pid>\d+)\.[0-9a-f]+\.partial")


class Unavailable(Exception):
    """Why the native kernel cannot be used here (one line)."""


def _cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("gemma-profiles")) / "native"


def build_timeout() -> float:
    """The build's time limit in seconds: ``GEMMA_PROFILE_NATIVE_BUILD_TIMEOUT``, else 120."""
    raw = settings.NATIVE_BUILD_TIMEOUT.raw()
    if not raw:
        return BUILD_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= 86400:  # NaN fails too
        shown = raw if len(raw) <= 40 and raw.isprintable() else repr(raw[:40])
        raise Unavailable(f"{BUILD_TIMEOUT_ENV}={shown} is not a number of seconds (0 < s <= 86400)")
    return value


def build(compiler: str | None = None, folder: Path | None = None, *, timeout: float | None = None) -> Path:
    """Compile the kernels (once per source and compiler) or find them built; returns the library's path.

    :param timeout: seconds the compiler may run (default `build_timeout`).
    :raises Unavailable: no compiler, the build failed or timed out, or the cache is not writable.
    """
    return _obtain(compiler, folder, timeout)[0]


def _compiler(compiler: str | None = None) -> tuple[str, str]:
    """The compiler asked for (``compiler``, else ``$CC``, else ``cc``) and its path.

    :raises Unavailable: it is not found.
    """
    cc = compiler or os.environ.get("CC") or "cc"
    path = shutil.which(cc)
    if path is None:
        raise Unavailable(f"no C compiler ('{cc}' not found; set CC)")
    return cc, path


def cache_key(compiler: str) -> str:
    """What a library is built from: the sources, the compiler's path and the flags (16 hex digits)."""
    source = b"".join(file.read_bytes() for file in (*SOURCES, *HEADERS))
    return hashlib.sha256(source + compiler.encode() + " ".join(_FLAGS).encode()).hexdigest()[:16]


def _obtain(compiler: str | None, folder: Path | None, timeout: float | None) -> tuple[Path, bytes]:
    """The library's path and its checked bytes, built when the cache has no good copy."""
    cc, path = _compiler(compiler)
    key = cache_key(path)
    folder = folder or _cache_dir()
    found = _checked(folder, key, remove=False)
    if found is not None:
        return found
    _remembered_failure(folder, key, path)
    limit = build_timeout() if timeout is None else timeout
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unavailable(f"cannot create the kernel cache {folder}: {exc.strerror or exc}") from exc
    with _builders_take_turns(folder, limit + 30):
        found = _checked(folder, key, remove=True)  # another process may have built it meanwhile
        if found is not None:
            return found
        _remembered_failure(folder, key, path)
        _remove_stale(folder, key)
        try:
            built = _compile(path, cc, folder, key, limit)
        except Unavailable as exc:
            with contextlib.suppress(OSError):
                (folder / f"{_PREFIX}{key}.failed").write_text(f"{exc}\n")
            raise
        with contextlib.suppress(OSError):
            (folder / f"{_PREFIX}{key}.failed").unlink()
        return built


def _checked(folder: Path, key: str, *, remove: bool) -> tuple[Path, bytes] | None:
    """A cached library for ``key`` whose bytes match the digest in its name (and are a whole ELF file).

    :param remove: delete the ones that do not match (done under the builders' lock).
    """
    try:
        candidates = sorted(folder.glob(f"{_PREFIX}{key}-*.so"))
    except OSError:
        return None
    for candidate in candidates:
        digest = candidate.name[len(_PREFIX) + len(key) + 1 : -len(".so")]
        try:
            with open(candidate, "rb") as handle:
                data = handle.read(_MAX_LIBRARY_BYTES + 1)
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == digest and _elf_problem(data) is None:
            return candidate, data
        if remove:
            with contextlib.suppress(OSError):
                candidate.unlink()
            logger.warning(
                "native kernels: {} did not match the digest in its name ({} bytes; damaged or replaced): "
                "removed, building again",
                candidate,
                len(data),
            )
    if remove:  # the cache's old naming, without a digest: never loaded now
        with contextlib.suppress(OSError):
            (folder / f"{_PREFIX}{key}.so").unlink()
    return None


def _elf_problem(data: bytes) -> str | None:
    """Why ``data`` is not a whole 64-bit little-endian ELF file (``dlopen`` of a truncated one: SIGBUS)."""
    if len(data) > _MAX_LIBRARY_BYTES:
        return f"over {_MAX_LIBRARY_BYTES >> 20} MiB"
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return "not an ELF file"
    if data[4:6] != b"\x02\x01":
        return "not a 64-bit little-endian ELF file"
    ph_offset, sh_offset = struct.unpack_from("<QQ", data, 32)
    ph_size, ph_count, sh_size, sh_count = struct.unpack_from("<HHHH", data, 54)
    if ph_offset + ph_size * ph_count > len(data) or sh_offset + sh_size * sh_count > len(data):
        return f"truncated ({len(data)} bytes; its headers end past that)"
    for index in range(ph_count):
        kind, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", data, ph_offset + index * ph_size)
        if kind == 1 and offset + size > len(data):  # PT_LOAD
            return f"truncated ({len(data)} bytes; a segment ends at {offset + size})"
    return None


def _remembered_failure(folder: Path, key: str, compiler: str) -> None:
    """Raise the last build's failure while it is recent and the compiler has not changed since."""
    memo = folder / f"{_PREFIX}{key}.failed"
    try:
        when = memo.stat().st_mtime
        if time.time() - when > FAILURE_MEMORY or os.stat(compiler).st_mtime > when:
            return
        with open(memo, encoding="utf-8", errors="replace") as handle:
            reason = "".join(c if c.isprintable() else "?" for c in handle.readline(300).strip())
    except OSError:
        return
    since = time.strftime("%H:%M", time.localtime(when))
    raise Unavailable(f"{reason} (remembered from {since}; delete {memo} to retry)")


@contextlib.contextmanager
def _builders_take_turns(folder: Path, wait: float) -> Iterator[None]:
    """One build at a time in ``folder`` (``flock`` on the folder itself: no lock file to leave behind)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic renames still keep every library whole
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        raise Unavailable(f"cannot open the kernel cache {folder}: {exc.strerror or exc}") from exc
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"another process has been building the CPU kernels in {folder} for over {wait:g} s"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_stale(folder: Path, key: str) -> None:
    """Remove ``.partial`` files no build is writing (called with the builders' lock held).

    This key's are all stale (its builder would hold the lock); another key's when the
    process that wrote it is gone; the old naming's (``*.so.partial``, no pid) after a day.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = _PARTIAL.fullmatch(entry.name)
        try:
            if match is not None:
                dead = not process_alive(int(match["pid"]))
                stale = match["key"] == key or dead or now - entry.stat().st_mtime > 86400
            else:
                stale = entry.name.startswith(_PREFIX) and entry.name.endswith(".so.partial")
                stale = stale and now - entry.stat().st_mtime > 86400
            if stale:
                os.unlink(entry.path)
        except OSError:
            continue


def _compile(compiler: str, cc: str, folder: Path, key: str, limit: float) -> tuple[Path, bytes]:
    """Build into a ``.partial`` file, check it, rename it to its digest's name; nothing left on failure."""
    partial = folder / f"{_PREFIX}{key}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    try:
        _run_compiler([compiler, *_FLAGS, "-o", str(partial), *map(str, SOURCES)], cc, limit)
        try:
            with open(partial, "rb") as handle:
                data = handle.read(_MAX_LIBRARY_BYTES + 1)
        except OSError as exc:
            raise Unavailable(f"building the CPU kernels with {cc} wrote no library: {exc.strerror or exc}") from exc
        problem = _elf_problem(data)
        if problem is not None:
            raise Unavailable(f"building the CPU kernels with {cc} gave no usable library: {problem}")
        digest = hashlib.sha256(data).hexdigest()
        library = folder / f"{_PREFIX}{key}-{digest}.so"
        try:
            _open(data, digest, partial)  # loads, and has every entry point
        except (OSError, AttributeError) as exc:
            raise Unavailable(f"building the CPU kernels with {cc} gave no usable library: {exc}") from exc
        try:
            os.replace(partial, library)  # atomic: a reader sees no library or a whole one
        except OSError as exc:
            raise Unavailable(f"cannot write the kernel cache {folder}: {exc.strerror or exc}") from exc
        return library, data
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()


def _run_compiler(command: list[str], cc: str, limit: float) -> None:
    """Run the compiler in a new process group; past ``limit`` seconds kill the group, whatever it spawned."""
    with tempfile.TemporaryFile() as output:  # a file, not a pipe: nothing left behind can hold us up
        try:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True
            )
        except OSError as exc:
            raise Unavailable(f"building the CPU kernels with {cc} failed: {exc.strerror or exc}") from exc
        try:
            status = _wait(process, limit)
        finally:
            # The leader is still unreaped here (waitid WNOWAIT), so its group id cannot be reused.
            if hasattr(os, "killpg"):
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait()
        if status is None:
            raise Unavailable(
                f"building the CPU kernels with {cc} took over {limit:g} s: stopped it "
                f"(set {BUILD_TIMEOUT_ENV} on a slow machine)"
            )
        if status != 0:
            output.seek(0)
            text = output.read(64 << 10).decode(errors="replace")
            first = next((line for line in text.splitlines() if "error" in line), text.strip()[:200])
            first = "".join(c if c.isprintable() else "?" for c in first.strip()) or f"exit status {status}"
            raise Unavailable(f"building the CPU kernels with {cc} failed: {first}")


def _wait(process: subprocess.Popen[bytes], limit: float) -> int | None:
    """The exit status, or None past ``limit`` seconds; the process is left unreaped where waitid exists."""
    deadline = time.monotonic() + limit
    delay = 0.005
    while True:
        if hasattr(os, "waitid"):
            try:
                result = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler): ask Popen
                result, code = None, process.poll()
                if code is not None:
                    return code
            if result is not None:
                return result.si_status if result.si_code == os.CLD_EXITED else -result.si_status
        else:
            code = process.poll()
            if code is not None:
                return code
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.1)


#: Libraries loaded in this process, by the digest of their bytes (loaded once each).
_LOADED: dict[str, ctypes.CDLL] = {}


def _open(data: bytes, digest: str, path: Path) -> ctypes.CDLL:
    """``dlopen`` the checked bytes through a ``memfd``, so a file changed afterwards cannot reach us.

    The descriptor stays open: glibc finds an already loaded library by its name, and
    ``/proc/self/fd/N`` of a closed descriptor would be reused for the next one.  Where
    there is no ``memfd`` (or it is not executable) the checked file itself is loaded.
    """
    if digest in _LOADED:
        return _LOADED[digest]
    library: ctypes.CDLL | None = None
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create(f"gemma-profiles-kernels-{digest[:12]}.so", getattr(os, "MFD_CLOEXEC", 1))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            library = ctypes.CDLL(f"/proc/self/fd/{fd}")
        except OSError:
            os.close(fd)
    if library is None:
        library = ctypes.CDLL(str(path))
    _declare(library)
    _LOADED[digest] = library
    return library


def _not_here() -> str | None:
    """Why the kernels are not even tried here (switched off, not x86-64), or None."""
    if not settings.switch(settings.NATIVE):
        return f"turned off ({ENV}=0)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"x86-64 AVX2/AVX-512 kernels; this CPU is {platform.machine() or 'unknown'}"
    return None


#: This process's outcome of `_load`, once tried: None (the library is loaded) or why not.
_outcome: dict[str, str | None] = {}


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | str:
    """The loaded library, or why not (cached for the process; `int8_verdict` reads the outcome)."""
    result = _try_load()
    _outcome["library"] = result if isinstance(result, str) else None
    return result


def _try_load() -> ctypes.CDLL | str:
    reason = _not_here()
    if reason is not None:
        return reason
    try:
        path, data = _obtain(None, None, None)
        return _open(data, hashlib.sha256(data).hexdigest(), path)
    except Unavailable as exc:
        return str(exc)
    except (OSError, AttributeError) as exc:
        return f"loading the built kernels failed: {exc}"


def _declare(library: ctypes.CDLL) -> None:
    """Argument and result types of every entry point (ctypes would guess ``int``)."""
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures: dict[str, tuple[Any, tuple[Any, ...]]] = {
        "gp_int8_supported": (i32, ()),
        # 1: AVX-512 VNNI, 2: AVX2 + FMA, 0: neither
        "gp_int8_path": (i32, ()),
        "gp_decode_supported": (i32, ()),
        # 1: AVX-512 F/BW/VL, 2: AVX2 + FMA, 0: neither; gp_decode_use(2) forces the AVX2 path
        # (tests, on an AVX-512 CPU), gp_decode_use(0) goes back to the CPU's best
        "gp_decode_path": (i32, ()),
        "gp_decode_use": (i32, (i32,)),
        # x (float32), n, y: e^x with the kernels' own exp (tests)
        "gp_exp": (None, (p, i64, p)),
        "gp_bf16_supported": (i32, ()),
        # x (bfloat16), rows, k, w (bfloat16, n x k), n, y (bfloat16)
        "gp_bf16_matmul": (i32, (p, i64, i64, p, i64, p)),
        # x, x is bfloat16, rows, k, q (int8 out), scale (float32 out)
        "gp_int8_quantize_rows": (None, (p, i32, i64, i64, p, p)),
        "gp_int8_row_sums": (None, (p, i64, i64, p)),
        # x, x is bfloat16, rows of x, k, packed w, n, scale, row sums, y, y is bfloat16
        "gp_int8_matmul": (i32, (p, i32, i64, i64, p, i64, i64, p, p, p, i32)),
        # packed w, n, k, chunk columns, scale, y, y is bfloat16
        "gp_int8_dequantize": (None, (p, i64, i64, i64, p, p, i32)),
        # x, x is bfloat16, rows of x, k, packed w, n, kc, group scales, group, y, y is bfloat16
        "gp_int8_matmul_grouped": (i32, (p, i32, i64, i64, p, i64, i64, p, i64, p, i32)),
        # packed w, n, k, kc, group scales, group, y, y is bfloat16
        "gp_int8_dequantize_grouped": (i32, (p, i64, i64, i64, p, i64, p, i32)),
        # x, x is bfloat16, rows, d, w, w is bfloat16, offset, eps, y
        "gp_rms_norm": (None, (p, i32, i64, i64, p, i32, f32, f32, p)),
        # gate, up, bfloat16, n, y
        "gp_gelu_mul": (None, (p, p, i32, i64, p)),
        # q/k/v with batch and token strides, batch, len, heads, kv heads, head dim, freqs,
        # positions, k cache, v cache, max seq, mask with strides, scaling, softcap, bfloat16, out
        "gp_attend": (i32, (*(p, i64, i64) * 3, *(i64,) * 5, p, p, p, p, i64, p, i64, i64, f32, f32, i32, p)),
        "gp_argmax": (None, (p, i32, i64, i64, p)),
    }
    for name, (result, arguments) in signatures.items():
        function = getattr(library, name)
        function.restype, function.argtypes = result, arguments


# -- the one decision -----------------------------------------------------------------


def reset() -> None:
    """Forget the loaded library and its outcome (tests switch ``GEMMA_PROFILE_NATIVE``/``CC``)."""
    _load.cache_clear()
    _outcome.clear()


def _remembered_build_failure() -> str | None:
    """Why the compiler asked for is missing or its last build failed (remembered), without building."""
    try:
        _, path = _compiler()
        _remembered_failure(_cache_dir(), cache_key(path), path)
    except Unavailable as exc:
        return str(exc)
    except OSError as exc:  # the sources unreadable: the engine's build would fail too
        return f"cannot read the kernel sources: {exc.strerror or exc}"
    return None


def int8_verdict(isa: tuple[str, ...]) -> str | None:
    """None when the native int8 kernel runs (or will, once built) on a CPU with the ISA flags ``isa``;
    else why not, in one line.  The planner's estimate asks this
    (`gemma_profiles.planning.hardware.native_int8_expected`); the engine's `native.unavailable`
    is the same library outcome and ``gp_int8_supported``'s ``cpuid`` check of the same instructions.

    In order: the switch and the architecture; ``isa`` (the detected or described CPU's flags);
    then the library - this process's outcome once the engine has loaded it or failed to
    (a failed build, a library that would not load), else a compiler to build it with and no
    build failure the cache remembers.  Nothing is built by asking.
    """
    reason = _not_here()
    if reason is not None:
        return reason
    if not any(flag in isa for flag in INT8_CPU_FLAGS):
        return "this CPU lacks AVX2 (and AVX-512 VNNI)"
    if "library" in _outcome:
        return _outcome["library"]
    return _remembered_build_failure()
