// Launchers of the multi-adapter shrink / expand kernels (csrc/multi_lora.cu), callable from host C++.
// Every pointer is a device pointer; strides are in elements; the innermost dimension named "contiguous"
// must have stride 1. The LoRA weights (A, B) must have the activation's dtype or be fp32 (other pairs return
// cudaErrorInvalidValue; the glue upcasts them to fp32, exactly). The launchers pick the vectorised path themselves when alignment allows, launch on
// `stream`, and return cudaGetLastError() (cudaSuccess when there is nothing to do, e.g. M == 0).
#pragma once

#include <cstdint>

#include "kernel_types.h"

namespace lora_kernels {

// Grouped launches (prefill; ops.multi_lora.LoRABatchMeta): with `tiles` set, the kernels walk a tile table instead of
// the rows. Tile t covers the sorted positions [tiles[T + t], tiles[2T + t]) (at most block_m of them) of adapter
// tiles[t] (-1: unused tile), T = num_tiles; the row at sorted position q is sorted_ids[q]. Blocks then take 8
// tokens of one adapter, so each chunk of A / B is loaded once per 8 tokens. Rows in no tile (no adapter) are
// not visited: the shrink leaves their xa as the caller initialised it. adapter_ids is not read.
struct TokenTiles {
  const int32_t* sorted_ids = nullptr;  // [>= M] int32: rows in adapter order
  const int32_t* tiles = nullptr;       // [3, num_tiles] int32, contiguous; null: one block row per token group
  int64_t num_tiles = 0;
  int64_t block_m = 0;                  // tokens per tile (at most)
};

// Shrink: for every row m with adapter i = adapter_ids[m] (0 when adapter_ids is null):
//   xa[m, j] = out_scale * Σ_k drop(x)[m, k] · A[i, j, k]      for j < rank_i
//   xa[m, j] = 0                                                 for rank_i <= j < r_max, or i ∉ [0, L)
// drop() is the seeded dropout of `dropout` (identity when disabled), applied to x at (m, k).
struct ShrinkArgs {
  const void* x = nullptr;      // [M, K], x[m, k] at x + m * x_stride_m + k
  DType x_dtype = DType::kFloat32;
  int64_t x_stride_m = 0;
  const void* a = nullptr;      // [L, r_max, K], A[i, j, k] at a + i * a_stride_l + j * a_stride_j + k
  DType a_dtype = DType::kFloat32;
  int64_t a_stride_l = 0;
  int64_t a_stride_j = 0;
  float* xa = nullptr;          // [M, r_max] fp32 output, xa[m, j] at xa + m * xa_stride_m + j
  int64_t xa_stride_m = 0;
  const void* adapter_ids = nullptr;  // [M] or null (every row uses adapter 0)
  IndexType ids_type = IndexType::kInt64;
  const void* ranks = nullptr;        // [L] or null (every adapter has rank r_max)
  IndexType ranks_type = IndexType::kInt64;
  int64_t M = 0, K = 0, r_max = 0, num_adapters = 0;
  float out_scale = 1.0f;
  DropoutArgs dropout;
  TokenTiles grouped;                 // optional tile table (see TokenTiles)
};

// Expand (in place): for every row m with a valid adapter i (rows with i ∉ [0, L) are untouched):
//   y[m, col_offset + n] = round(y[m, col_offset + n] + drop(scale_i · Σ_{j<rank_i} xa[m, j] · B[i, n, j]))
// scale_i = scales[i] (fp32) or `scale` when scales is null; drop() is the seeded dropout at
// (m, col_offset + n) (identity when disabled). One rounding: the sum is formed in fp32.
// DoRA (g != null): y[m, c] = round(g[i, c] · (y[m, c] + update) + (1 − g[i, c]) · bias[c]) with c = col_offset + n,
// bias[c] = 0 when bias is null; rows of a rank-0 adapter are rescaled too (g = 1 gives y + update bit for bit).
struct ExpandArgs {
  void* y = nullptr;            // y[m, c] at y + m * y_stride_m + c * y_stride_n (any strides)
  DType y_dtype = DType::kFloat32;
  int64_t y_stride_m = 0;
  int64_t y_stride_n = 1;
  const float* xa = nullptr;    // [M, r_max] fp32, xa[m, j] at xa + m * xa_stride_m + j
  int64_t xa_stride_m = 0;
  const void* b = nullptr;      // [L, N, r_max], B[i, n, j] at b + i * b_stride_l + n * b_stride_n + j * b_stride_j
  DType b_dtype = DType::kFloat32;
  int64_t b_stride_l = 0;
  int64_t b_stride_n = 0;
  int64_t b_stride_j = 1;
  const void* adapter_ids = nullptr;  // [M] or null (every row uses adapter 0)
  IndexType ids_type = IndexType::kInt64;
  const float* scales = nullptr;      // [L] fp32 or null (use `scale`)
  float scale = 1.0f;
  const void* ranks = nullptr;        // [L] or null (rank r_max)
  IndexType ranks_type = IndexType::kInt64;
  int64_t M = 0, N = 0, r_max = 0, num_adapters = 0, col_offset = 0;
  DropoutArgs dropout;
  TokenTiles grouped;                 // optional tile table (see TokenTiles)
  const float* g = nullptr;           // DoRA factors [L, >= col_offset + N] fp32 at g + i * g_stride_l + c, or null
  int64_t g_stride_l = 0;
  const float* bias = nullptr;        // [>= col_offset + N] fp32 (DoRA only), or null (zeros)
};

cudaError_t launch_multi_lora_shrink(const ShrinkArgs& args, cudaStream_t stream);
cudaError_t launch_multi_lora_expand(const ExpandArgs& args, cudaStream_t stream);

}  // namespace lora_kernels
