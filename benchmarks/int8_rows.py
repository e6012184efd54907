"""Where an int8 product with many rows of activations (a prompt) should leave the native kernel.

    python benchmarks/int8_rows.py [--rows 1,2,4,8,16,32,64,128,256] [--repeat 5] [--dtype float32]
                                   [--shapes 2b|270m] [--scales groups,rows]

The native kernel's cost grows with the rows of ``x`` (three VNNI planes per weight byte and
row on the VNNI path; a widening per weight and pair of rows and an FMA per weight and row on the
AVX2 path); dequantizing the weight into a temporary and calling torch's float GEMM costs a fixed
dequantization (plus the temporary's page faults) and then much less per row.  For a model's
three decoder weight shapes (``--shapes``: 2b's mlp in, mlp out, attention qkv; or the 270M's)
both ways, interleaved, median of ``--repeat``; the ratio is kernel / dequantize+GEMM, so above
1 the GEMM wins.  The second way is `Int8Weight.matmul`'s own prompt path (on the AVX2 path a
bfloat16 ``x`` is multiplied in float32).  ``--scales``: the weights packed as the loader packs
them on the AVX2 path (``groups``: a scale per 64 columns), with a scale per row (``rows``: the
VNNI path's format, and the AVX2 path's for a weight whose width 64 does not divide), or both
side by side (the VNNI path has no grouped kernel: ``rows`` only).
`gemma_profiles.settings.DEQUANTIZE_ROWS` (VNNI) and ``DEQUANTIZE_ROWS_AVX2`` are set from this.
"""

from __future__ import annotations

import argparse
import statistics
import time

SHAPES = {
    "2b": [(16384, 2048), (2048, 16384), (2560, 2048)],
    "270m": [(2048, 640), (640, 2048), (1024, 640)],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--shapes", default="2b", choices=sorted(SHAPES))
    parser.add_argument("--scales", default="groups", help="groups, rows, or groups,rows")
    args = parser.parse_args()
    formats = [name.strip() for name in args.scales.split(",") if name.strip()]
    if not formats or set(formats) - {"groups", "rows"}:
        parser.error(f"--scales {args.scales}: name groups, rows, or both (groups,rows)")

    import torch

    from gemma_profiles.engine import native

    if native.unavailable():
        raise SystemExit(f"native int8 kernel: {native.unavailable()}")
    from gemma_profiles.engine.loading import INT8_GROUP_COLUMNS, quantize_groups, quantize_rows

    if "groups" in formats and not native.grouped_path():
        path = native.int8_path()
        raise SystemExit(f"--scales groups: scales per group run on the AVX2 path only; this CPU runs {path}")
    shapes = SHAPES[args.shapes]
    weights: dict[str, list[native.Int8Weight]] = {name: [] for name in formats}
    for shape in shapes:
        source = torch.randn(shape) * 0.02
        if "groups" in formats:
            if not native.groups_fit(shape[1], INT8_GROUP_COLUMNS):
                raise SystemExit(f"{shape}: {INT8_GROUP_COLUMNS} columns do not fit the layout's chunks")
            q, groups = quantize_groups(source, INT8_GROUP_COLUMNS)
            weights["groups"].append(native.Int8Weight.pack(q, groups.amax(1), groups=groups))
        if "rows" in formats:
            q, scaler = quantize_rows(source, torch.float32)
            weights["rows"].append(native.Int8Weight.pack(q, scaler))
    dtype = getattr(torch, args.dtype)

    def kernel(w: native.Int8Weight, x: torch.Tensor) -> torch.Tensor:
        native.DEQUANTIZE_ROWS = native.DEQUANTIZE_ROWS_AVX2 = 1 << 62  # the kernel itself at every size
        return w.matmul(x)

    def dequantized(w: native.Int8Weight, x: torch.Tensor) -> torch.Tensor:
        native.DEQUANTIZE_ROWS = native.DEQUANTIZE_ROWS_AVX2 = 1  # the prompt path at every size
        return w.matmul(x)

    described = {"groups": "a scale per 64 columns", "rows": "a scale per row"}
    print(
        f"threads {torch.get_num_threads()}; {native.int8_path()} path; {args.shapes} weights {shapes}, "
        f"{args.dtype} x; " + ", ".join(f"{name}: {described[name]}" for name in formats)
    )
    header = f"{'rows':>6}"
    for name in formats:
        header += f" {name + ' kernel ms':>18} {'dequant+GEMM ms':>16} {'ratio':>6}"
    if len(formats) == 2:
        header += f" {'groups/rows':>12}"
    print(header)
    for rows in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(rows, shape[1]).to(dtype) for shape in shapes]
        times: dict[tuple[str, str], list[float]] = {(f, way): [] for f in formats for way in ("kernel", "gemm")}
        for _ in range(args.repeat):
            for name in formats:
                for way, call in (("kernel", kernel), ("gemm", dequantized)):
                    start = time.perf_counter()
                    for w, x in zip(weights[name], xs, strict=True):
                        call(w, x)
                    times[name, way].append(time.perf_counter() - start)
        line = f"{rows:>6}"
        medians = {key: statistics.median(value) for key, value in times.items()}
        for name in formats:
            k, g = medians[name, "kernel"], medians[name, "gemm"]
            line += f" {k * 1e3:>18.2f} {g * 1e3:>16.2f} {k / g:>6.2f}"
        if len(formats) == 2:
            line += f" {medians['groups', 'kernel'] / medians['rows', 'kernel']:>12.2f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
