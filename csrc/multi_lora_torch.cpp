// Torch glue of the multi-adapter kernels: implements lora_kernels::cuda_multi_lora_shrink and
// lora_kernels::cuda_multi_lora_expand_ (schemas and fakes live in lora_kernels/ops/multi_lora.py).
#include <optional>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "multi_lora_kernels.h"
#include "torch_glue.h"

namespace lora_kernels {
namespace {

using glue::check_cuda;
using glue::check_dim;

// The optional per-adapter ranks [L] (int32/int64, on `device`), contiguous; undefined when absent.
// Sets `ranks_type` to its index type.
at::Tensor checked_ranks(const std::optional<at::Tensor>& ranks_in, const at::Device device, int64_t L, const char* op,
                         IndexType& ranks_type) {
  if (!ranks_in.has_value()) return at::Tensor();
  const at::Tensor& ranks = *ranks_in;
  check_cuda(ranks, device, op, "ranks");
  check_dim(ranks, 1, op, "ranks", "[L]");
  TORCH_CHECK(ranks.size(0) == L, "lora_kernels.", op, ": ranks must be [L=", L, "], got ", ranks.sizes());
  ranks_type = glue::index_type(ranks, op, "ranks");
  return ranks.contiguous();
}

// The optional tile table of a grouped launch (ops.multi_lora.LoRABatchMeta's sorted_token_ids [C >= M] and tiles
// [3, T], int32): checked here, kept alive in `keep` for the launch. Empty TokenTiles when absent.
TokenTiles checked_tiles(const std::optional<at::Tensor>& sorted_in, const std::optional<at::Tensor>& tiles_in,
                         int64_t block_m, int64_t M, const at::Device device, const char* op, at::Tensor (&keep)[2]) {
  TokenTiles g;
  TORCH_CHECK(sorted_in.has_value() == tiles_in.has_value(), "lora_kernels.", op,
              ": sorted_token_ids and tiles must be given together (a LoRABatchMeta's buffers)");
  if (!tiles_in.has_value()) return g;
  const at::Tensor& sorted = *sorted_in;
  const at::Tensor& tiles = *tiles_in;
  check_cuda(sorted, device, op, "sorted_token_ids");
  check_cuda(tiles, device, op, "tiles");
  TORCH_CHECK(sorted.scalar_type() == at::kInt && tiles.scalar_type() == at::kInt, "lora_kernels.", op,
              ": sorted_token_ids and tiles must be int32, got ", sorted.scalar_type(), " and ", tiles.scalar_type());
  TORCH_CHECK(sorted.dim() == 1 && sorted.size(0) >= M, "lora_kernels.", op, ": sorted_token_ids must be [C >= M=", M,
              "], got ", sorted.sizes());
  TORCH_CHECK(tiles.dim() == 2 && tiles.size(0) == 3, "lora_kernels.", op, ": tiles must be [3, T], got ", tiles.sizes());
  TORCH_CHECK(block_m >= 1, "lora_kernels.", op, ": block_m must be >= 1 with a tile table, got ", block_m);
  keep[0] = sorted.contiguous();
  keep[1] = tiles.contiguous();
  g.sorted_ids = keep[0].data_ptr<int32_t>();
  g.tiles = keep[1].data_ptr<int32_t>();
  g.num_tiles = keep[1].size(1);
  g.block_m = block_m;
  return g;
}

// xa [M, r_max] fp32: xa[m, j] = x[m] · lora_a[adapter_ids[m], j] for j < ranks[i], else 0 (0 for ids outside [0, L)).
// With a tile table (grouped launch) the adapters come from the tiles and adapter_ids is not read.
at::Tensor cuda_multi_lora_shrink(const at::Tensor& x_in, const at::Tensor& lora_a_in, const at::Tensor& adapter_ids_in,
                                  const std::optional<at::Tensor>& ranks_in,
                                  const std::optional<at::Tensor>& sorted_token_ids,
                                  const std::optional<at::Tensor>& tiles, int64_t block_m) {
  constexpr const char* op = "cuda_multi_lora_shrink";
  const at::Device device = x_in.device();
  glue::check_operands(device, op, {{x_in, "x", 2, "[M, K]"},
                                    {lora_a_in, "lora_a", 3, "[L, r_max, K]"},
                                    {adapter_ids_in, "adapter_ids", 1, "[M]"}});
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const int64_t L = lora_a_in.size(0), r_max = lora_a_in.size(1);
  TORCH_CHECK(lora_a_in.size(2) == K, "lora_kernels.", op, ": lora_a must be [L, r_max, K=", K, "] to match x ",
              x_in.sizes(), ", got ", lora_a_in.sizes());
  TORCH_CHECK(adapter_ids_in.size(0) == M, "lora_kernels.", op, ": adapter_ids must be [M=", M, "], got ",
              adapter_ids_in.sizes());
  ShrinkArgs p;
  p.x_dtype = glue::kernel_dtype(x_in, op, "x");
  p.a_dtype = glue::kernel_dtype(lora_a_in, op, "lora_a");
  p.ids_type = glue::index_type(adapter_ids_in, op, "adapter_ids");
  const at::Tensor ranks = checked_ranks(ranks_in, device, L, op, p.ranks_type);
  at::Tensor keep[2];
  p.grouped = checked_tiles(sorted_token_ids, tiles, block_m, M, device, op, keep);

  const glue::DeviceGuard guard(device);
  // A grouped launch never visits rows without an adapter: their xa must start at 0.
  at::Tensor xa = p.grouped.tiles != nullptr ? at::zeros({M, r_max}, x_in.options().dtype(at::kFloat))
                                             : glue::kernel_output({M, r_max}, x_in.options().dtype(at::kFloat));
  if (M == 0 || r_max == 0) return xa;
  glue::check_grid(M, (r_max + 3) / 4, op);

  const at::Tensor x = glue::inner_contiguous(x_in);
  const at::Tensor lora_a = glue::inner_contiguous(glue::weight_for(lora_a_in, x_in));
  p.a_dtype = glue::kernel_dtype(lora_a, op, "lora_a");
  const at::Tensor adapter_ids = adapter_ids_in.contiguous();
  p.x = x.data_ptr();
  p.x_stride_m = x.stride(0);
  p.a = lora_a.data_ptr();
  p.a_stride_l = lora_a.stride(0);
  p.a_stride_j = lora_a.stride(1);
  p.xa = xa.data_ptr<float>();
  p.xa_stride_m = xa.stride(0);
  p.adapter_ids = adapter_ids.data_ptr();
  p.ranks = ranks.defined() ? ranks.data_ptr() : nullptr;
  p.M = M;
  p.K = K;
  p.r_max = r_max;
  p.num_adapters = L;
  glue::check_launch(launch_multi_lora_shrink(p, glue::current_stream()), "multi_lora_shrink kernel");
  return xa;
}

// y[m, col_offset + n] += scales[i] · Σ_{j<ranks[i]} xa[m, j] · lora_b[i, n, j] for i = adapter_ids[m] in [0, L).
// With a tile table (grouped launch) the adapters come from the tiles and adapter_ids is not read.
void cuda_multi_lora_expand_(const at::Tensor& y, const at::Tensor& xa_in, const at::Tensor& lora_b_in,
                             const at::Tensor& adapter_ids_in, const at::Tensor& scales_in,
                             const std::optional<at::Tensor>& ranks_in, int64_t col_offset,
                             const std::optional<at::Tensor>& sorted_token_ids, const std::optional<at::Tensor>& tiles,
                             int64_t block_m, const std::optional<at::Tensor>& magnitudes,
                             const std::optional<at::Tensor>& bias_in) {
  constexpr const char* op = "cuda_multi_lora_expand_";
  const at::Device device = y.device();
  glue::check_operands(device, op, {{y, "y", 2, "[M, N_total]"},
                                    {xa_in, "xa", 2, "[M, r_max]"},
                                    {lora_b_in, "lora_b", 3, "[L, N, r_max]"},
                                    {adapter_ids_in, "adapter_ids", 1, "[M]"},
                                    {scales_in, "scales", 1, "[L]"}});
  const int64_t M = y.size(0);
  const int64_t L = lora_b_in.size(0), N = lora_b_in.size(1), r_max = lora_b_in.size(2);
  TORCH_CHECK(xa_in.scalar_type() == at::kFloat, "lora_kernels.", op, ": xa must be float32 (the shrink output), got ",
              xa_in.scalar_type());
  TORCH_CHECK(xa_in.size(0) == M && xa_in.size(1) == r_max, "lora_kernels.", op, ": xa must be [M=", M, ", r_max=", r_max,
              "] (y is ", y.sizes(), ", lora_b is ", lora_b_in.sizes(), "), got ", xa_in.sizes());
  TORCH_CHECK(adapter_ids_in.size(0) == M, "lora_kernels.", op, ": adapter_ids must be [M=", M, "], got ",
              adapter_ids_in.sizes());
  TORCH_CHECK(scales_in.size(0) == L, "lora_kernels.", op, ": scales must be [L=", L, "], got ", scales_in.sizes());
  TORCH_CHECK(scales_in.is_floating_point(), "lora_kernels.", op, ": scales must be a floating tensor, got ",
              scales_in.scalar_type());
  TORCH_CHECK(col_offset >= 0 && N <= y.size(1) && col_offset <= y.size(1) - N, "lora_kernels.", op, ": columns [",
              col_offset, ", ", col_offset, " + ", N, ") of the slice do not fit in y ", y.sizes());
  // Each y element is read-modified-written by one thread: elements sharing memory (a stride-0 / expanded y)
  // would race on the GPU, where the reference's copy_ raises.
  at::assert_no_internal_overlap(y);
  ExpandArgs p;
  p.y_dtype = glue::kernel_dtype(y, op, "y");
  p.b_dtype = glue::kernel_dtype(lora_b_in, op, "lora_b");
  p.ids_type = glue::index_type(adapter_ids_in, op, "adapter_ids");
  const at::Tensor ranks = checked_ranks(ranks_in, device, L, op, p.ranks_type);
  at::Tensor keep[2];
  p.grouped = checked_tiles(sorted_token_ids, tiles, block_m, M, device, op, keep);
  // DoRA: factors [L, >= col_offset + N] (any float dtype, read as fp32) and an optional bias [>= col_offset + N]
  const bool dora = magnitudes.has_value() && magnitudes->defined();
  TORCH_CHECK(dora || !(bias_in.has_value() && bias_in->defined()), "lora_kernels.", op,
              ": bias is only read with magnitudes (DoRA)");
  at::Tensor g, bias;
  if (dora) {
    glue::check_operands(device, op, {{*magnitudes, "magnitudes", 2, "[L, N_total]"}});
    TORCH_CHECK(magnitudes->size(0) == L && magnitudes->size(1) >= col_offset + N && magnitudes->is_floating_point(),
                "lora_kernels.", op, ": magnitudes must be a floating [L=", L, ", >= ", col_offset + N, "] tensor, got ",
                magnitudes->sizes(), " ", magnitudes->scalar_type());
    if (bias_in.has_value() && bias_in->defined()) {
      glue::check_operands(device, op, {{*bias_in, "bias", 1, "[N_total]"}});
      TORCH_CHECK(bias_in->size(0) >= col_offset + N && bias_in->is_floating_point(), "lora_kernels.", op,
                  ": bias must be a floating [>= ", col_offset + N, "] tensor, got ", bias_in->sizes());
    }
  }
  if (M == 0 || N == 0 || (r_max == 0 && !dora)) return;
  glue::check_grid(M, (N + 127) / 128, op);

  const glue::DeviceGuard guard(device);
  if (dora) {
    g = magnitudes->to(at::kFloat).contiguous();
    p.g = g.data_ptr<float>();
    p.g_stride_l = g.stride(0);
    if (bias_in.has_value() && bias_in->defined()) {
      bias = bias_in->to(at::kFloat).contiguous();
      p.bias = bias.data_ptr<float>();
    }
  }
  const at::Tensor xa = glue::inner_contiguous(xa_in);
  // any strides (16-byte loads when the rank dim is contiguous and aligned)
  const at::Tensor lora_b = glue::weight_for(lora_b_in, y);
  p.b_dtype = glue::kernel_dtype(lora_b, op, "lora_b");
  const at::Tensor adapter_ids = adapter_ids_in.contiguous();
  const at::Tensor scales = scales_in.to(at::kFloat).contiguous();
  p.y = y.data_ptr();
  p.y_stride_m = y.stride(0);
  p.y_stride_n = y.stride(1);
  p.xa = xa.data_ptr<float>();
  p.xa_stride_m = xa.stride(0);
  p.b = lora_b.data_ptr();
  p.b_stride_l = lora_b.stride(0);
  p.b_stride_n = lora_b.stride(1);
  p.b_stride_j = lora_b.stride(2);
  p.adapter_ids = adapter_ids.data_ptr();
  p.scales = scales.data_ptr<float>();
  p.ranks = ranks.defined() ? ranks.data_ptr() : nullptr;
  p.M = M;
  p.N = N;
  p.r_max = r_max;
  p.num_adapters = L;
  p.col_offset = col_offset;
  glue::check_launch(launch_multi_lora_expand(p, glue::current_stream()), "multi_lora_expand kernel");
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, LORA_KERNELS_DISPATCH_KEY, m) {
  m.impl("cuda_multi_lora_shrink", &cuda_multi_lora_shrink);
  m.impl("cuda_multi_lora_expand_", &cuda_multi_lora_expand_);
}

}  // namespace lora_kernels
