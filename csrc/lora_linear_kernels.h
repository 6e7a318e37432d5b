// Launchers of the LoRA-linear helper kernels (csrc/lora_linear.cu), callable from host C++. The LoRA
// linear layer itself is composed in csrc/lora_linear_torch.cpp from these, the multi-adapter shrink /
// expand kernels with a single adapter (csrc/multi_lora_kernels.h), and cuBLAS GEMMs through ATen.
#pragma once

#include <cstdint>

#include "kernel_types.h"

namespace lora_kernels {

// out[m, k] = float(x[m, k]) · keep(row_offset + m, k) · keep_scale   (drop(x) in fp32; keep from `dropout`,
// all-true when dropout is disabled; row_offset places a chunk of rows in the full x, whose row numbers the
// mask hashes). x[m, k] at x + m * x_stride_m + k; out[m, k] at out + m * out_stride_m + k.
struct DropoutToFloatArgs {
  const void* x = nullptr;
  DType x_dtype = DType::kFloat32;
  int64_t x_stride_m = 0;
  float* out = nullptr;
  int64_t out_stride_m = 0;
  int64_t M = 0, K = 0;
  int64_t row_offset = 0;
  DropoutArgs dropout;
};

cudaError_t launch_dropout_to_float(const DropoutToFloatArgs& args, cudaStream_t stream);

}  // namespace lora_kernels
