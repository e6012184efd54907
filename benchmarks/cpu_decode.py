"""Decode speed on the CPU: gemma_pytorch as-is against the CPU profiles, in one run.

    python benchmarks/cpu_decode.py [--variant 2b] [--tokens 16] [--dir ~/.cache/gemma-bench]

For each configuration (fresh process, same random checkpoint, written once):
load time, peak RSS, median seconds per decoded token, the ratio to gemma
as-is (run.py's float32), and the fraction of the memory-bandwidth bound: the
bytes a decode step must read (weights as stored, plus the KV cache) divided by
the read bandwidth measured in the same run, over the measured step time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _runner import ensure_checkpoint, memory_bandwidth, run

PROMPT = "the cat sees a dog near the river"
CONFIGS = (
    ("gemma as-is (float32)", "off", "float32", False),
    ("cpu-32gb (bfloat16)", "cpu-32gb", "bfloat16", False),
    ("cpu-8gb (int8, bfloat16)", "cpu-8gb", "bfloat16", True),
)


def bytes_per_token(variant: str, dtype: str, int8: bool, seq_len: int) -> int:
    """Weights read per decode step (the int8 path keeps the tied embedder in ``dtype``), plus KV."""
    from gemma_profiles.memory import DTYPE_BYTES, ModelShape

    shape = ModelShape.of_variant(variant)
    size = DTYPE_BYTES[dtype]
    if int8:
        layers = shape.num_hidden_layers * shape.layer_bytes(dtype, True)
        weights = layers + shape.embedding_weights * size
    else:
        weights = shape.weight_bytes(dtype, False)
    kv = shape.num_hidden_layers * seq_len * shape.num_key_value_heads * shape.head_dim * 2 * size
    return weights + kv


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
    bandwidth = memory_bandwidth(args.threads)
    print(f"gemma: {gemma_status().describe()}")
    print(f"checkpoint: {ckpt} ({format_bytes(ckpt.stat().st_size)}); threads {args.threads}")
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    spec = {
        "variant": args.variant,
        "ckpt": str(ckpt),
        "tokenizer": tokenizer,
        "prompt": PROMPT,
        "output_len": args.tokens,
        "threads": args.threads,
    }
    header = f"{'configuration':<28} {'load s':>7} {'peak RSS':>10} {'s/token':>8} {'vs gemma':>9} {'of bound':>9}"
    print(header)
    baseline = None
    for label, profile, dtype, int8 in CONFIGS:
        result = run(spec, profile)
        seconds = result["s_per_token"]
        baseline = baseline or seconds
        bound = bytes_per_token(args.variant, dtype, int8, 16 + args.tokens) / bandwidth
        print(
            f"{label:<28} {result['load_s']:>7.1f} {format_bytes(result['peak']):>10} {seconds:>8.3f} "
            f"{baseline / seconds:>8.2f}x {bound / seconds:>8.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
