#!/usr/bin/env bash
# One call on a lent CUDA machine: what only a GPU can check, in one go, logs under $OUT.
#
#   OUT=/some/dir bash bench/gpu_session.sh [parts]     # parts: any of env,step,check,tests,graphs,profile,bench (default: all)
#
# env    : nvidia-smi, torch / triton / peft versions
# step   : python -m bench.gpu_step (base / PEFT LoRA / ours eager / ours captured in a CUDA graph, hidden-2048
#          and LLaMA-7B-like steps: ms, host ms, kernels per step; then the four kernels against their bounds;
#          its own budget STEP_S, default 480 s)
# check  : python -m bench.gpu_check (predicted vs measured time of the four layer kernels at the LLaMA-7B shapes;
#          SWEEP=1 adds its --sweep over launch configurations), then again with --adapters fp32
# tests  : the Triton tests on CUDA tensors (tests/conftest.py moves them) + tests/test_triton_gpu.py
# graphs : tests/test_cuda_graphs.py (a layer captured and replayed, with dropout: new masks per replay, torch.manual_seed
#          repeats them; a whole training step under torch.cuda.graph and torch.compile(mode="reduce-overhead"))
# profile: python -m bench.gpu_profile (host vs device time of a training step, top ops)
# bench  : python -m bench on the GPU plan (bench/cases.py GPU), CSV/PNG under $OUT/bench
#
# Wheels in .whl/ (peft, pinned like the CPU suite) install to /tmp/site; the package runs from the
# checkout, with kernels/ and csrc/ linked into adalora_fast/ for the run (setup.py's mapping).
# Each part has its own time limit, so one that hangs does not cost the others.
set -u
OUT=${OUT:?set OUT to a folder for the logs}
PARTS=${1:-env,step,check,tests,graphs,profile,bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$OUT" /tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site  # $PWD: the checkout and its bench package, whatever the working directory
# the checkout itself is imported (cwd comes first on sys.path): map kernels/ and csrc/ in as setup.py does
for d in kernels csrc; do [ -e adalora_fast/$d ] || { ln -s ../$d adalora_fast/$d; trap 'rm -f adalora_fast/kernels adalora_fast/csrc' EXIT; }; done
has() { [[ ",$PARTS," == *",$1,"* ]]; }
t0=$SECONDS
stamp() { echo "== $1 done at $((SECONDS - t0)) s"; }

if has env; then
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv | tee "$OUT/env.txt"
    $PY -c "import torch, triton, peft, transformers, adalora_fast; print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'adalora_fast at', adalora_fast.__file__)" | tee -a "$OUT/env.txt"
    stamp env
fi
if has step; then
    timeout $(( ${STEP_S:-480} + 30 )) $PY -m bench.gpu_step --budget-s ${STEP_S:-480} 2>&1 | tee "$OUT/gpu_step.txt"
    stamp step
fi
if has check; then
    timeout ${CHECK_S:-150} $PY -m bench.gpu_check --repeats 50 ${SWEEP:+--sweep} 2>&1 | tee "$OUT/gpu_check.txt" | grep -v "^sweep"
    # the same kernels with fp32 adapters (PEFT's default: the "bf16x3" binaries)
    timeout ${CHECK_S:-150} $PY -m bench.gpu_check --repeats 50 --adapters fp32 2>&1 | tee "$OUT/gpu_check_fp32_adapters.txt"
    stamp check
fi
if has tests; then
    timeout 330 $PY -m pytest tests -q -p no:cacheprovider -n 8 -k "triton or gpu" -rfEs --ignore tests/test_triton_compile.py \
        --junitxml "$OUT/junit.xml" 2>&1 | tail -150 | tee "$OUT/tests.txt"
    stamp tests
fi
if has graphs && [ -f tests/test_cuda_graphs.py ]; then
    timeout 240 $PY -m pytest tests/test_cuda_graphs.py -q -p no:cacheprovider -rfEs 2>&1 | tail -60 | tee "$OUT/graphs.txt"
    stamp graphs
fi
if has profile; then
    timeout ${PROFILE_S:-150} $PY -m bench.gpu_profile ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.txt" | tail -${PROFILE_TAIL:-8}
    stamp profile
fi
if has bench; then
    timeout ${BENCH_S:-300} $PY -m bench --device cuda --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt" | grep -v "it/s" | tail -80
    stamp bench
fi
