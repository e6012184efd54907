"""Shared by the CPU benchmarks: a random 2b checkpoint, and one measured run per process.

Each configuration runs in a fresh interpreter through gemma's run.py flow:
``get_model_config(variant)`` (or, with ``folder`` in the spec, the config of a model
imported by ``gemma-profile import``), ``dtype = "float32"``, construct under
``set_default_dtype``, ``load_weights``, ``generate``.  "gemma as-is" runs with
``GEMMA_PROFILE=off``; a profile runs through the .pth autoload, so the script
is the same.  Peak memory is ``VmHWM`` (``ru_maxrss`` survives exec and starts
at the parent's RSS) minus the RSS after imports (``peak``); ``peak_rss`` is the whole
process's, for comparing with another program; ``tokens`` are the ids ``generate`` picked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path.insert(0, str(TESTS))

RUN = r"""
import json, os, statistics, sys, time
import psutil, torch
sys.path.insert(0, {tests!r})
from gemma import config as gemma_config, model as gemma_model
spec = json.loads({spec!r})
torch.set_num_threads(spec["threads"])
if spec.get("folder"):
    # A model imported with `gemma-profile import` (a real Gemma): its config, run.py's float32.
    from gemma_profiles.tools import gguf_import
    model_config = gguf_import.load_config(spec["folder"], "float32")
else:
    model_config = gemma_config.get_model_config(spec["variant"])
    model_config.tokenizer = spec["tokenizer"]
    model_config.dtype = "float32"
    model_config.quant = False
baseline = psutil.Process().memory_info().rss
rss = lambda: psutil.Process().memory_info().rss
start = time.perf_counter()
torch.set_default_dtype(model_config.get_dtype())
model = gemma_model.GemmaForCausalLM(model_config)
built_rss = rss()  # gemma's construction: its rope tables and tokenizer, no weights yet
model.load_weights(spec["ckpt"])
model = model.to("cpu").eval()
torch.set_default_dtype(torch.float32)
load_s = time.perf_counter() - start
hwm = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
# Absolute figures too (a peer such as llama.cpp is compared on the whole process): RSS after
# the imports, after construction, after loading, and the high-water mark of loading alone.
result = {{"load_s": load_s, "load_peak": hwm() - baseline, "import_rss": baseline, "built_rss": built_rss,
           "loaded_rss": rss(), "load_hwm": hwm()}}
if spec.get("first_token"):
    # Memory-mapped weights are read on first use: time one token and its peak too.
    start = time.perf_counter()
    try:
        model.generate("the", "cpu", output_len=1, temperature=None)
    except IndexError:
        pass
    result.update(first_token_s=time.perf_counter() - start, first_token_peak=hwm() - baseline)
if spec["output_len"]:
    steps, bandwidths = [], []
    probes = []
    if spec.get("bandwidth"):
        # 256 MiB of float32 (8x the L3 here) twice: on ordinary pages, as torch allocates, and
        # on 2 MiB pages, as the int8 weights are (gemma_profiles/engine/hugepages.py); the faster
        # read sets the bound, so weights on huge pages are not set against a slower probe.
        from gemma_profiles.engine import hugepages
        probes.append(torch.ones(2**26))
        probes.append(hugepages.empty((2**26,), torch.float32, switchable=False).fill_(1.0))
    picked = []
    load_hwm = hwm()
    try:
        # From here VmHWM counts generation alone (Linux: "5" resets the peak RSS).
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    def pre(module, args, kwargs):
        steps.append(time.perf_counter())
    def post(module, args, kwargs, output):
        steps[-1] = time.perf_counter() - steps[-1]
        picked.append(int(output[0].reshape(-1)[0]))
        if probes:
            # Read bandwidth right after each step, in this process: on a shared host it
            # drifts (46-80 GB/s on the same box within minutes), so each step gets its own.
            best = float("inf")
            for _ in range(3):
                for probe in probes:
                    start = time.perf_counter()
                    probe.sum()
                    best = min(best, time.perf_counter() - start)
            bandwidths.append(2**28 / best)
    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)
    sampler_steps = []  # the sampler's share of each step: the product with the tied embedder
    if getattr(model, "sampler", None) is not None:
        def sampler_pre(module, args, kwargs):
            sampler_steps.append(time.perf_counter())
        def sampler_post(module, args, kwargs, output):
            sampler_steps[-1] = time.perf_counter() - sampler_steps[-1]
        model.sampler.register_forward_pre_hook(sampler_pre, with_kwargs=True)
        model.sampler.register_forward_hook(sampler_post, with_kwargs=True)
    try:
        model.generate(spec["prompt"], "cpu", output_len=spec["output_len"], temperature=None)
    except IndexError:
        pass  # random weights pick ids the tiny tokenizer cannot decode; timing is done
    decode = steps[1:]  # steps[0] is the prefill
    result.update(s_per_token=statistics.median(decode), steps=len(decode), prefill_s=steps[0])
    result.update(generate_hwm=hwm(), peak_rss=max(load_hwm, hwm()), peak=max(load_hwm, hwm()) - baseline)
    result["prompt_tokens"] = len(model.tokenizer.encode(spec["prompt"]))
    result.update(tokens=picked, end_rss=rss(), decode_steps=decode, sampler_steps=sampler_steps[1:])
    result["dtypes"] = sorted({{str(p.dtype) for p in model.parameters()}})
    if bandwidths:
        result["bandwidths"] = bandwidths[1:]
print(json.dumps(result))
"""


def ensure_checkpoint(folder: Path, variant: str = "2b", dtype: str = "bfloat16") -> tuple[Path, str]:
    """A random checkpoint of the full variant (bf16, like the official one) and a tiny tokenizer."""
    import torch
    from gemma_testing import train_tiny_tokenizer, write_random_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = str(folder / "tok" / "tiny_tokenizer.model")
    if not os.path.exists(tokenizer):
        tokenizer = train_tiny_tokenizer(folder / "tok")
    ckpt = folder / f"gemma-{variant}-random-{dtype}.ckpt"
    if not ckpt.exists():
        from gemma import config as gemma_config
        from gemma import model as gemma_model

        print(f"writing a random {variant} checkpoint to {ckpt} (once)...", flush=True)
        config = gemma_config.get_model_config(variant)
        config.tokenizer = tokenizer
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in gemma_model.GemmaForCausalLM(config).named_parameters()}
        partial = ckpt.with_suffix(".partial")
        write_random_checkpoint(shapes, partial, getattr(torch, dtype))
        partial.rename(ckpt)
    return ckpt, tokenizer


def run(spec: dict[str, Any], profile: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One configuration in a fresh interpreter; ``profile`` is a name/path or "off"."""
    env = dict(os.environ, GEMMA_PROFILE=profile, GEMMA_PROFILE_LOG="WARNING", **(env or {}))
    code = RUN.format(tests=str(TESTS), spec=json.dumps(spec))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{profile}: failed\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result
