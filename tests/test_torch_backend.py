"""The torch backend's LoRA linear layer (lora_kernels/torch/lora_linear.py) against the float64 reference.

The torch backend is a product path (CPU, MPS, ROCm) that computes in the input dtype; ``reference.py`` stays the
oracle. Checked here: the launchers and the public API in fp64 / fp32 / bf16 / fp16 over awkward shapes (M = 0, 1,
odd K and N, ranks 1..128, several row blocks), dropout masks bit for bit equal to ``reference.dropout_keep_mask``
(numpy and torch-int32 hashes, saved or regenerated), gradients against autograd through the reference, and what the
autograd function saves (no copy of W0, no M×K copy beyond what plain LoRA saves). No timing here: see
``benchmarks/bench_cpu.py``.
"""

import pytest
import torch
from torch import nn

import lora_kernels as lk
from conftest import TOL, assert_close_rel, assert_fa_rule, lora_linear_lowp, poison_
from lora_kernels import reference as ref
from lora_kernels.torch import lora_linear as tl

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ALL = (True, True, True, True)


def _d(t):
    return None if t is None else t.detach().to(torch.float64)


def _make(M, K, N, r, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return dict(x=rnd(M, K), w=rnd(N, K, scale=K**-0.5), a=rnd(r, K, scale=K**-0.5), b=rnd(N, r, scale=r**-0.5),
                bias=rnd(N) if bias else None, dy=rnd(M, N))


def _check(name, got, want, lowp, dtype):
    """TOL vs the float64 oracle, and for 16-bit outputs FlashAttention's rule against plain torch in that dtype."""
    assert got.dtype == want.dtype or True  # dtypes are asserted by the callers
    assert_close_rel(got, want, TOL[dtype], name)
    if dtype in (torch.float16, torch.bfloat16) and lowp is not None:
        assert_fa_rule(got, want, lowp, name)


@pytest.fixture(params=["one block", "many blocks"])
def blocks(request, monkeypatch):
    """Run each case with the default row blocks and with tiny ones (several blocks even at test sizes)."""
    if request.param == "many blocks":
        monkeypatch.setattr(tl, "_BLOCK_ELEMS", 64)
        monkeypatch.setattr(tl, "_HASH_BLOCK_ELEMS", 48)
    return request.param


# ------------------------------------------------------------------ launchers vs the float64 reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r", [(0, 16, 8, 4), (1, 9, 7, 1), (37, 33, 29, 8), (64, 48, 40, 64), (20, 130, 24, 128)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_launchers_match_reference(dtype, M, K, N, r, p, blocks):
    t = _make(M, K, N, r, dtype, seed=M + K + r)
    x, w, a, b, bias, dy = t["x"], t["w"], t["a"], t["b"], t["bias"], t["dy"]
    seed = 1234 + M
    y, xa = tl.lora_linear_fwd_torch(x, w, a, b, 0.75, bias, p, seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    assert xa.dtype == acc and xa.shape == (M, r)
    y_ref, xa_ref = ref.lora_linear_fwd_ref(_d(x), _d(w), _d(a), _d(b), 0.75, _d(bias), p, seed)
    y_low, g_low = lora_linear_lowp(x, w, a, b, bias, 0.75, p, seed, dy) if M else (None, (None,) * 4)
    _check("y", y, y_ref, y_low, dtype)
    assert_close_rel(xa, xa_ref, TOL[torch.float64 if dtype == torch.float64 else torch.float32], "xa")

    got = tl.lora_linear_bwd_torch(dy, x, xa, w, a, b, 0.75, p, seed, ALL)
    want = ref.lora_linear_bwd_ref(_d(dy), _d(x), xa_ref, _d(w), _d(a), _d(b), 0.75, p, seed, ALL)
    for name, g, e, lo, like in zip(("dx", "dA", "dB", "dW0"), got, want, g_low, (x, a, b, w)):
        assert g.dtype == like.dtype and g.shape == like.shape, name
        _check(name, g, e, lo, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [(True, False, True, False), (False, True, False, False), (True, False, False, False),
                                  (False, False, False, True)])
def test_backward_output_mask_and_lora_fa(dtype, mask, blocks):
    t = _make(23, 17, 11, 5, dtype, seed=3)
    x, w, a, b, dy = t["x"], t["w"], t["a"], t["b"], t["dy"]
    _, xa = tl.lora_linear_fwd_torch(x, w, a, b, 0.5, None, 0.2, 9)
    x_arg = x if (mask[1] or mask[3]) else None  # LoRA-FA: x is not saved when neither dA nor dW0 is needed
    got = tl.lora_linear_bwd_torch(dy, x_arg, xa, w, a, b, 0.5, 0.2, 9, mask)
    _, xa_ref = ref.lora_linear_fwd_ref(_d(x), _d(w), _d(a), _d(b), 0.5, None, 0.2, 9)
    want = ref.lora_linear_bwd_ref(_d(dy), _d(x), xa_ref, _d(w), _d(a), _d(b), 0.5, 0.2, 9, mask)
    for name, wanted, g, e in zip(("dx", "dA", "dB", "dW0"), mask, got, want):
        if wanted:
            assert_close_rel(g, e, TOL[dtype], name)
        else:
            assert g is None, name
    if not (mask[1] or mask[3]):
        with pytest.raises(ValueError, match="x was not saved"):
            tl.lora_linear_bwd_torch(dy, None, xa, w, a, b, 0.5, 0.2, 9, (True, True, False, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("onednn", [False, True])
def test_dy_w0_layout_choice_gives_the_same_dx(dtype, onednn, monkeypatch):
    """dy·W0 is computed with dy copied to column-major when ATen's fallback 16-bit GEMM is in use; both branches
    give dx within the 16-bit tolerance of the reference."""
    monkeypatch.setattr(tl, "_onednn_has", lambda dt: onednn)
    t = _make(40, 24, 36, 4, dtype, seed=5, bias=False)
    x, w, a, b, dy = t["x"], t["w"], t["a"], t["b"], t["dy"]
    _, xa = tl.lora_linear_fwd_torch(x, w, a, b, 1.0, None, 0.0, 0)
    dx = tl.lora_linear_bwd_torch(dy, x, xa, w, a, b, 1.0, 0.0, 0, (True, False, False, False))[0]
    _, xa_ref = ref.lora_linear_fwd_ref(_d(x), _d(w), _d(a), _d(b), 1.0)
    want = ref.lora_linear_bwd_ref(_d(dy), _d(x), xa_ref, _d(w), _d(a), _d(b), 1.0, 0.0, 0, (True, False, False, False))[0]
    assert dx.dtype == dtype and dx.is_contiguous()
    assert_close_rel(dx, want, TOL[dtype], "dx")


def test_keep_argument_is_used_instead_of_rehashing(monkeypatch):
    """With the saved mask passed in, neither launcher hashes again (and the result is the same as hashing)."""
    t = _make(19, 21, 13, 3, torch.float32, seed=8)
    x, w, a, b, bias, dy = t["x"], t["w"], t["a"], t["b"], t["bias"], t["dy"]
    keep = tl.lora_dropout_keep_torch(x, 0.3, 77)
    y0, xa0 = tl.lora_linear_fwd_torch(x, w, a, b, 2.0, bias, 0.3, 77)
    g0 = tl.lora_linear_bwd_torch(dy, x, xa0, w, a, b, 2.0, 0.3, 77, ALL)

    def no_hash(*args, **kwargs):
        raise AssertionError("the mask was hashed again")

    monkeypatch.setattr(tl, "_KeepMask", no_hash)
    y1, xa1 = tl.lora_linear_fwd_torch(x, w, a, b, 2.0, bias, 0.3, 77, keep)
    g1 = tl.lora_linear_bwd_torch(dy, x, xa1, w, a, b, 2.0, 0.3, 77, ALL, keep)
    assert torch.equal(y0, y1) and torch.equal(xa0, xa1)
    for u, v in zip(g0, g1):
        assert torch.equal(u, v)


# ------------------------------------------------------------------ the dropout mask, bit for bit


@pytest.mark.parametrize("hash_impl", ["numpy", "torch-int32"])
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**40 + 7, 2**63 - 1])
@pytest.mark.parametrize("p", [1e-9, 0.1, 0.5, 0.9, 0.99999999])
def test_keep_mask_is_the_reference_mask(hash_impl, seed, p, monkeypatch):
    if hash_impl == "torch-int32":
        monkeypatch.setattr(tl, "_np", None)
    monkeypatch.setattr(tl, "_HASH_BLOCK_ELEMS", 300)  # several blocks, a ragged last one
    for rows, cols in ((1, 1), (7, 5), (129, 67), (40, 1000)):
        want = ref.dropout_keep_mask(seed, rows, cols, p)
        got = tl.dropout_keep_mask_fast(seed, rows, cols, p)
        assert got.dtype == torch.bool and torch.equal(got, want), (rows, cols)
    # any window of rows (the row index is the row of the whole 2-D input)
    want = ref.dropout_keep_mask(seed, 90, 33, p)
    got = tl.keep_mask_rows(seed, 31, 59, 33, p)
    assert got.dtype == torch.uint8 and torch.equal(got.view(torch.bool), want[31:])
    assert int(got.max()) <= 1


def test_keep_mask_edge_cases():
    assert tl.keep_mask_rows(3, 0, 0, 5, 0.5).shape == (0, 5)
    assert tl.keep_mask_rows(3, 0, 4, 0, 0.5).shape == (4, 0)
    assert bool(tl.dropout_keep_mask_fast(3, 4, 6, 0.0).all())
    assert not bool(tl.dropout_keep_mask_fast(3, 4, 6, 1 - 1e-12).any())  # threshold 2^24: nothing kept
    assert torch.equal(tl.dropout_keep_mask_fast(3, 4, 6, 1 - 1e-12), ref.dropout_keep_mask(3, 4, 6, 1 - 1e-12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_forward_and_backward_apply_the_reference_mask(dtype, blocks):
    """A = I exposes drop(x) in xa; W0 = 0, B = I, s = 1 expose drop'(dy) in dx: both zero exactly where the
    reference's mask drops, and scale the rest by 1/(1-p)."""
    M, K, p, seed = 37, 24, 0.3, 4242
    x = torch.rand(M, K, dtype=dtype) + 0.5  # no zeros
    eye = torch.eye(K, dtype=dtype)
    keep = ref.dropout_keep_mask(seed, M, K, p)
    _, xa = tl.lora_linear_fwd_torch(x, torch.zeros(K, K, dtype=dtype), eye, eye, 1.0, None, p, seed)
    assert torch.equal(xa != 0, keep)
    torch.testing.assert_close(xa[keep], x.to(xa.dtype)[keep] / (1 - p), rtol=1e-6, atol=0)
    dy = torch.rand(M, K, dtype=dtype) + 0.5
    dx = tl.lora_linear_bwd_torch(dy, None, xa, torch.zeros(K, K, dtype=dtype), eye, eye, 1.0, p, seed,
                                  (True, False, False, False))[0]
    assert torch.equal(dx != 0, keep)
    tol = 1e-6 if dtype != torch.bfloat16 else 1e-2
    torch.testing.assert_close(dx[keep].double(), dy[keep].double() / (1 - p), rtol=tol, atol=0)


def test_dropout_keep_op_and_opcheck():
    x = torch.randn(13, 11)
    ops = torch.ops.lora_kernels
    k = ops.lora_dropout_keep(x, 0.4, 99)
    assert k.dtype == torch.uint8 and torch.equal(k.view(torch.bool), ref.dropout_keep_mask(99, 13, 11, 0.4))
    assert torch.equal(ops.lora_dropout_keep(x, 0.4, 0, torch.tensor([99])), k)  # seed read from the tensor
    torch.library.opcheck(ops.lora_dropout_keep.default, (x, 0.4, 99))
    w, a, b, bias, dy = torch.randn(7, 11), torch.randn(3, 11), torch.randn(7, 3), torch.randn(7), torch.randn(13, 7)
    torch.library.opcheck(ops.lora_linear_fwd.default, (x, w, a, b, 0.5, bias, 0.4, 99, "torch", None, k))
    _, xa = ops.lora_linear_fwd(x, w, a, b, 0.5, bias, 0.4, 99, "torch", None, k)
    torch.library.opcheck(ops.lora_linear_bwd.default, (dy, x, xa, w, a, b, 0.5, 0.4, 99, [True, True, True, False],
                                                        "torch", None, k))


def test_dispatcher_and_direct_calls_agree():
    """The API calls the op's implementation directly in eager mode; through torch.ops the result is the same."""
    from lora_kernels.ops import lora_linear as opl

    t = _make(9, 12, 10, 4, torch.float32, seed=2)
    x, w, a, b, bias, dy = t["x"], t["w"], t["a"], t["b"], t["bias"], t["dy"]
    keep = opl.call_dropout_keep(x, 0.2, 5)
    y1, xa1 = opl.call_fwd(x, w, a, b, 0.5, bias, 0.2, 5, "torch", None, keep)
    y2, xa2 = torch.ops.lora_kernels.lora_linear_fwd(x, w, a, b, 0.5, bias, 0.2, 5, "torch", None, keep)
    assert torch.equal(y1, y2) and torch.equal(xa1, xa2)
    g1 = opl.call_bwd(dy, x, xa1, w, a, b, 0.5, 0.2, 5, [True, True, True, False], "torch", None, keep)
    g2 = torch.ops.lora_kernels.lora_linear_bwd(dy, x, xa1, w, a, b, 0.5, 0.2, 5, [True, True, True, False], "torch",
                                                None, keep)
    for u, v in zip(g1[:3], g2[:3]):
        assert torch.equal(u, v)
    assert g1[3] is None and g2[3].numel() == 0


# ------------------------------------------------------------------ public API, autograd


def _grads_vs_reference(leaf, view, w, a, b, bias, scale, p, seed, dtype):
    """Our autograd gradients vs autograd through the float64 reference (same seed); x = view(leaf)."""
    x = view(leaf)
    y = lk.lora_linear(x, w, a, b, scale, bias, dropout_p=p, seed=seed, backend="torch")
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], w.shape[0])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(dtype)
    got = torch.autograd.grad(y, (leaf, a, b, bias), dy)
    leafd, ad, bd, biasd = (t.detach().double().requires_grad_(True) for t in (leaf, a, b, bias))
    y_ref = ref.lora_linear_ref(view(leafd), _d(w), ad, bd, scale, biasd, p, seed)
    want = torch.autograd.grad(y_ref, (leafd, ad, bd, biasd), dy.double())
    assert_close_rel(y, y_ref, TOL[dtype], "y")
    for name, g, e in zip(("dx", "dA", "dB", "dbias"), got, want):
        assert g.dtype == dtype, name
        assert_close_rel(g, e, TOL[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("layout", ["3-D", "transposed", "sliced 3-D", "1 token"])
def test_public_api_grads_match_reference(dtype, p, layout, blocks):
    g = torch.Generator().manual_seed(7)
    K, N, r = 20, 14, 6
    if layout == "3-D":
        leaf, view = torch.randn(3, 5, K, generator=g), (lambda t: t)
    elif layout == "transposed":  # [M, K] with K not the contiguous dim
        leaf, view = torch.randn(K, 9, generator=g), (lambda t: t.t())
    elif layout == "sliced 3-D":  # [S, B, K] view of [B, S, 2K]: not viewable as 2-D
        leaf, view = torch.randn(4, 6, 2 * K, generator=g), (lambda t: t.transpose(0, 1)[..., ::2])
    else:
        leaf, view = torch.randn(1, K, generator=g), (lambda t: t)
    leaf = leaf.to(dtype).requires_grad_(True)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    a = (torch.randn(r, K, generator=g) / K**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(N, r, generator=g).to(dtype).requires_grad_(True)
    bias = torch.randn(N, generator=g).to(dtype).requires_grad_(True)
    _grads_vs_reference(leaf, view, w, a, b, bias, 1.5, p, 31, dtype)


def test_gradcheck_fp64_with_dropout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lk.lora_linear(*t, 0.8, dropout_p=0.4, seed=3, backend="torch"),
                                    (x, w, a, b))


def test_module_in_bf16_matches_reference_with_fa_rule():
    torch.manual_seed(0)
    layer = lk.LoRALinear(nn.Linear(48, 40), r=8, alpha=16, backend="torch").to(torch.bfloat16)
    nn.init.normal_(layer.lora_B, std=0.2)
    x = torch.randn(2, 9, 48, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    args = (x.reshape(-1, 48), layer.weight, layer.lora_A, layer.lora_B, layer.bias, layer.scale, 0.0, 0)
    want_y, _ = ref.lora_linear_fwd_ref(*(_d(t) for t in args[:4]), layer.scale, _d(layer.bias))
    y_low, (dx_low, da_low, db_low, _) = lora_linear_lowp(*args, dy.reshape(-1, 40))
    assert_fa_rule(y.reshape(-1, 40), want_y, y_low, "y")
    _, xa_ref = ref.lora_linear_fwd_ref(*(_d(t) for t in args[:4]), layer.scale, _d(layer.bias))
    want = ref.lora_linear_bwd_ref(_d(dy.reshape(-1, 40)), _d(args[0]), xa_ref, *(_d(t) for t in args[1:4]),
                                   layer.scale, 0.0, 0, ALL)
    assert_fa_rule(dx.reshape(-1, 48), want[0], dx_low, "dx")
    assert_fa_rule(da, want[1], da_low, "dA")
    assert_fa_rule(db, want[2], db_low, "dB")


# ------------------------------------------------------------------ what the autograd function saves


def _saved(fn):
    """(result, [saved tensors]) of fn() under saved_tensors_hooks (what autograd keeps for the backward)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("layout", ["2-D", "sliced 3-D"])
def test_saved_tensors_no_weight_copy_and_no_extra_mk_copy(dtype, p, layout):
    M, K, N, r = 96, 64, 80, 4
    g = torch.Generator().manual_seed(1)
    if layout == "2-D":
        x = torch.randn(M, K, generator=g).to(dtype).requires_grad_(True)
    else:
        x = torch.randn(8, 12, 2 * K, generator=g).to(dtype).transpose(0, 1)[..., ::2].requires_grad_(True)
    w = torch.randn(N, K, generator=g).to(dtype)  # frozen
    a = torch.randn(r, K, generator=g).to(dtype).requires_grad_(True)
    b = torch.randn(N, r, generator=g).to(dtype).requires_grad_(True)

    y, ours = _saved(lambda: lk.lora_linear(x, w, a, b, 2.0, dropout_p=p, seed=5, backend="torch"))

    def plain():  # plain LoRA, as PEFT's layer computes it
        h = nn.functional.dropout(x, p, training=True)
        return nn.functional.linear(x, w) + nn.functional.linear(nn.functional.linear(h, a), b) * 2.0

    _, theirs = _saved(plain)
    inputs = {_storage(t) for t in (x, w, a, b)}
    for t in ours:
        if t.numel() == N * K or tuple(t.shape) == (N, K):
            assert _storage(t) == _storage(w), "a copy of the weight was saved"
    mk = M * K
    ours_mk = sum(t.numel() * t.element_size() for t in ours if t.numel() == mk and _storage(t) not in inputs)
    theirs_mk = sum(t.numel() * t.element_size() for t in theirs if t.numel() == mk and _storage(t) not in inputs)
    assert ours_mk <= theirs_mk, f"M×K bytes saved: ours {ours_mk}, plain LoRA {theirs_mk}"
    # what exactly: x itself (not a reshaped copy), xa (fp32, M×r), the parameters, and the uint8 mask with dropout
    assert any(t is x or (_storage(t) == _storage(x) and t.shape == x.shape) for t in ours)
    extra = [t for t in ours if _storage(t) not in inputs]
    assert sorted((tuple(t.shape), t.dtype) for t in extra) == sorted(
        [((M, r), torch.float32)] + ([((M, K), torch.uint8)] if p > 0 else []))
    y.backward(torch.ones_like(y))
    assert x.grad is not None and a.grad is not None and b.grad is not None


def test_frozen_a_saves_no_x_and_no_mask_for_db_only():
    x = torch.randn(10, 16, requires_grad=False)
    w, a = torch.randn(12, 16), torch.randn(4, 16)
    b = torch.randn(12, 4, requires_grad=True)
    _, saved = _saved(lambda: lk.lora_linear(x, w, a, b, 1.0, dropout_p=0.3, seed=2, backend="torch"))
    assert all(_storage(t) != _storage(x) for t in saved), "x saved although only dB is needed"
    assert not any(t.dtype == torch.uint8 for t in saved), "mask saved although no gradient needs it"


def test_outputs_are_fresh_tensors():
    """Outputs never alias inputs or each other (the op's schema promises new tensors)."""
    t = _make(6, 8, 5, 2, torch.float32)
    x, w, a, b, dy = t["x"], t["w"], t["a"], t["b"], t["dy"]
    y, xa = tl.lora_linear_fwd_torch(poison_(x.clone()).copy_(x), w, a, b, 1.0, None, 0.0, 0)
    ptrs = {_storage(v) for v in (x, w, a, b)}
    assert _storage(y) not in ptrs and _storage(xa) not in ptrs and _storage(y) != _storage(xa)
    grads = tl.lora_linear_bwd_torch(dy, x, xa, w, a, b, 1.0, 0.0, 0, ALL)
    assert len({_storage(g) for g in grads}) == 4 and not ({_storage(g) for g in grads} & (ptrs | {_storage(dy)}))
