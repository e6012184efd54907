"""Predicted vs measured peak memory: gemma-profiles' estimator against real runs.

For each configuration a fresh Python process runs gemma's run.py flow (build,
``load_weights``, ``generate``) on a random checkpoint of real Gemma widths
(fewer layers, so it fits this box) and reports its peak RSS above the RSS it
had after importing torch and gemma (``VmHWM`` - baseline).  The
prediction comes from `gemma_profiles.planning.memory.estimate_memory` with the same
shape and settings, before anything runs.  Configurations run with gemma as-is
(no profile; run.py's float32) and under profiles (through the .pth autoload).

    python benchmarks/memory_predict.py [--quick] [--keep DIR]

Prints a table with predicted, measured and their ratio; exits 1 when any
prediction is off by more than 10 %.  Needs gemma (gemma_pytorch or the stand-in).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

# name, variant, layers, compute dtype, int8, profile? (None: gemma as-is), checkpoint dtype
CONFIGS = [
    ("2b x4 layers, gemma as-is (float32)", "2b", 4, "float32", False, False, "float32"),
    ("2b x4 layers, profile bfloat16", "2b", 4, "bfloat16", False, True, "bfloat16"),
    ("2b-v2 x6 layers, profile float32", "2b-v2", 6, "float32", False, True, "float32"),
    ("1b (Gemma 3, all 26 layers), profile bfloat16", "1b", 26, "bfloat16", False, True, "bfloat16"),
    ("2b x4 layers, profile int8 + float32", "2b", 4, "float32", True, True, "float32"),
    ("2b x4 layers, profile int8 + bfloat16", "2b", 4, "bfloat16", True, True, "bfloat16"),
]
# A profile's int8 quantizes a float checkpoint while loading (what the CPU profiles do with
# the official bf16 checkpoints); gemma as-is with int8 needs its own int8 checkpoint.
QUICK = [0, 1, 4]
PROMPT = "the cat sees a dog near the river and the bird"
OUTPUT_LEN = 16

MEASURE = textwrap.dedent(
    """
    import json, sys
    import psutil, torch
    sys.path.insert(0, {tests!r})
    from gemma import config as gemma_config, model as gemma_model
    spec = json.loads({spec!r})
    model_config = gemma_config.get_model_config(spec["variant"])
    model_config.tokenizer = spec["tokenizer"]
    if not spec["profile"]:  # gemma as-is: run.py's own edits
        model_config.num_hidden_layers = spec["layers"]
        if model_config.attn_types is not None:
            model_config.attn_types = list(model_config.attn_types)[: spec["layers"]] or None
    model_config.dtype = "float32"
    model_config.quant = spec["int8"] if not spec["profile"] else False
    baseline = psutil.Process().memory_info().rss
    torch.set_default_dtype(model_config.get_dtype())
    model = gemma_model.GemmaForCausalLM(model_config)
    model.load_weights(spec["ckpt"])
    model = model.to("cpu").eval()
    torch.set_default_dtype(torch.float32)
    try:
        model.generate(spec["prompt"], "cpu", output_len=spec["output_len"], temperature=None)
    except IndexError:
        pass  # random weights pick ids the tiny tokenizer cannot decode; the peak came before

    # VmHWM, not ru_maxrss: ru_maxrss survives exec and starts at the parent's RSS.
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    tokens = len(model.tokenizer.encode(spec["prompt"]))
    print(json.dumps({{"baseline": baseline, "peak": peak, "prompt_tokens": tokens}}))
    """
)


def write_profile(folder: Path, name: str, variant: str, layers: int, dtype: str, int8: bool, tokenizer: str) -> Path:
    from gemma_profiles.spec.variants import VARIANTS

    attn = ""
    if VARIANTS[variant].family != "gemma1":
        from gemma import config as gemma_config

        types = [t.name for t in (gemma_config.get_model_config(variant).attn_types or [])][:layers]
        attn = f"\n  attn_types: [{', '.join(types)}]"
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ndescription: memory benchmark\nplacement: {{device: cpu}}\n"
        f"quantization: {{weights: {'int8' if int8 else 'none'}}}\n"
        f"config:\n  dtype: {dtype}\n  num_hidden_layers: {layers}\n  tokenizer: {tokenizer}{attn}\n"
    )
    return path


def final_config(variant: str, layers: int, dtype: str, int8: bool, tokenizer: str):  # type: ignore[no-untyped-def]
    import dataclasses

    from gemma import config as gemma_config

    config = gemma_config.get_model_config(variant)
    types = list(config.attn_types)[:layers] if config.attn_types is not None else None
    return dataclasses.replace(
        config, num_hidden_layers=layers, dtype=dtype, quant=int8, tokenizer=tokenizer, attn_types=types
    )


def make_checkpoint(config, path: Path, dtype: str) -> None:  # type: ignore[no-untyped-def]
    import torch
    from gemma import model as gemma_model
    from gemma_testing import write_random_checkpoint

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    with torch.device("meta"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            model = gemma_model.GemmaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    write_random_checkpoint(model, path, torch_dtype)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only configurations {QUICK}")
    parser.add_argument("--keep", type=Path, help="keep checkpoints in this folder")
    args = parser.parse_args()

    from gemma_testing import train_tiny_tokenizer

    from gemma_profiles.engine import native
    from gemma_profiles.planning.memory import ModelShape, estimate_memory
    from gemma_profiles.runtime.gemma_info import gemma_status
    from gemma_profiles.units import format_bytes

    work = args.keep or Path(tempfile.mkdtemp(prefix="gemma-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.keep:  # several GiB of checkpoints: gone when the script ends
        import atexit
        import shutil

        atexit.register(shutil.rmtree, work, True)
    tokenizer = train_tiny_tokenizer(work / "tok")
    print(f"gemma: {gemma_status().describe()}")
    print(f"{'configuration':<48} {'predicted':>11} {'measured':>11} {'ratio':>6}")
    worst = 0.0
    chosen = [CONFIGS[i] for i in QUICK] if args.quick else CONFIGS
    for index, (label, variant, layers, dtype, int8, profiled, ckpt_dtype) in enumerate(chosen):
        config = final_config(variant, layers, dtype, int8, tokenizer)
        int8_checkpoint = int8 and not profiled
        ckpt = work / f"ckpt-{variant}-{layers}-{ckpt_dtype}-{int(int8_checkpoint)}.pt"
        if not ckpt.exists():
            make_checkpoint(dataclasses.replace(config, quant=int8_checkpoint), ckpt, ckpt_dtype)
        env = dict(os.environ)
        env.pop("GEMMA_PROFILE", None)
        if profiled:
            env["GEMMA_PROFILE"] = str(write_profile(work, f"bench{index}", variant, layers, dtype, int8, tokenizer))
        else:
            env["GEMMA_PROFILE"] = "off"
        spec = json.dumps(
            {
                "variant": variant,
                "layers": layers,
                "int8": int8,
                "profile": profiled,
                "ckpt": str(ckpt),
                "tokenizer": tokenizer,
                "prompt": PROMPT,
                "output_len": OUTPUT_LEN,
            }
        )
        code = MEASURE.format(tests=str(HERE.parent / "tests"), spec=spec)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{label}: failed\n{done.stderr[-2000:]}")
            return 2
        result = json.loads(done.stdout.strip().splitlines()[-1])
        measured = result["peak"] - result["baseline"]
        estimate = estimate_memory(
            ModelShape.of_config(config),
            dtype=dtype,
            int8=int8,
            device="cpu",
            seq_len=result["prompt_tokens"] + OUTPUT_LEN,
            prefill_tokens=result["prompt_tokens"],
            checkpoint_dtype=ckpt_dtype,
            engine="profiles" if profiled else "gemma",
            cpu_int8_kernel=native.unavailable() is None,
        )
        predicted = estimate.peak["cpu"]
        ratio = predicted / measured
        worst = max(worst, abs(ratio - 1))
        print(f"{label:<48} {format_bytes(predicted):>11} {format_bytes(measured):>11} {ratio:>6.3f}")
    print(f"worst error: {worst * 100:.1f} % (limit 10 %)")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
