// Plain C++ types shared by the CUDA launchers (*.cu) and the torch glue (*_torch.cpp).
// Host-compiler safe: includes only the CUDA runtime API header (for cudaStream_t / cudaError_t).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace lora_kernels {

// Element types the kernels read and write (the glue maps at::ScalarType onto these).
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Integer types of adapter ids / ranks.
enum class IndexType : int { kInt32 = 0, kInt64 = 1 };

// Seeded LoRA dropout (reference.dropout_keep_mask): element (row, col) is kept iff
// (mix32(col + mix32(row + mix32(seed))) >> 8) >= threshold, and kept values are multiplied by keep_scale.
struct DropoutArgs {
  bool enabled = false;
  uint32_t seed = 0;        // low 32 bits of the user's seed (the launcher hashes it)
  uint32_t threshold = 0;   // round(p * 2^24), round-half-even like Python's round()
  float keep_scale = 1.0f;  // 1 / (1 - p)
};

}  // namespace lora_kernels
