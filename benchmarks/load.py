"""Loading a checkpoint: gemma_pytorch's ``load_weights`` against the lean loader, in one run.

    python benchmarks/load.py [--variant 2b] [--dir ~/.cache/gemma-bench]

For each configuration (fresh process, same random bf16 checkpoint, written
once): construction + ``load_weights`` time, then the same plus one generated
token (memory-mapped weights are read on first use, so that is the fair
comparison), and the peak RSS over both, as a multiple of the checkpoint's bytes.  gemma as-is builds float32 (run.py)
and copies; the profiles build lazily and assign memory-mapped tensors.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _runner import ensure_checkpoint, run

CONFIGS = (
    ("gemma as-is (float32)", "off"),
    ("cpu-32gb (bfloat16)", "cpu-32gb"),
    ("cpu-8gb (int8 on the fly)", "cpu-8gb"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="2b")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median reported)")
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "gemma-profiles-bench")
    args = parser.parse_args()

    from gemma_profiles.runtime.gemma_info import gemma_status
    from gemma_profiles.units import format_bytes

    ckpt, tokenizer = ensure_checkpoint(args.dir, args.variant)
    size = ckpt.stat().st_size
    print(f"gemma: {gemma_status().describe()}")
    print(f"checkpoint: {ckpt} ({format_bytes(size)})")
    spec = {
        "variant": args.variant,
        "ckpt": str(ckpt),
        "tokenizer": tokenizer,
        "prompt": "",
        "output_len": 0,
        "threads": args.threads,
        "first_token": True,
    }
    print(f"{'configuration':<28} {'load s':>7} {'+1st token':>10} {'vs gemma':>9} {'peak RSS':>10} {'x ckpt':>7}")
    reference = None
    for label, profile in CONFIGS:
        results = [run(spec, profile) for _ in range(args.repeats)]
        results.sort(key=lambda r: r["load_s"] + r["first_token_s"])
        middle = results[len(results) // 2]
        total = middle["load_s"] + middle["first_token_s"]
        reference = reference or total
        peak = max(middle["load_peak"], middle["first_token_peak"])
        print(
            f"{label:<28} {middle['load_s']:>7.1f} {total:>10.1f} {reference / total:>8.2f}x "
            f"{format_bytes(peak):>10} {peak / size:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
