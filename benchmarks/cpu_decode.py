"""Decode speed on the CPU: gemma_pytorch as-is against the CPU profiles, in one run.

    python benchmarks/cpu_decode.py [--variant 2b] [--tokens 16] [--dir ~/.cache/gemma-bench]

For each configuration (fresh process, same random checkpoint, written once):
load time, peak RSS, median seconds per decoded token, the ratio to gemma
as-is (run.py's float32), and the fraction of the memory-bandwidth bound: the
bytes a decode step must read (weights as stored, plus the KV cache) divided by
the read bandwidth, over the measured step time.  The bandwidth (best of 15
``sum()`` of a 1 GiB float32 tensor) is measured in each configuration's own
process right after its decode: on a shared host it drifts by a factor of
almost two within minutes, and a bound measured once at the start would
flatter or wrong the rows that run in another phase.

"cpu-8gb, torch int8 kernel" is cpu-8gb with ``GEMMA_PROFILE_NATIVE=0``: torch's
``_weight_int8pack_mm`` instead of our native kernel, to show what the kernel adds.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _runner import ensure_checkpoint, run

PROMPT = "the cat sees a dog near the river"
CONFIGS = (
    ("gemma as-is (float32)", "off", "float32", False, {}),
    ("cpu-32gb (bfloat16)", "cpu-32gb", "bfloat16", False, {}),
    ("cpu-8gb (int8, bfloat16)", "cpu-8gb", "bfloat16", True, {}),
    ("cpu-8gb, torch int8 kernel", "cpu-8gb", "bfloat16", True, {"GEMMA_PROFILE_NATIVE": "0"}),
)


def bytes_per_token(variant: str, dtype: str, int8: bool, seq_len: int) -> int:
    """Weights read per decode step (int8: every linear and the tied embedder, plus scalers), plus KV."""
    from gemma_profiles.memory import DTYPE_BYTES, ModelShape

    shape = ModelShape.of_variant(variant)
    size = DTYPE_BYTES[dtype]
    kv = shape.num_hidden_layers * seq_len * shape.num_key_value_heads * shape.head_dim * 2 * size
    return shape.weight_bytes(dtype, int8) + kv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="2b")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "gemma-profiles-bench")
    args = parser.parse_args()

    from gemma_profiles.gemma_info import gemma_status
    from gemma_profiles.units import format_bytes

    ckpt, tokenizer = ensure_checkpoint(args.dir, args.variant)
    print(f"gemma: {gemma_status().describe()}")
    print(f"checkpoint: {ckpt} ({format_bytes(ckpt.stat().st_size)}); threads {args.threads}")
    spec = {
        "variant": args.variant,
        "ckpt": str(ckpt),
        "tokenizer": tokenizer,
        "prompt": PROMPT,
        "output_len": args.tokens,
        "threads": args.threads,
        "bandwidth": True,
    }
    header = (
        f"{'configuration':<28} {'load s':>7} {'peak RSS':>10} {'s/token':>8} {'vs gemma':>9} "
        f"{'GB/token':>9} {'bandwidth':>10} {'of bound':>9}"
    )
    print(header)
    baseline = None
    for label, profile, dtype, int8, env in CONFIGS:
        result = run(spec, profile, env)
        seconds = result["s_per_token"]
        baseline = baseline or seconds
        needed = bytes_per_token(args.variant, dtype, int8, 16 + args.tokens)
        bound = needed / result["bandwidth"]
        print(
            f"{label:<28} {result['load_s']:>7.1f} {format_bytes(result['peak']):>10} {seconds:>8.3f} "
            f"{baseline / seconds:>8.2f}x {needed / 1e9:>9.2f} {result['bandwidth'] / 1e9:>5.1f} GB/s "
            f"{bound / seconds:>8.0%}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
