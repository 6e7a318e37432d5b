// Multi-adapter LoRA shrink / expand (Punica BGMV-style: GEMV per token, no sorting by adapter), used by
// add_lora (one adapter id per token) and by lora_linear (a single adapter: adapter_ids == nullptr, where
// blocks take 8 tokens at a time so the LoRA weights are read once per 8 tokens).
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
// The tokens of this block and their common adapter; returns how many (0: nothing to do; block-uniform).
//   !kGrouped: rows m0 .. m0+T-1 (clipped at M), m0 = blockIdx.x · T, adapter = the id of row m0 (a T > 1
//              block is only launched when every row shares it: single-adapter launches).
//   kGrouped:  token group blockIdx.x % G of tile blockIdx.x / G (G = ceil(block_m / T)): up to T rows of one
//              adapter, read from the sorted row list (see TokenTiles). Unused tiles and groups return 0.
// Rows past the count repeat rows[0] (never dereferenced: every use is guarded by t < count).
// ------------------------------------------------------------------------------------------------
template <bool kGrouped, int kTokens>
__device__ __forceinline__ int block_tokens(const TokenTiles& g, const void* adapter_ids, IndexType ids_type, int64_t M,
                                            int64_t (&rows)[kTokens], int64_t& adapter) {
  int64_t n = 0;
  if (!kGrouped) {
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTokens;
    n = M - m0;  // >= 1 by the grid
    adapter = row_adapter(adapter_ids, ids_type, m0);
#pragma unroll
    for (int t = 0; t < kTokens; ++t) rows[t] = m0 + (t < n ? t : 0);
  } else {
    const int64_t groups = (g.block_m + kTokens - 1) / kTokens;
    const int64_t tile = static_cast<int64_t>(blockIdx.x) / groups;
    adapter = g.tiles[tile];
    const int64_t first = g.tiles[g.num_tiles + tile] + (static_cast<int64_t>(blockIdx.x) % groups) * kTokens;
    n = adapter < 0 ? 0 : g.tiles[2 * g.num_tiles + tile] - first;
#pragma unroll
    for (int t = 0; t < kTokens; ++t) rows[t] = t < n ? static_cast<int64_t>(g.sorted_ids[first + t]) : 0;
#pragma unroll
    for (int t = 1; t < kTokens; ++t)
      if (t >= n) rows[t] = rows[0];
  }
  return n <= 0 ? 0 : (n >= kTokens ? kTokens : static_cast<int>(n));
}

// ------------------------------------------------------------------------------------------------
// Shrink. Grid (ceil(M / T), ceil(r_max / (kShrinkWarps · RPW))); one block = T tokens × (kShrinkWarps · RPW)
// rank rows; each warp owns RPW consecutive rank rows j0 .. j0+RPW-1 of the T tokens m0 .. m0+T-1 and streams
// K with 8-element (16-byte) loads: each chunk of A is loaded once and reused for the T tokens, each chunk of
// x is reused for the RPW rows; a warp shuffle reduction finishes each dot product.
// T > 1 only for single-adapter launches (adapter_ids == nullptr), where every token uses adapter 0, and for
// grouped launches (kGrouped: the T tokens of a tile of one adapter, see block_tokens).
// Reads x[rows, :], A[i, j0:j0+RPW, :]; writes xa[rows, j0:j0+RPW].
// ------------------------------------------------------------------------------------------------
constexpr int kShrinkWarps = 4;

template <typename TX, typename TA, bool kVec, int kRowsPerWarp, int kTokens, bool kGrouped>
__global__ void __launch_bounds__(kShrinkWarps * kWarpSize) multi_lora_shrink_kernel(const ShrinkArgs p) {
  int64_t rows[kTokens];
  int64_t adapter = -1;
  const int n_tok = block_tokens<kGrouped, kTokens>(p.grouped, p.adapter_ids, p.ids_type, p.M, rows, adapter);
  if (n_tok == 0) return;  // block-uniform
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.y) * kShrinkWarps + warp) * kRowsPerWarp;
  if (j0 >= p.r_max) return;  // warp-uniform

  const bool valid = adapter >= 0 && adapter < p.num_adapters;
  const int64_t rank = valid ? adapter_rank(p.ranks, p.ranks_type, adapter, p.r_max) : 0;
  // Rows of this warp below the adapter's rank (warp-uniform): rows r < live are computed, the rest are 0.
  const int64_t live64 = rank - j0;
  const int live = live64 <= 0 ? 0 : (live64 >= kRowsPerWarp ? kRowsPerWarp : static_cast<int>(live64));

  float acc[kTokens][kRowsPerWarp];
#pragma unroll
  for (int t = 0; t < kTokens; ++t)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[t][r] = 0.0f;

  if (live > 0) {
    const TX* xrow[kTokens];
#pragma unroll
    for (int t = 0; t < kTokens; ++t) xrow[t] = static_cast<const TX*>(p.x) + rows[t] * p.x_stride_m;
    // Only rows j0 + r with r < live are ever dereferenced, and those are < rank <= r_max.
    const TA* __restrict__ a = static_cast<const TA*>(p.a) + adapter * p.a_stride_l + j0 * p.a_stride_j;
    const bool drop = p.dropout.enabled;
    const uint32_t seed_hash = dropout_seed_hash(p.dropout.seed);
    const uint32_t threshold = p.dropout.threshold;
    const float keep_scale = p.dropout.keep_scale;
    uint32_t row_hash[kTokens];
#pragma unroll
    for (int t = 0; t < kTokens; ++t) row_hash[t] = dropout_row_hash(seed_hash, rows[t]);

    int64_t k_tail = 0;
    if (kVec) {
      const int64_t k_vec_end = (p.K / 8) * 8;
      for (int64_t k = static_cast<int64_t>(lane) * 8; k < k_vec_end; k += kWarpSize * 8) {
        float av[kRowsPerWarp][8];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          if (r < live) load8(a + r * p.a_stride_j + k, av[r]);
        }
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          if (t < n_tok) {
            float xv[8];
            load8(xrow[t] + k, xv);
            if (drop) {
#pragma unroll
              for (int e = 0; e < 8; ++e) xv[e] = dropout_keep(row_hash[t], k + e, threshold) ? xv[e] * keep_scale : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) {
              if (r < live) {
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[t][r] = fmaf(xv[e], av[r][e], acc[t][r]);
              }
            }
          }
        }
      }
      k_tail = k_vec_end;
    }
    for (int64_t k = k_tail + lane; k < p.K; k += kWarpSize) {
      float av[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) av[r] = r < live ? to_float(a[r * p.a_stride_j + k]) : 0.0f;
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        if (t < n_tok) {
          float xv = to_float(xrow[t][k]);
          if (drop) xv = dropout_keep(row_hash[t], k, threshold) ? xv * keep_scale : 0.0f;
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) acc[t][r] = fmaf(xv, av[r], acc[t][r]);
        }
      }
    }
  }

  // Every lane of the warp reaches this point (all early exits above are warp-uniform).
#pragma unroll
  for (int t = 0; t < kTokens; ++t)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[t][r] = warp_sum(acc[t][r]);

  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      if (t < n_tok) {
        float* __restrict__ out = p.xa + rows[t] * p.xa_stride_m;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int64_t j = j0 + r;
          if (j < p.r_max) out[j] = r < live ? acc[t][r] * p.out_scale : 0.0f;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Expand. Grid (ceil(M / T), ceil(N / kExpandThreads)); one thread = output column n of the T tokens
// m0 .. m0+T-1: dot products of length rank_i between xa[m, :] (fp32, the same address for the whole block,
// so a broadcast from L1) and B[i, n, :], which is loaded once for the T tokens (16-byte loads when B's rank
// dim is contiguous and aligned; with b_stride_n == 1 the scalar path is coalesced across the warp instead).
// T > 1 only for single-adapter launches (adapter_ids == nullptr) and grouped launches (kGrouped, see
// block_tokens). Reads xa[m, :rank], B[i, n, :rank], y[m, c+n] of the block's rows m; writes each y[m, c+n] once.
// ------------------------------------------------------------------------------------------------
constexpr int kExpandThreads = 128;

template <typename TY, typename TB, bool kVec, int kTokens, bool kGrouped>
__global__ void __launch_bounds__(kExpandThreads) multi_lora_expand_kernel(const ExpandArgs p) {
  int64_t rows[kTokens];
  int64_t adapter = -1;
  const int n_tok = block_tokens<kGrouped, kTokens>(p.grouped, p.adapter_ids, p.ids_type, p.M, rows, adapter);
  if (n_tok == 0) return;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (n >= p.N) return;
  if (adapter < 0 || adapter >= p.num_adapters) return;  // no adapter: y untouched
  const int64_t rank = adapter_rank(p.ranks, p.ranks_type, adapter, p.r_max);
  if (rank == 0 && p.g == nullptr) return;  // y + 0 rounds back to y (DoRA still rescales the row)

  const float* xa_row[kTokens];
#pragma unroll
  for (int t = 0; t < kTokens; ++t) xa_row[t] = p.xa + rows[t] * p.xa_stride_m;
  const TB* __restrict__ b = static_cast<const TB*>(p.b) + adapter * p.b_stride_l + n * p.b_stride_n;
  float acc[kTokens];
#pragma unroll
  for (int t = 0; t < kTokens; ++t) acc[t] = 0.0f;
  int64_t j = 0;
  if (kVec) {  // b_stride_j == 1
    for (; j + 8 <= rank; j += 8) {
      float bv[8];
      load8(b + j, bv);
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        if (t < n_tok) {
          const float* xa_t = xa_row[t] + j;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[t] = fmaf(__ldg(xa_t + e), bv[e], acc[t]);
        }
      }
    }
  }
  for (; j < rank; ++j) {
    const float bj = to_float(b[j * p.b_stride_j]);
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      if (t < n_tok) acc[t] = fmaf(__ldg(xa_row[t] + j), bj, acc[t]);
    }
  }

  const float s = p.scales != nullptr ? __ldg(p.scales + adapter) : p.scale;
  const int64_t col = p.col_offset + n;
  const uint32_t seed_hash = dropout_seed_hash(p.dropout.seed);
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    if (t < n_tok) {
      const int64_t m = rows[t];
      float update = s * acc[t];
      if (p.dropout.enabled) {
        update = dropout_keep(dropout_row_hash(seed_hash, m), col, p.dropout.threshold) ? update * p.dropout.keep_scale : 0.0f;
      }
      TY* y = static_cast<TY*>(p.y) + m * p.y_stride_m + col * p.y_stride_n;
      float v = to_float(*y) + update;
      if (p.g != nullptr) {  // DoRA: g·(y + update) + (1 − g)·bias
        const float gv = __ldg(p.g + adapter * p.g_stride_l + col);
        v *= gv;
        if (p.bias != nullptr) v += (1.0f - gv) * __ldg(p.bias + col);
      }
      *y = from_float<TY>(v);
    }
  }
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

// (activation dtype, LoRA weight dtype) pairs that are compiled: the weight has the activation's dtype or
// is fp32 (the glue upcasts any other weight dtype to fp32, which is exact). Returns false otherwise.
template <typename F>
bool dispatch_pair(DType act, DType weight, F&& f) {
  if (weight != act && weight != DType::kFloat32) return false;
  dispatch_dtype(act, [&](auto at) {
    if (weight == act) f(at, at);
    else f(at, TypeTag<float>{});
  });
  return true;
}

inline int64_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

inline bool valid_dtype(DType dt) {
  return dt == DType::kFloat16 || dt == DType::kBFloat16 || dt == DType::kFloat32;
}

// A grouped launch's tile table (TokenTiles) is complete and has tiles (num_tiles == 0: nothing to do).
inline bool usable_tiles(const TokenTiles& g) { return g.sorted_ids != nullptr && g.num_tiles > 0 && g.block_m > 0; }

// Blocks along the grid's x: one per `tokens`-token group of every tile (grouped) or of the M rows.
inline int64_t token_blocks(const TokenTiles& g, int64_t M, int tokens) {
  return g.tiles != nullptr ? g.num_tiles * ceil_div(g.block_m, tokens) : ceil_div(M, tokens);
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
  // Single adapter with many tokens (lora_linear) and grouped launches: tiles of 8 tokens × 16 rank rows, so each
  // chunk of A is loaded once per 8 tokens. Multi-adapter with many tokens: 1 token × 16 rank rows (each x chunk
  // reused 4×). Few tokens (decode): one rank row per warp, so more warps share the work.
  const bool grouped = p.grouped.tiles != nullptr;
  if (grouped && !usable_tiles(p.grouped)) return p.grouped.num_tiles == 0 ? cudaSuccess : cudaErrorInvalidValue;
  const bool many = p.M >= 64 || grouped;
  const int rows_per_warp = many ? 4 : 1;
  const int tokens = (grouped || (many && p.adapter_ids == nullptr)) ? 8 : 1;
  const int64_t grid_x = token_blocks(p.grouped, p.M, tokens);
  const int64_t grid_y = ceil_div(p.r_max, static_cast<int64_t>(kShrinkWarps) * rows_per_warp);
  if (grid_y > kMaxGridY || grid_x > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  const dim3 block(kShrinkWarps * kWarpSize);
  const bool ok = dispatch_pair(p.x_dtype, p.a_dtype, [&](auto xt, auto at) {
    using TX = typename decltype(xt)::type;
    using TA = typename decltype(at)::type;
    if (vec) {
      if (grouped) multi_lora_shrink_kernel<TX, TA, true, 4, 8, true><<<grid, block, 0, stream>>>(p);
      else if (tokens == 8) multi_lora_shrink_kernel<TX, TA, true, 4, 8, false><<<grid, block, 0, stream>>>(p);
      else if (rows_per_warp == 4) multi_lora_shrink_kernel<TX, TA, true, 4, 1, false><<<grid, block, 0, stream>>>(p);
      else multi_lora_shrink_kernel<TX, TA, true, 1, 1, false><<<grid, block, 0, stream>>>(p);
    } else {
      if (grouped) multi_lora_shrink_kernel<TX, TA, false, 4, 8, true><<<grid, block, 0, stream>>>(p);
      else if (tokens == 8) multi_lora_shrink_kernel<TX, TA, false, 4, 8, false><<<grid, block, 0, stream>>>(p);
      else if (rows_per_warp == 4) multi_lora_shrink_kernel<TX, TA, false, 4, 1, false><<<grid, block, 0, stream>>>(p);
      else multi_lora_shrink_kernel<TX, TA, false, 1, 1, false><<<grid, block, 0, stream>>>(p);
    }
  });
  if (!ok) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

cudaError_t launch_multi_lora_expand(const ExpandArgs& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0 || (p.r_max <= 0 && p.g == nullptr)) return cudaSuccess;
  if (!valid_dtype(p.y_dtype) || !valid_dtype(p.b_dtype) || p.M > kMaxGridX) return cudaErrorInvalidValue;
  const int64_t bs = dtype_size(p.b_dtype);
  const bool vec = p.b_stride_j == 1 && aligned16(p.b) && (p.b_stride_l * bs) % 16 == 0 && (p.b_stride_n * bs) % 16 == 0;
  // Single adapter with many tokens (lora_linear) and grouped launches: each thread handles 8 tokens of one
  // adapter, so B is read once per 8 tokens.
  const bool grouped = p.grouped.tiles != nullptr;
  if (grouped && !usable_tiles(p.grouped)) return p.grouped.num_tiles == 0 ? cudaSuccess : cudaErrorInvalidValue;
  const int tokens = (grouped || (p.M >= 64 && p.adapter_ids == nullptr)) ? 8 : 1;
  const int64_t grid_x = token_blocks(p.grouped, p.M, tokens);
  const int64_t grid_y = ceil_div(p.N, kExpandThreads);
  if (grid_y > kMaxGridY || grid_x > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  const dim3 block(kExpandThreads);
  const bool ok = dispatch_pair(p.y_dtype, p.b_dtype, [&](auto yt, auto bt) {
    using TY = typename decltype(yt)::type;
    using TB = typename decltype(bt)::type;
    if (vec) {
      if (grouped) multi_lora_expand_kernel<TY, TB, true, 8, true><<<grid, block, 0, stream>>>(p);
      else if (tokens == 8) multi_lora_expand_kernel<TY, TB, true, 8, false><<<grid, block, 0, stream>>>(p);
      else multi_lora_expand_kernel<TY, TB, true, 1, false><<<grid, block, 0, stream>>>(p);
    } else {
      if (grouped) multi_lora_expand_kernel<TY, TB, false, 8, true><<<grid, block, 0, stream>>>(p);
      else if (tokens == 8) multi_lora_expand_kernel<TY, TB, false, 8, false><<<grid, block, 0, stream>>>(p);
      else multi_lora_expand_kernel<TY, TB, false, 1, false><<<grid, block, 0, stream>>>(p);
    }
  });
  if (!ok) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace lora_kernels
