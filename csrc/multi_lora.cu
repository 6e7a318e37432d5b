// Multi-adapter LoRA shrink / expand (Punica BGMV-style, one token per block row), used by add_lora
// (one adapter id per token) and by lora_linear (a single adapter: adapter_ids == nullptr).
//
//   shrink: xa[m, j]  = out_scale · Σ_k drop(x)[m, k] · A[i, j, k]                (fp32 out, 0 past rank_i)
//   expand: y[m, c+n] = round(y[m, c+n] + drop(scale_i · Σ_{j<rank_i} xa[m, j] · B[i, n, j]))
//
// Both read fp16/bf16/fp32 inputs, accumulate in fp32 and never read out of bounds for ids outside [0, L).
#include "common.cuh"
#include "multi_lora_kernels.h"

namespace lora_kernels {
namespace {

// ------------------------------------------------------------------------------------------------
// Shrink. Grid (M, ceil(r_max / (kShrinkWarps · RPW))); one block = one token × (kShrinkWarps · RPW)
// rank rows; each warp owns RPW consecutive rank rows j0 .. j0+RPW-1 and streams K with 8-element
// (16-byte) loads of x and of the RPW rows of A, reusing each x chunk RPW times; a warp shuffle
// reduction finishes each dot product. Reads x[m, :], A[i, j0:j0+RPW, :]; writes xa[m, j0:j0+RPW].
// ------------------------------------------------------------------------------------------------
constexpr int kShrinkWarps = 4;

template <typename TX, typename TA, bool kVec, int kRowsPerWarp>
__global__ void __launch_bounds__(kShrinkWarps * kWarpSize) multi_lora_shrink_kernel(const ShrinkArgs p) {
  const int64_t m = blockIdx.x;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.y) * kShrinkWarps + warp) * kRowsPerWarp;
  if (j0 >= p.r_max) return;  // warp-uniform

  const int64_t adapter = row_adapter(p.adapter_ids, p.ids_type, m);
  const bool valid = adapter >= 0 && adapter < p.num_adapters;
  const int64_t rank = valid ? adapter_rank(p.ranks, p.ranks_type, adapter, p.r_max) : 0;
  // Rows of this warp below the adapter's rank (warp-uniform): rows r < live are computed, the rest are 0.
  const int64_t live64 = rank - j0;
  const int live = live64 <= 0 ? 0 : (live64 >= kRowsPerWarp ? kRowsPerWarp : static_cast<int>(live64));

  float acc[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = 0.0f;

  if (live > 0) {
    const TX* __restrict__ x = static_cast<const TX*>(p.x) + m * p.x_stride_m;
    // Only rows j0 + r with r < live are ever dereferenced, and those are < rank <= r_max.
    const TA* __restrict__ a = static_cast<const TA*>(p.a) + adapter * p.a_stride_l + j0 * p.a_stride_j;
    const bool drop = p.dropout.enabled;
    const uint32_t row_hash = dropout_row_hash(dropout_seed_hash(p.dropout.seed), m);
    const uint32_t threshold = p.dropout.threshold;
    const float keep_scale = p.dropout.keep_scale;

    int64_t k_tail = 0;
    if (kVec) {
      const int64_t k_vec_end = (p.K / 8) * 8;
#pragma unroll 2
      for (int64_t k = static_cast<int64_t>(lane) * 8; k < k_vec_end; k += kWarpSize * 8) {
        float xv[8];
        load8(x + k, xv);
        if (drop) {
#pragma unroll
          for (int e = 0; e < 8; ++e) xv[e] = dropout_keep(row_hash, k + e, threshold) ? xv[e] * keep_scale : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          if (r < live) {
            float av[8];
            load8(a + r * p.a_stride_j + k, av);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r] = fmaf(xv[e], av[e], acc[r]);
          }
        }
      }
      k_tail = k_vec_end;
    }
    for (int64_t k = k_tail + lane; k < p.K; k += kWarpSize) {
      float xv = to_float(x[k]);
      if (drop) xv = dropout_keep(row_hash, k, threshold) ? xv * keep_scale : 0.0f;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (r < live) acc[r] = fmaf(xv, to_float(a[r * p.a_stride_j + k]), acc[r]);
      }
    }
  }

  // Every lane of the warp reaches this point (all early exits above are warp-uniform).
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = warp_sum(acc[r]);

  if (lane == 0) {
    float* __restrict__ out = p.xa + m * p.xa_stride_m;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t j = j0 + r;
      if (j < p.r_max) out[j] = r < live ? acc[r] * p.out_scale : 0.0f;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Expand. Grid (M, ceil(N / kExpandThreads)); one thread = one output element y[m, col_offset + n]:
// a dot product of length rank_i between xa[m, :] (fp32, the same address for the whole block, so a
// broadcast from L1) and B[i, n, :] (16-byte loads when B's rank dim is contiguous and aligned; with
// b_stride_n == 1 the scalar path is coalesced across the warp instead). Reads xa[m, :rank],
// B[i, n, :rank], y[m, c+n]; writes y[m, c+n] once.
// ------------------------------------------------------------------------------------------------
constexpr int kExpandThreads = 128;

template <typename TY, typename TB, bool kVec>
__global__ void __launch_bounds__(kExpandThreads) multi_lora_expand_kernel(const ExpandArgs p) {
  const int64_t m = blockIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (n >= p.N) return;
  const int64_t adapter = row_adapter(p.adapter_ids, p.ids_type, m);
  if (adapter < 0 || adapter >= p.num_adapters) return;  // no adapter: y untouched
  const int64_t rank = adapter_rank(p.ranks, p.ranks_type, adapter, p.r_max);
  if (rank == 0) return;  // y + 0 rounds back to y

  const float* __restrict__ xa = p.xa + m * p.xa_stride_m;
  const TB* __restrict__ b = static_cast<const TB*>(p.b) + adapter * p.b_stride_l + n * p.b_stride_n;
  float acc = 0.0f;
  int64_t j = 0;
  if (kVec) {  // b_stride_j == 1
    for (; j + 8 <= rank; j += 8) {
      float bv[8];
      load8(b + j, bv);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc = fmaf(__ldg(xa + j + e), bv[e], acc);
    }
  }
  for (; j < rank; ++j) acc = fmaf(__ldg(xa + j), to_float(b[j * p.b_stride_j]), acc);

  const float s = p.scales != nullptr ? __ldg(p.scales + adapter) : p.scale;
  float update = s * acc;
  const int64_t col = p.col_offset + n;
  if (p.dropout.enabled) {
    const uint32_t row_hash = dropout_row_hash(dropout_seed_hash(p.dropout.seed), m);
    update = dropout_keep(row_hash, col, p.dropout.threshold) ? update * p.dropout.keep_scale : 0.0f;
  }
  TY* y = static_cast<TY*>(p.y) + m * p.y_stride_m + col * p.y_stride_n;
  *y = from_float<TY>(to_float(*y) + update);
}

// ------------------------------------------------------------------------------------------------
// dtype dispatch
// ------------------------------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat16: f(TypeTag<__half>{}); break;
    case DType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: f(TypeTag<float>{}); break;
  }
}

inline int64_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

inline bool valid_dtype(DType dt) {
  return dt == DType::kFloat16 || dt == DType::kBFloat16 || dt == DType::kFloat32;
}

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

}  // namespace

cudaError_t launch_multi_lora_shrink(const ShrinkArgs& p, cudaStream_t stream) {
  if (p.M <= 0 || p.r_max <= 0) return cudaSuccess;
  if (!valid_dtype(p.x_dtype) || !valid_dtype(p.a_dtype) || p.M > kMaxGridX) return cudaErrorInvalidValue;
  const int64_t xs = dtype_size(p.x_dtype), as = dtype_size(p.a_dtype);
  const bool vec = aligned16(p.x) && aligned16(p.a) && (p.x_stride_m * xs) % 16 == 0 &&
                   (p.a_stride_l * as) % 16 == 0 && (p.a_stride_j * as) % 16 == 0;
  // Few tokens (decode): one rank row per warp, so more warps share the work; many tokens: 4 rows per
  // warp, reusing each loaded chunk of x four times.
  const int rows_per_warp = p.M >= 64 ? 4 : 1;
  const int64_t grid_y = ceil_div(p.r_max, static_cast<int64_t>(kShrinkWarps) * rows_per_warp);
  if (grid_y > kMaxGridY) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.M), static_cast<unsigned>(grid_y));
  const dim3 block(kShrinkWarps * kWarpSize);
  dispatch_dtype(p.x_dtype, [&](auto xt) {
    using TX = typename decltype(xt)::type;
    dispatch_dtype(p.a_dtype, [&](auto at) {
      using TA = typename decltype(at)::type;
      if (vec) {
        if (rows_per_warp == 4) multi_lora_shrink_kernel<TX, TA, true, 4><<<grid, block, 0, stream>>>(p);
        else multi_lora_shrink_kernel<TX, TA, true, 1><<<grid, block, 0, stream>>>(p);
      } else {
        if (rows_per_warp == 4) multi_lora_shrink_kernel<TX, TA, false, 4><<<grid, block, 0, stream>>>(p);
        else multi_lora_shrink_kernel<TX, TA, false, 1><<<grid, block, 0, stream>>>(p);
      }
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_multi_lora_expand(const ExpandArgs& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0 || p.r_max <= 0) return cudaSuccess;
  if (!valid_dtype(p.y_dtype) || !valid_dtype(p.b_dtype) || p.M > kMaxGridX) return cudaErrorInvalidValue;
  const int64_t bs = dtype_size(p.b_dtype);
  const bool vec = p.b_stride_j == 1 && aligned16(p.b) && (p.b_stride_l * bs) % 16 == 0 && (p.b_stride_n * bs) % 16 == 0;
  const int64_t grid_y = ceil_div(p.N, kExpandThreads);
  if (grid_y > kMaxGridY) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.M), static_cast<unsigned>(grid_y));
  const dim3 block(kExpandThreads);
  dispatch_dtype(p.y_dtype, [&](auto yt) {
    using TY = typename decltype(yt)::type;
    dispatch_dtype(p.b_dtype, [&](auto bt) {
      using TB = typename decltype(bt)::type;
      if (vec) multi_lora_expand_kernel<TY, TB, true><<<grid, block, 0, stream>>>(p);
      else multi_lora_expand_kernel<TY, TB, false><<<grid, block, 0, stream>>>(p);
    });
  });
  return cudaGetLastError();
}

}  // namespace lora_kernels
