"""Where an int8 product with many rows of activations (a prompt) should leave the native kernel.

    python benchmarks/int8_rows.py [--rows 1,8,32,64,128,256,512,1024] [--repeat 5] [--dtype float32]

The native kernel's cost grows with the rows of ``x`` (three VNNI planes per weight byte and
row on the VNNI path; a widening and an FMA per weight and row on the AVX2 path); dequantizing
the weight into a temporary and calling torch's float GEMM costs a fixed dequantization (plus
the temporary's page faults) and then much less per row.  For a 2b layer's three weight shapes
(mlp in, mlp out, attention qkv) - packed as the loader packs them here (a scale per 64 columns
on the AVX2 path) - both ways, interleaved, median of ``--repeat``; the ratio is kernel /
dequantize+GEMM, so above 1 the GEMM wins.  The second way is `Int8Weight.matmul`'s own prompt
path (on the AVX2 path a bfloat16 ``x`` is multiplied in float32).
`gemma_profiles.settings.DEQUANTIZE_ROWS` (VNNI) and ``DEQUANTIZE_ROWS_AVX2`` are set from this.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,64,128,256,512,1024")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()

    import torch

    from gemma_profiles.engine import native

    if native.unavailable():
        raise SystemExit(f"native int8 kernel: {native.unavailable()}")
    from gemma_profiles.engine.loading import INT8_GROUP_COLUMNS, quantize_groups, quantize_rows

    shapes = [(16384, 2048), (2048, 16384), (2560, 2048)]
    weights = []
    for shape in shapes:
        source = torch.randn(shape) * 0.02
        if native.grouped_path() and native.groups_fit(shape[1], INT8_GROUP_COLUMNS):
            q, groups = quantize_groups(source, INT8_GROUP_COLUMNS)
            weights.append(native.Int8Weight.pack(q, groups.amax(1), groups=groups))
        else:
            q, scaler = quantize_rows(source, torch.float32)
            weights.append(native.Int8Weight.pack(q, scaler))
    dtype = getattr(torch, args.dtype)

    def kernel(w: native.Int8Weight, x: torch.Tensor) -> torch.Tensor:
        native.DEQUANTIZE_ROWS = native.DEQUANTIZE_ROWS_AVX2 = 1 << 62  # the kernel itself at every size
        return w.matmul(x)

    def dequantized(w: native.Int8Weight, x: torch.Tensor) -> torch.Tensor:
        native.DEQUANTIZE_ROWS = native.DEQUANTIZE_ROWS_AVX2 = 1  # the prompt path at every size
        return w.matmul(x)

    scales = "a scale per 64 columns" if weights[0].groups is not None else "a scale per row"
    print(f"threads {torch.get_num_threads()}; {native.int8_path()} path, {scales}; weights {shapes}, {args.dtype} x")
    print(f"{'rows':>6} {'kernel ms':>10} {'dequant+GEMM ms':>16} {'ratio':>7}")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(rows, w.k).to(dtype) for w in weights]
        times: dict[str, list[float]] = {"kernel": [], "gemm": []}
        for _ in range(args.repeat):
            for name, way in (("kernel", kernel), ("gemm", dequantized)):
                start = time.perf_counter()
                for w, x in zip(weights, xs, strict=True):
                    way(w, x)
                times[name].append(time.perf_counter() - start)
        k, g = statistics.median(times["kernel"]), statistics.median(times["gemm"])
        print(f"{rows:>6} {k * 1e3:>10.2f} {g * 1e3:>16.2f} {k / g:>7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
