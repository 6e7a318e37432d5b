#!/usr/bin/env bash
# One call on a GPU machine without network: install, build the CUDA extension, run the GPU tests and the
# benchmarks, and leave logs + JSON under $OUT (default ./out). At most 8 files are written to $OUT (the
# device tool brings back 8), everything else is appended to $OUT/suite.log.
#
#   bash benchmarks/gpu_suite.sh [quick|full]    (quick: a subset of every benchmark, ~5 min)
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-quick}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
export PYTHONUNBUFFERED=1 LORA_KERNELS_CACHE_DIR=${LORA_KERNELS_CACHE_DIR:-/tmp/lora_kernels_cache}
step() { echo; echo "===== $* ($(date +%T))" | tee -a "$LOG"; }
status=0

step "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nvcc --version | tail -1;
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)";
  python -c "import peft; print('peft', peft.__version__)" 2>&1; } 2>&1 | tee -a "$LOG"

step "install (editable, no deps, no build isolation)"
pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3 | tee -a "$LOG"

step "build the CUDA extension (ninja JIT, current arch)"
timeout 900 python -c "
import time, lora_kernels as lk
t = time.time(); ok = lk.load_extension(verbose=True); print('extension loaded:', ok, 'in %.1f s' % (time.time() - t))
from lora_kernels import _ext; print('reason:', _ext.load_failure_reason())
" >>"$LOG" 2>&1 || status=1
tail -3 "$LOG"
lora-kernels info 2>&1 | tee -a "$LOG"

step "GPU tests (full suite on CUDA, junit to \$OUT)"
timeout 1200 python -m pytest tests -q -x --junitxml="$OUT/junit.xml" -p no:cacheprovider >>"$LOG" 2>&1 || status=1
tail -15 "$LOG"

run_bench() {  # name, command...
    local name=$1; shift
    step "benchmark $name"
    timeout 1500 "$@" >>"$LOG" 2>&1 || { echo "benchmark $name failed (see suite.log)"; status=1; }
}
Q=$([ "$MODE" = quick ] && echo --quick || true)
[ -f benchmarks/bench_lora_linear.py ] && run_bench lora_linear python benchmarks/bench_lora_linear.py $Q --out "$OUT/bench_lora_linear.json"
[ -f benchmarks/bench_multi_lora.py ] && run_bench multi_lora python benchmarks/bench_multi_lora.py $Q --out "$OUT/bench_multi_lora.json"
[ -f benchmarks/bench_merge.py ] && run_bench merge python benchmarks/bench_merge.py $Q --out "$OUT/bench_merge.json"
run_bench cli lora-kernels bench --no-progress $([ "$MODE" = full ] && echo --full) --json "$OUT/bench_ops.json"
if [ "$MODE" = full ]; then
    run_bench e2e lora-kernels bench --model llama-7b-layer --json "$OUT/bench_e2e.json" --png "$OUT/bench_e2e.png"
fi
step "done (status $status)"
exit $status
