"""int8 weights for transformers' Gemma on CUDA: bitsandbytes' LLM.int8() under t4 and pascal-5gb (issue 17).

    python benchmarks/gpu_transformers_int8.py [--layers 26] [--tokens 16] [--keep DIR]

Needs a CUDA device, transformers, accelerate and bitsandbytes (``pip install
"gemma-profiles[hf,cuda-int8]"``; offline, from wheels: bitsandbytes' manylinux wheel carries its
CUDA libraries).  Without CUDA it exits 2 with one line: the CPU side of the same checks is
tests/test_transformers_bnb.py, which imports this file's helpers.

Each system runs in a child process of its own (``--child``), a plain
``AutoModelForCausalLM.from_pretrained(folder)`` under ``GEMMA_PROFILE=<profile>`` - what an
unmodified script gets - and prints one JSON line: its bitsandbytes layers, whether every logit is
finite, the teacher-forced logits' KL against transformers' own float32 model, greedy tokens, and
CUDA memory (``max_memory_allocated``).  The models are random, written with transformers' own config
classes and ``save_pretrained`` into a temporary folder (no download), their layers strengthened so
that greedy text means something and activations are large (`strengthen`):

1. t4 on a Gemma 3 with Gemma 2 2b's layer shapes (hidden 2304, MLP 9216, 8 heads, 4 KV heads of
   256; ``--layers``, vocabulary 262144), float32 compute: every linear layer a ``Linear8bitLt``.  t4 gives
   int8 to its 7b, 9b, 12b and 27b only (too large to make at random here), so the profile is
   `T4_INT8`, a file extending t4 with ``quantization: {weights: int8}`` for every model;
2. ``pascal-5gb`` under a 5 GiB allocator cap (``torch.cuda.set_per_process_memory_fraction``), a
   Gemma 1 2b (its profile's int8 + float16 compute; its Gemma 2/3 store float16 weights instead).
   The profile describes a Pascal card (compute capability 6.1, below LLM.int8()'s 7.5), but the plan
   is made for the GPU detected here, so LLM.int8() runs; the refusal on 6.1 is a CPU test;
3. the float16 dequantization bound: a tiny Gemma 3 whose ``q_proj`` weights are scaled so that the
   int8 part of its products passes 65504 (its ``q_norm`` keeps the model itself finite).  Under t4-int8
   the layers are scaled (finite logits); with the script's own ``BitsAndBytesConfig`` they are not,
   and bitsandbytes' float16 dequantization kernel gives inf - which is what hooks/transformers.py's
   ``bound_bitsandbytes`` is for.  Exit 1 if that control is finite: the premise would be wrong.

Exit 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The teacher-forced ids and the greedy prompt (tokens of a random model's vocabulary).
TEXT = [[(3 + 7 * i) % 509 for i in range(96)]]
PROMPT = [[2, 17, 33, 101, 7, 250, 61, 5]]
#: `scale_queries`' factor: weights of up to ~2.4e4 (float16 holds them), products of ~5e4 and more.
QUERY_SCALE = 3e5
#: Strength of the layers over the embedding (`strengthen`).
STRENGTH = 16.0
GiB = 2**30
#: t4 with int8 weights for every model (t4 itself gives them to 7b, 9b, 12b and 27b only).
T4_INT8 = """name: t4-int8
extends: t4
description: "t4 with int8 weights for every model (benchmarks/gpu_transformers_int8.py)"
quantization: {weights: int8}
"""
#: Layer shapes (transformers' config fields); vocabulary and layers set by the caller.
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16, max_position_embeddings=256)
SHAPE_2B = dict(
    hidden_size=2304, intermediate_size=9216, num_attention_heads=8, head_dim=256, max_position_embeddings=1024
)
GEMMA1_2B = dict(
    hidden_size=2048, intermediate_size=16384, num_attention_heads=8, head_dim=256, max_position_embeddings=1024
)
KV_HEADS = {"gemma3": 1, "gemma2": 2, "gemma": 1}


def build(kind: str, *, layers: int = 2, vocab: int = 512, shape: dict[str, int] | None = None, **extra: Any) -> Any:
    """A random transformers Gemma (``kind``: ``gemma3``, ``gemma2``, ``gemma``), seeded, float32."""
    import torch
    import transformers

    torch.manual_seed(0)
    fields: dict[str, Any] = dict(shape or TINY)
    fields.update(vocab_size=vocab, num_hidden_layers=layers, initializer_range=0.02, **extra)
    fields.setdefault("num_key_value_heads", KV_HEADS[kind])
    if kind == "gemma3":
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(sliding_window=32, **fields))
    if kind == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(sliding_window=32, **fields))
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(**fields))


def strengthen(model: Any, kind: str, strength: float = STRENGTH, feedforward_norm: float | None = None) -> Any:
    """Layers that outweigh the embedding in the residual stream (otherwise a random model with a tied
    embedder predicts its input again): ``o_proj``/``down_proj`` times ``strength``, Gemma 2/3's post-norms
    filled with it.  ``feedforward_norm``: Gemma 2/3's ``pre_feedforward_layernorm`` weights filled with it,
    so that the MLP's inputs - and ``down_proj``'s, the product of two of them - are large (as after a
    trained checkpoint's norm weights): above 65504, float16's largest value, for 2000."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(strength)
            layer.mlp.down_proj.weight.mul_(strength)
            if kind != "gemma":
                layer.post_attention_layernorm.weight.fill_(strength)
                layer.post_feedforward_layernorm.weight.fill_(strength)
                if feedforward_norm is not None:
                    layer.pre_feedforward_layernorm.weight.fill_(feedforward_norm)
    return model


def scale_queries(model: Any, factor: float) -> Any:
    """Gemma 3's ``q_proj`` weights times ``factor``: its ``q_norm`` normalizes the queries, so the model
    computes the same, while the products themselves grow past float16's range."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
    return model


def int8_layers(model: Any) -> int:
    """How many of the model's modules are bitsandbytes' ``Linear8bitLt``."""
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())


def answers(model: Any, tokens: int = 12) -> dict[str, Any]:
    """Teacher-forced logits over `TEXT` (float64, on the CPU) and ``tokens`` greedy tokens after `PROMPT`."""
    import torch

    device = next(p.device for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.tensor(TEXT, device=device)).logits[0].double().cpu()
        out = model.generate(torch.tensor(PROMPT, device=device), max_new_tokens=tokens, do_sample=False)
    return {"logits": logits, "tokens": out[0, len(PROMPT[0]) :].tolist()}


def kl(reference: Any, other: Any) -> float:
    """Mean KL(reference || other) over positions (float64 logits)."""
    import torch

    p, q = torch.log_softmax(reference, -1), torch.log_softmax(other, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


# -- the GPU run ---------------------------------------------------------------------------------------------


def child(folder: str, options: dict[str, Any]) -> dict[str, Any]:
    """One system, in this process: a plain ``from_pretrained`` (the profile from ``GEMMA_PROFILE``)."""
    import torch
    import transformers

    if options.get("cap_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, options["cap_gib"] * GiB / total), 0)
    kwargs = dict(options.get("kwargs", {}))
    if "quantization_config" in kwargs:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(**kwargs["quantization_config"])
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    loaded = time.perf_counter() - started
    result = answers(model, options.get("tokens", 12))
    logits = result.pop("logits")
    torch.save(logits, options["logits"])
    return {
        "int8_layers": int8_layers(model),
        "finite": bool(torch.isfinite(logits).all()),
        "tokens": result["tokens"],
        "devices": sorted({p.device.type for p in model.parameters()}),
        "dtype": str(next(p.dtype for p in model.parameters() if p.is_floating_point())),
        "load_s": round(loaded, 1),
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 3) if torch.cuda.is_available() else None,
    }


def run_child(folder: Path, profile: str, work: Path, name: str, **options: Any) -> dict[str, Any]:
    env = dict(os.environ, GEMMA_PROFILE=profile, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    options["logits"] = str(work / f"{name}.pt")
    command = [sys.executable, __file__, "--child", str(folder), json.dumps(options)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    tag = "[" + Path(profile).stem + "]"
    lines = [line for line in completed.stderr.splitlines() if tag in line or "Error" in line]
    print(f"--- {name} (GEMMA_PROFILE={profile}): exit {completed.returncode}")
    for line in lines[-12:]:
        print("   ", line[:300])
    if completed.returncode != 0:
        print(completed.stderr[-3000:])
        raise SystemExit(f"{name}: the child failed (exit {completed.returncode})")
    answer: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    import torch

    answer["logits"] = torch.load(options["logits"])
    return answer


def compare(name: str, got: dict[str, Any], reference: dict[str, Any], layers: int, failures: list[str]) -> None:
    divergence = kl(reference["logits"], got["logits"]) if got["finite"] else float("inf")
    same = agreement(reference["tokens"], got["tokens"])
    print(
        f"{name}: {got['int8_layers']} Linear8bitLt (want {layers}), finite {got['finite']}, KL {divergence:.2e}, "
        f"greedy agreement {same:.0%}, {got['dtype']} on {got['devices']}, CUDA peak {got['cuda_peak_gib']} GiB "
        f"(float32 reference: {reference['cuda_peak_gib']} GiB), load {got['load_s']} s"
    )
    if got["int8_layers"] != layers:
        failures.append(f"{name}: {got['int8_layers']} Linear8bitLt layers, want {layers}")
    if not got["finite"]:
        failures.append(f"{name}: logits not finite")
    if divergence > 0.05 or same < 0.5:
        failures.append(f"{name}: KL {divergence:.3g}, greedy agreement {same:.0%} against float32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=26, help="decoder layers of the 2b-shaped models")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens per system")
    parser.add_argument("--keep", type=Path, help="write the models here (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return 0
    try:
        import torch
    except ImportError:
        print("gpu_transformers_int8.py: needs torch", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "gpu_transformers_int8.py: needs CUDA (torch.cuda.is_available() is False here); "
            "its CPU side is tests/test_transformers_bnb.py",
            file=sys.stderr,
        )
        return 2
    missing = [name for name in ("transformers", "accelerate", "bitsandbytes") if not _importable(name)]
    if missing:
        print(
            f"gpu_transformers_int8.py: needs {', '.join(missing)} (pip install 'gemma-profiles[hf,cuda-int8]')",
            file=sys.stderr,
        )
        return 2
    capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
    print(f"{torch.cuda.get_device_name(0)} (compute capability {capability})")
    root = args.keep or Path(tempfile.mkdtemp(prefix="gpu-hf-int8-"))
    root.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    t4 = root / "t4-int8.yaml"
    t4.write_text(T4_INT8)
    float32 = {"kwargs": {"dtype": "float32", "device_map": "cuda:0"}, "tokens": args.tokens}

    # 1. t4: Gemma 3, 2b layer shapes, float32 compute.
    folder = root / "gemma3-2b"
    if not (folder / "config.json").is_file():
        started = time.perf_counter()
        model = build("gemma3", layers=args.layers, vocab=262144, shape=SHAPE_2B, num_key_value_heads=4)
        strengthen(model, "gemma3").to(torch.bfloat16).save_pretrained(folder)  # as checkpoints are
        del model
        print(f"wrote {folder} in {time.perf_counter() - started:.0f} s")
    reference = run_child(folder, "off", root, "gemma3 float32", **float32)
    got = run_child(folder, str(t4), root, "gemma3 t4-int8", tokens=args.tokens)
    compare("t4-int8, Gemma 3 (2b layer shapes)", got, reference, 7 * args.layers, failures)

    # 2. pascal-5gb: Gemma 1 2b, int8 + float16 compute, under a 5 GiB cap.
    folder = root / "gemma-2b"
    if not (folder / "config.json").is_file():
        model = strengthen(build("gemma", layers=18, vocab=256000, shape=GEMMA1_2B), "gemma")
        model.to(torch.bfloat16).save_pretrained(folder)
        del model
    reference = run_child(folder, "off", root, "gemma float32", **float32)
    got = run_child(folder, "pascal-5gb", root, "gemma pascal-5gb", tokens=args.tokens, cap_gib=5)
    compare("pascal-5gb, Gemma 1 2b, 5 GiB cap", got, reference, 7 * 18, failures)
    if got["cuda_peak_gib"] is not None and got["cuda_peak_gib"] > 5:
        failures.append(f"pascal-5gb: CUDA peak {got['cuda_peak_gib']} GiB over the 5 GiB cap")

    # 3. the float16 dequantization bound.
    folder = root / "gemma3-queries"
    if not (folder / "config.json").is_file():
        scale_queries(strengthen(build("gemma3"), "gemma3"), QUERY_SCALE).save_pretrained(folder)
    reference = run_child(folder, "off", root, "queries float32", **float32)
    got = run_child(folder, str(t4), root, "queries t4-int8", tokens=args.tokens)
    compare("t4-int8, q_proj products past 65504", got, reference, 14, failures)
    own = {"quantization_config": {"load_in_8bit": True}, "dtype": "float32", "device_map": "cuda:0"}
    control = run_child(folder, "off", root, "queries own config", tokens=args.tokens, kwargs=own)
    print(f"the script's own BitsAndBytesConfig (no bound): finite {control['finite']} (expected: False)")
    if control["finite"]:
        failures.append("the unbounded control is finite: bitsandbytes' CUDA dequantization is not float16 here")

    for failure in failures:
        print("FAIL:", failure)
    print("gpu_transformers_int8:", "all checks hold" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
