"""Where an int8 product with many rows of activations (a prompt) should leave the native kernel.

    python benchmarks/int8_rows.py [--rows 1,8,32,64,128,256,512,1024] [--repeat 5]

The native kernel's cost grows with the rows of ``x`` (three VNNI planes per weight byte and
row); dequantizing the weight into a temporary and calling torch's float GEMM costs a fixed
dequantization (plus the temporary's page faults) and then a third of that per row.  For a 2b
layer's three weight shapes (mlp in, mlp out, attention qkv), both ways, interleaved, median of
``--repeat``; the ratio is kernel / dequantize+GEMM, so above 1 the GEMM wins.
`gemma_profiles.engine.native.DEQUANTIZE_ROWS` is set from this.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,64,128,256,512,1024")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import torch

    from gemma_profiles.engine import native

    if native.unavailable():
        raise SystemExit(f"native int8 kernel: {native.unavailable()}")
    shapes = [(16384, 2048), (2048, 16384), (2560, 2048)]
    weights = [
        native.Int8Weight.pack(torch.randint(-127, 128, shape, dtype=torch.int8), torch.rand(shape[0]) / 100)
        for shape in shapes
    ]
    native.DEQUANTIZE_ROWS = 1 << 62  # time the kernel itself at every size

    def kernel(w: native.Int8Weight, x: torch.Tensor) -> torch.Tensor:
        return w.matmul(x)

    def dequantized(w: native.Int8Weight, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, w.dequantize(x.dtype))

    print(f"threads {torch.get_num_threads()}; weights {shapes}, bfloat16 activations")
    print(f"{'rows':>6} {'kernel ms':>10} {'dequant+GEMM ms':>16} {'ratio':>7}")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(rows, w.k, dtype=torch.bfloat16) for w in weights]
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
