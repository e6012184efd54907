"""Decode speed on the CPU: gemma_pytorch as-is against the CPU profiles, in one run.

    python benchmarks/cpu_decode.py [--variant 2b] [--tokens 16] [--rounds 3] [--prompt-repeat 1]
                                    [--dir ~/.cache/gemma-bench]

For each configuration (fresh process, same random checkpoint, written once):
load time, peak RSS, the prompt's prefill time, median seconds per decoded token, the ratio to gemma
as-is (run.py's float32), and the fraction of the memory-bandwidth bound: the
bytes a decode step must read (weights as stored, plus the KV cache) divided by
the read bandwidth, over the measured step time.  The bandwidth (best of 3
``sum()`` of a 256 MiB float32 tensor, 8x the L3 cache, on 4 KiB pages and again on
2 MiB pages: the faster) is measured right after
every decode step, in the same process: on a shared host it drifts by a factor
of almost two within minutes, so each step is set against the bandwidth of its
own moment and the column is the median over steps of (bytes / bandwidth) /
step time.  The peak RSS column includes those probes' 512 MiB.

"cpu-8gb, gemma's layer forwards" is cpu-8gb with ``GEMMA_PROFILE_DISABLE_PLUGINS=fused``
(the native int8 kernel, but gemma's own norms, attention, MLP middle and argmax), to show
what the fused layers add; "cpu-8gb, no native library" is cpu-8gb with
``GEMMA_PROFILE_NATIVE=0`` - what a machine without a C compiler gets: torch's
``_weight_int8pack_mm`` and gemma's own layer forwards; "cpu-8gb, 4 KiB pages" is cpu-8gb
with ``GEMMA_PROFILE_HUGEPAGES=0`` (the int8 weights on ordinary pages: what a system with
transparent huge pages off gets).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from _runner import ensure_checkpoint, run

PROMPT = "the cat sees a dog near the river"
CONFIGS: tuple[tuple[str, str, str, bool, dict[str, str]], ...] = (
    ("gemma as-is (float32)", "off", "float32", False, {}),
    ("cpu-32gb (bfloat16)", "cpu-32gb", "bfloat16", False, {}),
    ("cpu-8gb (int8, bfloat16)", "cpu-8gb", "bfloat16", True, {}),
    ("cpu-8gb, gemma's layer forwards", "cpu-8gb", "bfloat16", True, {"GEMMA_PROFILE_DISABLE_PLUGINS": "fused"}),
    ("cpu-8gb, no native library", "cpu-8gb", "bfloat16", True, {"GEMMA_PROFILE_NATIVE": "0"}),
    ("cpu-8gb, 4 KiB pages", "cpu-8gb", "bfloat16", True, {"GEMMA_PROFILE_HUGEPAGES": "0"}),
)


def bytes_per_token(variant: str, dtype: str, int8: bool, seq_len: int) -> int:
    """Weights read per decode step (int8: every linear and the tied embedder, plus scalers), plus KV."""
    from gemma_profiles.planning.memory import DTYPE_BYTES, ModelShape

    shape = ModelShape.of_variant(variant)
    size = DTYPE_BYTES[dtype]
    kv = shape.num_hidden_layers * seq_len * shape.num_key_value_heads * shape.head_dim * 2 * size
    return shape.weight_bytes(dtype, int8) + kv


def show(label: str, row: dict[str, float], gemma_seconds: float, format_bytes: Any) -> None:
    print(
        f"{label:<32} {row['load_s']:>7.1f} {format_bytes(int(row['peak'])):>10} {row['prefill_s']:>9.2f} "
        f"{row['seconds']:>8.3f} "
        f"{gemma_seconds / row['seconds']:>8.2f}x {row['needed'] / 1e9:>9.2f} {row['bandwidth'] / 1e9:>5.1f} GB/s "
        f"{row['fraction']:>8.0%}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="2b")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="run every configuration this many times, round-robin")
    parser.add_argument("--prompt-repeat", type=int, default=1, help="repeat the 8-token prompt: a long context")
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "gemma-profiles-bench")
    args = parser.parse_args()

    from gemma_profiles.runtime.gemma_info import gemma_status
    from gemma_profiles.units import format_bytes

    ckpt, tokenizer = ensure_checkpoint(args.dir, args.variant)
    print(f"gemma: {gemma_status().describe()}")
    print(f"checkpoint: {ckpt} ({format_bytes(ckpt.stat().st_size)}); threads {args.threads}")
    import sentencepiece

    prompt = " ".join([PROMPT] * args.prompt_repeat)
    tokens = len(sentencepiece.SentencePieceProcessor(model_file=tokenizer).encode(prompt))
    print(f"prompt: {tokens} tokens; {args.tokens} generated")
    spec = {
        "variant": args.variant,
        "ckpt": str(ckpt),
        "tokenizer": tokenizer,
        "prompt": prompt,
        "output_len": args.tokens,
        "threads": args.threads,
        "bandwidth": True,
    }
    header = (
        f"{'configuration':<32} {'load s':>7} {'peak RSS':>10} {'prefill s':>9} {'s/token':>8} {'vs gemma':>9} "
        f"{'GB/token':>9} {'bandwidth':>10} {'of bound':>9}"
    )
    rows: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in CONFIGS}
    for round_ in range(args.rounds):
        if args.rounds > 1:
            print(f"round {round_ + 1} of {args.rounds}")
        print(header)
        for label, profile, dtype, int8, env in CONFIGS:
            result = run(spec, profile, env)
            needed = bytes_per_token(args.variant, dtype, int8, result["prompt_tokens"] + args.tokens)
            pairs = zip(result["decode_steps"], result["bandwidths"], strict=True)
            rows[label].append(
                {
                    "load_s": result["load_s"],
                    "prefill_s": result["prefill_s"],
                    "peak": result["peak"],
                    "seconds": result["s_per_token"],
                    "needed": needed,
                    "bandwidth": statistics.median(result["bandwidths"]),
                    "fraction": statistics.median(needed / bandwidth / step for step, bandwidth in pairs),
                }
            )
            show(label, rows[label][-1], rows[CONFIGS[0][0]][-1]["seconds"], format_bytes)
    if args.rounds > 1:
        print(f"median of {args.rounds} rounds (vs gemma: ratio of the medians)")
        print(header)
        medians = {}
        for label, runs in rows.items():
            medians[label] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for label, median in medians.items():
            show(label, median, medians[CONFIGS[0][0]]["seconds"], format_bytes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
