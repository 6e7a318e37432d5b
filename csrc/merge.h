// Launcher interface of the fused merge kernels (csrc/merge.cu), shared with the torch glue (merge_torch.cpp).
// Host-compiler safe: CUDA runtime API header only.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernel_types.h"

namespace lora_kernels {

// One thread block owns a kMergeTileN x kMergeTileK tile of W (lora_kernels/cuda/merge.py mirrors these; tests/test_architecture.py checks it).
constexpr int kMergeTileN = 32;
constexpr int kMergeTileK = 128;

struct MergeArgs {
  // W [N, K], updated in place, any strides.
  void* w = nullptr;
  int64_t w_stride_n = 0, w_stride_k = 0;
  int64_t N = 0, K = 0;
  DType w_dtype = DType::kFloat32;
  // A [R, K] and B [N, R]: the adapters concatenated along the rank, one dtype, any strides.
  const void* a = nullptr;
  int64_t a_stride_r = 0, a_stride_k = 0;
  const void* b = nullptr;
  int64_t b_stride_n = 0, b_stride_r = 0;
  DType ab_dtype = DType::kFloat32;
  // Adapter i owns rank rows [rank_starts[i], rank_starts[i+1]) and scale scales[i] (device memory).
  const int32_t* rank_starts = nullptr;
  const float* scales = nullptr;
  int n_adapters = 0;
  // Exact merge only: counters [4] = (entries claimed, entries stored, overflowed tiles, new non-finite);
  // repair list (logical index n*K + k as int32 or int64, original bits as int16 or int32) of capacity
  // rec_capacity; overflow_tiles [n_tiles]; tile_ids (optional): the tiles to process, one per block.
  int32_t* counters = nullptr;
  void* rec_idx = nullptr;
  bool rec_idx_64 = false;
  void* rec_bits = nullptr;
  int64_t rec_capacity = 0;
  int32_t* overflow_tiles = nullptr;
  const int32_t* tile_ids = nullptr;
  int64_t n_blocks = 0;  // tiles to process (all tiles, or the length of tile_ids)
};

// W <- round(W + sum_i scales[i] * B_i A_i) (fp32 on chip, rounded once); with exact, also the repair list.
cudaError_t launch_lora_merge(const MergeArgs& args, bool exact, cudaStream_t stream);

}  // namespace lora_kernels
