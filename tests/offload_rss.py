"""Peak RSS of gemma's flow under disk offload, in a fresh process (run by tests/test_offload.py).

Prints one JSON line: the RSS after imports (the baseline), the weights' size, the
peak up to the end of loading (construction, load, packing layers into files),
and the peak while generating (``VmHWM`` reset after loading).  Linux only.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))


def rss_config(gemma_config: Any, tokenizer: str, layers: int) -> Any:
    """gemma's 2b with layers wide enough that they dominate the weights (13 MiB each in float32)."""
    from gemma_testing import tiny_config

    config = tiny_config(gemma_config, "2b", tokenizer, dtype="float32")
    return dataclasses.replace(
        config, hidden_size=256, intermediate_size=4096, head_dim=64, num_hidden_layers=layers, quant=False
    )


def status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--layers", type=int, required=True)
    args = parser.parse_args()

    from gemma import config as gemma_config
    from gemma import model as gemma_model

    import gemma_profiles

    config = rss_config(gemma_config, args.tokenizer, args.layers)
    baseline = status("VmRSS")
    with gemma_profiles.use(args.profile):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            model = gemma_model.GemmaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        model.load_weights(args.ckpt)
        model = model.to("cpu").eval()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        peak_load = status("VmHWM")
        after_load = status("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
        text = model.generate("the cat sees", "cpu", output_len=3, temperature=None)
        peak_generate = status("VmHWM")
    report = {
        "baseline": baseline,
        "weights": weights,
        "peak_load": peak_load,
        "after_load": after_load,
        "peak_generate": peak_generate,
        "lazy_loader": importlib.util.find_spec("gemma_profiles.engine.lazy") is not None,
        "text": text,
        "config": {
            k: str(v) for k, v in dataclasses.asdict(config).items() if k in ("hidden_size", "num_hidden_layers")
        },
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
