"""merge_ / unmerge_ (plain, fp32-accurate, one rounding) and merge_exact_ / unmerge_exact_ (bit-exact round trip).

CPU: torch backend in every dtype (bf16 included: it is pure torch) and the interpreted Triton kernel in
fp32/fp16. GPU-marked tests run the Triton and CUDA kernels in bf16.
"""

import math
import warnings

import pytest
import torch
from conftest import HAS_CUDA, TOL, assert_close_rel, rel_err

import lora_kernels as lk
from lora_kernels import LoRAInputError, MergeOverflowError, MergeRecord
from lora_kernels.ops.merge import BITS_DTYPE as _BITS
from lora_kernels.reference import merge_ref

CPU_BACKENDS = [("torch", torch.float32), ("torch", torch.float16), ("torch", torch.bfloat16), ("torch", torch.float64),
                ("triton", torch.float32), ("triton", torch.float16)]


def bits(t):
    return t.view(_BITS[t.dtype]).clone()


def same_bits(a, b):
    return torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def make_adapters(N, K, ranks, dtype, device="cpu", rel=0.05, w_std=1.0, seed=0):
    """Adapters whose ΔW has Frobenius norm ≈ rel × that of a W with entries of std w_std."""
    g = torch.Generator().manual_seed(seed)
    A, B = [], []
    for r in ranks:
        a = torch.randn(r, K, generator=g, dtype=torch.float64)
        b = torch.randn(N, r, generator=g, dtype=torch.float64)
        a = a * (rel * w_std / math.sqrt(r * len(ranks))) ** 0.5
        b = b * (rel * w_std / math.sqrt(r * len(ranks))) ** 0.5
        A.append(a.to(dtype).to(device))
        B.append(b.to(dtype).to(device))
    return A, B


def merged_fp64(W, A, B, scales):
    d = W.double().clone()
    for a, b, s in zip(A, B, scales):
        d += s * (b.double() @ a.double())
    return d


# ----------------------------------------------------------------------------------------------
# Plain merge vs the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", [c for c in CPU_BACKENDS if c[1] != torch.float64])
@pytest.mark.parametrize("N,K,ranks", [(1, 1, [1]), (37, 53, [8]), (64, 48, [1, 16, 33]), (19, 130, [64])])
def test_merge_matches_reference(backend, dtype, N, K, ranks):
    torch.manual_seed(N * 1000 + K)
    W = torch.randn(N, K, dtype=dtype)
    A, B = make_adapters(N, K, ranks, dtype, rel=0.3, seed=K)
    scales = [0.5 + 0.25 * i for i in range(len(ranks))]
    expect = merged_fp64(W, A, B, scales)
    out = W.clone()
    lk.merge_(out, A, B, scales, backend=backend)
    assert_close_rel(out, expect, TOL[dtype], f"merge {backend} {dtype}")
    # elementwise: fp32 accumulation error (bounded by the sum of magnitudes) + one rounding to W's dtype
    mag = W.double().abs()
    for a, b, s in zip(A, B, scales):
        mag += abs(s) * (b.double().abs() @ a.double().abs())
    ulp = torch.finfo(dtype).eps * expect.abs()
    bound = ulp + 4 * max(ranks) * torch.finfo(torch.float32).eps * mag + torch.finfo(dtype).tiny
    assert ((out.double() - expect).abs() <= bound).all()
    ref = W.clone()
    merge_ref(ref, A, B, scales)
    assert ((ref.double() - expect).abs() <= bound).all()
    lk.unmerge_(out, A, B, scales, backend=backend)
    assert_close_rel(out, W, TOL[dtype], f"unmerge {backend} {dtype}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["transposed", "strided_slice"])
def test_merge_noncontiguous(backend, layout):
    torch.manual_seed(1)
    N, K = 33, 47
    if layout == "transposed":
        parent = torch.randn(K, N)
        W = parent.t()  # [N, K], column-major
    else:
        parent = torch.randn(2 * N, K + 5)
        W = parent[::2, 3 : 3 + K]  # strided rows, offset columns
    outside = parent.clone()
    W0 = W.clone()
    A, B = make_adapters(N, K, [5], torch.float32, rel=0.5)
    A_nc = A[0].t().contiguous().t()  # non-contiguous adapter too
    lk.merge_(W, A_nc, B[0], 1.5, backend=backend)
    assert_close_rel(W, merged_fp64(W0, A, B, [1.5]), TOL[torch.float32], f"{backend} {layout}")
    mask = torch.ones_like(parent, dtype=torch.bool)
    if layout == "strided_slice":
        mask[::2, 3 : 3 + K] = False
        assert torch.equal(parent[mask], outside[mask])  # the rest of the parent is untouched
    rec = lk.merge_exact_(W, A_nc, B[0], -1.5, backend=backend)
    lk.unmerge_exact_(W, rec)
    lk.unmerge_(W, A_nc, B[0], 1.5, backend=backend)
    assert_close_rel(W, W0, TOL[torch.float32])


def test_merge_empty_weight():
    W = torch.empty(0, 16)
    A, B = [torch.randn(4, 16)], [torch.randn(0, 4)]
    lk.merge_(W, A, B, 1.0, backend="triton")
    rec = lk.merge_exact_(W, A, B, 1.0, backend="triton")
    assert rec.n_repairs == 0
    lk.unmerge_exact_(W, rec)


# ----------------------------------------------------------------------------------------------
# Exact round trip
# ----------------------------------------------------------------------------------------------


def awkward_weight(N, K, dtype, seed=0):
    """Random weights salted with exact powers of two (binade edges), the values one ulp below them,
    subnormals and ±0."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g, dtype=torch.float64).to(dtype)
    flat = W.view(-1)
    ib = _BITS[dtype]
    n = flat.numel()
    pick = torch.randperm(n, generator=g)
    q = max(n // 8, 1)
    pw = 2.0 ** torch.randint(-6, 4, (2 * q,), generator=g).double()
    sign = torch.where(torch.rand(2 * q, generator=g) < 0.5, -1.0, 1.0).double()
    edges = (sign * pw).to(dtype)
    flat[pick[:q]] = edges[:q]  # exact powers of two
    flat.view(ib)[pick[q : 2 * q]] = edges[q:].view(ib) - 1  # one ulp below a power of two in magnitude
    n_sub = max(q // 4, 1)
    sub = pick[2 * q : 2 * q + n_sub]
    flat[sub] = (torch.randn(n_sub, generator=g).double() * torch.finfo(dtype).tiny * 0.5).to(dtype)
    z = pick[2 * q + n_sub : 2 * q + n_sub + 8]
    flat[z[:4]] = 0.0
    flat[z[4:]] = -0.0
    return W


@pytest.mark.parametrize("backend,dtype", CPU_BACKENDS)
@pytest.mark.parametrize("rel", [0.02, 0.5, 20.0])
def test_exact_round_trip(backend, dtype, rel):
    N, K = 40, 72
    W = awkward_weight(N, K, dtype, seed=int(rel * 100))
    A, B = make_adapters(N, K, [3, 16], dtype, rel=rel, seed=7)
    W0 = W.clone()
    rec = lk.merge_exact_(W, A, B, [1.0, -0.75], backend=backend, on_overflow="keep")
    assert rec.backend == backend
    plain = W0.clone()
    lk.merge_(plain, A, B, [1.0, -0.75], backend=backend)
    assert same_bits(W, plain), "the exact merge must write the same W' as the plain merge"
    assert not same_bits(W, W0)
    lk.unmerge_exact_(W, rec)
    assert same_bits(W, W0)
    # the plain unmerge alone is not exact here: the record really is needed (for large updates)
    if rel >= 0.5:
        assert rec.n_repairs > 0


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float16), ("triton", torch.float16)])
def test_exact_specials_zero_nan_inf(backend, dtype):
    W = torch.tensor([[0.0, -0.0, float("inf"), -float("inf"), float("nan"), 6e-8, -6e-8, 65504.0]], dtype=dtype)
    A = [torch.zeros(1, 8, dtype=dtype)]
    B = [torch.zeros(1, 1, dtype=dtype)]
    A[0][0, :] = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=dtype)
    B[0][0, 0] = 0.0  # Δ = +0 everywhere: -0 + 0 = +0 must be repaired
    W0 = W.clone()
    rec = lk.merge_exact_(W, A, B, 1.0, backend=backend)
    assert rec.n_repairs >= 1  # -0
    lk.unmerge_exact_(W, rec)
    assert same_bits(W, W0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exact_overflow_raise_leaves_w_unchanged(backend):
    W = torch.full((4, 16), 60000.0, dtype=torch.float16)
    W[0, 0] = -1.0
    A = [torch.ones(1, 16, dtype=torch.float16)]
    B = [torch.ones(4, 1, dtype=torch.float16)]
    W0 = W.clone()
    with pytest.raises(MergeOverflowError, match="non-finite element"):
        lk.merge_exact_(W, A, B, 8000.0, backend=backend)
    assert same_bits(W, W0)
    rec = lk.merge_exact_(W, A, B, 8000.0, backend=backend, on_overflow="keep")
    assert rec.n_nonfinite == 63 and torch.isinf(W).sum() == 63
    lk.unmerge_exact_(W, rec)
    assert same_bits(W, W0)


def test_exact_thousand_cycles_zero_drift():
    torch.manual_seed(0)
    W = awkward_weight(12, 20, torch.bfloat16, seed=3)
    A, B = make_adapters(12, 20, [4], torch.bfloat16, rel=0.3)
    W0 = W.clone()
    drift_plain = W.clone()
    total_repairs = 0
    for i in range(1000):
        rec = lk.merge_exact_(W, A, B, 1.0, backend="torch")
        total_repairs += rec.n_repairs
        lk.unmerge_exact_(W, rec)
        lk.merge_(drift_plain, A, B, 1.0, backend="torch")
        lk.unmerge_(drift_plain, A, B, 1.0, backend="torch")
    assert same_bits(W, W0)
    assert total_repairs > 0
    assert not same_bits(drift_plain, W0)  # the plain round trip does drift on this weight


def test_exact_cycles_triton():
    W = awkward_weight(20, 36, torch.float16, seed=5)
    A, B = make_adapters(20, 36, [4, 9], torch.float16, rel=0.4)
    W0 = W.clone()
    for i in range(25):
        rec = lk.merge_exact_(W, A, B, [1.0, 0.5], backend="triton")
        lk.unmerge_exact_(W, rec)
    assert same_bits(W, W0)


def test_triton_repair_list_overflow_second_pass():
    """Tiles whose entries do not fit the preallocated list are re-run; the result is identical."""
    from lora_kernels.triton.merge import merge_exact_triton

    W = awkward_weight(70, 45, torch.float32, seed=9)
    A, B = make_adapters(70, 45, [5, 17], torch.float32, rel=2.0)
    w1, w2 = W.clone(), W.clone()
    i1, b1, _, _ = merge_exact_triton(w1, A, B, [0.3, -0.7])
    i2, b2, _, _ = merge_exact_triton(w2, A, B, [0.3, -0.7], capacity=3)
    assert torch.equal(w1, w2) and i1.numel() == i2.numel() > 3
    o1, o2 = torch.argsort(i1), torch.argsort(i2)
    assert torch.equal(i1[o1], i2[o2]) and torch.equal(b1[o1], b2[o2])


def test_multi_adapter_weighted_exact():
    W = torch.randn(30, 50, dtype=torch.bfloat16)
    A, B = make_adapters(30, 50, [2, 8, 32], torch.bfloat16, rel=0.1)
    scales = [0.7, -1.3, 0.25]
    W0 = W.clone()
    rec = lk.merge_exact_(W, A, B, scales, backend="torch")
    assert_close_rel(W, merged_fp64(W0, A, B, scales), TOL[torch.bfloat16])
    lk.unmerge_exact_(W, rec)
    assert same_bits(W, W0)


def test_record_storage_report(capsys):
    W = torch.randn(64, 96, dtype=torch.bfloat16) * 0.02
    A, B = make_adapters(64, 96, [16], torch.bfloat16, rel=0.03, w_std=0.02)
    rec = lk.merge_exact_(W, A, B, 1.0, backend="torch")
    assert rec.repair_nbytes() == rec.n_repairs * 6
    assert rec.adapter_nbytes() == 16 * (64 + 96) * 2
    rec2 = lk.merge_exact_(W, A, B, 1.0, backend="torch", snapshot=False)
    assert rec2.adapter_nbytes() == 0
    with capsys.disabled():
        print("\n" + rec.summary())


def test_repair_fraction_realistic():
    """Fraction of elements needing repair for realistic bf16 adapters (|ΔW| ≈ 0.7–7 % of |W|).

    W ~ N(0, 0.02²) [512, 768], ΔW = s·B·A of rank 16 scaled to the given Frobenius-norm ratio.
    Prints a table (run with -s); asserts exactness and that the list stays a small fraction of W."""
    rows = []
    for rel in (0.007, 0.02, 0.07):
        W = (torch.randn(512, 768, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
        A, B = make_adapters(512, 768, [16], torch.bfloat16, rel=rel, w_std=0.02, seed=2)
        d = (B[0].double() @ A[0].double())
        measured = (d.norm() / W.double().norm()).item()
        W0 = W.clone()
        rec = lk.merge_exact_(W, A, B, 1.0, backend="torch")
        lk.unmerge_exact_(W, rec)
        assert same_bits(W, W0)
        rows.append((measured, rec.repair_fraction, rec.repair_nbytes() / (W.numel() * 2)))
        assert rec.repair_fraction < 0.10
    print("\n|ΔW|/|W|   repaired elements   repair list / W bytes (bf16)")
    for m, f, b in rows:
        print(f"{100 * m:7.2f}%   {100 * f:14.3f}%   {100 * b:10.3f}%")


# ----------------------------------------------------------------------------------------------
# Errors: message asserted, W unchanged
# ----------------------------------------------------------------------------------------------


def _inputs():
    W = torch.randn(8, 12)
    A = torch.randn(4, 12)
    B = torch.randn(8, 4)
    return W, A, B


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda W, A, B: (W, torch.randn(4, 13), B, 1.0), r"lora_a\[0\] must be \[r, K=12\]"),
        (lambda W, A, B: (W, A, torch.randn(9, 4), 1.0), r"lora_b\[0\] must be \[N=8, r\]"),
        (lambda W, A, B: (W, A, torch.randn(8, 5), 1.0), r"rank mismatch"),
        (lambda W, A, B: (W, A, B, float("nan")), r"scale must be finite"),
        (lambda W, A, B: (W, A, B, float("inf")), r"scale must be finite"),
        (lambda W, A, B: (W, A.to("meta"), B, 1.0), r"adapter 0 is on"),
        (lambda W, A, B: (W, A.to(torch.int32), B, 1.0), r"floating dtype"),
        (lambda W, A, B: (W, [A, A], [B], [1.0, 1.0]), r"one scale per adapter"),
    ],
)
@pytest.mark.parametrize("fn", ["merge_", "merge_exact_"])
def test_merge_errors_leave_w_unchanged(mutate, match, fn):
    W, A, B = _inputs()
    W0 = W.clone()
    w, a, b, s = mutate(W, A, B)
    with pytest.raises(LoRAInputError, match=match):
        getattr(lk, fn)(w, a, b, s, backend="torch")
    assert same_bits(W, W0)


def test_merge_error_weight_dtype_and_stride0():
    W = torch.zeros(8, 12, dtype=torch.int32)
    with pytest.raises(LoRAInputError, match="weight must have a floating dtype"):
        lk.merge_exact_(W, torch.randn(2, 12), torch.randn(8, 2), 1.0)
    W = torch.zeros(1, 12).expand(8, 12)
    with pytest.raises(LoRAInputError, match="stride 0"):
        lk.merge_exact_(W, torch.randn(2, 12), torch.randn(8, 2), 1.0)
    W = torch.randn(8, 12)
    with pytest.raises(LoRAInputError, match="on_overflow"):
        lk.merge_exact_(W, torch.randn(2, 12), torch.randn(8, 2), 1.0, on_overflow="clip")


def test_unmerge_exact_wrong_record_errors():
    W, A, B = _inputs()
    W2 = W.clone()
    rec = lk.merge_exact_(W, A, B, 1.0, backend="torch")
    rec2 = lk.merge_exact_(W2, A, B, 1.0, backend="torch")
    snap, snap2 = W.clone(), W2.clone()
    with pytest.raises(LoRAInputError, match="does not belong to this weight"):
        lk.unmerge_exact_(W, rec2)
    with pytest.raises(LoRAInputError, match="MergeRecord returned by merge_exact_"):
        lk.unmerge_exact_(W, "record")
    with pytest.raises(LoRAInputError, match="was made by the 'torch' backend"):
        lk.unmerge_exact_(W, rec, backend="triton")
    assert same_bits(W, snap) and same_bits(W2, snap2)
    lk.unmerge_exact_(W, rec)
    snap = W.clone()
    with pytest.raises(LoRAInputError, match="already used"):
        lk.unmerge_exact_(W, rec)
    assert same_bits(W, snap)
    # weight modified in place after the merge
    W2.add_(1.0)
    snap2 = W2.clone()
    with pytest.raises(LoRAInputError, match="modified in place after merge_exact_"):
        lk.unmerge_exact_(W2, rec2)
    assert same_bits(W2, snap2)


def test_unmerge_exact_adapter_changed_without_snapshot():
    W, A, B = _inputs()
    W0 = W.clone()
    rec = lk.merge_exact_(W, A, B, 1.0, snapshot=False)
    B.add_(0.1)
    snap = W.clone()
    with pytest.raises(LoRAInputError, match="changed since merge_exact_"):
        lk.unmerge_exact_(W, rec)
    assert same_bits(W, snap)
    # with the (default) snapshot, adapter changes cannot break the round trip
    W, A, B = _inputs()
    W0 = W.clone()
    rec = lk.merge_exact_(W, A, B, 1.0)
    A.mul_(3.0)
    lk.unmerge_exact_(W, rec)
    assert same_bits(W, W0)


# ----------------------------------------------------------------------------------------------
# LoRALinear
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_merge_unmerge(dtype):
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40).to(dtype)
    layer = lk.LoRALinear(base, r=8, alpha=16, backend="torch")
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    W0 = layer.weight.detach().clone()
    x = torch.randn(5, 48, dtype=dtype)
    with torch.no_grad():
        y_unmerged = layer(x)
        layer.merge()
        y_merged = layer(x)
    assert layer.merged and isinstance(layer._merge_record, MergeRecord)
    assert layer.state_dict()["lora_merge_record"].dtype == torch.uint8  # serialised record (tests/test_unload.py)
    assert_close_rel(y_merged, y_unmerged, TOL[dtype] if dtype != torch.float32 else 1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    # LoRA parameters changed while merged (e.g. an optimizer step): the unmerge still restores W exactly
    with torch.no_grad():
        layer.lora_B.add_(0.01)
    layer.unmerge()
    assert same_bits(layer.weight.detach(), W0) and not layer.merged
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    assert same_bits(layer.weight.detach(), W0)


def test_lora_linear_weight_changed_while_merged_warns():
    base = torch.nn.Linear(16, 12)
    layer = lk.LoRALinear(base, r=4, alpha=4, backend="torch")
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    W0 = layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        layer.weight.add_(0.5)
    with pytest.warns(RuntimeWarning, match="exact unmerge impossible"):
        layer.unmerge()
    assert_close_rel(layer.weight.detach(), W0 + 0.5, 1e-6)
    assert not layer.merged


def test_lora_linear_merge_on_eval_round_trip():
    base = torch.nn.Linear(24, 20).to(torch.bfloat16)
    layer = lk.LoRALinear(base, r=4, alpha=8, backend="torch", merge_on_eval=True)
    torch.nn.init.normal_(layer.lora_B, std=0.2)
    W0 = layer.weight.detach().clone()
    for _ in range(20):
        layer.eval()
        assert layer.merged
        layer.train()
    assert same_bits(layer.weight.detach(), W0)


# ----------------------------------------------------------------------------------------------
# opcheck and GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_merge(backend):
    W = torch.randn(16, 24)
    A, B = [torch.randn(4, 24)], [torch.randn(16, 4)]
    torch.library.opcheck(torch.ops.lora_kernels.merge_.default, (W, A, B, [0.5], backend),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("N,K,ranks", [(4096, 4096, [16]), (257, 1000, [1, 64]), (1, 7, [3])])
def test_gpu_bf16_merge_and_exact(backend, N, K, ranks):
    if backend == "cuda" and not lk.load_extension():
        pytest.skip("CUDA extension not available")
    torch.manual_seed(0)
    W = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
    A, B = make_adapters(N, K, ranks, torch.bfloat16, device="cuda", rel=0.03, w_std=0.02)
    scales = [1.0] * len(ranks)
    W0 = W.clone()
    plain = W.clone()
    lk.merge_(plain, A, B, scales, backend=backend)
    assert_close_rel(plain, merged_fp64(W0, A, B, scales), TOL[torch.bfloat16])
    rec = lk.merge_exact_(W, A, B, scales, backend=backend)
    assert rec.backend == backend and same_bits(W, plain)
    lk.unmerge_exact_(W, rec)
    assert same_bits(W, W0)
    Wt = W0.t().contiguous().t()
    rec = lk.merge_exact_(Wt, A, B, scales, backend=backend)
    assert torch.equal(Wt, plain) or rel_err(Wt, plain) < 1e-2
    lk.unmerge_exact_(Wt, rec)
    assert same_bits(Wt, W0)


@pytest.mark.gpu
def test_gpu_opcheck_cuda_merge_ops():
    if not lk.load_extension():
        pytest.skip("CUDA extension not available")
    W = torch.randn(64, 160, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(8, 160, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(64, 8, device="cuda", dtype=torch.bfloat16)
    rs = torch.tensor([0, 8], dtype=torch.int32, device="cuda")
    sc = torch.tensor([0.5], device="cuda")
    torch.library.opcheck(torch.ops.lora_kernels.cuda_merge_.default, (W, A, B, rs, sc))
    counters = torch.zeros(4, dtype=torch.int32, device="cuda")
    idx = torch.empty(64 * 160, dtype=torch.int32, device="cuda")
    bts = torch.empty(64 * 160, dtype=torch.int16, device="cuda")
    ovf = torch.empty(64, dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.lora_kernels.cuda_merge_exact_.default,
                          (W, A, B, rs, sc, counters, idx, bts, ovf, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("by_fill", [False, True])
def test_small_tensor_paths_agree(by_fill):
    from lora_kernels.ops.merge import concat_adapters, small_tensor

    t = small_tensor([0, 3, 19], torch.int32, "cpu", by_fill=by_fill)
    assert t.dtype == torch.int32 and t.tolist() == [0, 3, 19]
    s = small_tensor([0.5, -1.25], torch.float32, "cpu", by_fill=by_fill)
    assert s.tolist() == [0.5, -1.25]
    W = torch.randn(5, 7)
    _, _, starts, scales = concat_adapters(W, [torch.randn(2, 7), torch.randn(3, 7)], [torch.randn(5, 2), torch.randn(5, 3)], [1.0, 2.0])
    assert starts.tolist() == [0, 2, 5] and scales.tolist() == [1.0, 2.0]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_merge_captured_in_cuda_graph(backend):
    """Plain merge_ / unmerge_ with several adapters inside CUDA-graph capture (per-adapter scales and rank
    offsets reach the device by fill kernels, not by a pageable host copy), replayed twice."""
    if backend == "cuda" and not lk.load_extension():
        pytest.skip("CUDA extension not available")
    torch.manual_seed(0)
    N, K = 96, 200
    W = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
    A, B = make_adapters(N, K, [4, 8], torch.bfloat16, device="cuda", rel=0.03, w_std=0.02)
    scales = [0.5, 2.0]
    expected_once = merged_fp64(W.clone(), A, B, scales)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compiles / builds) outside the capture
        warm = W.clone()
        lk.merge_(warm, A, B, scales, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    W0 = W.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lk.merge_(W, A, B, scales, backend=backend)
    W.copy_(W0)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_rel(W, expected_once, TOL[torch.bfloat16], "captured merge, first replay")
    assert same_bits(W, warm), "the graph replay must equal the eager merge bit for bit"
