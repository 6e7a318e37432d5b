// Small helpers for the torch glue files (*_torch.cpp): input checks with messages that name the tensor
// and what was expected, dtype mapping onto the kernels' DType / IndexType, launch-error reporting.
// Host C++ only (no cuSPARSE-pulling ATen/cuda headers).
//
// LORA_KERNELS_EMULATE_CUDA (tests/cuda_emu/build.py only): the glue is built against a CPU torch with the
// kernels run by the CPU emulator of tests/cuda_emu/cuda_emu.h. The ops then register for CPU tensors, with no
// device guard and no stream; nothing else in the glue changes. Never defined in a real build.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include <ATen/ATen.h>
#ifndef LORA_KERNELS_EMULATE_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "kernel_types.h"

// Dispatch key the *_torch.cpp files register their kernels under: TORCH_LIBRARY_IMPL(lora_kernels, LORA_KERNELS_DISPATCH_KEY, m).
#ifdef LORA_KERNELS_EMULATE_CUDA
#define LORA_KERNELS_DISPATCH_KEY CPU
#else
#define LORA_KERNELS_DISPATCH_KEY CUDA
#endif

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
#ifdef LORA_KERNELS_EMULATE_CUDA
  TORCH_CHECK(t.is_cpu(), "lora_kernels.", op, ": ", name, " must be a CPU tensor (emulated CUDA build), got device ", t.device());
#else
  TORCH_CHECK(t.is_cuda(), "lora_kernels.", op, ": ", name, " must be a CUDA tensor, got device ", t.device());
#endif
  TORCH_CHECK(t.device() == device, "lora_kernels.", op, ": ", name, " is on ", t.device(), " but expected ", device,
              " (all tensors must be on one device)");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "lora_kernels.", op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

// One operand of an op: the tensor, its name in messages, and its expected layout ("[M, K]": 2-D).
struct Operand {
  const at::Tensor& t;
  const char* name;
  int64_t dim;
  const char* layout;
};

// Every operand on `device` (see check_cuda) with its expected number of dimensions.
inline void check_operands(const at::Device& device, const char* op, std::initializer_list<Operand> operands) {
  for (const Operand& o : operands) {
    check_cuda(o.t, device, op, o.name);
    check_dim(o.t, o.dim, op, o.name, o.layout);
  }
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

// A buffer the kernels must write in full. The emulated build fills it with NaN, so an element a kernel misses
// shows up in the tests; the real build leaves it uninitialised.
inline at::Tensor kernel_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef LORA_KERNELS_EMULATE_CUDA
  return at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options);
#else
  return at::empty(sizes, options);
#endif
}

inline void check_launch(cudaError_t err, const char* what) {
#ifdef LORA_KERNELS_EMULATE_CUDA
  TORCH_CHECK(err == cudaSuccess, "lora_kernels: launching ", what, " failed in the CUDA emulator: error ",
              static_cast<int>(err), " (details on stderr)");
#else
  TORCH_CHECK(err == cudaSuccess, "lora_kernels: launching ", what, " failed: ", cudaGetErrorString(err));
#endif
}

// The kernels index the grid's x dimension by row (2^31 - 1 rows at most) and y by column tile (65535).
inline void check_grid(int64_t rows, int64_t tiles, const char* op) {
  TORCH_CHECK(rows <= 2147483647LL, "lora_kernels.", op, ": at most 2^31 - 1 rows supported, got ", rows);
  TORCH_CHECK(tiles <= 65535, "lora_kernels.", op, ": the output is too wide for one launch (", tiles, " tiles > 65535)");
}

#ifdef LORA_KERNELS_EMULATE_CUDA
inline cudaStream_t current_stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
#else
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
// Makes the tensors' device current for the launches and ATen calls of one op.
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

}  // namespace glue
}  // namespace lora_kernels
