// Device helpers shared by the lora_kernels CUDA kernels: dtype conversions, 8-wide vector loads,
// warp reductions and the seeded dropout hash. CUDA headers only (no torch), so every *.cu compiles with
// plain nvcc. Written without implicit half/bf16 conversions or operators (torch builds extensions with
// __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernel_types.h"

namespace lora_kernels {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Scalar conversions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---------------------------------------------------------------------------------------------
// 8 consecutive elements -> 8 floats. p must be 16-byte aligned (one 16-byte load for 2-byte
// types, two for float).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void load8(const float* __restrict__ p, float (&v)[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(p);
  const float4 hi = *reinterpret_cast<const float4*>(p + 4);
  v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
  v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
}

__device__ __forceinline__ void load8(const __half* __restrict__ p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h2[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8(const __nv_bfloat16* __restrict__ p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(b2[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// ---------------------------------------------------------------------------------------------
// Warp reduction (every lane of the warp must call it; every lane gets the sum).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Adapter ids / ranks stored as int32 or int64.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int64_t load_index(const void* p, IndexType type, int64_t i) {
  return type == IndexType::kInt64 ? static_cast<const int64_t*>(p)[i]
                                   : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// Adapter of row m: adapter_ids[m], or 0 for every row when adapter_ids is null (single-adapter use).
__device__ __forceinline__ int64_t row_adapter(const void* adapter_ids, IndexType type, int64_t m) {
  return adapter_ids == nullptr ? 0 : load_index(adapter_ids, type, m);
}

// Rank of a valid adapter: ranks[adapter] clamped to [0, r_max], or r_max when ranks is null.
__device__ __forceinline__ int64_t adapter_rank(const void* ranks, IndexType type, int64_t adapter, int64_t r_max) {
  if (ranks == nullptr) return r_max;
  const int64_t r = load_index(ranks, type, adapter);
  return r < 0 ? 0 : (r > r_max ? r_max : r);
}

// ---------------------------------------------------------------------------------------------
// Seeded dropout: bit-exact with reference.dropout_keep_mask (lowbias32 finaliser, uint32 wrap-around).
//   keep(row, col) = (mix32(col + mix32(row + mix32(seed))) >> 8) >= threshold
// ---------------------------------------------------------------------------------------------
__host__ __device__ __forceinline__ uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}

// seed_hash = mix32(seed): computed once on the host by the launchers.
__host__ __device__ __forceinline__ uint32_t dropout_seed_hash(uint32_t seed) { return mix32(seed); }

// Per-row hash mix32(row + seed_hash); row is the row of x flattened to [M, K] (low 32 bits, like the reference).
// (__host__ too, so tests/test_cuda_ext.py can check the mask against the reference on a CPU-only machine.)
__host__ __device__ __forceinline__ uint32_t dropout_row_hash(uint32_t seed_hash, int64_t row) {
  return mix32(static_cast<uint32_t>(row) + seed_hash);
}

__host__ __device__ __forceinline__ bool dropout_keep(uint32_t row_hash, int64_t col, uint32_t threshold) {
  return (mix32(row_hash + static_cast<uint32_t>(col)) >> 8) >= threshold;
}

// ---------------------------------------------------------------------------------------------
// Host-side helpers for the launchers.
// ---------------------------------------------------------------------------------------------
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lora_kernels
