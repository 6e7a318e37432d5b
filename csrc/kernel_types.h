// Plain C++ types shared by the CUDA launchers (*.cu) and the torch glue (*_torch.cpp).
// Host-compiler safe: includes only the CUDA runtime API header (for cudaStream_t / cudaError_t).
#pragma once

#include <cmath>
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

// DropoutArgs of probability p in [0, 1) (checked by the caller) and the user's seed (any int64; only its low
// 32 bits matter, as in the reference's `seed & 0xFFFFFFFF`). threshold = round(p * 2^24) with ties to even, like
// Python's round() in reference.dropout_threshold, whatever the FPU rounding mode (p * 2^24 is exact in double).
inline DropoutArgs make_dropout_args(double p, int64_t seed) {
  DropoutArgs d;
  d.enabled = p > 0.0;
  d.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffULL);
  const double scaled = p * 16777216.0;
  double rounded = std::floor(scaled);
  const double frac = scaled - rounded;  // exact
  if (frac > 0.5 || (frac == 0.5 && std::fmod(rounded, 2.0) != 0.0)) rounded += 1.0;
  d.threshold = static_cast<uint32_t>(rounded);
  d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

}  // namespace lora_kernels
