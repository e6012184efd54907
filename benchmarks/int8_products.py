"""The native int8 kernel against torch's ``_weight_int8pack_mm``, product by product.

    python benchmarks/int8_products.py [--rows 1,2,16] [--repeat 7] [--threads 1]
    python benchmarks/int8_products.py --step [--repeat 21]

For the shapes a decode step multiplies (2b's mlp in and out, the 270M's mlp and its 262144 x 640
tied embedder), interleaved in one process: our kernel with a scale per row, with a scale per 64
columns (the AVX2 path only), and torch's ``_weight_int8pack_mm`` (what the ``quantization``
builtin used on a CPU without the kernel), each on bfloat16 activations; a ``sum()`` of the
weight's bytes read as int64 as the memory probe.  Medians of ``--repeat``; GB/s counts the int8 weight bytes;
the ratio is int8pack's time over ours.  Prints which path of the kernel runs here.

``--step``: the decoder products of one decode step of the 270M (18 layers, each gemma_pytorch's
qkv, o, gate, up and down projections, each its own weight, one row of bfloat16 activations, a
scale per 64 columns where the AVX2 path runs) in the order a step runs them: each weight in its
own buffer, as `Int8Weight.pack` leaves it (under 2 MiB each: 4 KiB pages), against the same
bytes in one arena on huge pages (`gemma_profiles.engine.hugepages`), interleaved; GB/s counts
the int8 weight bytes of the whole step.  Out of the caches each product reads its weight once
from memory, so this is where a decode step's int8 time goes, product by product.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

SHAPES = ((16384, 2048), (2048, 16384), (2048, 640), (640, 2048), (262144, 640))
#: One layer of the 270M as gemma_pytorch multiplies it: qkv (4 query heads and one key/value head
#: of 256), o, gate, up, down.
LAYER_270M = ((1536, 640), (640, 1024), (2048, 640), (2048, 640), (640, 2048))
LAYERS_270M = 18


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,16")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step", action="store_true", help="a 270M step's decoder products, 4 KiB vs 2 MiB pages")
    args = parser.parse_args()

    import torch

    from gemma_profiles.engine import native
    from gemma_profiles.engine.loading import INT8_GROUP_COLUMNS, quantize_groups, quantize_rows

    torch.set_num_threads(args.threads)
    if native.unavailable():
        print(f"int8_products: the native int8 kernel does not run here: {native.unavailable()}", file=sys.stderr)
        return 2
    print(f"native int8 kernel path: {native.int8_path()}; torch {torch.__version__}; {args.threads} thread(s)")
    if args.step:
        return step(args.repeat)
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


def step(repeat: int) -> int:
    """`--step`: the 270M's decoder products, each weight in its own buffer and all in one huge-page arena."""
    import torch

    from gemma_profiles.engine import hugepages, native
    from gemma_profiles.engine.loading import INT8_GROUP_COLUMNS, quantize_groups, quantize_rows

    generator = torch.Generator().manual_seed(0)
    own: list[native.Int8Weight] = []
    for n, k in LAYER_270M * LAYERS_270M:
        source = torch.randn(n, k, generator=generator) * 0.02
        if native.grouped_path():
            q, groups = quantize_groups(source, INT8_GROUP_COLUMNS)
            own.append(native.Int8Weight.pack(q, groups.amax(1), groups=groups))
        else:
            q, scaler = quantize_rows(source, torch.float32)
            own.append(native.Int8Weight.pack(q, scaler))
    total = sum(weight.data.numel() for weight in own)
    arena = hugepages.empty((total,), torch.int8)
    shared, offset = [], 0
    for weight in own:
        size = weight.data.numel()
        data = arena[offset : offset + size].view(weight.data.shape)
        data.copy_(weight.data)
        offset += size
        shared.append(native.Int8Weight(data, weight.n, weight.k, weight.scale, weight.sums, weight.groups))
    inputs = {k: torch.randn(1, k, generator=generator).bfloat16() for _, k in LAYER_270M}
    layouts = {"own buffers (4 KiB pages)": own, "one arena (2 MiB pages)": shared}
    for first, second in zip(own, shared, strict=True):
        assert torch.equal(first.matmul(inputs[first.k]), second.matmul(inputs[first.k]))
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for round_ in range(repeat):
        for name in list(layouts)[:: 1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            for weight in layouts[name]:
                weight.matmul(inputs[weight.k])
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"270M decode step's decoder products: {len(own)} weights, {total / 1e6:.0f} MB int8, medians of {repeat}")
    for name, t in medians.items():
        print(f"  {name}: {t * 1e3:.2f} ms ({total / t / 1e9:.1f} GB/s, {medians[next(iter(layouts))] / t:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
