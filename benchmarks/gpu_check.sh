#!/usr/bin/env bash
# GPU checks for offload (issue 4), pascal-5gb's int8 + float16 (issue 13), tensor parallel and the
# pipeline (issue 18), in one call, offline, under 9 minutes:
#   1. the CUDA tests (tests/test_offload_gpu.py, plus the CPU offload tests on this machine);
#   2. pascal-5gb's numbers (tests/test_int8_gpu.py, tests/test_float16_storage_gpu.py): float16-stored
#      weights computed in float32 equal float32's; int8 weights with float16 compute under a 5 GiB
#      allocator cap, activations of std ~16 (norm weights of tens, as trained checkpoints have):
#      every output finite and within a bound of float32 on the same int8 weights, gemma's 2b layer
#      shapes one by one and end to end under the pascal-5gb profile;
#   3. tensor parallel (tests/test_parallel.py -k cuda): 2 ranks under torchrun on this machine's
#      GPUs - NCCL when each rank has a GPU of its own; on a single GPU gloo on CUDA tensors, since
#      NCCL refuses two ranks on one GPU ("Duplicate GPU detected") - the single process's greedy
#      text, about half of the sharded weights per rank, each rank's CUDA memory printed;
#   4. a pipeline (tests/test_pipeline_gpu.py): decoder layers computed on the CPU beside cuda:0 (activations
#      and each stage's KV cache really cross devices), and cuda:0 + cuda:1 under a profile when there are two
#      GPUs - the single-GPU text either way;
#   5. transformers' int8 on CUDA through bitsandbytes (benchmarks/gpu_transformers_int8.py): a 2b-shaped
#      Gemma 3 under a t4-int8 profile, pascal-5gb's Gemma 1 2b under a 5 GiB cap (cc < 7.5 there: float),
#      each product's float16 dequantization kept finite by the bound;
#   6. benchmarks/offload_gpu.py: a 2b-shaped model under a 5 GiB CUDA allocator cap - ours
#      (offload: cpu / disk, prefetch on a side stream) against accelerate's cpu_offload and
#      dispatch_model at the same layer split, the fraction of the measured host->device
#      bandwidth bound reached, and pascal-5gb's int8 2b run capped at 5 GiB.
#
# From the repository root on a machine with a GPU:
#     bash benchmarks/gpu_check.sh
# GPU_CHECK_STEPS picks steps (default "offload int8 parallel pipeline hfint8 bench"), e.g. GPU_CHECK_STEPS=parallel.
# With this workplace's device tool (the log and offload_gpu.json come back in $OUT):
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl", "third_party/gemma_pytorch"], timeout_s=600)
#
# The GPU machine has torch (and accelerate, sentencepiece, pluggy, pyyaml, click, psutil) but no
# package registry.  Whatever else is missing travels as wheels in the folder GEMMA_PROFILES_WHEELS
# (default: .wheels, then .whl - ignored by git, never committed), installed with
# `pip install --no-index --find-links`.  Make it here with benchmarks/gpu_wheels.sh (Python 3.12,
# x86-64; 33 MB with transformers and a bitsandbytes trimmed to CUDA 12.6+, under the 64 MiB carry).
# accelerate not importable after that: the comparison rows are skipped, with a message.
# gemma: the real gemma_pytorch when GEMMA_PYTORCH_SRC (default third_party/gemma_pytorch) holds it,
# else the stand-in in tests/standin.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTEST_FLAGS=
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/.gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/gpu_check.log
exec > >(tee "$LOG") 2>&1
started=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - started )) s]"; }

echo "== machine $(elapsed)"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
$PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

echo "== dependencies $(elapsed)"
missing() {
    $PY - <<'EOF'
import importlib.util
names = {"loguru": "loguru", "pydantic": "pydantic", "platformdirs": "platformdirs", "pluggy": "pluggy",
         "yaml": "pyyaml", "click": "click", "psutil": "psutil", "sentencepiece": "sentencepiece",
         "pytest": "pytest", "accelerate": "accelerate", "transformers": "transformers",
         "bitsandbytes": "bitsandbytes"}
print(" ".join(dist for module, dist in names.items() if importlib.util.find_spec(module) is None))
EOF
}
need=$(missing)
WHEELS=${GEMMA_PROFILES_WHEELS:-}
if [ -z "$WHEELS" ]; then
    for candidate in .wheels .whl; do [ -d "$candidate" ] && WHEELS=$candidate && break; done
fi
if [ -n "$need" ]; then
    echo "missing: $need"
    if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
        echo "installing from $WHEELS (no index)"
        # Every wheel there, one at a time and without resolving: the folder holds the dependencies
        # (benchmarks/gpu_wheels.sh), and a wheel this Python cannot take must not stop the others.
        for wheel in "$WHEELS"/*.whl; do
            $PY -m pip install -q --no-index --no-deps "$wheel" 2>&1 | tail -1 || true
        done
        need=$(missing)
        [ -n "$need" ] && echo "still missing after $WHEELS: $need"
    else
        echo "no wheel folder (GEMMA_PROFILES_WHEELS, .wheels, .whl): see the header of this script"
    fi
fi
for required in loguru pydantic platformdirs pluggy pyyaml click psutil sentencepiece pytest; do
    case " $need " in *" $required "*) echo "FATAL: $required is required"; exit 2 ;; esac
done
case " $need " in *" accelerate "*) echo "accelerate is not importable: the comparison with it is skipped" ;; esac
case " $need " in *" transformers "*|*" bitsandbytes "*) echo "transformers or bitsandbytes missing: step hfint8 skips" ;; esac

echo "== gemma-profiles and gemma $(elapsed)"
# gemma-profiles from this tree: hooks/ and profiles/ are installed as gemma_profiles.hooks/.profiles.
if $PY -c "import gemma_profiles.hooks.offload" 2>/dev/null; then
    echo "gemma-profiles already importable"
elif ! $PY -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1; then
    echo "pip install -e . failed; using a copy on PYTHONPATH"
    rm -rf /tmp/gp-src && mkdir -p /tmp/gp-src
    cp -r gemma_profiles /tmp/gp-src/ && cp -r hooks /tmp/gp-src/gemma_profiles/hooks
    cp -r profiles /tmp/gp-src/gemma_profiles/profiles && cp gemma_profiles_autoload.py /tmp/gp-src/
    export PYTHONPATH=/tmp/gp-src${PYTHONPATH:+:$PYTHONPATH}
    # -P: the repository root must not come first on sys.path (its gemma_profiles/ lacks hooks/).
    PYTEST_FLAGS=-P
fi
SRC=${GEMMA_PYTORCH_SRC:-$ROOT/third_party/gemma_pytorch}
if $PY -c "import gemma.model" 2>/dev/null; then
    echo "gemma already importable"
elif [ -f "$SRC/gemma/model.py" ]; then
    export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$ROOT/tests/standin${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "from gemma_profiles.runtime.gemma_info import gemma_status; print('gemma under test:', gemma_status().describe())" \
    || { echo "FATAL: gemma-profiles does not import"; exit 2; }

STEPS=" ${GPU_CHECK_STEPS:-offload int8 parallel pipeline hfint8 bench} "
step() { case "$STEPS" in *" $1 "*) return 0 ;; *) echo "(step $1 skipped: GPU_CHECK_STEPS)"; return 1 ;; esac; }
tests=0 int8=0 parallel=0 pipeline=0 hfint8=0 bench=0

echo "== tests: CUDA offload, then the CPU offload tests on this machine $(elapsed)"
if step offload; then
    timeout 140 $PY ${PYTEST_FLAGS:-} -m pytest -q -p no:cacheprovider -x tests/test_offload_gpu.py tests/test_offload.py 2>&1 | tail -25
    tests=${PIPESTATUS[0]}
fi

echo "== tests: pascal-5gb, int8 weights + float16 compute under a 5 GiB cap; float16 storage + float32 compute $(elapsed)"
if step int8; then
    timeout 110 $PY ${PYTEST_FLAGS:-} -m pytest -q -p no:cacheprovider -rs tests/test_int8_gpu.py tests/test_float16_storage_gpu.py 2>&1 | tail -15
    int8=${PIPESTATUS[0]}
fi

echo "== tests: tensor parallel, 2 ranks (torchrun) on $($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) GPU(s) $(elapsed)"
if step parallel; then
    # -s: the ranks' backend and CUDA memory lines; GEMMA_PROFILE_REAL_MODEL=0: no GGUF import here.
    GEMMA_PROFILE_REAL_MODEL=0 timeout 90 $PY ${PYTEST_FLAGS:-} -m pytest -q -s -p no:cacheprovider -rs \
        tests/test_parallel.py -k "cuda" 2>&1 | grep -E "cuda rank|passed|failed|skipped|Error|error" | tail -15
    parallel=${PIPESTATUS[0]}
fi

echo "== tests: a pipeline - layers on the CPU beside cuda:0; cuda:0 + cuda:1 when there are two GPUs $(elapsed)"
if step pipeline; then
    timeout 60 $PY ${PYTEST_FLAGS:-} -m pytest -q -s -p no:cacheprovider -rs tests/test_pipeline_gpu.py tests/test_pipeline.py \
        2>&1 | grep -E "pipeline over|passed|failed|skipped|Error|error" | tail -15
    pipeline=${PIPESTATUS[0]}
fi

echo "== transformers' int8 on CUDA (bitsandbytes' LLM.int8(): t4-int8, pascal-5gb under 5 GiB, the float16 bound) $(elapsed)"
if step hfint8 && [ -n "$(echo " $need " | grep -E ' (transformers|bitsandbytes) ')" ]; then
    echo "SKIPPED: transformers or bitsandbytes not installed (benchmarks/gpu_wheels.sh makes their wheels)"
elif step hfint8; then
    timeout 240 $PY benchmarks/gpu_transformers_int8.py --layers 8 2>&1 | tail -30
    hfint8=${PIPESTATUS[0]}
fi

echo "== benchmark $(elapsed)"
if step bench; then
    export OUT
    timeout 230 $PY benchmarks/offload_gpu.py "$@"
    bench=$?
fi

echo "== done $(elapsed): tests exit $tests, int8 + float16 tests exit $int8, tensor parallel exit $parallel, pipeline exit $pipeline, transformers int8 exit $hfint8, benchmark exit $bench (log: $LOG)"
[ "$tests" -eq 0 ] && [ "$int8" -eq 0 ] && [ "$parallel" -eq 0 ] && [ "$pipeline" -eq 0 ] && [ "$hfint8" -eq 0 ] && [ "$bench" -eq 0 ]
