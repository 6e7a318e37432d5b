"""lora_shrink / lora_expand_ (ops/shrink_expand.py) on the torch and Triton backends (the interpreter on the CPU)
against the float64 reference: fp32, fp16 (and fp64 on torch), awkward shapes (M = 0, 1, odd K/N, ranks 1..64,
mixed and zero ranks), ids -1, strided inputs (vLLM's [L, 1, r, K] stacks, column windows of a packed output,
slices of a [S, M, r] buffer, transposed weights), outputs NaN-poisoned before the kernels write them, opcheck,
and one test per error message. The CUDA launchers run in tests/test_shrink_expand_cuda_emulated.py."""

import math

import pytest
import torch
from conftest import HAS_CUDA, TOL, assert_close_rel, assert_fa_rule, poison_

import lora_kernels as lk
from lora_kernels import LoRAInputError
from lora_kernels import reference as ref
from lora_kernels.triton import shrink_expand as tse

DEV = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["torch", "triton"]


def make_ids(kind, M, L, gen):
    if kind == "mixed":  # every adapter and -1 interleaved
        ids = torch.randint(-1, L, (M,), generator=gen)
        if M:
            ids[::4] = -1
    elif kind == "none":
        ids = torch.full((M,), -1)
    elif kind == "one":
        ids = torch.full((M,), L - 1)
    else:
        raise ValueError(kind)
    return ids


def make_ranks(kind, L, r_max):
    if kind is None:
        return None
    if kind == "mixed":  # 0, 1, r_max and values between
        rk = [max(1, (r_max * (j + 1)) // L) for j in range(L)]
        rk[0], rk[-1] = r_max, 1
        if L > 2:
            rk[1] = 0
        return torch.tensor(rk, dtype=torch.int32)
    raise ValueError(kind)


def layout(t, kind, gen):
    """The same values as t ([M, K]) in another memory layout."""
    M, K = t.shape
    if kind == "contiguous":
        return t
    if kind == "padded":  # row stride K + 3
        buf = torch.randn(M, K + 3, generator=gen).to(t.dtype)
        buf[:, 3:] = t
        return buf[:, 3:]
    if kind == "colmajor":
        return t.t().contiguous().t()
    raise ValueError(kind)


def stacked_vllm(w, gen):
    """w [L, a, b] as vLLM stores it: a [L, 1, a, b] buffer, seen through [:, 0] (strides (a*b, b, 1))."""
    buf = torch.empty(w.shape[0], 1, *w.shape[1:], dtype=w.dtype, device=w.device)
    buf[:, 0] = w
    return buf[:, 0]


def padded_stack(w, gen):
    """w [L, a, b] as a window of a larger buffer: every stride differs from the contiguous one."""
    buf = torch.randn(w.shape[0], w.shape[1] + 3, w.shape[2] + 5, generator=gen).to(w.device, w.dtype)
    view = buf[:, 2:2 + w.shape[1], 1:1 + w.shape[2]]
    view.copy_(w)
    return view


def shrink_lowp(x, a, ids, scale, ranks):
    """Plain torch in the inputs' precision (the FlashAttention rule's baseline), fp32 result like the op's."""
    M, r_max = x.shape[0], a.shape[1]
    out = torch.zeros(M, r_max)
    for t, i in enumerate(ids.tolist()):
        if i >= 0:
            r = r_max if ranks is None else int(ranks[i])
            out[t, :r] = (scale * (x[t].to(a.dtype) @ a[i, :r].t())).float()
    return out


def expand_lowp(y, xa, b, ids, scales, ranks, col):
    y = y.clone()
    N, r_max = b.shape[1], b.shape[2]
    for t, i in enumerate(ids.tolist()):
        if i >= 0:
            r = r_max if ranks is None else int(ranks[i])
            y[t, col:col + N] += (scales[i].to(b.dtype) * (xa[t, :r].to(b.dtype) @ b[i, :, :r].t())).to(y.dtype)
    return y


def to_dev(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


# ------------------------------------------------------------------------------------------------
# shrink
# ------------------------------------------------------------------------------------------------


def run_shrink(backend, x, a, ids, scale, ranks, monkeypatch):
    if backend == "triton":  # the kernel must write every element of its (uninitialised) output
        monkeypatch.setattr(tse, "_new_xa", lambda M, r, device: poison_(torch.empty((M, r), dtype=torch.float32,
                                                                                     device=device)))
    return lk.lora_shrink(x, a, ids, scale, ranks, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [0, 1, 7, 37])
@pytest.mark.parametrize("K,r_max,ranks", [(33, 1, None), (64, 16, "mixed"), (200, 64, "mixed"), (17, 40, None)])
def test_shrink(backend, dtype, M, K, r_max, ranks, monkeypatch):
    gen = torch.Generator().manual_seed(M * 131 + K + r_max)
    L = 4
    x = torch.randn(M, K, generator=gen).to(dtype)
    a = (torch.randn(L, r_max, K, generator=gen) / math.sqrt(K)).to(dtype)
    ids = make_ids("mixed", M, L, gen)
    rk = make_ranks(ranks, L, r_max)
    x, a, ids, rk = to_dev(x, a, ids, rk)
    xa = run_shrink(backend, x, a, ids, 0.75, rk, monkeypatch)
    assert xa.dtype == torch.float32 and xa.shape == (M, r_max)
    expected = ref.lora_shrink_ref(x.double(), a.double(), ids, 0.75, rk)
    assert_close_rel(xa, expected, TOL[torch.float32], f"shrink {backend} {dtype}")
    assert torch.all(xa[expected == 0] == 0), "entries past a rank and rows with id -1 must be exactly 0"
    if dtype == torch.float16 and M:
        assert_fa_rule(xa, expected, shrink_lowp(x.cpu(), a.cpu(), ids.cpu(), 0.75, rk).to(DEV), f"shrink {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_layout", ["padded", "colmajor"])
def test_shrink_strided_inputs(backend, x_layout, monkeypatch):
    """x with a padded or column-major layout; A as vLLM stacks it ([L, 1, r, K][:, 0]) and as a transposed view;
    int32 ids; the scale applied once."""
    gen = torch.Generator().manual_seed(3)
    M, K, L, r_max = 23, 45, 5, 12
    x = layout(torch.randn(M, K, generator=gen), x_layout, gen)
    a = torch.randn(L, r_max, K, generator=gen)
    ids = make_ids("mixed", M, L, gen).to(torch.int32)
    rk = torch.tensor([12, 3, 0, 7, 1])
    expected = ref.lora_shrink_ref(x.double(), a.double(), ids, -1.5, rk)
    for a_view in (stacked_vllm(a, gen), padded_stack(a, gen), a.transpose(1, 2).contiguous().transpose(1, 2)):
        xa = run_shrink(backend, *to_dev(x, a_view, ids), -1.5, rk.to(DEV), monkeypatch)
        assert_close_rel(xa, expected, TOL[torch.float32], f"strided shrink {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shrink_mixed_dtypes(backend, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 24, generator=gen).half()
    a = torch.randn(3, 8, 24, generator=gen)  # fp32 weights, fp16 activations
    ids = torch.tensor([0, 1, 2, -1, 2, 1, 0, -1, 2])
    xa = run_shrink(backend, *to_dev(x, a, ids), 1.0, None, monkeypatch)
    assert_close_rel(xa, ref.lora_shrink_ref(x.double(), a.double(), ids, 1.0), TOL[torch.float32], "mixed dtypes")


def test_shrink_fp64_on_torch():
    gen = torch.Generator().manual_seed(5)
    x, a = torch.randn(6, 10, generator=gen, dtype=torch.float64), torch.randn(2, 4, 10, generator=gen, dtype=torch.float64)
    ids = torch.tensor([1, -1, 0, 1, 0, -1])
    xa = lk.lora_shrink(x, a, ids, 2.0, torch.tensor([4, 2]), backend="torch")
    assert xa.dtype == torch.float64
    assert_close_rel(xa, ref.lora_shrink_ref(x, a, ids, 2.0, torch.tensor([4, 2])), TOL[torch.float64], "fp64 shrink")


# ------------------------------------------------------------------------------------------------
# expand
# ------------------------------------------------------------------------------------------------


def check_expand(y_after, y_before, expected, ids, col, N, tol, what):
    """Rows with id -1 and the columns outside the window bit-identical (they hold NaN: never read-modified-
    written), the window finite and within tol of the reference."""
    keep = ids.to(y_after.device) < 0
    outside = torch.ones(y_after.shape[1], dtype=torch.bool, device=y_after.device)
    outside[col:col + N] = False
    same = lambda a, b: torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())  # noqa: E731
    assert same(y_after[:, outside], y_before[:, outside]), f"{what}: columns outside the window changed"
    assert same(y_after[keep], y_before[keep]), f"{what}: rows with id -1 changed"
    win = ~keep
    assert_close_rel(y_after[win][:, col:col + N], expected[win][:, col:col + N], tol, what)


def poisoned_y(M, N_total, col, N, dtype, gen, ids):
    """y with random values in the window rows the op updates, NaN in every element it must not touch."""
    y = torch.randn(M, N_total, generator=gen).to(dtype)
    outside = torch.ones(N_total, dtype=torch.bool)
    outside[col:col + N] = False
    y[:, outside] = float("nan")
    y[ids < 0] = float("nan")
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [0, 1, 7, 37])
@pytest.mark.parametrize("N,r_max,ranks", [(1, 1, None), (37, 8, "mixed"), (130, 64, "mixed"), (64, 13, None)])
def test_expand(backend, dtype, M, N, r_max, ranks):
    gen = torch.Generator().manual_seed(M * 7 + N + r_max)
    L, col = 5, 3
    ids = make_ids("mixed", M, L, gen)
    y = poisoned_y(M, N + 7, col, N, dtype, gen, ids)
    xa = torch.randn(M, r_max, generator=gen)
    b = (torch.randn(L, N, r_max, generator=gen) / math.sqrt(r_max)).to(dtype)
    scales = torch.tensor([0.5, -1.25, 2.0, 0.0, 1.0])
    rk = make_ranks(ranks, L, r_max)
    y, xa, b, ids, scales, rk = to_dev(y, xa, b, ids, scales, rk)
    y0 = y.clone()
    out = lk.lora_expand_(y, xa, b, ids, scales, rk, col, backend=backend)
    assert out is y
    expected = ref.lora_expand_ref(y0.double().clone(), xa.double(), b.double(), ids, scales.double(), rk, col)
    check_expand(y, y0, expected, ids, col, N, TOL[dtype], f"expand {backend} {dtype}")
    if dtype == torch.float16 and M:
        lowp = expand_lowp(y0.cpu(), xa.cpu(), b.cpu(), ids.cpu(), scales.cpu(), rk, col).to(DEV)
        win = ids >= 0
        assert_fa_rule(y[win][:, col:col + N], expected[win][:, col:col + N], lowp[win][:, col:col + N], f"expand {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expand_strided_operands(backend):
    """xa a slice of vLLM's [S, M, r] buffer (and 16-bit), B as vLLM stacks it and transposed, y column-major, int32
    ids: the same result as contiguous operands."""
    gen = torch.Generator().manual_seed(6)
    M, N, L, r_max, col = 19, 29, 4, 16, 11
    ids = make_ids("mixed", M, L, gen).to(torch.int32)
    buf = torch.randn(3, M, r_max, generator=gen)
    b = torch.randn(L, N, r_max, generator=gen)
    scales = torch.rand(L, generator=gen) + 0.5
    rk = torch.tensor([16, 5, 0, 9])
    buf, b, ids, scales, rk = to_dev(buf, b, ids, scales, rk)
    for xa in (buf[1], buf[2].half(), buf[0].t().contiguous().t()):
        for b_view in (stacked_vllm(b, gen), padded_stack(b, gen), b.transpose(1, 2).contiguous().transpose(1, 2)):
            y = poisoned_y(M, N + 20, col, N, torch.float32, gen, ids.cpu()).to(DEV).t().contiguous().t()  # column-major
            y0 = y.clone()
            lk.lora_expand_(y, xa, b_view, ids, scales, rk, col, backend=backend)
            expected = ref.lora_expand_ref(y0.double().clone(), xa.double(), b.double(), ids, scales.double(), rk, col)
            check_expand(y, y0, expected, ids, col, N, TOL[torch.float32], f"strided expand {backend}")


def test_expand_fp64_on_torch():
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    xa, b = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    ids, scales = torch.tensor([0, 1, -1, 1, 0]), torch.tensor([0.5, 2.0], dtype=torch.float64)
    y0 = y.clone()
    lk.lora_expand_(y, xa, b, ids, scales, None, 2, backend="torch")
    assert_close_rel(y, ref.lora_expand_ref(y0, xa, b, ids, scales, None, 2), TOL[torch.float64], "fp64 expand")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shrink_then_expand_equals_add_lora(backend):
    """Shrink + expand per slice (what vLLM's add_lora_linear does with the pieces) == add_lora on packed slices."""
    gen = torch.Generator().manual_seed(8)
    M, K, L, r_max, widths = 21, 40, 4, 8, [24, 8, 8]
    x = torch.randn(M, K, generator=gen)
    A = [torch.randn(L, r_max, K, generator=gen) / math.sqrt(K) for _ in widths]
    B = [torch.randn(L, n, r_max, generator=gen) for n in widths]
    ids = make_ids("mixed", M, L, gen)
    scales, rk = torch.ones(L), torch.tensor([8, 2, 0, 5])
    y0 = torch.randn(M, sum(widths), generator=gen)
    y1, y2 = y0.clone(), y0.clone()
    col = 0
    for a, b in zip(A, B):
        xa = lk.lora_shrink(x, a, ids, 1.0, rk, backend=backend)
        lk.lora_expand_(y1, xa, b, ids, scales, rk, col, backend=backend)
        col += b.shape[1]
    lk.add_lora(y2, x, A, B, ids, scales, rk, backend=backend)
    assert_close_rel(y1, y2, TOL[torch.float32], "shrink+expand vs add_lora")


# ------------------------------------------------------------------------------------------------
# opcheck, routing, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(9)
    x, a = torch.randn(6, 12, generator=gen), torch.randn(3, 4, 12, generator=gen)
    ids, rk = torch.tensor([0, -1, 2, 1, 2, 0]), torch.tensor([4, 1, 3])
    torch.library.opcheck(torch.ops.lora_kernels.lora_shrink.default, (x, a, ids, 0.5, rk, backend))
    torch.library.opcheck(torch.ops.lora_kernels.lora_shrink.default, (x, a, ids, 1.0, None, backend))
    y, xa, b = torch.randn(6, 10, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(3, 7, 4, generator=gen)
    torch.library.opcheck(torch.ops.lora_kernels.lora_expand_.default, (y, xa, b, ids, torch.rand(3), rk, 2, backend))
    torch.library.opcheck(torch.ops.lora_kernels.lora_expand_.default, (y, xa, b, ids, torch.rand(3), None, 0, backend))


def test_table_rows_and_auto_choice():
    from lora_kernels import _backend

    for be in ("torch", "triton", "cuda"):
        assert {"lora_shrink", "lora_expand"} <= set(_backend.implemented_ops(be)), be
    x = torch.randn(2, 4)
    assert lk.resolve_backend("lora_shrink", x, backend="torch") == "torch"
    assert lk.resolve_backend("lora_expand", x.double()) == "torch"  # fp64: only torch takes it


def test_expand_marks_y_written():
    y = torch.zeros(2, 3)
    v = y._version
    lk.lora_expand_(y, torch.ones(2, 1), torch.ones(1, 3, 1), torch.tensor([0, -1]), torch.ones(1), backend="torch")
    assert y._version > v and torch.equal(y, torch.tensor([[1.0, 1, 1], [0, 0, 0]]))


def _shrink_args(**kw):
    args = dict(x=torch.randn(4, 8), lora_a=torch.randn(3, 2, 8), adapter_ids=torch.tensor([0, 1, -1, 2]), scale=1.0,
                ranks=None)
    args.update(kw)
    return args


def _expand_args(**kw):
    args = dict(y=torch.randn(4, 10), xa=torch.randn(4, 2), lora_b=torch.randn(3, 6, 2),
                adapter_ids=torch.tensor([0, 1, -1, 2]), scales=torch.ones(3), ranks=None, col_offset=4)
    args.update(kw)
    return args


@pytest.mark.parametrize("kw,msg", [
    (dict(x=torch.randn(4, 8).long()), r"lora_shrink: x must have a floating dtype"),
    (dict(x=torch.randn(4, 2, 8)), r"lora_shrink: x must be 2-D \[M, K\], got shape \[4, 2, 8\]"),
    (dict(lora_a=torch.randn(3, 2, 9)), r"lora_a must be \[L, r_max, K=8\]"),
    (dict(lora_a=torch.randn(2, 8)), r"lora_a must be \[L, r_max, K=8\]"),
    (dict(adapter_ids=torch.tensor([0.0, 1, 2, 0])), r"adapter_ids must be an int32 or int64 tensor"),
    (dict(adapter_ids=[0, 1, 2, 0]), r"adapter_ids must be an int32 or int64 tensor, got list"),
    (dict(adapter_ids=torch.tensor([0, 1, 2])), r"adapter_ids must be \[M=4\], got shape \[3\]"),
    (dict(adapter_ids=torch.tensor([0, 1, 3, 0])), r"adapter id out of range: adapter_ids must be in \[-1, L=3\), got min 0, max 3"),
    (dict(adapter_ids=torch.tensor([0, -2, 1, 0])), r"adapter id out of range.*got min -2"),
    (dict(scale=float("inf")), r"lora_shrink: scale must be finite"),
    (dict(scale="1"), r"lora_shrink: scale must be a real number"),
    (dict(ranks=torch.tensor([1, 2])), r"ranks must be \[L=3\], got shape \[2\]"),
    (dict(ranks=torch.tensor([1.0, 2, 2])), r"ranks must be an int32 or int64 tensor"),
    (dict(ranks=torch.tensor([1, 3, 2])), r"ranks must be in \[0, r_max=2\], got min 1, max 3"),
    (dict(ranks=torch.tensor([1, -1, 2])), r"ranks must be in \[0, r_max=2\], got min -1"),
    (dict(lora_a=torch.randn(3, 2, 8, device="meta")), r"all tensors must be on one device: x is on cpu but lora_a is on meta"),
    (dict(x=torch.randn(4, 8, requires_grad=True)), r"x requires grad, but lora_shrink is an inference op"),
])
def test_shrink_errors(kw, msg):
    with pytest.raises(LoRAInputError, match=msg):
        lk.lora_shrink(**_shrink_args(**kw), backend="torch")


@pytest.mark.parametrize("kw,msg", [
    (dict(y=torch.randn(4, 10).int()), r"lora_expand_: y must have a floating dtype"),
    (dict(y=torch.randn(40)), r"y must be 2-D \[M, N_total\], got shape \[40\]"),
    (dict(lora_b=torch.randn(6, 2)), r"lora_b must be \[L, N, r_max\], got shape \[6, 2\]"),
    (dict(xa=torch.randn(4, 3)), r"xa must be \[M=4, r_max=2\].*got shape \[4, 3\]"),
    (dict(xa=torch.randn(5, 2)), r"xa must be \[M=4, r_max=2\]"),
    (dict(col_offset=5), r"col_offset=5 puts the N=6 columns of lora_b at \[5, 11\), outside y's 10 columns"),
    (dict(col_offset=-1), r"col_offset=-1 puts"),
    (dict(col_offset=1.0), r"col_offset must be an int, got float"),
    (dict(adapter_ids=torch.tensor([0, 1, -1])), r"adapter_ids must be \[M=4\]"),
    (dict(adapter_ids=torch.tensor([0, 1, -1, 3])), r"adapter id out of range: adapter_ids must be in \[-1, L=3\)"),
    (dict(scales=torch.ones(2)), r"scales must be a 1-D tensor \[L=3\], got \[2\]"),
    (dict(scales=1.0), r"scales must be a 1-D tensor \[L=3\], got float"),
    (dict(scales=torch.tensor([1.0, float("nan"), 1.0])), r"scales must be finite"),
    (dict(scales=torch.ones(3, dtype=torch.int64)), r"scales must have a floating dtype"),
    (dict(ranks=torch.tensor([1, 2, 5])), r"ranks must be in \[0, r_max=2\]"),
    (dict(y=torch.randn(1, 10).expand(4, 10)), r"y \(shape \[4, 10\], strides \[0, 1\]\) has elements that share memory"),
    (dict(xa=torch.randn(4, 2, device="meta")), r"all tensors must be on one device"),
    (dict(lora_b=torch.randn(3, 6, 2, requires_grad=True)), r"lora_b requires grad, but lora_expand_ is an inference op"),
])
def test_expand_errors(kw, msg):
    args = _expand_args(**kw)
    y0 = args["y"].clone() if isinstance(args["y"], torch.Tensor) else None
    with pytest.raises(LoRAInputError, match=msg):
        lk.lora_expand_(**args, backend="torch")
    if y0 is not None:
        assert torch.equal(args["y"], y0), "a failed call must leave y untouched"


def test_expand_y_overlapping_an_input_is_rejected():
    buf = torch.randn(4, 12)
    with pytest.raises(LoRAInputError, match=r"y overlaps xa in memory"):
        lk.lora_expand_(buf[:, :10], buf[:, 8:10], torch.randn(3, 6, 2), torch.tensor([0, 1, -1, 2]), torch.ones(3),
                        backend="torch")
    # interleaved but disjoint views are fine
    lk.lora_expand_(buf[:, :10], buf[:, 10:], torch.randn(3, 6, 2), torch.tensor([0, 1, -1, 2]), torch.ones(3),
                    backend="torch")


def test_expand_triton_refuses_fp64_explicitly():
    with pytest.raises(lk.BackendUnavailableError, match=r"fp16/bf16/fp32"):
        lk.lora_expand_(**_expand_args(y=torch.randn(4, 10, dtype=torch.float64)), backend="triton")
