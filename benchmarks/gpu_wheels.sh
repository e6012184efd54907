#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a GPU machine without a package registry, in one
# folder under the device tool's 64 MiB carry limit (default .whl; ignored by git, never committed):
#     bash benchmarks/gpu_wheels.sh [FOLDER]
# - what gemma-profiles needs beyond torch, pluggy, pyyaml, click, psutil, sentencepiece and pytest
#   (which the machine has): loguru, pydantic (+ its core), platformdirs;
# - for the transformers int8 step (hfint8): transformers 5.24 (the version the tests use) and
#   bitsandbytes - 43 MB as published, because it carries a library for each CUDA and ROCm version;
#   here it keeps CUDA 12.6 and newer (the H200's torch is built for CUDA 13.0) and the CPU one, 19 MB.
# Python 3.12, x86-64 Linux, no dependencies resolved (torch must not come along).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
CORE="loguru pydantic pydantic_core annotated-types typing-inspection typing_extensions platformdirs"
# The H200 image has transformers 5.17 with huggingface_hub 1.33, tokenizers 0.23, safetensors 0.8
# (/work/.library/device/KINDS.md's list): transformers 5.24's own needs are met there.
HF="transformers==5.24.0 bitsandbytes"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" $CORE $HF
"$PY" - "$DEST" <<'PY'
import pathlib, re, sys, zipfile

keep = re.compile(r"libbitsandbytes_(cuda12[6-9]|cuda1[3-9]\d|cpu)\.")
for wheel in pathlib.Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    trimmed = wheel.with_suffix(".trim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
        for item in source.infolist():
            name = item.filename
            if "libbitsandbytes_" in name and not keep.search(name):
                continue
            data = source.read(name)
            if name.endswith(".dist-info/RECORD"):
                rows = [r for r in data.decode().splitlines() if "libbitsandbytes_" not in r.split(",")[0] or keep.search(r)]
                data = ("\n".join(rows) + "\n").encode()
            out.writestr(item, data)
    trimmed.replace(wheel)
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB with the CUDA 12.6+ and CPU libraries")
PY
du -sh "$DEST"
grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
