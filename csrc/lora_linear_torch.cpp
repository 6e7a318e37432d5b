// Torch glue of the LoRA linear layer on the CUDA extension: implements lora_kernels::cuda_lora_linear_fwd,
// lora_kernels::cuda_lora_linear_bwd and lora_kernels::cuda_lora_dropout (schemas and fakes live in
// lora_kernels/ops/lora_linear.py; semantics are reference.lora_linear_fwd_ref / lora_linear_bwd_ref).
//
// Composition (base GEMMs are cuBLAS through ATen, the LoRA branch is custom kernels):
//   forward   xa = drop(x)·Aᵀ                    shrink kernel (fp32 out, dropout hash fused)
//             y  = x·W0ᵀ (+ bias)                at::mm / at::addmm (cuBLAS, rounded to x.dtype)
//             y += scale·xa·Bᵀ                   expand kernel (in place, fp32 math)
//   backward  dxa = scale·dy·B                   shrink kernel on Bᵀ (fp32 out)
//             dB  = scale·dyᵀ·xa                 at::addmm in fp32 (over row chunks for 16-bit dy)
//             dA  = dxaᵀ·drop(x)                 dropout kernel (fp32 drop(x)) + at::addmm in fp32 (row chunks)
//             dx  = dy·W0 ; dx += drop'(dxa·A)   at::mm (cuBLAS) + expand kernel with dropout on its output
//             dW0 = dyᵀ·x                        at::mm, only when asked
// Numerics: every kernel accumulates in fp32. y and dx are rounded twice in fp16/bf16: once by cuBLAS
// (x·W0ᵀ + bias, dy·W0) and once after adding the LoRA term in fp32 (the reference rounds once); the extra
// error is at most half an ulp of the output. dA, dB, dW0 are rounded once. In fp32 everything is exact
// fp32 arithmetic (TF32 only if the user enabled torch.backends.cuda.matmul.allow_tf32).
#include <algorithm>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "lora_linear_kernels.h"
#include "multi_lora_kernels.h"
#include "torch_glue.h"

namespace lora_kernels {
namespace {

using glue::check_cuda;

// Row chunks of the backward's fp32 GEMMs: at most kChunkBytes of fp32 copy per chunk (the CPU emulator's
// build sets a tiny value so that its small test shapes cross chunk boundaries).
#ifndef LORA_KERNELS_BWD_CHUNK_BYTES
#define LORA_KERNELS_BWD_CHUNK_BYTES (int64_t{64} << 20)
#endif
constexpr int64_t kChunkBytes = LORA_KERNELS_BWD_CHUNK_BYTES;
int64_t chunk_rows(int64_t cols) { return std::max<int64_t>(1, kChunkBytes / (4 * std::max<int64_t>(cols, 1))); }

void check_dropout_p(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lora_kernels.", op, ": dropout_p must be in [0, 1), got ", p);
}

// Shapes/dtypes/devices shared by forward and backward: weight [N, K], lora_a [r, K], lora_b [N, r].
void check_weights(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Device& device,
                   const char* op) {
  glue::check_operands(device, op, {{weight, "weight", 2, "[N, K]"},
                                    {lora_a, "lora_a", 2, "[r, K]"},
                                    {lora_b, "lora_b", 2, "[N, r]"}});
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_a.size(0);
  TORCH_CHECK(lora_a.size(1) == K, "lora_kernels.", op, ": lora_a must be [r, K=", K, "] (weight is ", weight.sizes(),
              "), got ", lora_a.sizes());
  TORCH_CHECK(lora_b.size(0) == N && lora_b.size(1) == r, "lora_kernels.", op, ": lora_b must be [N=", N, ", r=", r,
              "], got ", lora_b.sizes());
  glue::kernel_dtype(weight, op, "weight");
  glue::kernel_dtype(lora_a, op, "lora_a");
  glue::kernel_dtype(lora_b, op, "lora_b");
  TORCH_CHECK(lora_a.scalar_type() == lora_b.scalar_type(), "lora_kernels.", op, ": lora_a (", lora_a.scalar_type(),
              ") and lora_b (", lora_b.scalar_type(), ") must have the same dtype");
}

// out[m, j] = out_scale · Σ_k drop(x)[m, k] · a[j, k]  for a [r, K] (inner dim contiguous or copied), out fp32 [M, r].
void single_shrink(const at::Tensor& x_in, const at::Tensor& a_in, const at::Tensor& out, float out_scale,
                   const DropoutArgs& dropout, const char* op) {
  const int64_t M = x_in.size(0), K = x_in.size(1), r = a_in.size(0);
  if (M == 0 || r == 0) return;
  glue::check_grid(M, (r + 3) / 4, op);
  const at::Tensor x = glue::inner_contiguous(x_in);
  const at::Tensor a = glue::inner_contiguous(glue::weight_for(a_in, x_in));
  ShrinkArgs p;
  p.x = x.data_ptr();
  p.x_dtype = glue::kernel_dtype(x, op, "x");
  p.x_stride_m = x.stride(0);
  p.a = a.data_ptr();
  p.a_dtype = glue::kernel_dtype(a, op, "lora weight");
  p.a_stride_l = 0;
  p.a_stride_j = a.stride(0);
  p.xa = out.data_ptr<float>();
  p.xa_stride_m = out.stride(0);
  p.M = M;
  p.K = K;
  p.r_max = r;
  p.num_adapters = 1;
  p.out_scale = out_scale;
  p.dropout = dropout;
  glue::check_launch(launch_multi_lora_shrink(p, glue::current_stream()), "LoRA shrink kernel");
}

// y[m, n] = round(y[m, n] + drop(scale · Σ_j xa[m, j] · b[n, j])) for b [N, r] with any strides, xa fp32 [M, r].
void single_expand(const at::Tensor& y, const at::Tensor& xa_in, const at::Tensor& b_in, float scale,
                   const DropoutArgs& dropout, const char* op) {
  const int64_t M = y.size(0), N = b_in.size(0), r = b_in.size(1);
  if (M == 0 || N == 0 || r == 0) return;
  glue::check_grid(M, (N + 127) / 128, op);
  const at::Tensor xa = glue::inner_contiguous(xa_in);
  const at::Tensor b = glue::weight_for(b_in, y);
  ExpandArgs p;
  p.y = y.data_ptr();
  p.y_dtype = glue::kernel_dtype(y, op, "y");
  p.y_stride_m = y.stride(0);
  p.y_stride_n = y.stride(1);
  p.xa = xa.data_ptr<float>();
  p.xa_stride_m = xa.stride(0);
  p.b = b.data_ptr();
  p.b_dtype = glue::kernel_dtype(b, op, "lora weight");
  p.b_stride_l = 0;
  p.b_stride_n = b.stride(0);
  p.b_stride_j = b.stride(1);
  p.scale = scale;
  p.M = M;
  p.N = N;
  p.r_max = r;
  p.num_adapters = 1;
  p.col_offset = 0;
  p.dropout = dropout;
  glue::check_launch(launch_multi_lora_expand(p, glue::current_stream()), "LoRA expand kernel");
}

// drop(x) in fp32 [M, K]; x holds rows row_offset .. row_offset + M - 1 of the layer's input (the mask's rows).
at::Tensor dropout_to_float(const at::Tensor& x_in, const DropoutArgs& dropout, const char* op, int64_t row_offset = 0) {
  const at::Tensor x = glue::inner_contiguous(x_in);
  at::Tensor out = glue::kernel_output(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t M = x.size(0), K = x.size(1);
  if (M == 0 || K == 0) return out;
  glue::check_grid(M, (K + 255) / 256, op);
  DropoutToFloatArgs p;
  p.x = x.data_ptr();
  p.x_dtype = glue::kernel_dtype(x, op, "x");
  p.x_stride_m = x.stride(0);
  p.out = out.data_ptr<float>();
  p.out_stride_m = out.stride(0);
  p.M = M;
  p.K = K;
  p.row_offset = row_offset;
  p.dropout = dropout;
  glue::check_launch(launch_dropout_to_float(p, glue::current_stream()), "LoRA dropout kernel");
  return out;
}

std::tuple<at::Tensor, at::Tensor> cuda_lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                        const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                        const std::optional<at::Tensor>& bias, double dropout_p,
                                                        int64_t seed) {
  constexpr const char* op = "cuda_lora_linear_fwd";
  const at::Device device = x.device();
  glue::check_operands(device, op, {{x, "x", 2, "[M, K]"}});
  glue::kernel_dtype(x, op, "x");
  check_weights(weight, lora_a, lora_b, device, op);
  TORCH_CHECK(x.size(1) == weight.size(1), "lora_kernels.", op, ": x ", x.sizes(), " has ", x.size(1),
              " features but weight is ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "lora_kernels.", op, ": weight dtype ", weight.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  if (bias.has_value()) {
    glue::check_operands(device, op, {{*bias, "bias", 1, "[N]"}});
    TORCH_CHECK(bias->size(0) == weight.size(0), "lora_kernels.", op, ": bias must be [N=", weight.size(0), "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "lora_kernels.", op, ": bias dtype ", bias->scalar_type(),
                " must equal x dtype ", x.scalar_type());
  }
  check_dropout_p(dropout_p, op);
  const glue::DeviceGuard guard(device);
  const int64_t M = x.size(0), r = lora_a.size(0);
  const DropoutArgs dropout = make_dropout_args(dropout_p, seed);

  at::Tensor xa = glue::kernel_output({M, r}, x.options().dtype(at::kFloat));
  single_shrink(x, lora_a, xa, 1.0f, dropout, op);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  single_expand(y, xa, lora_b, static_cast<float>(scale), DropoutArgs{}, op);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_lora_linear_bwd(
    const at::Tensor& dy, const std::optional<at::Tensor>& x_opt, const at::Tensor& xa, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p, int64_t seed,
    c10::List<bool> output_mask) {
  constexpr const char* op = "cuda_lora_linear_bwd";
  TORCH_CHECK(output_mask.size() == 4, "lora_kernels.", op, ": output_mask must have 4 entries (dx, dA, dB, dW0), got ",
              output_mask.size());
  const bool need_dx = output_mask.get(0), need_da = output_mask.get(1), need_db = output_mask.get(2),
             need_dw = output_mask.get(3);
  const at::Device device = dy.device();
  glue::check_operands(device, op, {{dy, "dy", 2, "[M, N]"}});
  glue::kernel_dtype(dy, op, "dy");
  check_weights(weight, lora_a, lora_b, device, op);
  const int64_t M = dy.size(0), N = weight.size(0), K = weight.size(1), r = lora_a.size(0);
  TORCH_CHECK(dy.size(1) == N, "lora_kernels.", op, ": dy must be [M, N=", N, "], got ", dy.sizes());
  TORCH_CHECK(weight.scalar_type() == dy.scalar_type(), "lora_kernels.", op, ": weight dtype ", weight.scalar_type(),
              " must equal dy dtype ", dy.scalar_type());
  check_cuda(xa, device, op, "xa");
  TORCH_CHECK(xa.scalar_type() == at::kFloat, "lora_kernels.", op, ": xa must be float32 (saved by the forward), got ",
              xa.scalar_type());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == r, "lora_kernels.", op, ": xa must be [M=", M, ", r=", r,
              "], got ", xa.sizes());
  at::Tensor x;
  if (x_opt.has_value()) {
    x = *x_opt;
    check_cuda(x, device, op, "x");
    TORCH_CHECK(x.dim() == 2 && x.size(0) == M && x.size(1) == K, "lora_kernels.", op, ": x must be [M=", M, ", K=", K,
                "], got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == dy.scalar_type(), "lora_kernels.", op, ": x dtype ", x.scalar_type(),
                " must equal dy dtype ", dy.scalar_type());
  }
  TORCH_CHECK(x.defined() || !(need_da || need_dw), "lora_kernels.", op,
              ": x is required for dA / dW0 (output_mask asks for them) but was not given");
  check_dropout_p(dropout_p, op);
  const glue::DeviceGuard guard(device);
  const DropoutArgs dropout = make_dropout_args(dropout_p, seed);

  at::Tensor dx = dy.new_empty({0});
  at::Tensor da = lora_a.new_empty({0});
  at::Tensor db = lora_b.new_empty({0});
  at::Tensor dw = weight.new_empty({0});

  at::Tensor dxa;
  if (need_dx || need_da) {
    // dxa [M, r] = scale · dy · B, as a shrink of dy against Bᵀ [r, N] (a small copy, so K-contiguous loads).
    dxa = glue::kernel_output({M, r}, dy.options().dtype(at::kFloat));
    single_shrink(dy, lora_b.t().contiguous(), dxa, static_cast<float>(scale), DropoutArgs{}, op);
  }
  // dB and dA are fp32 GEMMs reducing over M. For 16-bit inputs they run over row chunks, so the fp32 copies
  // of dy and drop(x) they read stay within kChunkBytes instead of M·N·4 / M·K·4 bytes.
  if (need_db) {
    at::Tensor db32 = at::zeros({N, r}, xa.options());
    const int64_t rows = dy.scalar_type() == at::kFloat ? std::max<int64_t>(M, 1) : chunk_rows(N);
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
      const int64_t m1 = std::min(M, m0 + rows);
      db32.addmm_(dy.slice(0, m0, m1).to(at::kFloat).t(), xa.slice(0, m0, m1));
    }
    db = db32.mul_(scale).to(lora_b.scalar_type());
  }
  if (need_da) {
    at::Tensor da32 = at::zeros({r, K}, dxa.options());
    const bool copy = dropout.enabled || x.scalar_type() != at::kFloat;
    const int64_t rows = copy ? chunk_rows(K) : std::max<int64_t>(M, 1);
    for (int64_t m0 = 0; m0 < M; m0 += rows) {
      const int64_t m1 = std::min(M, m0 + rows);
      const at::Tensor xc = x.slice(0, m0, m1);
      const at::Tensor xd = dropout.enabled ? dropout_to_float(xc, dropout, op, m0) : xc.to(at::kFloat);
      da32.addmm_(dxa.slice(0, m0, m1).t(), xd);
    }
    da = da32.to(lora_a.scalar_type());
  }
  if (need_dx) {
    dx = at::mm(dy, weight);  // [M, K] in dy.dtype (cuBLAS)
    // dx[m, k] += drop'(Σ_j dxa[m, j] · A[j, k]): an expand with "B" = Aᵀ [K, r], a view whose column stride is 1
    // for a contiguous A, so the warp's loads of A are coalesced, and the dropout mask applied at (m, k).
    single_expand(dx, dxa, lora_a.t(), 1.0f, dropout, op);
  }
  if (need_dw) {
    dw = at::mm(dy.t(), x).to(weight.scalar_type());
  }
  return {dx, da, db, dw};
}

// drop(x) in fp32: x · keep / (1 − p) with the seeded mask of reference.dropout_keep_mask (for tests and dA).
at::Tensor cuda_lora_dropout(const at::Tensor& x, double dropout_p, int64_t seed) {
  constexpr const char* op = "cuda_lora_dropout";
  glue::check_operands(x.device(), op, {{x, "x", 2, "[M, K]"}});
  glue::kernel_dtype(x, op, "x");
  check_dropout_p(dropout_p, op);
  const glue::DeviceGuard guard(x.device());
  return dropout_to_float(x, make_dropout_args(dropout_p, seed), op);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, LORA_KERNELS_DISPATCH_KEY, m) {
  m.impl("cuda_lora_linear_fwd", &cuda_lora_linear_fwd);
  m.impl("cuda_lora_linear_bwd", &cuda_lora_linear_bwd);
  m.impl("cuda_lora_dropout", &cuda_lora_dropout);
}

}  // namespace lora_kernels
