"""The CUDA extension (csrc/): multi-adapter shrink/expand, the LoRA linear layer, seeded dropout.

CPU (always run): the cuda_* ops' schemas and fake kernels (FakeTensorMode and the meta device), the
consistency between the C++ registrations and the Python schemas, source rules the CPU-only build relies on,
and (with LORA_KERNELS_TEST_COMPILE=1) the nvcc/g++ compile check of .ci/compile_cuda.sh.
GPU (marked, skipped on CPU): every cuda op against the float64 reference in fp16/bf16/fp32 over awkward
shapes, gradients of lora_linear(backend="cuda"), bit-exact dropout masks, opcheck, CUDA-graph replay.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import cuda_ext_cases as cases
from conftest import TOL, assert_close_rel

import lora_kernels as lk
from lora_kernels import reference as ref
from lora_kernels.ops import SCHEMAS

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
ops = torch.ops.lora_kernels

CUDA_OPS = sorted(name for name in SCHEMAS if name.startswith("cuda_"))
MY_OPS = ["cuda_multi_lora_shrink", "cuda_multi_lora_expand_", "cuda_lora_linear_fwd", "cuda_lora_linear_bwd",
          "cuda_lora_dropout"]
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# ------------------------------------------------------------------------------------------------
# CPU: fake kernels, registrations, sources
# ------------------------------------------------------------------------------------------------


def _fake_inputs_linear(M, K, N, r, dtype, device):
    x = torch.empty(M, K, dtype=dtype, device=device)
    w = torch.empty(N, K, dtype=dtype, device=device)
    a = torch.empty(r, K, dtype=dtype, device=device)
    b = torch.empty(N, r, dtype=dtype, device=device)
    return x, w, a, b


@pytest.mark.parametrize("device", ["fake", "meta"])
@pytest.mark.parametrize("M", [0, 1, 7])
def test_fake_multi_lora_ops_shapes(device, M):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(dev):
        L, r_max, K, N = 3, 5, 11, 13
        x = torch.empty(M, K, dtype=torch.bfloat16, device=dev)
        a = torch.empty(L, r_max, K, dtype=torch.float16, device=dev)
        b = torch.empty(L, N, r_max, dtype=torch.float16, device=dev)
        ids = torch.empty(M, dtype=torch.int32, device=dev)
        xa = ops.cuda_multi_lora_shrink(x, a, ids, None)
        assert xa.shape == (M, r_max) and xa.dtype == torch.float32 and xa.device == x.device
        y = torch.empty(M, N + 4, dtype=torch.bfloat16, device=dev)
        out = ops.cuda_multi_lora_expand_(y, xa, b, ids, torch.empty(L, device=dev), torch.empty(L, dtype=torch.int64, device=dev), 4)
        assert out is None and y.shape == (M, N + 4)

    if device == "fake":
        with FakeTensorMode():
            run("cpu")
    else:
        run("meta")


@pytest.mark.parametrize("device", ["fake", "meta"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("mask", [(True, True, True, False), (True, False, False, False), (False, True, True, True)])
def test_fake_lora_linear_ops_shapes(device, dtype, mask):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(dev):
        M, K, N, r = 7, 33, 17, 4
        x, w, a, b = _fake_inputs_linear(M, K, N, r, dtype, dev)
        y, xa = ops.cuda_lora_linear_fwd(x, w, a, b, 0.5, None, 0.1, 3)
        assert y.shape == (M, N) and y.dtype == dtype
        assert xa.shape == (M, r) and xa.dtype == torch.float32
        dy = torch.empty(M, N, dtype=dtype, device=dev)
        grads = ops.cuda_lora_linear_bwd(dy, x, xa, w, a, b, 0.5, 0.1, 3, list(mask))
        want = [(M, K), (r, K), (N, r), (N, K)]
        for g, need, shape, like in zip(grads, mask, want, (dy, a, b, w)):
            assert tuple(g.shape) == (shape if need else (0,))
            assert g.dtype == like.dtype
        d = ops.cuda_lora_dropout(x, 0.25, 7)
        assert d.shape == (M, K) and d.dtype == torch.float32

    if device == "fake":
        with FakeTensorMode():
            run("cpu")
    else:
        run("meta")


def test_cuda_ops_declared_with_fakes():
    for name in MY_OPS:
        assert name in SCHEMAS, name
        packet = getattr(ops, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(packet.default.name(), "Meta"), f"{name} has no fake/meta kernel"


def test_cuda_ops_have_no_cpu_kernel():
    # The extension is the only implementation; a CPU tensor must not silently run something else.
    # (Except in a process that loaded the CPU emulation of the extension: tests/test_cuda_emulated.py.)
    if "lora_kernels_emu" in sys.modules:
        pytest.skip("the emulated CUDA extension registered the cuda_* ops for CPU tensors in this process")
    x = torch.randn(2, 3)
    with pytest.raises(NotImplementedError):
        ops.cuda_lora_dropout(x, 0.5, 1)


def _sources():
    return sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))


def test_cpp_registrations_match_python_schemas():
    impls = {}
    for f in sorted(CSRC.glob("*.cpp")):
        for name in re.findall(r'm\.impl\(\s*"([A-Za-z0-9_]+)"', f.read_text()):
            assert name not in impls, f"{name} is registered in both {impls.get(name)} and {f.name}"
            impls[name] = f.name
    for name, where in impls.items():
        assert name in SCHEMAS, f"{where} implements lora_kernels::{name}, which has no schema in lora_kernels/ops/"
        assert name.startswith("cuda_"), f"{where} implements a non-cuda_ op {name}"
    for name in MY_OPS:
        assert name in impls, f"no TORCH_LIBRARY_IMPL registers {name}"


def test_extension_sources_follow_build_rules():
    srcs = _sources()
    assert any(f.suffix == ".cu" for f in srcs)
    pybind = [f.name for f in srcs if "PYBIND11_MODULE(" in f.read_text()]
    assert pybind == ["module.cpp"], f"exactly one TU may define the Python module, found {pybind}"
    for f in srcs:
        text = f.read_text()
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', text)
        assert "ATen/cuda/CUDAContext.h" not in includes, f"{f.name} includes ATen/cuda/CUDAContext.h (pulls cuSPARSE)"
        assert not any("cusparse" in i.lower() for i in includes), f"{f.name} includes cuSPARSE"
        if f.suffix in (".cu", ".cuh") or f.name.endswith("_kernels.h") or f.name == "kernel_types.h":
            bad = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
            assert not bad, f"{f.name} must include CUDA headers only, includes {bad}"


@pytest.mark.skipif(os.environ.get("LORA_KERNELS_TEST_COMPILE") != "1", reason="set LORA_KERNELS_TEST_COMPILE=1 (CI runs the script directly)")
def test_compile_script_passes():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "compile_cuda.sh")], cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    n_cu, n_cpp = len(list(CSRC.glob("*.cu"))), len(list(CSRC.glob("*.cpp")))
    assert f"{n_cu + n_cpp}/{n_cu + n_cpp} compiled OK" in out, out


_DROPOUT_HOST_PROGRAM = r"""
// Host-only use of the kernels' dropout code: csrc/kernel_types.h make_dropout_args (what the glue passes to
// every kernel) and csrc/common.cuh dropout_seed_hash / dropout_row_hash / dropout_keep (what the kernels run).
#include <cstdio>
#include <cstring>
#include "common.cuh"
using namespace lora_kernels;
int main() {  // stdin: "seed p row0 rows cols" per case; stdout: "threshold keep_scale_bits enabled" + one 0/1 row each
  long long seed, row0, rows, cols;
  double p;
  while (std::scanf("%lld %lf %lld %lld %lld", &seed, &p, &row0, &rows, &cols) == 5) {
    const DropoutArgs d = make_dropout_args(p, seed);
    uint32_t bits;
    std::memcpy(&bits, &d.keep_scale, 4);
    std::printf("%u %u %d\n", d.threshold, bits, d.enabled ? 1 : 0);
    const uint32_t seed_hash = dropout_seed_hash(d.seed);
    for (long long r = row0; r < row0 + rows; ++r) {
      const uint32_t row_hash = dropout_row_hash(seed_hash, r);
      for (long long c = 0; c < cols; ++c) std::putchar(dropout_keep(row_hash, c, d.threshold) ? '1' : '0');
      std::putchar('\n');
    }
  }
  return 0;
}
"""


def _host_keep_rows(seed, p, row0, rows, cols):
    """reference.dropout_keep_mask for rows row0 .. row0+rows-1 (the reference's own hash, any row offset)."""
    seed_h = ref._mix32(torch.tensor(int(seed) & ref._M32, dtype=torch.int64))
    m = torch.arange(row0, row0 + rows, dtype=torch.int64)
    k = torch.arange(cols, dtype=torch.int64)
    h = ref._mix32(ref._mix32(m + seed_h)[:, None] + k[None, :])
    return (h >> (32 - ref.DROPOUT_HASH_BITS)) >= ref.dropout_threshold(p)


def test_dropout_host_code_matches_reference(tmp_path):
    """The kernels' dropout (hash, seed truncation, threshold with ties to even, 1/(1-p) in fp32) vs the reference,
    compiled for the host with nvcc: runs on a CPU-only machine."""
    import shutil
    import struct

    nvcc = os.environ.get("NVCC", "nvcc")
    if shutil.which(nvcc) is None:
        pytest.skip("nvcc not found")
    src = tmp_path / "dropout_host.cu"
    src.write_text(_DROPOUT_HOST_PROGRAM)
    exe = tmp_path / "dropout_host"
    proc = subprocess.run([nvcc, "-std=c++17", f"-I{CSRC}", str(src), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = [
        (0, 0.1, 0, 9, 33), (7, 0.5, 0, 5, 70), (2**31 - 1, 0.9, 0, 4, 17), (2**40 + 3, 0.3, 0, 6, 40),
        (-5, 0.25, 0, 3, 64), (2**32 - 1, 0.75, 0, 3, 19), (-(2**63), 0.999, 0, 2, 50), (2**63 - 1, 0.01, 0, 2, 50),
        (11, 1e-9, 0, 2, 16),  # threshold 0: every element kept, still scaled
        (12, 2.5 / 2**24, 0, 2, 8), (13, 3.5 / 2**24, 0, 2, 8), (14, 0.5 + 0.5 / 2**24, 0, 2, 8),  # exact ties
        (15, 0.4, 2**32 - 2, 5, 20), (16, 0.6, 2**40 + 7, 3, 20),  # rows past 2^32 wrap like the reference
        (17, 0.0, 0, 2, 8),  # disabled
    ]
    stdin = "".join(f"{s} {p!r} {r0} {rows} {cols}\n" for s, p, r0, rows, cols in cases)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()
    pos = 0
    for seed, p, row0, rows, cols in cases:
        thr, scale_bits, enabled = (int(v) for v in out[pos].split())
        what = f"seed={seed} p={p!r}"
        assert thr == ref.dropout_threshold(p), what
        assert enabled == (p > 0.0), what
        assert struct.unpack("<f", struct.pack("<I", scale_bits))[0] == torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item(), what
        got = torch.tensor([[c == "1" for c in line] for line in out[pos + 1 : pos + 1 + rows]])
        pos += 1 + rows
        assert got.shape == (rows, cols), what
        assert torch.equal(got, _host_keep_rows(seed, p, row0, rows, cols)), what
        if row0 == 0:
            assert torch.equal(got, ref.dropout_keep_mask(seed, rows, cols, p)), what
    assert pos == len(out)


# ------------------------------------------------------------------------------------------------
# GPU: the kernels against the float64 reference
# ------------------------------------------------------------------------------------------------




@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 300])
@pytest.mark.parametrize("K,r_max", [(33, 1), (64, 16), (200, 128), (4096, 16)])
@pytest.mark.parametrize("layout", ["contiguous", "padded8", "padded3", "colmajor"])
def test_shrink_matches_reference(ext, dtype, M, K, r_max, layout):
    cases.check_shrink(dtype, M, K, r_max, layout, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,a_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16)])
def test_shrink_mixed_dtypes_and_out_of_range_ids(ext, x_dtype, a_dtype):
    cases.check_shrink_mixed_dtypes_and_out_of_range_ids(x_dtype, a_dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 300])
@pytest.mark.parametrize("N,r_max", [(1, 1), (37, 8), (130, 128), (515, 16), (64, 13)])
@pytest.mark.parametrize("y_layout", ["contiguous", "colmajor"])
def test_expand_matches_reference(ext, dtype, M, N, r_max, y_layout):
    cases.check_expand(dtype, M, N, r_max, y_layout, "cuda")


@pytest.mark.gpu
def test_expand_strided_b_and_out_of_range_ids(ext):
    cases.check_expand_strided_b_and_out_of_range_ids("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M", [1, 7, 300])
@pytest.mark.parametrize("widths,r_max", [([64], 16), ([40, 24, 24], 8), ([33, 5], 128)])
def test_add_lora_cuda_packed_slices(ext, dtype, M, widths, r_max):
    def run(y, x, A, B, ids, scales, ranks, widths):  # through the public API
        lk.add_lora(y, x, A, B, ids, scales, ranks, slices=widths, backend="cuda")

    cases.check_add_lora_packed_slices(dtype, M, widths, r_max, "cuda", run)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 300])
@pytest.mark.parametrize("K,N,r", [(33, 17, 1), (64, 96, 16), (200, 77, 128)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_fwd_matches_reference(ext, dtype, M, K, N, r, p):
    cases.check_lora_linear_fwd(dtype, M, K, N, r, p, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 300])
@pytest.mark.parametrize("K,N,r", [(33, 17, 1), (64, 96, 16), (200, 77, 128)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_bwd_matches_reference(ext, dtype, M, K, N, r, p):
    cases.check_lora_linear_bwd(dtype, M, K, N, r, p, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_autograd_cuda(ext, dtype, p, bias):
    torch.manual_seed(5)
    M0, M1, K, N, r = 3, 5, 48, 40, 8
    x = torch.randn(M0, M1, K, dtype=dtype, device="cuda", requires_grad=True)
    w = (torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5).requires_grad_(True)
    a = (torch.randn(r, K, dtype=dtype, device="cuda") / K**0.5).requires_grad_(True)
    b = (torch.randn(N, r, dtype=dtype, device="cuda") / r**0.5).requires_grad_(True)
    bb = torch.randn(N, dtype=dtype, device="cuda", requires_grad=True) if bias else None
    leaves = [t for t in (x, w, a, b, bb) if t is not None]
    y = lk.lora_linear(x, w, a, b, 0.5, bb, dropout_p=p, seed=42, backend="cuda")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    rx, rw, ra, rb = ref_leaves[:4]
    rbb = ref_leaves[4] if bias else None
    y_ref = ref.lora_linear_ref(rx, rw, ra, rb, 0.5, rbb, dropout_p=p, seed=42)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert_close_rel(y, y_ref, TOL[dtype], "y")
    for name, g, e in zip(("x", "weight", "lora_a", "lora_b", "bias"), grads, ref_grads):
        assert_close_rel(g, e, TOL[dtype], f"grad {name} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**40 + 3])
@pytest.mark.parametrize("M,K", [(1, 1), (7, 33), (300, 257)])
def test_dropout_mask_bit_exact(ext, p, seed, M, K):
    cases.check_dropout_mask_bit_exact(p, seed, M, K, "cuda")


@pytest.mark.gpu
def test_opcheck_cuda_ops(ext):
    cases.check_opcheck_cuda_ops("cuda")


@pytest.mark.gpu
def test_cuda_graph_capture_replay_add_lora(ext):
    torch.manual_seed(3)
    M, K, L, r = 16, 64, 4, 16
    widths = [32, 16]
    dtype = torch.bfloat16
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    A = [torch.randn(L, r, K, dtype=dtype, device="cuda") / K**0.5 for _ in widths]
    B = [torch.randn(L, w, r, dtype=dtype, device="cuda") for w in widths]
    ids = torch.randint(-1, L, (M,), device="cuda")
    scales = torch.rand(L, device="cuda")
    ranks = torch.tensor([r, 4, 1, 9], device="cuda")
    y = torch.zeros(M, sum(widths), dtype=dtype, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (and make sure the extension is built) outside the capture
        lk.add_lora(y, x, A, B, ids, scales, ranks, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lk.add_lora(y, x, A, B, ids, scales, ranks, backend="cuda")
    for _ in range(2):
        x.copy_(torch.randn(M, K, dtype=dtype, device="cuda"))
        ids.copy_(torch.randint(-1, L, (M,), device="cuda"))
        y0 = torch.randn(M, sum(widths), dtype=dtype, device="cuda")
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        expected = ref.add_lora_ref(y0.double(), x.double(), [t.double() for t in A], [t.double() for t in B], ids, scales.double(), ranks)
        assert_close_rel(y, expected, TOL[dtype], "graph replay")


@pytest.mark.gpu
def test_glue_errors_name_the_tensor(ext):
    cases.check_glue_errors_name_the_tensor("cuda")
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ops.cuda_multi_lora_shrink(torch.randn(4, 8), torch.randn(2, 3, 8, device="cuda"),
                                   torch.zeros(4, dtype=torch.int64, device="cuda"), None)


@pytest.mark.gpu
@pytest.mark.parametrize("M,L", [(64, 4), (2048, 8), (777, 128)])
def test_grouped_launch_equals_per_token_launch_bf16(ext, M, L):
    """bf16 on the GPU: the grouped (LoRABatchMeta tile table) launch gives the per-token launch's y bit for bit."""
    from lora_kernels.cuda.multi_lora import add_lora_cuda
    from lora_kernels.serving import LoRABatchMeta

    torch.manual_seed(M + L)
    K, r_max, widths = 4096, 16, [4096, 1024]
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    A = [torch.randn(L, r_max, K, dtype=torch.bfloat16, device="cuda") / K**0.5 for _ in widths]
    B = [torch.randn(L, w, r_max, dtype=torch.bfloat16, device="cuda") for w in widths]
    ids = torch.randint(-1, L, (M,), device="cuda", dtype=torch.int32)
    scales = torch.rand(L, device="cuda") + 0.5
    ranks = torch.randint(1, r_max + 1, (L,), device="cuda")
    meta = LoRABatchMeta(ids, L)
    y0 = torch.randn(M, sum(widths), dtype=torch.bfloat16, device="cuda")
    y_tok, y_grp = y0.clone(), y0.clone()
    add_lora_cuda(y_tok, x, A, B, ids, scales, ranks)
    add_lora_cuda(y_grp, x, A, B, ids, scales, ranks, groups=meta.groups)
    assert torch.equal(y_grp, y_tok)
    expected = ref.add_lora_ref(y0.double(), x.double(), [a.double() for a in A], [b.double() for b in B], ids,
                                scales.double(), ranks)
    assert_close_rel(y_grp, expected, TOL[torch.bfloat16], "grouped add_lora bf16")
