"""The native int8 kernel against torch's ``_weight_int8pack_mm``, product by product.

    python benchmarks/int8_products.py [--rows 1,2,16] [--repeat 7] [--threads 1]

For the shapes a decode step multiplies (2b's mlp in and out, the 270M's mlp and its 262144 x 640
tied embedder), interleaved in one process: our kernel with a scale per row, with a scale per 64
columns (the AVX2 path only), and torch's ``_weight_int8pack_mm`` (what the ``quantization``
builtin used on a CPU without the kernel), each on bfloat16 activations; a ``sum()`` of the
weight's bytes read as int64 as the memory probe.  Medians of ``--repeat``; GB/s counts the int8 weight bytes;
the ratio is int8pack's time over ours.  Prints which path of the kernel runs here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

SHAPES = ((16384, 2048), (2048, 16384), (2048, 640), (640, 2048), (262144, 640))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,16")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from gemma_profiles.engine import native
    from gemma_profiles.engine.loading import INT8_GROUP_COLUMNS, quantize_groups, quantize_rows

    torch.set_num_threads(args.threads)
    if native.unavailable():
        print(f"int8_products: the native int8 kernel does not run here: {native.unavailable()}", file=sys.stderr)
        return 2
    print(f"native int8 kernel path: {native.int8_path()}; torch {torch.__version__}; {args.threads} thread(s)")
    generator = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        source = torch.randn(n, k, generator=generator) * 0.02
        q, scaler = quantize_rows(source, torch.float32)
        plain = q.clone()
        contenders: dict[str, native.Int8Weight | None] = {"ours, per row": native.Int8Weight.pack(q.clone(), scaler)}
        if native.grouped_path() and native.groups_fit(k, INT8_GROUP_COLUMNS):
            grouped_q, groups = quantize_groups(source, INT8_GROUP_COLUMNS)
            contenders["ours, per 64 columns"] = native.Int8Weight.pack(grouped_q, groups.amax(1), groups=groups)
        del source
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=generator).bfloat16()
            scale16 = scaler.bfloat16()
            calls: dict[str, Callable[[], object]] = {
                name: (lambda packed=packed, x=x: packed.matmul(x))  # type: ignore[misc]
                for name, packed in contenders.items()
            }
            calls["_weight_int8pack_mm"] = lambda x=x, w=plain, s=scale16: torch.ops.aten._weight_int8pack_mm(x, w, s)  # type: ignore[misc]
            if rows == 1:
                words = plain.view(torch.int64)  # the same bytes, 8 a read
                calls["sum() probe"] = lambda w=words: w.sum()  # type: ignore[misc]
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.repeat):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(t) for name, t in times.items()}
            reference = medians["_weight_int8pack_mm"]
            cells = [
                f"{name} {t * 1e3:.2f} ms ({n * k / t / 1e9:.1f} GB/s, {reference / t:.2f}x)"
                for name, t in medians.items()
            ]
            print(f"{n} x {k}, {rows} row(s): " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
