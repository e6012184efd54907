"""The native CPU kernels (``csrc/``): built on first use, loaded with ctypes.

Torch-touching.  Three parts in one library: the int8 matmul (``csrc/int8_matmul.c``,
used by `gemma_profiles.engine.quantization` on a CPU with AVX-512 VNNI), the bfloat16 matmul
(``csrc/bf16_matmul.c``, used by `gemma_profiles.engine.kernels` on a CPU with AVX-512 BF16) and
the decoder-layer kernels (``csrc/decode.c``, used by `gemma_profiles.engine.fused` on a CPU with
AVX-512).

The C files are compiled once per source version with the system C compiler
(``$CC``, else ``cc``; ``-O3 -fopenmp``) into the user cache
(``~/.cache/gemma-profiles/native/``) and reused by every later process; a
missing compiler, a failed build or a CPU without the instructions leaves the
int8 layers on torch's ``_weight_int8pack_mm``, bfloat16 weights on oneDNN and the layers
on gemma's own forward, with one log line saying why.  ``GEMMA_PROFILE_NATIVE=0`` turns all three off.

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

`Int8Weight` holds one int8 weight in the kernel's layout - blocks of four rows
interleaved 64 bytes at a time, ``[n/4][k/64][4][64]``, zero-padded - with its
per-row scale (float32) and per-row sums; it gives the plain ``(n, k)`` int8 back
for ``state_dict()`` and gathers rows for an embedding lookup.
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

import torch

from gemma_profiles.engine import hugepages
from gemma_profiles.engine.pages import process_alive
from gemma_profiles.log import logger
from gemma_profiles.planning import hardware
from gemma_profiles.planning.hardware import NATIVE_ENV

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "int8_matmul.c", CSRC / "bf16_matmul.c", CSRC / "decode.c")
HEADERS = (CSRC / "common.h",)
ENV = NATIVE_ENV
#: Seconds one build may take before the compiler's process group is killed.
BUILD_TIMEOUT_ENV = "GEMMA_PROFILE_NATIVE_BUILD_TIMEOUT"
BUILD_TIMEOUT = 120.0
#: Seconds a failed build is remembered (later processes fall back without building again).
FAILURE_MEMORY = 3600.0
#: The kernel's int32 partial sums stay exact up to this reduction length.
MAX_K = 32768
#: Rows of activations from which `Int8Weight.matmul` dequantizes and uses a float GEMM
#: (benchmarks/int8_rows.py on the 2-core AVX-512 box: the kernel is 0.83x the GEMM's time at
#: 128 rows, 1.4x at 256, 4.8x at 1024).  In `hardware` because the planner counts the copy.
DEQUANTIZE_ROWS = hardware.DEQUANTIZE_ROWS
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
    raw = os.environ.get(BUILD_TIMEOUT_ENV, "").strip()
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


def cache_key(compiler: str) -> str:
    """What a library is built from: the sources, the compiler's path and the flags (16 hex digits)."""
    source = b"".join(file.read_bytes() for file in (*SOURCES, *HEADERS))
    return hashlib.sha256(source + compiler.encode() + " ".join(_FLAGS).encode()).hexdigest()[:16]


def _obtain(compiler: str | None, folder: Path | None, timeout: float | None) -> tuple[Path, bytes]:
    """The library's path and its checked bytes, built when the cache has no good copy."""
    cc = compiler or os.environ.get("CC") or "cc"
    path = shutil.which(cc)
    if path is None:
        raise Unavailable(f"no C compiler ('{cc}' not found; set CC)")
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


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | str:
    """The loaded library, or why not (cached for the process)."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return f"turned off ({ENV}=0)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"x86-64 AVX-512 kernels; this CPU is {platform.machine() or 'unknown'}"
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
        "gp_decode_supported": (i32, ()),
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


def _where(supported: str, lacking: str) -> ctypes.CDLL | str:
    """The library when its ``supported()`` entry point says this CPU runs that part; else why not."""
    library = _load()
    if isinstance(library, str):
        return library
    return library if getattr(library, supported)() else f"this CPU lacks {lacking}"


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | str:
    """The library for the int8 kernel, or why not."""
    return _where("gp_int8_supported", "AVX-512 VNNI")


@functools.lru_cache(maxsize=1)
def decode_library() -> ctypes.CDLL | str:
    """The library for the decoder-layer kernels (`gemma_profiles.engine.fused`), or why not."""
    return _where("gp_decode_supported", "AVX-512 (F, BW, VL)")


@functools.lru_cache(maxsize=1)
def bf16_library() -> ctypes.CDLL | str:
    """The library for the bfloat16 matmul (`gemma_profiles.engine.kernels`), or why not."""
    return _where("gp_bf16_supported", "AVX-512 BF16")


def unavailable() -> str | None:
    """None when the kernel runs here; else why not."""
    library = _library()
    return library if isinstance(library, str) else None


def bf16_unavailable() -> str | None:
    """None when the bfloat16 matmul runs here; else why not."""
    library = bf16_library()
    return library if isinstance(library, str) else None


def reset() -> None:
    """Forget the cached library (tests switch ``GEMMA_PROFILE_NATIVE``/``CC``)."""
    for cached in (_load, _library, decode_library, bf16_library):
        cached.cache_clear()


def supports(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    return (
        weight.dtype == torch.int8
        and weight.dim() == 2
        and weight.device.type == "cpu"
        and 0 < weight.shape[1] <= MAX_K
        and dtype in (torch.float32, torch.bfloat16)
    )


_STAGING_BYTES = 8 << 20
_staging_buffer: list[torch.Tensor] = []


def _staging(size: int) -> torch.Tensor:
    """One int8 buffer reused by every in-place pack: a fresh 8 MiB temporary per weight is
    not handed back to the OS by glibc between packs (RSS grew 8 MiB a weight, 1 GiB for 2b)."""
    if not _staging_buffer or _staging_buffer[0].numel() < size:
        _staging_buffer[:] = [torch.empty(max(size, _STAGING_BYTES), dtype=torch.int8)]
    return _staging_buffer[0][:size]


def row_sums(weight: torch.Tensor) -> torch.Tensor:
    """``weight.sum(1)`` in int32 (the kernel's correction terms), computed by the native library:
    torch's ``sum(dtype=int32)`` on a CPU casts the whole input to int32 first (a 2 GiB temporary
    for a 2b embedder, or, in chunks, temporaries that fragment the heap: +0.7 GiB RSS for 2b)."""
    library = _library()
    assert not isinstance(library, str), library
    plain = weight.detach().contiguous()
    sums = torch.empty(plain.shape[0], dtype=torch.int32)
    library.gp_int8_row_sums(plain.data_ptr(), plain.shape[0], plain.shape[1], sums.data_ptr())
    return sums


def quantize_rows_into(block: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Quantize ``block`` (rows x k, float32/bfloat16, CPU) into ``q`` (int8) and ``scale``
    (float32) as the loader's torch code does, bit for bit; False when the kernel cannot here."""
    library = _library()
    if isinstance(library, str) or block.dtype not in (torch.float32, torch.bfloat16) or block.dim() != 2:
        return False
    if not (block.is_contiguous() and q.is_contiguous() and scale.is_contiguous()) or block.device.type != "cpu":
        return False
    bf16 = int(block.dtype == torch.bfloat16)
    library.gp_int8_quantize_rows(
        block.data_ptr(), bf16, block.shape[0], block.shape[1], q.data_ptr(), scale.data_ptr()
    )
    return True


#: Widest column chunk of the packed layout: a chunk's activation planes (3 bytes a column)
#: stay in L1 (csrc/int8_matmul.c).
CHUNK_COLUMNS = 4096


def chunk_columns(k: int) -> int:
    """Columns per chunk of the packed layout for a weight ``k`` wide: k padded to 64 when it
    fits one chunk, else ``k / chunks`` rounded up to 64 (16384 -> 4096, 9216 -> 3072)."""
    chunks = -(-k // CHUNK_COLUMNS)
    return -(-k // (chunks * 64)) * 64


class Int8Weight:
    """One int8 weight in the kernel's layout, with its scale and row sums.

    :param data: ``[chunks, n4/4, kc/64, 4, 64]`` int8: column chunks of ``kc`` =
        `chunk_columns` (k) one after another, each in blocks of four rows interleaved 64
        bytes at a time (``n4``: ``n`` padded to 4; columns past ``k`` zero).
    """

    def __init__(self, data: torch.Tensor, n: int, k: int, scale: torch.Tensor, sums: torch.Tensor) -> None:
        self.data, self.n, self.k, self.scale, self.sums = data, n, k, scale, sums
        self.kc = data.shape[2] * 64
        # Addresses taken once: the tensors are owned here and never resized.
        self._pointers = (data.data_ptr(), scale.data_ptr(), sums.data_ptr())

    @classmethod
    def pack(
        cls, weight: torch.Tensor, scaler: torch.Tensor, *, in_place: bool = False, release: bool = False
    ) -> Int8Weight:
        """``weight`` (n x k int8) in the kernel's layout.

        :param in_place: reuse ``weight``'s memory (it is scrambled) when no padding is needed
            and ``weight`` is contiguous; otherwise a copy.  With one column chunk each block
            of four rows is a permutation of its own bytes, so blocks are rearranged a chunk at
            a time and no second weight-sized tensor exists (a 2b embedder: 0.5 GiB less at the
            peak); a wide weight goes through one weight-sized temporary (a 2b down_proj: 32 MiB).
        :param release: ``weight`` is a memory-mapped checkpoint tensor: the copy is made a
            chunk at a time, each chunk's source pages dropped once copied, so the source is
            never resident whole.
        """
        n, k = weight.shape
        kc = chunk_columns(k)
        chunks = -(-k // kc)
        n4, kp = -(-n // 4) * 4, chunks * kc
        sums = row_sums(weight)
        scale = scaler.detach().to(torch.float32).contiguous()
        plain = weight.detach()
        if in_place and (n4, kp) == (n, k) and plain.is_contiguous():
            if chunks > 1:
                source = plain.clone()
                data = plain.view(chunks, n // 4, kc // 64, 4, 64)
                data.copy_(source.view(n // 4, 4, chunks, kc // 64, 64).permute(2, 0, 3, 1, 4))
                return cls(data, n, k, scale, sums)
            blocks = plain.view(n // 4, 4, k // 64, 64)
            step = max(1, _STAGING_BYTES // (4 * k))  # ~8 MiB of blocks at a time
            scratch = _staging(step * 4 * k).view(step, k // 64, 4, 64)
            for start in range(0, n // 4, step):
                chunk = blocks[start : start + step]
                staged = scratch[: chunk.shape[0]]
                staged.copy_(chunk.permute(0, 2, 1, 3))
                chunk.view(staged.shape).copy_(staged)
            return cls(blocks.view(1, n // 4, k // 64, 4, 64), n, k, scale, sums)
        from gemma_profiles.engine.loading import release_pages

        # Every token reads the whole weight: on huge pages where the OS gives them (hugepages.py).
        data = hugepages.empty((chunks, n4 // 4, kc // 64, 4, 64), torch.int8)
        step = max(1, _STAGING_BYTES // (4 * kp))
        for first in range(0, n4 // 4, step):
            last = min(first + step, n4 // 4)
            rows = plain[4 * first : 4 * last]
            if rows.shape != (4 * (last - first), kp):  # zero padding to 4 rows, whole chunks
                padded = torch.zeros(4 * (last - first), kp, dtype=torch.int8)
                padded[: rows.shape[0], :k] = rows
                rows = padded
            data[:, first:last].copy_(rows.reshape(last - first, 4, chunks, kc // 64, 64).permute(2, 0, 3, 1, 4))
            if release and plain.is_contiguous():
                release_pages(plain[4 * first : 4 * last])
        return cls(data, n, k, scale, sums)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    def unpack(self) -> torch.Tensor:
        """The plain ``(n, k)`` int8 weight."""
        chunks, blocks, columns = self.data.shape[:3]
        plain = self.data.permute(1, 3, 0, 2, 4).reshape(blocks * 4, chunks * columns * 64)
        return plain[: self.n, : self.k].contiguous()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``unpack()[ids]`` without unpacking: an embedding lookup."""
        gathered = self.data[:, ids // 4, :, ids % 4, :]  # ids.shape + (chunks, kc/64, 64)
        return gathered.reshape(*ids.shape, -1)[..., : self.k]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """``weight * scale[:, None]`` as a plain ``(n, k)`` tensor of ``dtype`` (float32 or bfloat16)."""
        library = _library()
        assert not isinstance(library, str), library
        out = torch.empty(self.n, self.k, dtype=dtype)
        weight, scale, _ = self._pointers
        library.gp_int8_dequantize(weight, self.n, self.k, self.kc, scale, out.data_ptr(), int(dtype == torch.bfloat16))
        return out

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (weight * scale[:, None]).T`` in ``x``'s dtype (float32 or bfloat16).

        From `DEQUANTIZE_ROWS` rows of ``x`` on (a prompt), the weight is dequantized into a
        temporary and multiplied by torch's float GEMM instead: the kernel's cost grows with
        the rows, and there it is ~3x the GEMM's.
        """
        library = _library()
        assert not isinstance(library, str), library
        flat = x.reshape(-1, self.k)
        if flat.shape[0] >= DEQUANTIZE_ROWS:
            return torch.nn.functional.linear(x, self.dequantize(x.dtype))
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.empty(flat.shape[0], self.n, dtype=x.dtype)
        if flat.shape[0] == 0:
            return out.reshape(*x.shape[:-1], self.n)
        bf16 = int(x.dtype == torch.bfloat16)
        weight, scale, sums = self._pointers
        status = library.gp_int8_matmul(
            flat.data_ptr(), bf16, flat.shape[0], self.k, weight, self.n, self.kc, scale, sums, out.data_ptr(), bf16
        )
        if status != 0:
            raise RuntimeError(f"gemma-profiles int8 kernel failed ({status}) for {tuple(x.shape)} x {self.shape}")
        return out.reshape(*x.shape[:-1], self.n)
