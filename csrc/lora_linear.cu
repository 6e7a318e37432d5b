// LoRA-linear helper kernel: the seeded dropout of x, materialised in fp32 for the dA GEMM of the
// backward pass (dA = dxaᵀ · drop(x)). The forward shrink/expand and the backward dxa / dx kernels are the
// single-adapter case of csrc/multi_lora.cu (adapter_ids == nullptr).
#include "common.cuh"
#include "lora_linear_kernels.h"

namespace lora_kernels {
namespace {

constexpr int kDropoutThreads = 256;

// Grid (M, ceil(K / kDropoutThreads)); one thread per element. Reads x[m, k]; writes out[m, k] (fp32), with
// the mask of row row_offset + m.
template <typename TX>
__global__ void __launch_bounds__(kDropoutThreads) dropout_to_float_kernel(const DropoutToFloatArgs p) {
  const int64_t m = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kDropoutThreads + threadIdx.x;
  if (k >= p.K) return;
  float v = to_float(static_cast<const TX*>(p.x)[m * p.x_stride_m + k]);
  if (p.dropout.enabled) {
    const uint32_t row_hash = dropout_row_hash(dropout_seed_hash(p.dropout.seed), p.row_offset + m);
    v = dropout_keep(row_hash, k, p.dropout.threshold) ? v * p.dropout.keep_scale : 0.0f;
  }
  p.out[m * p.out_stride_m + k] = v;
}

}  // namespace

cudaError_t launch_dropout_to_float(const DropoutToFloatArgs& p, cudaStream_t stream) {
  if (p.M <= 0 || p.K <= 0) return cudaSuccess;
  const int64_t grid_y = (p.K + kDropoutThreads - 1) / kDropoutThreads;
  if (p.M > 2147483647LL || grid_y > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.M), static_cast<unsigned>(grid_y));
  switch (p.x_dtype) {
    case DType::kFloat16: dropout_to_float_kernel<__half><<<grid, kDropoutThreads, 0, stream>>>(p); break;
    case DType::kBFloat16: dropout_to_float_kernel<__nv_bfloat16><<<grid, kDropoutThreads, 0, stream>>>(p); break;
    case DType::kFloat32: dropout_to_float_kernel<float><<<grid, kDropoutThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace lora_kernels
