"""LoRA where users put it (issue 16, part 1): embedding tables and GPT-2 Conv1D.

* ``lora_embedding`` / ``LoRAEmbedding`` (ops/embedding.py) on the torch and Triton backends (the interpreter on the
  CPU, fp32/fp16) against the float64 reference: outputs and every gradient (dA through a scatter-add over the ids,
  padding_idx and scale_grad_by_freq as nn.Embedding), awkward shapes (M = 0, 1, rank 1, odd V/D, strided tables
  and adapters), outputs NaN-poisoned before the kernels write them, opcheck, one test per error message.
* ``add_lora_embedding`` (serving): mixed batches (ids -1, several adapters, per-adapter ranks, a [L, V, r] storage
  passed as a transposed view) against the reference.
* GPT-2 ``Conv1D`` in ``LoRALinear`` (the weight's transposed view, no copy) on both backends, merge / unmerge.
* Against PEFT 0.21.2: a tiny GPT-2 (Conv1D targets, fan_in_fan_out) and a tiny Llama (embed_tokens, lm_head and
  q_proj targets): outputs, every LoRA gradient, save with lora_kernels -> load in PEFT and the reverse; the tied
  lm_head warning and the refusal to merge a tied table.
"""

import math
import warnings

import pytest
import torch
from conftest import HAS_CUDA, TOL, assert_close_rel, assert_fa_rule, poison_
from torch import nn

import lora_kernels as lk
from lora_kernels import LoRAInputError
from lora_kernels import peft_io
from lora_kernels import reference as ref
from lora_kernels.triton import embedding as temb

DEV = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["torch", "triton"]


def _poison_triton(monkeypatch):
    monkeypatch.setattr(temb, "_alloc", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype,
                                                                                          device=device)))


def _layout(t, kind):
    """t itself, or the same values through a transposed storage (non-contiguous)."""
    return t if kind == "contig" else t.t().contiguous().t()


def _ref_grads(ids, w, a, b, scale, padding_idx, by_freq, dy):
    """y and (dA, dB) by autograd through the float64 reference (scale_grad_by_freq through F.embedding's own)."""
    a64 = a.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    if by_freq:
        xa = nn.functional.embedding(ids, a64.t(), padding_idx=padding_idx, scale_grad_by_freq=True)
        y = w.double()[ids] + scale * xa @ b64.t()
    else:
        y = ref.lora_embedding_ref(ids, w.double(), a64, b64, scale, padding_idx)
    y.backward(dy.double())
    return y.detach(), a64.grad, b64.grad


def _lowp(ids, w, a, b, scale, padding_idx, dy):
    """The same layer by plain torch autograd in the inputs' own precision (the FlashAttention rule's baseline)."""
    a_, b_ = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y = nn.functional.embedding(ids, w) + scale * nn.functional.embedding(ids, a_.t(), padding_idx=padding_idx) @ b_.t()
    y.backward(dy)
    return y.detach(), a_.grad, b_.grad


# ------------------------------------------------------------------------------------------------
# lora_embedding: outputs and gradients vs the float64 reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("V,D,r,shape", [(37, 19, 5, (3, 7)), (1, 1, 1, (1,)), (50, 33, 16, (0,)), (29, 40, 1, (2, 1, 5)),
                                         (64, 24, 33, (41,))])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_lora_embedding_vs_reference(backend, dtype, V, D, r, shape, padding_idx, monkeypatch):
    if padding_idx is not None and padding_idx >= V:
        padding_idx = None
    gen = torch.Generator().manual_seed(V * 7 + D + r)
    w = torch.randn(V, D, generator=gen).to(dtype)
    a = (torch.randn(r, V, generator=gen) / math.sqrt(r)).to(dtype)
    b = torch.randn(D, r, generator=gen).to(dtype)
    ids = torch.randint(0, V, shape, generator=gen)
    if ids.numel() > 2 and padding_idx is not None:
        ids.view(-1)[:2] = padding_idx  # padding tokens in the batch (twice)
    dy = torch.randn(*shape, D, generator=gen).to(dtype)
    w, a, b, ids, dy = (t.to(DEV) for t in (w, a, b, ids, dy))
    if backend == "triton":
        _poison_triton(monkeypatch)
    a_p, b_p = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = lk.lora_embedding(ids, w, a_p, b_p, 0.7, padding_idx=padding_idx, backend=backend)
    assert y.shape == (*shape, D) and y.dtype == dtype
    y.backward(dy)
    y64, da64, db64 = _ref_grads(ids, w, a, b, 0.7, padding_idx, False, dy)
    tol = TOL[dtype]
    assert_close_rel(y, y64, tol, f"y {backend} {dtype}")
    assert_close_rel(a_p.grad, da64, tol, f"dA {backend} {dtype}")
    assert_close_rel(b_p.grad, db64, tol, f"dB {backend} {dtype}")
    if padding_idx is not None:
        assert torch.all(a_p.grad[:, padding_idx] == 0), "padding tokens must give A no gradient"
    if dtype == torch.float16 and ids.numel():  # FlashAttention's rule against the same layer by torch in fp16
        ly, lda, ldb = (t.to(DEV) for t in _lowp(ids.cpu(), w.cpu(), a.cpu(), b.cpu(), 0.7, padding_idx, dy.cpu()))
        assert_fa_rule(y.detach(), y64, ly, "y fp16")
        assert_fa_rule(a_p.grad, da64, lda, "dA fp16")
        assert_fa_rule(b_p.grad, db64, ldb, "dB fp16")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contig", "transposed"])
def test_lora_embedding_strided_and_by_freq(backend, layout, monkeypatch):
    """Tables and adapters through transposed storage, ids with repeats under scale_grad_by_freq."""
    gen = torch.Generator().manual_seed(5)
    V, D, r = 23, 18, 6
    w = _layout(torch.randn(V, D, generator=gen), layout).to(DEV)
    a = _layout(torch.randn(r, V, generator=gen), layout).to(DEV)
    b = _layout(torch.randn(D, r, generator=gen), layout).to(DEV)
    ids = torch.tensor([[1, 4, 4, 9, 1, 1], [22, 0, 4, 7, 7, 3]]).to(DEV)
    ids_nc = ids.t().contiguous().t()  # non-contiguous ids too
    dy = torch.randn(2, 6, D, generator=gen).to(DEV)
    if backend == "triton":
        _poison_triton(monkeypatch)
    a_p, b_p = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y = lk.lora_embedding(ids_nc, w, a_p, b_p, -1.3, padding_idx=7, scale_grad_by_freq=True, backend=backend)
    y.backward(dy)
    y64, da64, db64 = _ref_grads(ids, w, a, b, -1.3, 7, True, dy)
    assert_close_rel(y, y64, TOL[torch.float32], "y")
    assert_close_rel(a_p.grad, da64, TOL[torch.float32], "dA (by freq)")
    assert_close_rel(b_p.grad, db64, TOL[torch.float32], "dB")


def test_lora_embedding_fp64_and_bf16_on_torch():
    gen = torch.Generator().manual_seed(11)
    V, D, r = 31, 12, 4
    ids = torch.randint(0, V, (9,), generator=gen)
    for dtype in (torch.float64, torch.bfloat16):
        w, a, b = (torch.randn(*s, generator=gen).to(dtype) for s in ((V, D), (r, V), (D, r)))
        dy = torch.randn(9, D, generator=gen).to(dtype)
        a_p, b_p = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = lk.lora_embedding(ids, w, a_p, b_p, 0.5, backend="torch")
        y.backward(dy)
        y64, da64, db64 = _ref_grads(ids, w, a, b, 0.5, None, False, dy)
        for got, exp, what in ((y, y64, "y"), (a_p.grad, da64, "dA"), (b_p.grad, db64, "dB")):
            assert_close_rel(got, exp, TOL[dtype], f"{what} {dtype}")


def test_lora_embedding_trainable_table_gets_nn_embedding_grad():
    gen = torch.Generator().manual_seed(2)
    V, D, r = 13, 8, 3
    w = torch.randn(V, D, generator=gen, requires_grad=True)
    a, b = torch.randn(r, V, generator=gen), torch.randn(D, r, generator=gen)
    ids = torch.tensor([0, 5, 5, 12, 2])
    dy = torch.randn(5, D, generator=gen)
    lk.lora_embedding(ids, w, a, b, 2.0, padding_idx=2, backend="torch").backward(dy)
    w2 = w.detach().clone().requires_grad_(True)
    nn.functional.embedding(ids, w2, padding_idx=2).backward(dy)
    assert torch.equal(w.grad, w2.grad)


def test_lora_embedding_mixed_adapter_dtype_casts_to_table():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(11, 6, generator=gen).half()
    a = torch.randn(2, 11, generator=gen, requires_grad=True)  # fp32 adapters on an fp16 table
    b = torch.randn(6, 2, generator=gen, requires_grad=True)
    ids = torch.tensor([3, 10, 0])
    y = lk.lora_embedding(ids, w, a, b, 1.0, backend="torch")
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert_close_rel(y, ref.lora_embedding_ref(ids, w.double(), a.detach().half().double(),
                                               b.detach().half().double(), 1.0), TOL[torch.float16], "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_embedding_opcheck(backend):
    gen = torch.Generator().manual_seed(4)
    w, a, b = torch.randn(17, 9, generator=gen), torch.randn(3, 17, generator=gen), torch.randn(9, 3, generator=gen)
    ids = torch.tensor([0, 16, 4, 4, 2])
    torch.library.opcheck(torch.ops.lora_kernels.lora_embedding_fwd.default, (ids, w, a, b, 0.5, backend))
    dy = torch.randn(5, 9, generator=gen)
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(torch.ops.lora_kernels.lora_embedding_bwd.default,
                              (dy, ids, a, b, 0.5, 4, False, mask, backend))
    torch.library.opcheck(torch.ops.lora_kernels.lora_embedding_bwd.default,
                          (dy, ids, a, b, 0.5, -1, True, [True, True], backend))
    y = torch.randn(5, 9, generator=gen)
    A, B = torch.randn(2, 3, 17, generator=gen), torch.randn(2, 9, 3, generator=gen)
    torch.library.opcheck(torch.ops.lora_kernels.add_lora_embedding_.default,
                          (y, ids, A, B, torch.tensor([0, -1, 1, 1, 0]), torch.rand(2), torch.tensor([3, 1]), backend))


def _emb_args(**kw):
    gen = torch.Generator().manual_seed(0)
    args = dict(ids=torch.tensor([0, 3, 9]), weight=torch.randn(10, 4, generator=gen),
                lora_a=torch.randn(2, 10, generator=gen), lora_b=torch.randn(4, 2, generator=gen), scale=1.0)
    args.update(kw)
    return args


@pytest.mark.parametrize("kw,msg", [
    (dict(ids=torch.tensor([0, 10])), r"ids out of range: token ids must be in \[0, V=10\).*max 10"),
    (dict(ids=torch.tensor([-1, 2])), r"ids out of range.*min -1"),
    (dict(ids=torch.tensor([0.0, 1.0])), "ids must be an int32 or int64 tensor"),
    (dict(lora_a=torch.randn(2, 9)), r"lora_a must be \[r, V=10\]"),
    (dict(lora_b=torch.randn(5, 2)), r"lora_b must be \[D=4, r\]"),
    (dict(lora_b=torch.randn(4, 3)), "rank mismatch"),
    (dict(weight=torch.randn(10)), r"weight must be 2-D \[V, D\]"),
    (dict(scale=float("nan")), "scale must be finite"),
    (dict(lora_b=torch.randn(4, 2, dtype=torch.float64)), "lora_a dtype torch.float32 and lora_b dtype"),
])
def test_lora_embedding_errors(kw, msg):
    args = _emb_args(**kw)
    with pytest.raises(LoRAInputError, match=msg):
        lk.lora_embedding(args["ids"], args["weight"], args["lora_a"], args["lora_b"], args["scale"], backend="torch")


def test_lora_embedding_padding_idx_error():
    args = _emb_args()
    with pytest.raises(LoRAInputError, match=r"padding_idx must be an int in \[-10, 10\)"):
        lk.lora_embedding(args["ids"], args["weight"], args["lora_a"], args["lora_b"], 1.0, padding_idx=10)


# ------------------------------------------------------------------------------------------------
# Serving: add_lora_embedding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,V,D,r_max,ranks", [(0, 9, 8, 4, None), (1, 5, 3, 1, None), (23, 41, 37, 16, "mixed"),
                                               (12, 17, 64, 40, None)])
@pytest.mark.parametrize("a_storage", ["LrV", "LVr"])
def test_add_lora_embedding_mixed_batch(backend, dtype, M, V, D, r_max, ranks, a_storage):
    gen = torch.Generator().manual_seed(M + V * 3 + D + r_max)
    L = 3
    if a_storage == "LrV":
        A = torch.randn(L, r_max, V, generator=gen).to(dtype)
    else:  # vLLM-style [L, V, r] storage, passed as a transposed view (no copy)
        A = torch.randn(L, V, r_max, generator=gen).to(dtype).transpose(1, 2)
    B = torch.randn(L, D, r_max, generator=gen).to(dtype)
    tok = torch.randint(0, V, (M,), generator=gen)
    aid = torch.randint(-1, L, (M,), generator=gen)
    if M > 3:
        aid[:4] = torch.tensor([-1, 0, 1, 2])  # every adapter and a token without one
    rk = torch.tensor([r_max, max(r_max // 3, 1), 0]) if ranks == "mixed" else None
    scales = torch.tensor([0.5, -1.25, 2.0])
    y0 = torch.randn(M, D, generator=gen).to(dtype)
    y0, A, B, tok, aid, scales = (t.to(DEV) for t in (y0, A, B, tok, aid, scales))
    rk = rk.to(DEV) if rk is not None else None
    y = y0.clone()
    out = lk.add_lora_embedding(y, tok, A, B, aid, scales, rk, backend=backend)
    assert out is y
    expected = ref.add_lora_embedding_ref(y0.double().clone(), tok, A.double(), B.double(), aid, scales.double(), rk)
    assert_close_rel(y, expected, TOL[dtype], f"add_lora_embedding {backend} {dtype}")
    untouched = aid < 0
    if rk is not None:
        untouched |= (aid == 2)  # rank 0
    assert torch.equal(y[untouched], y0[untouched]), "rows without an adapter (or rank 0) must be untouched"


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_lora_embedding_equals_per_adapter_lora_embedding(backend):
    """A mixed batch equals each adapter's own lora_embedding on its tokens (the training op as the oracle)."""
    gen = torch.Generator().manual_seed(8)
    V, D, r, L = 19, 10, 4, 2
    w = torch.randn(V, D, generator=gen)
    A, B = torch.randn(L, r, V, generator=gen), torch.randn(L, D, r, generator=gen)
    scales = torch.tensor([0.5, 3.0])
    tok = torch.randint(0, V, (11,), generator=gen)
    aid = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1, 0, 1])
    y = w[tok].clone()
    lk.add_lora_embedding(y, tok, A, B, aid, scales, backend=backend)
    for t in range(11):
        i = int(aid[t])
        exp = w[tok[t]] if i < 0 else lk.lora_embedding(tok[t:t + 1], w, A[i], B[i], float(scales[i]), backend="torch")[0]
        assert_close_rel(y[t], exp, TOL[torch.float32], f"token {t}")


def _serve_args(**kw):
    gen = torch.Generator().manual_seed(0)
    args = dict(y=torch.randn(4, 6, generator=gen), token_ids=torch.tensor([0, 1, 2, 8]),
                lora_a=torch.randn(2, 3, 9, generator=gen), lora_b=torch.randn(2, 6, 3, generator=gen),
                adapter_ids=torch.tensor([0, -1, 1, 1]), scales=torch.ones(2), ranks=None)
    args.update(kw)
    return args


@pytest.mark.parametrize("kw,msg", [
    (dict(token_ids=torch.tensor([0, 1, 2, 9])), r"token_ids out of range: token ids must be in \[0, V=9\)"),
    (dict(token_ids=torch.tensor([0, 1, 2])), r"token_ids must be \[M=4\]"),
    (dict(adapter_ids=torch.tensor([0, -1, 2, 1])), r"adapter id out of range.*\[-1, L=2\)"),
    (dict(adapter_ids=torch.tensor([0, -2, 1, 1])), "adapter id out of range"),
    (dict(lora_a=torch.randn(2, 4, 9)), r"lora_a must be \[L=2, r_max=3, V\]"),
    (dict(lora_b=torch.randn(2, 5, 3)), r"lora_b must be \[L, D=6, r_max\]"),
    (dict(scales=torch.ones(3)), r"scales must be a 1-D tensor \[L=2\]"),
    (dict(scales=torch.tensor([1.0, float("inf")])), "scales must be finite"),
    (dict(ranks=torch.tensor([4, 1])), r"ranks must be in \[0, r_max=3\]"),
    (dict(y=torch.randn(4, 1).expand(4, 6)), "share memory"),
])
def test_add_lora_embedding_errors_leave_y_untouched(kw, msg):
    args = _serve_args(**kw)
    before = args["y"].clone()
    with pytest.raises(LoRAInputError, match=msg):
        lk.add_lora_embedding(**args, backend="torch")
    assert torch.equal(args["y"], before)


# ------------------------------------------------------------------------------------------------
# LoRAEmbedding module: merge / unmerge, construction errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lora_embedding_module_merge_unmerge_exact(dtype):
    torch.manual_seed(0)
    base = nn.Embedding(29, 12, padding_idx=1).to(dtype)
    layer = lk.LoRAEmbedding(base, r=4, alpha=8)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert torch.all(layer.lora_embedding_A == 0), "PEFT initialisation: A = 0 (a fresh layer equals the base)"
    ids = torch.randint(0, 29, (3, 5))
    assert torch.equal(layer(ids), base(ids))
    with torch.no_grad():
        layer.lora_embedding_A.normal_()
    w0 = base.weight.detach().clone()
    y = layer(ids)
    layer.merge()
    assert layer.merged and not torch.equal(base.weight, w0)
    tol = TOL[torch.float32] if dtype == torch.float32 else 2e-2
    assert_close_rel(layer(ids), y, tol, "merged forward")
    layer.unmerge()
    assert torch.equal(base.weight, w0), "unmerge must restore the table bit for bit"


def test_lora_embedding_module_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="max_norm"):
        lk.LoRAEmbedding(nn.Embedding(5, 3, max_norm=1.0), 2, 2)
    with pytest.raises(ValueError, match="sparse"):
        lk.LoRAEmbedding(nn.Embedding(5, 3, sparse=True), 2, 2)

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    with pytest.raises(TypeError, match="Scaled overrides nn.Embedding.forward"):
        lk.LoRAEmbedding(Scaled(5, 3), 2, 2)
    with pytest.raises(TypeError, match="LoRAEmbedding wraps an nn.Embedding"):
        lk.LoRAEmbedding(nn.Linear(3, 3), 2, 2)


def test_inject_lora_refuses_convolutions_by_name():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, dilation=2))
    with pytest.raises(TypeError, match=r"module '0' \(Conv1d\): LoRA on this convolution is not supported"):
        lk.inject_lora(model, ["0"], r=2, alpha=2)
    with pytest.raises(TypeError, match=r"module '1' \(Conv2d\): supports groups=1.*got groups=2"):
        lk.inject_lora(model, ["1"], r=2, alpha=2)
    with pytest.raises(TypeError, match=r"module '2' \(Conv2d\): .*dilation=\(2, 2\)"):
        lk.inject_lora(model, ["2"], r=2, alpha=2)
    assert isinstance(model[1], nn.Conv2d), "a refused injection leaves the model as it was"
    with pytest.raises(TypeError, match="LoRALinear wraps an nn.Linear or a transformers Conv1D, got Conv2d; for a 2-D "
                                        "convolution use lora_kernels.LoRAConv2d"):
        lk.LoRALinear(nn.Conv2d(3, 4, 1), 2, 2)
    with pytest.raises(TypeError, match="got Conv1d; LoRA on this convolution is not supported"):
        lk.LoRALinear(nn.Conv1d(3, 4, 1), 2, 2)


# ------------------------------------------------------------------------------------------------
# nn.Conv2d: LoRAConv2d (a conv pair: A with the base's kernel/stride/padding, B 1x1)
# ------------------------------------------------------------------------------------------------


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, (3, 2), stride=2, bias=False)
        self.conv3 = nn.Conv2d(6, 5, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = self.conv3(h).mean((2, 3))
        return self.head(h)


def test_lora_conv2d_vs_float64_and_exact_merge():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 7, (3, 2), stride=(2, 1), padding=1)
    layer = lk.LoRAConv2d(conv, r=3, alpha=6)
    assert layer.weight is conv.weight and layer.lora_A.shape == (3, 4, 3, 2) and layer.lora_B.shape == (7, 3, 1, 1)
    x = torch.randn(2, 4, 9, 6, requires_grad=True)
    assert torch.equal(layer(x), conv(x)), "B = 0: a fresh layer equals the base"
    with torch.no_grad():
        layer.lora_B.normal_()
    dy = torch.randn_like(conv(x))
    y = layer(x)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    F = nn.functional
    y64 = F.conv2d(x64, conv.weight.double(), conv.bias.double(), (2, 1), 1) + 2.0 * F.conv2d(
        F.conv2d(x64, a64, None, (2, 1), 1), b64)
    y64.backward(dy.double())
    for got, exp, what in ((y, y64, "y"), (x.grad, x64.grad, "dx"), (layer.lora_A.grad, a64.grad, "dA"),
                           (layer.lora_B.grad, b64.grad, "dB")):
        assert_close_rel(got, exp, TOL[torch.float32], what)
    for dtype in (torch.float32, torch.bfloat16):
        c = nn.Conv2d(4, 7, 3, padding=1).to(dtype)
        lc = lk.LoRAConv2d(c, r=2, alpha=2)
        with torch.no_grad():
            lc.lora_B.normal_()
        w0 = c.weight.detach().clone()
        xx = torch.randn(1, 4, 5, 5).to(dtype)
        yy = lc(xx)
        lc.merge()
        assert_close_rel(lc(xx), yy, 1e-5 if dtype == torch.float32 else 2e-2, f"merged {dtype}")
        lc.unmerge()
        assert torch.equal(c.weight, w0), f"unmerge must restore the kernel bit for bit ({dtype})"


def test_conv2d_merge_and_unload_gives_plain_conv2d():
    model = _ConvNet()
    x = torch.randn(2, 3, 10, 8, generator=torch.Generator().manual_seed(4))
    y0 = model(x)
    lk.inject_lora(model, ["conv1", "conv2"], r=3, alpha=3)
    with torch.no_grad():
        for m in (model.conv1, model.conv2):
            m.lora_B.normal_()
    y = model(x)
    w1 = model.conv1.weight
    lk.merge_and_unload(model)
    assert type(model.conv1) is nn.Conv2d and type(model.conv2) is nn.Conv2d and model.conv1.weight is w1
    assert_close_rel(model(x), y, TOL[torch.float32], "merged and unloaded")
    base = _ConvNet()
    lk.inject_lora(base, ["conv2"], r=2, alpha=2)
    with torch.no_grad():
        base.conv2.lora_B.normal_()
    base.conv2.merge()
    lk.unload(base)
    assert type(base.conv2) is nn.Conv2d and torch.equal(base(x), y0), "unload restores the base bit for bit"


def test_conv2d_vs_peft_outputs_grads_and_round_trips(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = ["conv1", "conv2", "conv3", "head"]
    pm = get_peft_model(_ConvNet(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomise_peft_adapters(pm, seed=7)
    ours, _ = _ours_from_peft(_ConvNet, targets, pm, 4, 8, tmp_path)
    assert isinstance(ours.conv2, lk.LoRAConv2d) and isinstance(ours.head, lk.LoRALinear)
    x = torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(3))
    y_peft, y_ours = pm(x), ours(x)
    assert_close_rel(y_ours, y_peft, TOL[torch.float32], "outputs")
    y_peft.square().mean().backward()
    y_ours.square().mean().backward()
    _compare_grads(ours, pm)
    path = str(tmp_path / "ours")
    peft_io.save_peft_adapter(ours, path)
    pm2 = PeftModel.from_pretrained(_ConvNet(), path)
    assert_close_rel(pm2(x), y_ours, TOL[torch.float32], "ours saved -> PEFT loaded")


# ------------------------------------------------------------------------------------------------
# GPT-2 Conv1D in LoRALinear
# ------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv1d_lora_linear_vs_reference(backend, dtype):
    """Conv1D [K, N] reaches the op as weight.t() (a strided view): forward and every gradient vs float64."""
    torch.manual_seed(1)
    K, N, r = 21, 30, 5
    conv = Conv1D(N, K).to(dtype)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    layer = lk.LoRALinear(conv, r=r, alpha=10, backend=backend).to(DEV)
    assert layer.fan_in_fan_out and layer.weight is conv.weight and (layer.in_features, layer.out_features) == (K, N)
    assert layer.weight_nk.data_ptr() == conv.weight.data_ptr(), "the [N, K] view must not copy the weight"
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, K, device=DEV).to(dtype).requires_grad_(True)
    dy = torch.randn(3, 7, N, device=DEV).to(dtype)
    y = layer(x)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    y64 = x64 @ conv.weight.double() + conv.bias.double() + layer.scale * (x64 @ a64.t()) @ b64.t()
    y64.backward(dy.double())
    tol = TOL[dtype]
    assert_close_rel(y, y64, tol, "y")
    assert_close_rel(x.grad, x64.grad, tol, "dx")
    assert_close_rel(layer.lora_A.grad, a64.grad, tol, "dA")
    assert_close_rel(layer.lora_B.grad, b64.grad, tol, "dB")
    assert conv.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_merge_into_its_own_parameter(dtype):
    torch.manual_seed(2)
    conv = Conv1D(12, 9).to(dtype)
    layer = lk.LoRALinear(conv, r=3, alpha=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = conv.weight.detach().clone()
    x = torch.randn(4, 9).to(dtype)
    y = layer(x)
    layer.merge()
    delta = (layer.scale * layer.lora_B.double() @ layer.lora_A.double()).t()  # [K, N], Conv1D's layout
    assert_close_rel(conv.weight.double() - w0.double(), delta, 1e-5 if dtype == torch.float32 else 1e-2, "ΔW")
    assert_close_rel(layer(x), y, 1e-5 if dtype == torch.float32 else 2e-2, "merged forward")
    layer.unmerge()
    assert torch.equal(conv.weight, w0)


# ------------------------------------------------------------------------------------------------
# Against PEFT: tiny GPT-2 (Conv1D) and tiny Llama (embed_tokens, lm_head)
# ------------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=48, n_positions=32, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _llama(tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _randomise_peft_adapters(pm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _ours_from_peft(make, targets, pm, r, alpha, tmp_path, **inject):
    """Save the PEFT model's adapter, inject ours into a fresh base, load it: (our model, adapter dir)."""
    path = str(tmp_path / "from_peft")
    pm.save_pretrained(path)
    ours = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lk.inject_lora(ours, targets, r=r, alpha=alpha, **inject)
    peft_io.load_peft_adapter_(ours, path)
    return ours, path


def _lora_grads(model, prefix_from, peft_names=False):
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None or "lora_" not in name:
            continue
        key = name.replace("base_model.model.", "").replace(".default", "").replace(".weight", "")
        out[key] = p.grad
    return out


def _compare_grads(ours, pm):
    g_ours = _lora_grads(ours, "")
    g_peft = _lora_grads(pm, "")
    assert g_peft and set(g_ours) == set(g_peft), (sorted(g_ours)[:4], sorted(g_peft)[:4])
    for k in g_peft:
        assert_close_rel(g_ours[k], g_peft[k], TOL[torch.float32], f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_conv1d_vs_peft_outputs_grads_and_round_trips(backend, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = ["c_attn", "c_proj", "c_fc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "fan_in_fan_out is set to False but the target module is Conv1D"
        pm = get_peft_model(_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True))
    _randomise_peft_adapters(pm)
    ours, _ = _ours_from_peft(_gpt2, targets, pm, 4, 8, tmp_path, backend=backend)
    assert isinstance(ours.transformer.h[0].attn.c_attn, lk.LoRALinear)
    ids = torch.randint(0, 48, (2, 6), generator=torch.Generator().manual_seed(1))
    y_peft = pm(ids).logits
    y_ours = ours(ids).logits
    assert_close_rel(y_ours, y_peft, TOL[torch.float32], "logits")
    y_peft.square().mean().backward()
    y_ours.square().mean().backward()
    _compare_grads(ours, pm)
    # ours -> PEFT
    path = str(tmp_path / "ours")
    cfg = peft_io.save_peft_adapter(ours, path)
    assert cfg["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm2 = PeftModel.from_pretrained(_gpt2(), path).eval()
    assert_close_rel(pm2(ids).logits, y_ours, TOL[torch.float32], "ours saved -> PEFT loaded")


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_embedding_and_lm_head_vs_peft(backend, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = ["embed_tokens", "lm_head", "q_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomise_peft_adapters(pm, seed=3)
    ours, _ = _ours_from_peft(_llama, targets, pm, 4, 8, tmp_path, backend=backend)
    emb = ours.model.embed_tokens
    assert isinstance(emb, lk.LoRAEmbedding) and isinstance(ours.lm_head, lk.LoRALinear)
    assert emb.padding_idx == 0
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(2))
    ids[0, :2] = 0  # padding tokens: no gradient to A's column 0, in PEFT and here
    y_peft = pm(ids).logits
    y_ours = ours(ids).logits
    assert_close_rel(y_ours, y_peft, TOL[torch.float32], "logits")
    y_peft.square().mean().backward()
    y_ours.square().mean().backward()
    _compare_grads(ours, pm)
    assert torch.all(emb.lora_embedding_A.grad[:, 0] == 0)
    # ours -> PEFT
    path = str(tmp_path / "ours")
    peft_io.save_peft_adapter(ours, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm2 = PeftModel.from_pretrained(_llama(), path).eval()
    assert_close_rel(pm2(ids).logits, y_ours, TOL[torch.float32], "ours saved -> PEFT loaded")
    # read_peft_adapter: the embedding module as (A [r, V], B [D, r], scale)
    _, adapters = peft_io.read_peft_adapter(path)
    a, b, s = adapters["model.embed_tokens"]
    assert a.shape == (4, 40) and b.shape == (16, 4) and s == 2.0


def test_tied_lm_head_warns_and_merge_refuses():
    model = _llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(UserWarning, match=r"lm_head.weight is tied to model.embed_tokens.weight"):
        lk.inject_lora(model, ["lm_head"], r=2, alpha=2)
    with pytest.warns(UserWarning, match=r"model.embed_tokens.weight is tied to lm_head.weight"):
        lk.inject_lora(model, ["embed_tokens"], r=2, alpha=2)
    w0 = model.model.embed_tokens.weight.detach().clone()
    for layer in (model.lm_head, model.model.embed_tokens):
        with torch.no_grad():
            layer.lora_B.normal_()
            layer.lora_A.normal_()
        with pytest.raises(LoRAInputError, match="tied to"):
            layer.merge()
        assert torch.equal(model.model.embed_tokens.weight, w0), "a refused merge must leave the table untouched"
    with pytest.warns(UserWarning, match=r"merge\(allow_tied=True\)"):
        model.model.embed_tokens.merge(allow_tied=True)
    model.model.embed_tokens.unmerge()
    assert torch.equal(model.model.embed_tokens.weight, w0)


def test_tied_lm_head_adapter_from_peft_loads(tmp_path):
    """PEFT saves a targeted lm_head's base weight (``lm_head.base_layer.weight``); with tied embeddings our model
    names that parameter ``lm_head.weight`` only as a duplicate, which the loader must still find."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_llama(tied=True), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
        _randomise_peft_adapters(pm, seed=5)
        ours, _ = _ours_from_peft(lambda: _llama(tied=True), ["lm_head", "q_proj"], pm, 4, 8, tmp_path)
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(6))
    assert_close_rel(ours(ids).logits, pm(ids).logits, TOL[torch.float32], "tied lm_head logits")


def test_lora_only_state_dict_and_trainable_cover_embedding_and_conv2d():
    model = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lk.inject_lora(model, ["embed_tokens", "q_proj"], r=2, alpha=2)
    sd = lk.lora_state_dict(model, bias="lora_only")
    assert {"model.embed_tokens.lora_embedding_A", "model.embed_tokens.lora_embedding_B"} <= set(sd)
    assert set(sd) == set(lk.lora_state_dict(model, bias="none"))  # no biases in this model
    net = _ConvNet()
    lk.inject_lora(net, ["conv1", "conv2"], r=2, alpha=2)
    sd = lk.lora_state_dict(net, bias="lora_only")
    assert {"conv1.lora_A", "conv1.lora_B", "conv1.bias", "conv2.lora_A", "conv2.lora_B"} <= set(sd)
    assert "conv3.bias" not in sd and "head.bias" not in sd
    lk.mark_only_lora_as_trainable(net, bias="lora_only")
    assert net.conv1.bias.requires_grad and not net.conv3.bias.requires_grad and not net.conv1.weight.requires_grad


def test_lora_embedding_compiles_fullgraph():
    """The ops' schemas and fakes carry LoRAEmbedding through torch.compile without a graph break (aot_eager)."""
    torch.manual_seed(0)
    layer = lk.LoRAEmbedding(nn.Embedding(31, 8, padding_idx=0), r=4, alpha=4)
    with torch.no_grad():
        layer.lora_embedding_A.normal_()
    ids = torch.randint(0, 31, (3, 5))
    dy = torch.randn(3, 5, 8)
    y_eager = layer(ids)
    y_eager.backward(dy)
    g_eager = (layer.lora_embedding_A.grad.clone(), layer.lora_embedding_B.grad.clone())
    layer.zero_grad()
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(ids)
    y.backward(dy)
    assert torch.equal(y, y_eager)
    assert torch.equal(layer.lora_embedding_A.grad, g_eager[0]) and torch.equal(layer.lora_embedding_B.grad, g_eager[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_serving_embedding_and_lm_head_mixed_batch_vs_peft(backend, tmp_path):
    """Two PEFT adapters (ranks 4 and 2) on embed_tokens and lm_head, read with peft_io and stacked (rank-padded):
    one batch mixing both and tokens without an adapter equals each token's own PEFT adapter (base for id -1), for
    the embedding rows (add_lora_embedding) and the logits rows (add_lora on the hidden rows)."""
    from peft import LoraConfig, get_peft_model

    paths, pms = [], []
    for i, r in enumerate((4, 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(_llama(), LoraConfig(r=r, lora_alpha=2 * r + i, target_modules=["embed_tokens", "lm_head"]))
        _randomise_peft_adapters(pm, seed=10 + i)
        path = str(tmp_path / f"a{i}")
        pm.save_pretrained(path)
        paths.append(path)
        pms.append(pm.eval())
    read = [peft_io.read_peft_adapter(p)[1] for p in paths]
    r_max, L = 4, 2

    def stack(path, which):  # [L, r_max, K] for A, [L, N, r_max] for B, zero-padded past each rank
        ts = [a[path][which] for a in read]
        if which == 0:
            return torch.stack([torch.cat([t, t.new_zeros(r_max - t.shape[0], t.shape[1])]) for t in ts])
        return torch.stack([torch.cat([t, t.new_zeros(t.shape[0], r_max - t.shape[1])], 1) for t in ts])

    scales = torch.tensor([a["model.embed_tokens"][2] for a in read])
    ranks = torch.tensor([4, 2])
    tok = torch.tensor([5, 0, 17, 39, 5, 22, 8, 1, 30])
    ids = torch.tensor([0, 1, -1, 1, 1, 0, -1, 0, 1])
    base = _llama()
    W = base.model.embed_tokens.weight.detach()
    y = W[tok].clone()
    lk.add_lora_embedding(y, tok, stack("model.embed_tokens", 0), stack("model.embed_tokens", 1), ids, scales, ranks,
                          backend=backend)
    h = torch.randn(9, 16, generator=torch.Generator().manual_seed(0))
    logits = h @ base.lm_head.weight.detach().t()
    lk.add_lora(logits, h, stack("lm_head", 0), stack("lm_head", 1), ids, torch.tensor([a["lm_head"][2] for a in read]),
                ranks, backend=backend)
    with torch.no_grad():
        for t in range(9):
            i = int(ids[t])
            if i < 0:
                e_exp, l_exp = W[tok[t]], h[t] @ base.lm_head.weight.t()
            else:
                m = pms[i].base_model.model
                e_exp, l_exp = m.model.embed_tokens(tok[t:t + 1])[0], m.lm_head(h[t:t + 1])[0]
            assert_close_rel(y[t], e_exp, TOL[torch.float32], f"embedding row {t} (adapter {i})")
            assert_close_rel(logits[t], l_exp, TOL[torch.float32], f"logits row {t} (adapter {i})")
