// Small helpers for the torch glue files (*_torch.cpp): input checks with messages that name the tensor
// and what was expected, dtype mapping onto the kernels' DType / IndexType, launch-error reporting.
// Host C++ only (no cuSPARSE-pulling ATen/cuda headers).
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernel_types.h"

namespace lora_kernels {
namespace glue {

inline DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default:
      TORCH_CHECK(false, "lora_kernels.", op, ": ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

inline IndexType index_type(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "lora_kernels.", op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
  return t.scalar_type() == at::kLong ? IndexType::kInt64 : IndexType::kInt32;
}

inline void check_cuda(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lora_kernels.", op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "lora_kernels.", op, ": ", name, " is on ", t.device(), " but expected ", device,
              " (all tensors must be on one device)");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "lora_kernels.", op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

// The kernels need the innermost dimension contiguous (any other strides are passed through): copy otherwise.
inline at::Tensor inner_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// LoRA weights enter the kernels in the activation's dtype or in fp32 (the only compiled pairs): a weight of
// another dtype is upcast to fp32, which is exact (fp16/bf16 -> fp32).
inline at::Tensor weight_for(const at::Tensor& weight, const at::Tensor& activation) {
  if (weight.scalar_type() == activation.scalar_type() || weight.scalar_type() == at::kFloat) return weight;
  return weight.to(at::kFloat);
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lora_kernels: launching ", what, " failed: ", cudaGetErrorString(err));
}

// The kernels index the grid's x dimension by row (2^31 - 1 rows at most) and y by column tile (65535).
inline void check_grid(int64_t rows, int64_t tiles, const char* op) {
  TORCH_CHECK(rows <= 2147483647LL, "lora_kernels.", op, ": at most 2^31 - 1 rows supported, got ", rows);
  TORCH_CHECK(tiles <= 65535, "lora_kernels.", op, ": the output is too wide for one launch (", tiles, " tiles > 65535)");
}

inline DropoutArgs make_dropout(double p, int64_t seed) { return make_dropout_args(p, seed); }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace glue
}  // namespace lora_kernels
