// Fused LoRA merge / unmerge: W <- round(W + sum_i s_i * B_i A_i), the update formed on chip in fp32 and added
// once, W read once and written once (any strides). The exact variant also appends, in the same pass, the
// elements whose unmerge round(W' - delta) would not give back W bit-for-bit (lora_kernels/exact_merge.py).
// CUDA headers only (no torch).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "merge.h"

namespace lora_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kRankChunk = 32;                    // rank rows staged in shared memory at a time
constexpr int kRowsPerThread = kMergeTileN / 8;   // 8 row groups of threads
constexpr int kColsPerThread = kMergeTileK / 32;  // 32 column lanes (a warp spans 32 consecutive columns)
static_assert(kThreads == 256, "the thread layout below assumes 8 x 32 threads");

__device__ __forceinline__ uint32_t weight_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t weight_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t weight_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

template <typename T>
__device__ __forceinline__ bool is_finite_value(T v) {
  const float f = to_float(v);
  return fabsf(f) <= 3.402823466e38f;  // false for inf and NaN
}

// Exclusive block-wide prefix sum of one int per thread; also returns the block total. All threads call it.
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_sums, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int t = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += t;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  int warp_off = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    const int s = warp_sums[w];
    if (w < warp) warp_off += s;
    sum += s;
  }
  total = sum;
  __syncthreads();  // warp_sums may be reused right after
  return warp_off + incl - v;
}

// Reads one kMergeTileN x kMergeTileK tile of W, the matching rows of B and columns of A (all adapters);
// writes the tile of W once. EXACT: also writes repair entries + counters (a tile whose entries do not fit
// the list leaves W untouched and is listed in overflow_tiles for a second launch).
template <typename WT, typename AT, bool EXACT>
__global__ void __launch_bounds__(kThreads) lora_merge_kernel(MergeArgs p) {
  __shared__ float a_s[kRankChunk][kMergeTileK];
  __shared__ float b_s[kMergeTileN][kRankChunk + 1];
  __shared__ int warp_sums[kThreads / 32];
  __shared__ int s_base;

  const int64_t tile = p.tile_ids != nullptr ? static_cast<int64_t>(p.tile_ids[blockIdx.x]) : static_cast<int64_t>(blockIdx.x);
  const int64_t tiles_k = (p.K + kMergeTileK - 1) / kMergeTileK;
  const int64_t n0 = (tile / tiles_k) * kMergeTileN;
  const int64_t k0 = (tile % tiles_k) * kMergeTileK;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const AT* A = static_cast<const AT*>(p.a);
  const AT* B = static_cast<const AT*>(p.b);

  float delta[kRowsPerThread][kColsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) delta[i][j] = 0.f;

  for (int ad = 0; ad < p.n_adapters; ++ad) {
    const int r_lo = p.rank_starts[ad], r_hi = p.rank_starts[ad + 1];
    const float s = p.scales[ad];
    float ba[kRowsPerThread][kColsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) ba[i][j] = 0.f;
    for (int r0 = r_lo; r0 < r_hi; r0 += kRankChunk) {
      for (int e = threadIdx.x; e < kRankChunk * kMergeTileK; e += kThreads) {
        const int r = e / kMergeTileK, k = e % kMergeTileK;
        const int64_t gr = r0 + r, gk = k0 + k;
        a_s[r][k] = (gr < r_hi && gk < p.K) ? to_float(A[gr * p.a_stride_r + gk * p.a_stride_k]) : 0.f;
      }
      for (int e = threadIdx.x; e < kMergeTileN * kRankChunk; e += kThreads) {
        const int n = e / kRankChunk, r = e % kRankChunk;
        const int64_t gn = n0 + n, gr = r0 + r;
        b_s[n][r] = (gr < r_hi && gn < p.N) ? to_float(B[gn * p.b_stride_n + gr * p.b_stride_r]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int r = 0; r < kRankChunk; ++r) {
        float bv[kRowsPerThread], av[kColsPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) bv[i] = b_s[ty * kRowsPerThread + i][r];
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) av[j] = a_s[r][tx + 32 * j];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) ba[i][j] = __fmaf_rn(bv[i], av[j], ba[i][j]);
      }
      __syncthreads();
    }
    // explicit _rn intrinsics: never contracted, so merge, check and unmerge see the same delta
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) delta[i][j] = __fadd_rn(delta[i][j], __fmul_rn(s, ba[i][j]));
  }

  WT* W = static_cast<WT*>(p.w);
  WT out[kRowsPerThread][kColsPerThread];
  int n_bad = 0, n_nonfinite = 0;
  uint32_t bad_mask = 0;  // bit i*kColsPerThread + j
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int64_t n = n0 + ty * kRowsPerThread + i, k = k0 + tx + 32 * j;
      if (n < p.N && k < p.K) {
        const WT w = W[n * p.w_stride_n + k * p.w_stride_k];
        const WT o = from_float<WT>(__fadd_rn(to_float(w), delta[i][j]));
        out[i][j] = o;
        if (EXACT) {
          const WT back = from_float<WT>(__fsub_rn(to_float(o), delta[i][j]));  // what the unmerge computes
          if (weight_bits(back) != weight_bits(w)) {
            bad_mask |= 1u << (i * kColsPerThread + j);
            ++n_bad;
          }
          if (is_finite_value(w) && !is_finite_value(o)) ++n_nonfinite;
        } else {
          W[n * p.w_stride_n + k * p.w_stride_k] = o;
        }
      }
    }
  }
  if (!EXACT) return;

  int total = 0;
  const int offset = block_exclusive_scan(n_bad, warp_sums, total);
  int total_nonfinite = 0;
  block_exclusive_scan(n_nonfinite, warp_sums, total_nonfinite);
  if (threadIdx.x == 0) s_base = total > 0 ? atomicAdd(p.counters, total) : 0;
  __syncthreads();
  const int64_t base = s_base;
  const bool fits = total == 0 || base + total <= p.rec_capacity;
  if (!fits) {
    if (threadIdx.x == 0) {
      const int slot = atomicAdd(p.counters + 2, 1);
      p.overflow_tiles[slot] = static_cast<int32_t>(tile);
    }
    return;
  }
  int slot = 0;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int64_t n = n0 + ty * kRowsPerThread + i, k = k0 + tx + 32 * j;
      if (n < p.N && k < p.K) {
        WT* wp = W + n * p.w_stride_n + k * p.w_stride_k;
        if (bad_mask & (1u << (i * kColsPerThread + j))) {
          const int64_t at = base + offset + slot++;
          const int64_t idx = n * p.K + k;
          if (p.rec_idx_64) static_cast<int64_t*>(p.rec_idx)[at] = idx;
          else static_cast<int32_t*>(p.rec_idx)[at] = static_cast<int32_t>(idx);
          const uint32_t bits = weight_bits(*wp);
          if (sizeof(WT) == 4) static_cast<int32_t*>(p.rec_bits)[at] = static_cast<int32_t>(bits);
          else static_cast<int16_t*>(p.rec_bits)[at] = static_cast<int16_t>(static_cast<uint16_t>(bits));
        }
        *wp = out[i][j];
      }
    }
  }
  if (threadIdx.x == 0) {
    atomicAdd(p.counters + 1, total);
    if (total_nonfinite) atomicAdd(p.counters + 3, total_nonfinite);
  }
}

template <typename WT, typename AT>
cudaError_t launch_typed(const MergeArgs& p, bool exact, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.n_blocks));
  if (exact) lora_merge_kernel<WT, AT, true><<<grid, kThreads, 0, stream>>>(p);
  else lora_merge_kernel<WT, AT, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename WT>
cudaError_t launch_w(const MergeArgs& p, bool exact, cudaStream_t stream) {
  switch (p.ab_dtype) {
    case DType::kFloat16: return launch_typed<WT, __half>(p, exact, stream);
    case DType::kBFloat16: return launch_typed<WT, __nv_bfloat16>(p, exact, stream);
    default: return launch_typed<WT, float>(p, exact, stream);
  }
}

}  // namespace

cudaError_t launch_lora_merge(const MergeArgs& p, bool exact, cudaStream_t stream) {
  if (p.n_blocks <= 0) return cudaSuccess;
  if (p.n_blocks > 2147483647LL) return cudaErrorInvalidValue;
  switch (p.w_dtype) {
    case DType::kFloat16: return launch_w<__half>(p, exact, stream);
    case DType::kBFloat16: return launch_w<__nv_bfloat16>(p, exact, stream);
    default: return launch_w<float>(p, exact, stream);
  }
}

}  // namespace lora_kernels
