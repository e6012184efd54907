"""bfloat16 products on the CPU, one thread: the native kernel against torch (decode and prompts).

    OMP_NUM_THREADS=1 python benchmarks/bf16_avx2.py [--rounds 9] [--shapes 2b|270m|all]
                                                     [--rows 1,8,16,24,32,48,64,256,640]

For each weight shape (out x in: 2b's 16384x2048 and 2048x16384, Gemma 3 270M's 2048x640,
640x2048 and its tied embedder 262144x640) and each number of activation rows, every contender
runs once per round, the rounds interleaved (a shared host's drift hits them alike):

- ``native``: the native bfloat16 kernel (``gp_bf16_matmul``, whichever path this CPU runs:
  AVX-512 BF16 or AVX2 + FMA), called directly at every row count;
- ``widened``: `gemma_profiles.engine.kernels.widened_linear` (the weight widened to float32 a
  block at a time, torch's float32 GEMM, rounded to bfloat16) - what prompts take on the AVX2 path;
- ``F.linear bf16`` on the plain bfloat16 weight (what a bfloat16 model ran without the kernel)
  and ``F.linear f32`` on a float32 copy of the weight (twice the bytes);
- ``sum()`` (one row only): a plain ``sum()`` of a float32 tensor of the bfloat16 weight's byte
  size, run right before each contender - the rate memory gives one thread at that moment.

One row (a decode step) prints the median GB/s of weight bytes as stored (bfloat16: 2 bytes a
weight; float32: 4) and, in brackets, the median over rounds of that rate over ``sum()``'s;
more rows print the median rows per second (prompt tokens per second through that product).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

SHAPES = {"2b": [(16384, 2048), (2048, 16384)], "270m": [(2048, 640), (640, 2048), (262144, 640)]}


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def native_product(library: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    (n, k), rows = weight.shape, x.shape[0]
    y = torch.empty(rows, n, dtype=torch.bfloat16)
    status = library.gp_bf16_matmul(x.data_ptr(), rows, k, weight.data_ptr(), n, y.data_ptr())
    assert status == 0, status
    return y


def measure(library: Any, n: int, k: int, rows_list: list[int], rounds: int) -> None:
    from gemma_profiles.engine import kernels

    generator = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=generator).to(torch.bfloat16)
    wide = weight.float()
    probe = torch.randn(n * k // 2, generator=generator)
    size = weight.numel() * 2
    print(f"\nweight {n} x {k} ({size / 1e6:.0f} MB bfloat16)", flush=True)
    for rows in rows_list:
        x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
        contenders: dict[str, Callable[[], object]] = {
            "native": functools.partial(native_product, library, x, weight),
            "widened": functools.partial(kernels.widened_linear, x, weight),
            "F.linear bf16": functools.partial(torch.nn.functional.linear, x, weight),
            "F.linear f32": functools.partial(torch.nn.functional.linear, x.float(), wide),
        }
        if rows > 64 and n * k > 64 << 20:
            del contenders["native"]  # minutes at 640 rows of the embedder
        for fn in contenders.values():
            fn()  # warm: scratch buffers, oneDNN's primitive cache
        times: dict[str, list[float]] = {name: [] for name in contenders}
        ratios: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, fn in contenders.items():
                reference = seconds(probe.sum) if rows == 1 else 0.0
                times[name].append(seconds(fn))
                bytes_read = size * 2 if name == "F.linear f32" else size
                ratios[name].append(reference / times[name][-1] * bytes_read / size)
        cells = []
        for name, measured in times.items():
            median = statistics.median(measured)
            if rows == 1:
                rate = (size * 2 if name == "F.linear f32" else size) / median / 1e9
                cells.append(f"{name} {rate:.1f} GB/s ({statistics.median(ratios[name]):.2f}x sum)")
            else:
                cells.append(f"{name} {rows / median:.0f}")
        print(f"  rows {rows}: " + " | ".join(cells), flush=True)


def main() -> None:
    from gemma_profiles.engine import kernels, native

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--shapes", choices=("2b", "270m", "all"), default="all")
    parser.add_argument("--rows", default="1,8,16,24,32,48,64,256,640")
    args = parser.parse_args()
    torch.set_num_threads(1)
    library = native.bf16_library()
    if isinstance(library, str):
        raise SystemExit(f"bf16_avx2.py: the native bfloat16 kernel does not run here: {library}")
    print(f"native bfloat16 kernel: {kernels.native_path()} path; torch {torch.__version__}, 1 thread")
    print("rows 1: GB/s of weights as stored (their rate over sum()'s); more rows: rows per second")
    rows_list = [int(r) for r in args.rows.split(",")]
    shapes = SHAPES["2b"] + SHAPES["270m"] if args.shapes == "all" else SHAPES[args.shapes]
    for n, k in shapes:
        measure(library, n, k, rows_list, args.rounds)


if __name__ == "__main__":
    main()
