// Torch glue of the fused merge kernels: implements lora_kernels::cuda_merge_ and lora_kernels::cuda_merge_exact_
// (schemas and fakes live in lora_kernels/ops/merge.py; the Python launchers in lora_kernels/cuda/merge.py).
#include <optional>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "merge.h"
#include "torch_glue.h"

namespace lora_kernels {
namespace {

using glue::check_cuda;

MergeArgs make_args(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    const at::Tensor& rank_starts, const at::Tensor& scales, const char* op) {
  const at::Device device = weight.device();
  glue::check_operands(device, op, {{weight, "weight", 2, "[N, K]"},
                                    {lora_a, "lora_a", 2, "[R, K]"},
                                    {lora_b, "lora_b", 2, "[N, R]"},
                                    {rank_starts, "rank_starts", 1, "[n_adapters + 1]"},
                                    {scales, "scales", 1, "[n_adapters]"}});
  const int64_t N = weight.size(0), K = weight.size(1), R = lora_a.size(0);
  TORCH_CHECK(lora_a.size(1) == K, "lora_kernels.", op, ": lora_a must be [R, K=", K, "], got ", lora_a.sizes());
  TORCH_CHECK(lora_b.size(0) == N && lora_b.size(1) == R, "lora_kernels.", op, ": lora_b must be [N=", N, ", R=", R,
              "], got ", lora_b.sizes());
  TORCH_CHECK(lora_a.scalar_type() == lora_b.scalar_type(), "lora_kernels.", op, ": lora_a (", lora_a.scalar_type(),
              ") and lora_b (", lora_b.scalar_type(), ") must share one dtype");
  TORCH_CHECK(rank_starts.scalar_type() == at::kInt && rank_starts.is_contiguous(), "lora_kernels.", op,
              ": rank_starts must be a contiguous int32 tensor");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "lora_kernels.", op,
              ": scales must be a contiguous float32 tensor");
  TORCH_CHECK(rank_starts.size(0) == scales.size(0) + 1, "lora_kernels.", op, ": rank_starts must have n_adapters + 1 = ",
              scales.size(0) + 1, " entries, got ", rank_starts.size(0));
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(weight.stride(d) != 0 || weight.size(d) <= 1, "lora_kernels.", op,
                ": weight must not have stride 0 (an in-place merge needs every element stored once)");
  }
  MergeArgs p;
  p.w = weight.data_ptr();
  p.w_stride_n = weight.stride(0);
  p.w_stride_k = weight.stride(1);
  p.N = N;
  p.K = K;
  p.w_dtype = glue::kernel_dtype(weight, op, "weight");
  p.a = lora_a.data_ptr();
  p.a_stride_r = lora_a.stride(0);
  p.a_stride_k = lora_a.stride(1);
  p.b = lora_b.data_ptr();
  p.b_stride_n = lora_b.stride(0);
  p.b_stride_r = lora_b.stride(1);
  p.ab_dtype = glue::kernel_dtype(lora_a, op, "lora_a");
  p.rank_starts = rank_starts.data_ptr<int32_t>();
  p.scales = scales.data_ptr<float>();
  p.n_adapters = static_cast<int>(scales.size(0));
  p.n_blocks = ((N + kMergeTileN - 1) / kMergeTileN) * ((K + kMergeTileK - 1) / kMergeTileK);
  return p;
}

void cuda_merge_(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& rank_starts,
                 const at::Tensor& scales) {
  constexpr const char* op = "cuda_merge_";
  MergeArgs p = make_args(weight, lora_a, lora_b, rank_starts, scales, op);
  if (weight.numel() == 0) return;
  const glue::DeviceGuard guard(weight.device());
  glue::check_launch(launch_lora_merge(p, /*exact=*/false, glue::current_stream()), "lora_merge_kernel");
}

void cuda_merge_exact_(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& rank_starts, const at::Tensor& scales, const at::Tensor& counters,
                       const at::Tensor& repair_index, const at::Tensor& repair_bits, const at::Tensor& overflow_tiles,
                       const std::optional<at::Tensor>& tile_ids) {
  constexpr const char* op = "cuda_merge_exact_";
  MergeArgs p = make_args(weight, lora_a, lora_b, rank_starts, scales, op);
  const at::Device device = weight.device();
  glue::check_operands(device, op, {{counters, "counters", 1, "[4]"},
                                    {repair_index, "repair_index", 1, "[capacity]"},
                                    {repair_bits, "repair_bits", 1, "[capacity]"},
                                    {overflow_tiles, "overflow_tiles", 1, "[tiles]"}});
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= 4, "lora_kernels.",
              op, ": counters must be a contiguous int32 tensor of 4 zeros");
  TORCH_CHECK(repair_index.is_contiguous() && (repair_index.scalar_type() == at::kInt || repair_index.scalar_type() == at::kLong),
              "lora_kernels.", op, ": repair_index must be a contiguous int32 or int64 tensor");
  // int32 holds every logical index n*K + k <= numel - 1 while numel <= 2^31 (ops/merge.collect_repair_list picks int32 below 2^31).
  TORCH_CHECK(repair_index.scalar_type() == at::kLong || weight.numel() <= 2147483648LL, "lora_kernels.", op,
              ": weight has more than 2^31 elements: repair_index must be int64");
  const auto bits_type = weight.scalar_type() == at::kFloat ? at::kInt : at::kShort;
  TORCH_CHECK(repair_bits.is_contiguous() && repair_bits.scalar_type() == bits_type, "lora_kernels.", op,
              ": repair_bits must be a contiguous ", bits_type, " tensor for a ", weight.scalar_type(), " weight");
  TORCH_CHECK(repair_bits.numel() == repair_index.numel(), "lora_kernels.", op,
              ": repair_index and repair_bits must have the same length");
  TORCH_CHECK(overflow_tiles.scalar_type() == at::kInt && overflow_tiles.is_contiguous(), "lora_kernels.", op,
              ": overflow_tiles must be a contiguous int32 tensor");
  at::Tensor tiles;
  if (tile_ids.has_value()) {
    tiles = *tile_ids;
    check_cuda(tiles, device, op, "tile_ids");
    TORCH_CHECK(tiles.scalar_type() == at::kInt && tiles.is_contiguous() && tiles.dim() == 1, "lora_kernels.", op,
                ": tile_ids must be a contiguous 1-D int32 tensor");
    p.tile_ids = tiles.data_ptr<int32_t>();
    p.n_blocks = tiles.numel();
  }
  TORCH_CHECK(overflow_tiles.numel() >= p.n_blocks, "lora_kernels.", op, ": overflow_tiles must hold ", p.n_blocks,
              " entries (one per tile processed), got ", overflow_tiles.numel());
  if (weight.numel() == 0 || p.n_blocks == 0) return;
  p.counters = counters.data_ptr<int32_t>();
  p.rec_idx = repair_index.data_ptr();
  p.rec_idx_64 = repair_index.scalar_type() == at::kLong;
  p.rec_bits = repair_bits.data_ptr();
  p.rec_capacity = repair_index.numel();
  p.overflow_tiles = overflow_tiles.data_ptr<int32_t>();
  const glue::DeviceGuard guard(device);
  glue::check_launch(launch_lora_merge(p, /*exact=*/true, glue::current_stream()), "lora_merge_kernel (exact)");
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, LORA_KERNELS_DISPATCH_KEY, m) {
  m.impl("cuda_merge_", &cuda_merge_);
  m.impl("cuda_merge_exact_", &cuda_merge_exact_);
}

}  // namespace lora_kernels
