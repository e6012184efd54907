"""gemma's ``scripts/run.py`` flow on a tiny model, reporting what was built as JSON.

The calls and their order are run.py's: ``get_model_config(variant)``, then
``dtype = "float32"`` and ``quant`` set *after* it, the model constructed and
loaded under ``set_default_dtype(config.get_dtype())``, ``.to(device)``, then
``generate(prompt, device, ...)``.  The one addition is shrinking the config to
a few thousand weights so tests run in seconds.  No gemma-profiles import:
whatever happens to the model is the .pth autoload's doing.

    python tests/run_flow.py --ckpt X --tokenizer T [--variant 2b] [--device cpu] [--quant]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    torch.set_default_dtype(dtype)
    yield
    torch.set_default_dtype(torch.float)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--variant", default="2b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quant", action="store_true")
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--write-ckpt", action="store_true", help="write a random checkpoint for the built model first")
    args = parser.parse_args()

    from gemma import config
    from gemma import model as gemma_model
    from gemma_testing import tiny_config, write_random_checkpoint

    model_config = tiny_config(config, args.variant, args.tokenizer)
    model_config.dtype = "float32"
    model_config.quant = args.quant
    report: dict[str, object] = {}
    device = torch.device(args.device)
    try:
        with default_dtype(model_config.get_dtype()):
            model = gemma_model.GemmaForCausalLM(model_config)
            report["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
            report["float_param_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
            report["config_dtype"] = model.config.dtype
            report["script_config_dtype"] = model_config.dtype
            if args.write_ckpt:
                write_random_checkpoint(model, args.ckpt, torch.float32)
            model.load_weights(args.ckpt)
            model = model.to(device).eval()
        report["device"] = str(next(model.parameters()).device)
        result = model.generate("the cat sees", device, output_len=args.output_len, temperature=None)
        report["result"] = result
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
