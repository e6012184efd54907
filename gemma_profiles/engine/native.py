"""The native CPU kernels (``csrc/``), loaded with ctypes: the torch side.

Torch-touching.  Three parts in one library: the int8 matmul (``csrc/int8_matmul.c``,
used by `gemma_profiles.engine.quantization` on a CPU with AVX-512 VNNI - exact integer sums -
or AVX2 + FMA - float32 sums; `int8_path` says which), the bfloat16 matmul
(``csrc/bf16_matmul.c``, used by `gemma_profiles.engine.kernels` on a CPU with AVX-512 BF16 or
AVX2 + FMA) and
the decoder-layer kernels (``csrc/decode.c``, used by `gemma_profiles.engine.fused` on a CPU with
AVX-512 F/BW/VL or AVX2 + FMA).  Each part checks the CPU when called and takes its AVX-512 path
where the CPU has the instructions, else its AVX2 + FMA one.

`gemma_profiles.engine.build` compiles the library on first use, caches it and loads it
(no torch); a missing compiler, a failed build or a CPU without the instructions leaves the
int8 layers on torch's ``_weight_int8pack_mm``, bfloat16 weights on oneDNN and the layers
on gemma's own forward, with one log line saying why.  ``GEMMA_PROFILE_NATIVE=0`` turns all
three off.  Whether the int8 kernel runs is the same decision the planner's estimate reads
(`build.int8_verdict`).

`Int8Weight` holds one int8 weight in the kernel's layout - blocks of four rows
interleaved 64 bytes at a time, ``[n/4][k/64][4][64]``, zero-padded - with its
per-row scale (float32) and per-row sums; it gives the plain ``(n, k)`` int8 back
for ``state_dict()`` and gathers rows for an embedding lookup.
"""

from __future__ import annotations

import ctypes
import functools

import torch

import gemma_profiles.settings as settings
from gemma_profiles.engine import build, hugepages
from gemma_profiles.engine.pages import release_pages

#: ``0`` turns the native kernels off (`build.ENV`).
ENV = build.ENV
#: The kernel's int32 partial sums stay exact up to this reduction length.
MAX_K = 32768
#: Rows of activations from which `Int8Weight.matmul` dequantizes and uses a float GEMM
#: (benchmarks/int8_rows.py on the 2-core AVX-512 box: the kernel is 0.83x the GEMM's time at
#: 128 rows, 1.4x at 256, 4.8x at 1024); in `gemma_profiles.settings`, since the planner counts the copy.
DEQUANTIZE_ROWS = settings.DEQUANTIZE_ROWS
#: The same on the AVX2 path (`gemma_profiles.settings.DEQUANTIZE_ROWS_AVX2`).
DEQUANTIZE_ROWS_AVX2 = settings.DEQUANTIZE_ROWS_AVX2


def _where(supported: str, lacking: str) -> ctypes.CDLL | str:
    """The library when its ``supported()`` entry point says this CPU runs that part; else why not."""
    library = build._load()
    if isinstance(library, str):
        return library
    return library if getattr(library, supported)() else f"this CPU lacks {lacking}"


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | str:
    """The library for the int8 kernel, or why not."""
    return _where("gp_int8_supported", "AVX2 + FMA (and AVX-512 VNNI)")


@functools.lru_cache(maxsize=1)
def decode_library() -> ctypes.CDLL | str:
    """The library for the decoder-layer kernels (`gemma_profiles.engine.fused`), or why not."""
    return _where("gp_decode_supported", "AVX2 + FMA (and AVX-512 F, BW, VL)")


@functools.lru_cache(maxsize=1)
def bf16_library() -> ctypes.CDLL | str:
    """The library for the bfloat16 matmul (`gemma_profiles.engine.kernels`), or why not."""
    return _where("gp_bf16_supported", "AVX-512 BF16 or AVX2+FMA")


def unavailable() -> str | None:
    """None when the kernel runs here; else why not."""
    library = _library()
    return library if isinstance(library, str) else None


@functools.lru_cache(maxsize=1)
def int8_path() -> str | None:
    """Which path of the int8 kernel runs here: ``"avx512-vnni"``, ``"avx2"``, or None (neither)."""
    library = _library()
    if isinstance(library, str):
        return None
    return {1: "avx512-vnni", 2: "avx2"}.get(library.gp_int8_path())


def bf16_unavailable() -> str | None:
    """None when the bfloat16 matmul runs here; else why not."""
    library = bf16_library()
    return library if isinstance(library, str) else None


def reset() -> None:
    """Forget the cached library (tests switch ``GEMMA_PROFILE_NATIVE``/``CC``)."""
    build.reset()
    for cached in (_library, decode_library, bf16_library, int8_path):
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


def groups_fit(k: int, group: int) -> bool:
    """Whether a weight ``k`` columns wide can have scales per ``group`` columns on the kernel: a
    multiple of 64 that divides ``k`` and the packed layout's column chunk (no group straddles one)."""
    return 0 < group <= k and group % 64 == 0 and k % group == 0 and chunk_columns(k) % group == 0


def grouped_path() -> bool:
    """Whether scales per group of columns run here: the kernel's AVX2 path (any CPU with AVX2 and
    FMA; the VNNI path sums whole rows in integers and has no per-group scales)."""
    library = _library()
    return not isinstance(library, str) and int8_path() == "avx2"


def _float32(groups: torch.Tensor | None) -> torch.Tensor | None:
    return None if groups is None else groups.detach().to(torch.float32).contiguous()


class Int8Weight:
    """One int8 weight in the kernel's layout, with its scale and row sums.

    :param data: ``[chunks, n4/4, kc/64, 4, 64]`` int8: column chunks of ``kc`` =
        `chunk_columns` (k) one after another, each in blocks of four rows interleaved 64
        bytes at a time (``n4``: ``n`` padded to 4; columns past ``k`` zero).
    """

    def __init__(
        self,
        data: torch.Tensor,
        n: int,
        k: int,
        scale: torch.Tensor,
        sums: torch.Tensor,
        groups: torch.Tensor | None = None,
    ) -> None:
        self.data, self.n, self.k, self.scale, self.sums = data, n, k, scale, sums
        self.kc = data.shape[2] * 64
        #: float32 scales per group of `group` columns (n x k/group), or None: per-row ``scale``.
        self.groups = groups
        self.group = 0 if groups is None else k // groups.shape[1]
        # Addresses taken once: the tensors are owned here and never resized.
        self._pointers = (data.data_ptr(), scale.data_ptr(), sums.data_ptr())
        self._groups = 0 if groups is None else groups.data_ptr()

    @classmethod
    def pack(
        cls,
        weight: torch.Tensor,
        scaler: torch.Tensor,
        *,
        in_place: bool = False,
        release: bool = False,
        groups: torch.Tensor | None = None,
    ) -> Int8Weight:
        """``weight`` (n x k int8) in the kernel's layout.

        :param groups: scales per group of columns (n x k/group; `groups_fit`), computed by the
            AVX2 path; ``scaler`` is then kept for ``state_dict()`` only.

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
        if groups is not None and (groups.shape[0] != n or not groups_fit(k, k // max(groups.shape[1], 1))):
            raise ValueError(f"group scales of shape {tuple(groups.shape)} do not fit an int8 weight of {n} x {k}")
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
                return cls(data, n, k, scale, sums, _float32(groups))
            blocks = plain.view(n // 4, 4, k // 64, 64)
            step = max(1, _STAGING_BYTES // (4 * k))  # ~8 MiB of blocks at a time
            scratch = _staging(step * 4 * k).view(step, k // 64, 4, 64)
            for start in range(0, n // 4, step):
                chunk = blocks[start : start + step]
                staged = scratch[: chunk.shape[0]]
                staged.copy_(chunk.permute(0, 2, 1, 3))
                chunk.view(staged.shape).copy_(staged)
            return cls(blocks.view(1, n // 4, k // 64, 4, 64), n, k, scale, sums, _float32(groups))
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
        return cls(data, n, k, scale, sums, _float32(groups))

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
        """``weight * scale[:, None]`` (or times its group scales) as a plain ``(n, k)`` tensor of
        ``dtype`` (float32 or bfloat16)."""
        library = _library()
        assert not isinstance(library, str), library
        out = torch.empty(self.n, self.k, dtype=dtype)
        weight, scale, _ = self._pointers
        bf16 = int(dtype == torch.bfloat16)
        if self.groups is not None:
            status = library.gp_int8_dequantize_grouped(
                weight, self.n, self.k, self.kc, self._groups, self.group, out.data_ptr(), bf16
            )
            if status != 0:
                raise RuntimeError(f"gemma-profiles int8 kernel: grouped dequantize failed ({status}) for {self.shape}")
            return out
        library.gp_int8_dequantize(weight, self.n, self.k, self.kc, scale, out.data_ptr(), bf16)
        return out

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (weight * scale[:, None]).T`` in ``x``'s dtype (float32 or bfloat16).

        From `DEQUANTIZE_ROWS` rows of ``x`` on (`DEQUANTIZE_ROWS_AVX2` on the AVX2 path), the
        weight is dequantized into a temporary and multiplied by torch's float GEMM instead: the
        kernel's cost grows with the rows (on the AVX2 path a bfloat16 ``x`` is then multiplied
        in float32: torch's bfloat16 GEMM is slow without AVX-512 BF16).
        """
        library = _library()
        assert not isinstance(library, str), library
        flat = x.reshape(-1, self.k)
        avx2 = int8_path() == "avx2"  # (cached: this is every int8 product's path)
        if flat.shape[0] >= (DEQUANTIZE_ROWS_AVX2 if avx2 else DEQUANTIZE_ROWS):
            if x.dtype == torch.bfloat16 and (avx2 or self.groups is not None):
                # without AVX-512 BF16 torch's bfloat16 GEMM has no fast kernel (5x float32's
                # time at 128 x 2048 x 2048 on the AVX2 box): the product runs in float32
                wide = torch.nn.functional.linear(x.float(), self.dequantize(torch.float32))
                return wide.to(x.dtype)
            return torch.nn.functional.linear(x, self.dequantize(x.dtype))
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.empty(flat.shape[0], self.n, dtype=x.dtype)
        if flat.shape[0] == 0:
            return out.reshape(*x.shape[:-1], self.n)
        bf16 = int(x.dtype == torch.bfloat16)
        weight, scale, sums = self._pointers
        if self.groups is not None:
            status = library.gp_int8_matmul_grouped(
                flat.data_ptr(),
                bf16,
                flat.shape[0],
                self.k,
                weight,
                self.n,
                self.kc,
                self._groups,
                self.group,
                out.data_ptr(),
                bf16,
            )
        else:
            status = library.gp_int8_matmul(
                flat.data_ptr(), bf16, flat.shape[0], self.k, weight, self.n, self.kc, scale, sums, out.data_ptr(), bf16
            )
        if status != 0:
            raise RuntimeError(f"gemma-profiles int8 kernel failed ({status}) for {tuple(x.shape)} x {self.shape}")
        return out.reshape(*x.shape[:-1], self.n)
