"""benchmarks/peer_llamacpp.py: llama.cpp found (or skipped with one line), ratios within rounds,
a saved run printed again. The llama.cpp worker itself runs only where llama-cpp-python is
installed (``GEMMA_PROFILE_LLAMA_PYTHON`` names its python)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import peer_llamacpp  # noqa: E402


def run_result(decode_s: float, peak_mib: float, prefill_s: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {
        "load_s": 1.0,
        "prefill_s": prefill_s,
        "decode_steps": [decode_s] * 5,
        "peak_rss": peak_mib * 2**20,
        "import_rss": 40 * 2**20,
        "loaded_rss": peak_mib * 2**20,
        "tokens": [1, 2, 3],
        **extra,
    }


def test_a_python_without_llama_cpp_is_one_line(tmp_path: Path) -> None:
    missing = peer_llamacpp.find_llama(str(tmp_path / "bin" / "python"))
    assert (
        missing
        == f"--llama-python {tmp_path / 'bin' / 'python'}: no such file (a python with llama-cpp-python installed)"
    )
    if importlib.util.find_spec("llama_cpp") is None:
        reason = peer_llamacpp.find_llama(sys.executable)
        assert reason == (
            f"llama_cpp is not importable by {sys.executable} (pip install llama-cpp-python there, "
            "or pass --llama-python with a python that has it)"
        )


def test_ratios_are_taken_within_each_round() -> None:
    rounds = [
        {"cpu-8gb": peer_llamacpp.summarize(run_result(0.1, 700), 10)},
        {"cpu-8gb": peer_llamacpp.summarize(run_result(0.2, 700), 10)},
    ]
    rounds[0]["llama-Q8_0"] = peer_llamacpp.summarize(run_result(0.05, 350), 10)
    rounds[1]["llama-Q8_0"] = peer_llamacpp.summarize(run_result(0.4, 350), 10)
    ratios = {(ours, figure): values for ours, _, figure, values in peer_llamacpp.ratio_rows(rounds)}
    assert ratios[("cpu-8gb", "decode_tps")] == pytest.approx([0.5, 2.0])  # not the ratio of the medians
    assert ratios[("cpu-8gb", "peak_mib")] == pytest.approx([2.0, 2.0])
    assert ("cpu-32gb", "decode_tps") not in ratios  # its peer did not run


def test_a_saved_run_prints_its_tables_again(tmp_path: Path) -> None:
    runs = []
    for number in (1, 2, 3):
        ours = run_result(0.1 * number, 700, built_rss=400 * 2**20, load_hwm=690 * 2**20, generate_hwm=700 * 2**20)
        runs.append({"round": number, "system": "cpu-8gb", **ours})
        runs.append({"round": number, "system": "llama-Q8_0", **run_result(0.1, 350)})
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"prompt_tokens": 10, "gigabytes": {"cpu-8gb": 0.27}, "runs": runs}))
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "peer_llamacpp.py"), "--report", str(saved)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "cpu-8gb / llama.cpp Q8_0, decode tokens/s: 0.50x (0.33-1.00)" in done.stdout
    assert "cpu-8gb / llama.cpp Q8_0, peak RSS: 2.00x (2.00-2.00)" in done.stdout
    assert "| ours cpu-8gb (int8) | 40 | 400 | 700 | 690 | 700 | 700 |" in done.stdout
    assert "| llama.cpp Q8_0 | 40 | - | 350 | - | - | 350 |" in done.stdout


def test_bad_arguments_are_one_line() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "peer_llamacpp.py"), "--systems", "cpu-8gb,llama-q4"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "peer_llamacpp.py: unknown system 'llama-q4' in --systems "
        "(known: gemma, cpu-32gb, cpu-8gb, llama-BF16, llama-Q8_0)"
    )


@pytest.mark.skipif(not os.environ.get("GEMMA_PROFILE_LLAMA_PYTHON"), reason="GEMMA_PROFILE_LLAMA_PYTHON is not set")
def test_the_worker_runs_under_the_llama_python() -> None:
    found = peer_llamacpp.find_llama(None)
    assert isinstance(found, tuple), found
    python, info = found
    assert info["version"] and "CPU" in info["system_info"]
    with pytest.raises(peer_llamacpp.PeerError, match=r"the llama\.cpp worker failed \(run\)"):
        peer_llamacpp.call_worker(python, {"op": "run", "gguf": "/nonexistent.gguf", "ids": [2], "threads": 1})
