#!/usr/bin/env bash
# The GPU suite, for a GPU machine without network (e.g. the device tool, 10 minutes per call):
# install the package, build the CUDA extension, run the GPU tests, run the benchmarks, and leave logs and
# JSON under $OUT (default ./out). At most 8 files land in $OUT (the device tool brings back 8); all output
# is appended to $OUT/suite.log.
#
#   bash benchmarks/gpu_suite.sh test     install + extension build + every test on the GPU        (~1 call)
#   bash benchmarks/gpu_suite.sh bench    install + extension build + quick benchmarks             (~1 call)
#   bash benchmarks/gpu_suite.sh sanitize install + extension build + compute-sanitizer memcheck / racecheck /
#                                         initcheck over the CUDA-extension tests at small shapes      (~1 call)
#   bash benchmarks/gpu_suite.sh full     everything, full benchmark grids and the e2e model bench (no time cap)
#
# The CPU-only checks (tests/test_cuda_emulated.py: the CUDA extension run by the CPU emulator, and
# tests/test_triton_compile.py: ahead-of-time compiles) run in CI, not here.
#
# Each step runs under `timeout` within BUDGET_S (default 560 s for test/bench) so that a 600 s call still
# returns its logs. The extension build is cached in $LORA_KERNELS_CACHE_DIR (default /tmp/lora_kernels_cache),
# so a second call on the same (warm) machine skips it.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-test}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
export PYTHONUNBUFFERED=1 LORA_KERNELS_CACHE_DIR=${LORA_KERNELS_CACHE_DIR:-/tmp/lora_kernels_cache}
case "$STAGE" in test|bench|sanitize) BUDGET_S=${BUDGET_S:-560} ;; full) BUDGET_S=${BUDGET_S:-100000} ;;
  *) echo "usage: $0 test|bench|sanitize|full" >&2; exit 2 ;; esac
T0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
status=0
step() { echo; echo "===== $* (t=$(( $(date +%s) - T0 ))s, budget left $(left)s)" | tee -a "$LOG"; }
run() {  # max_seconds, command...  (capped by the remaining budget)
    local cap=$1; shift
    local t=$(left); [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -le 5 ]; then echo "skipped (no budget left): $*" | tee -a "$LOG"; status=1; return 1; fi
    timeout "$t" "$@" >>"$LOG" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && { echo "FAILED (rc=$rc): $*" | tee -a "$LOG"; status=1; }
    return $rc
}

step "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nvcc --version | tail -1;
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)";
  python -c "import peft, transformers; print('peft', peft.__version__, 'transformers', transformers.__version__)" 2>&1; } 2>&1 | tee -a "$LOG"

step "install (editable, no deps, no build isolation)"
run 120 pip install -q -e . --no-deps --no-build-isolation

step "build the CUDA extension (ninja JIT, current arch only)"
run 300 python -c "
import time, lora_kernels as lk
from lora_kernels import _ext
t = time.time(); ok = lk.load_extension(verbose=True)
print('extension loaded:', ok, 'in %.1f s' % (time.time() - t), '| reason:', _ext.load_failure_reason())
raise SystemExit(0 if ok else 1)"
tail -2 "$LOG"
lora-kernels info 2>&1 | tee -a "$LOG"

if [ "$STAGE" = test ] || [ "$STAGE" = full ]; then
    step "GPU tests: CUDA extension"
    run 240 python -m pytest tests/test_cuda_ext.py -q -x -p no:cacheprovider --junitxml="$OUT/junit_cuda.xml"
    tail -4 "$LOG"
    step "GPU tests: everything else (Triton kernels in bf16, graphs, interop)"
    run 400 python -m pytest tests -q -p no:cacheprovider --ignore=tests/test_cuda_ext.py \
        --ignore=tests/test_cuda_emulated.py --ignore=tests/test_triton_compile.py --junitxml="$OUT/junit.xml"
    tail -8 "$LOG"
fi

if [ "$STAGE" = sanitize ]; then
    # Small shapes only (the sanitizers slow kernels down 10-100x); -x stops at the first report.
    SEL="not 4096 and not 300 and not graph and not opcheck"
    for tool in memcheck racecheck initcheck; do
        step "compute-sanitizer --tool $tool over tests/test_cuda_ext.py ($SEL)"
        run 170 compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
            python -m pytest tests/test_cuda_ext.py -q -x -p no:cacheprovider -k "$SEL"
        tail -3 "$LOG"
    done
fi

if [ "$STAGE" = bench ] || [ "$STAGE" = full ]; then
    Q=$([ "$STAGE" = bench ] && echo --quick || true)
    step "benchmark lora_linear";  run 200 python benchmarks/bench_lora_linear.py $Q --out "$OUT/bench_lora_linear.json"
    step "benchmark multi_lora";   run 150 python benchmarks/bench_multi_lora.py $Q --out "$OUT/bench_multi_lora.json"
    step "benchmark merge";        run 100 python benchmarks/bench_merge.py $Q --out "$OUT/bench_merge.json"
    if [ "$STAGE" = full ]; then
        step "benchmark ops (CLI)"; run 100000 lora-kernels bench --no-progress --full --json "$OUT/bench_ops.json"
        step "benchmark e2e";       run 100000 lora-kernels bench --model llama-7b-layer --json "$OUT/bench_e2e.json" --png "$OUT/bench_e2e.png"
        step "benchmark qlora";     run 100000 python benchmarks/bench_qlora.py --out "$OUT/bench_qlora.json"
        step "benchmark moe_lora";  run 100000 python benchmarks/bench_moe_lora.py --out "$OUT/bench_moe_lora.json"
        # DoRA: the GPU part (bf16 M=8192 K=N=4096 r=16 vs base GEMM and PEFT DoRA); the CPU part kept tiny here
        step "benchmark dora";      run 100000 python benchmarks/bench_dora.py --M 64 --K 128 --rounds 3 --md "$OUT/bench_dora.md"
    fi
fi
step "done (status $status)"
exit $status
