#!/usr/bin/env bash
# Compile-check the CUDA extension sources without a GPU (and without a CUDA build of torch):
#   * every csrc/*.cu with nvcc for sm_80 and sm_90a (one fatbin per file, object discarded);
#   * every csrc/*.cpp with g++ -fsyntax-only against torch's headers, the CUDA headers, csrc/ and Python's headers.
# A CPU-only torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h; a stub is provided only in that case.
# Usage (from the repo root): .ci/compile_cuda.sh        env: PYTHON (default python), NVCC (default nvcc),
#                             CXX (default g++), JOBS (parallel compiles, default 2)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
NVCC="${NVCC:-nvcc}"
CXX="${CXX:-g++}"
JOBS="${JOBS:-2}"

command -v "$NVCC" >/dev/null || { echo "compile_cuda: nvcc not found (set NVCC)" >&2; exit 2; }
command -v "$CXX" >/dev/null || { echo "compile_cuda: $CXX not found (set CXX)" >&2; exit 2; }

shopt -s nullglob
CU_SRCS=(csrc/*.cu)
CPP_SRCS=(csrc/*.cpp)
# Largest files first so the slowest compiles start early (sizes are a proxy for compile time).
sort_by_size() { [ "$#" -gt 0 ] && ls -S -- "$@"; }
mapfile -t CU_SRCS < <(sort_by_size "${CU_SRCS[@]}")
mapfile -t CPP_SRCS < <(sort_by_size "${CPP_SRCS[@]}")
if [ ${#CU_SRCS[@]} -eq 0 ] && [ ${#CPP_SRCS[@]} -eq 0 ]; then
  echo "compile_cuda: no sources under csrc/" >&2
  exit 2
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

if [ -n "${CUDA_HOME:-}" ]; then
  CUDA_INC="$CUDA_HOME/include"
else
  CUDA_INC="$(cd "$(dirname "$(readlink -f "$(command -v "$NVCC")")")/.." && pwd)/include"
  [ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC=/usr/local/cuda/include
fi
[ -f "$CUDA_INC/cuda_runtime_api.h" ] || { echo "compile_cuda: CUDA headers not found in $CUDA_INC (set CUDA_HOME)" >&2; exit 2; }

TORCH_INCS=()
while IFS= read -r line; do TORCH_INCS+=("-I$line"); done < <(
  "$PYTHON" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
PY_INC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
TORCH_INC_ROOT="${TORCH_INCS[0]#-I}"

STUB_INCS=()
if [ ! -f "$TORCH_INC_ROOT/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$TMP/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
  STUB_INCS=("-I$TMP/stub")
  echo "compile_cuda: torch lacks c10/cuda/impl/cuda_cmake_macros.h; using a stub"
fi

# Same defines torch.utils.cpp_extension passes to nvcc (no implicit half/bf16 conversions or operators).
NVCC_FLAGS=(-std=c++17 -O3 --expt-relaxed-constexpr -Icsrc
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a)
# torch >= 2.10 headers use C++20 bit-field initialisers; g++ accepts them in C++17 mode with a warning.
CXX_FLAGS=(-std=c++17 -fsyntax-only -Wno-c++20-extensions "${TORCH_INCS[@]}" "-I$CUDA_INC" -Icsrc "-I$PY_INC"
  "${STUB_INCS[@]}" -DTORCH_EXTENSION_NAME=lora_kernels_cuda -DTORCH_API_INCLUDE_EXTENSION_H)

# Jobs: "kind|source"; each writes its log to $TMP/<n>.log and its status to $TMP/<n>.rc.
JOBS_LIST=()
for f in "${CU_SRCS[@]}"; do JOBS_LIST+=("nvcc|$f"); done
for f in "${CPP_SRCS[@]}"; do JOBS_LIST+=("cxx|$f"); done

run_job() {
  local n="$1" kind="$2" src="$3" start rc
  start=$SECONDS
  if [ "$kind" = nvcc ]; then
    "$NVCC" "${NVCC_FLAGS[@]}" -c "$src" -o "$TMP/$n.o" >"$TMP/$n.log" 2>&1 && rc=0 || rc=$?
  else
    "$CXX" "${CXX_FLAGS[@]}" "$src" >"$TMP/$n.log" 2>&1 && rc=0 || rc=$?
  fi
  echo "$rc $((SECONDS - start))" >"$TMP/$n.rc"
}

echo "compile_cuda: $(${NVCC} --version | tail -1); $($CXX --version | head -1); torch include $TORCH_INC_ROOT"
echo "compile_cuda: ${#CU_SRCS[@]} .cu file(s) for sm_80 + sm_90a, ${#CPP_SRCS[@]} .cpp file(s) syntax-checked, $JOBS at a time"
T0=$SECONDS
running=0
for i in "${!JOBS_LIST[@]}"; do
  kind="${JOBS_LIST[$i]%%|*}"
  src="${JOBS_LIST[$i]#*|}"
  echo "  [$kind] $src"
  run_job "$i" "$kind" "$src" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

failed=0
for i in "${!JOBS_LIST[@]}"; do
  src="${JOBS_LIST[$i]#*|}"
  read -r rc secs <"$TMP/$i.rc" || { rc=99; secs=0; }
  if [ "$rc" -ne 0 ]; then
    failed=$((failed + 1))
    echo "FAILED ($rc): $src"
    cat "$TMP/$i.log"
  else
    echo "ok   ${secs}s  $src"
    # Show warnings, if any, without failing.
    if [ -s "$TMP/$i.log" ]; then sed 's/^/     | /' "$TMP/$i.log" | head -40; fi
  fi
done

total=${#JOBS_LIST[@]}
echo "compile_cuda: $((total - failed))/$total compiled OK (${#CU_SRCS[@]} nvcc sm_80+sm_90a, ${#CPP_SRCS[@]} g++ syntax) in $((SECONDS - T0))s"
[ "$failed" -eq 0 ]
