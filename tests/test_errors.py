"""Every bad input raises a clear error before any kernel runs or anything is written."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels import LoRAInputError


def _linear_inputs(M=4, K=8, N=6, r=2, dtype=torch.float32):
    return (torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(r, K, dtype=dtype),
            torch.randn(N, r, dtype=dtype))


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda a: a.update(x=torch.randn(4, 9)), r"x has 9 features .* \(expects K=8\)"),
        (lambda a: a.update(weight=torch.randn(6, 8, 1)), r"weight must be 2-D \[N, K\]"),
        (lambda a: a.update(lora_a=torch.randn(2, 7)), r"lora_a must be \[r, K=8\]"),
        (lambda a: a.update(lora_b=torch.randn(5, 2)), r"lora_b must be \[N=6, r\]"),
        (lambda a: a.update(lora_b=torch.randn(6, 3)), r"rank mismatch: lora_a has r=2 rows but lora_b has 3"),
        (lambda a: a.update(bias=torch.randn(5)), r"bias must be \[N=6\]"),
        (lambda a: a.update(weight=torch.randn(6, 8, dtype=torch.float64)), r"weight dtype torch.float64 must equal x dtype"),
        (lambda a: a.update(x=torch.randint(0, 3, (4, 8))), r"x must have a floating dtype"),
        (lambda a: a.update(scale=float("nan")), r"scale must be finite, got nan"),
        (lambda a: a.update(scale=float("inf")), r"scale must be finite, got inf"),
        (lambda a: a.update(scale="2"), r"scale must be a real number"),
        (lambda a: a.update(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        (lambda a: a.update(lora_a=torch.randn(0, 8), lora_b=torch.randn(6, 0)), r"rank must be at least 1"),
        (lambda a: a.update(bias=torch.randn(6, device="meta")), r"all tensors must be on one device"),
    ],
)
def test_lora_linear_bad_inputs(mutate, msg):
    x, W, A, B = _linear_inputs()
    args = dict(x=x, weight=W, lora_a=A, lora_b=B, scale=1.0, bias=None, dropout_p=0.0)
    mutate(args)
    with pytest.raises(LoRAInputError, match=msg):
        lk.lora_linear(args["x"], args["weight"], args["lora_a"], args["lora_b"], args["scale"], args["bias"],
                       dropout_p=args["dropout_p"])


def _multi_inputs(M=5, K=8, L=3, r=4, widths=(6,), dtype=torch.float32):
    x = torch.randn(M, K, dtype=dtype)
    y = torch.randn(M, sum(widths), dtype=dtype)
    As = [torch.randn(L, r, K, dtype=dtype) for _ in widths]
    Bs = [torch.randn(L, w, r, dtype=dtype) for w in widths]
    ids = torch.tensor([0, 1, -1, 2, 1][:M])
    return dict(y=y, x=x, lora_a=As, lora_b=Bs, adapter_ids=ids, scales=torch.ones(L), ranks=None, slices=None)


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda a: a.update(adapter_ids=torch.tensor([0, 1, 3, 2, 1])), r"adapter id out of range: ids must be in \[-1, L=3\), got min 0, max 3"),
        (lambda a: a.update(adapter_ids=torch.tensor([0, -2, 1, 2, 1])), r"adapter id out of range"),
        (lambda a: a.update(adapter_ids=torch.tensor([0.0, 1, 1, 2, 1])), r"adapter_ids must be int32 or int64"),
        (lambda a: a.update(adapter_ids=torch.tensor([0, 1])), r"adapter_ids must be \[M=5\]"),
        (lambda a: a.update(ranks=torch.tensor([4, 5, 1])), r"ranks must be in \[0, r_max=4\], got min 1, max 5"),
        (lambda a: a.update(ranks=torch.tensor([4, 4])), r"ranks must be \[L=3\]"),
        (lambda a: a.update(scales=torch.tensor([1.0, float("inf"), 1.0])), r"scales must be finite"),
        (lambda a: a.update(scales=torch.ones(2)), r"scales must be a 1-D tensor \[L=3\]"),
        (lambda a: a.update(x=torch.randn(5, 8, dtype=torch.float64)), r"x dtype torch.float64 must equal y dtype"),
        (lambda a: a.update(x=torch.randn(5, 7)), r"lora_a\[0\] must be \[L=3, r_max=4, K=7\]"),
        (lambda a: a.update(y=torch.randn(5, 7)), r"slice widths \[6\] sum to 6 but y has 7 columns"),
        (lambda a: a.update(lora_b=[torch.randn(3, 6, 5)]), r"lora_b\[0\] must be \[L=3, N_s, r_max=4\].*rank mismatch"),
        (lambda a: a.update(slices=[5]), r"slices \[5\] do not match the widths of lora_b \[6\]"),
        (lambda a: a.update(lora_b=[]), r"non-empty lists of equal length"),
        (lambda a: a.update(y=torch.randn(4, 6)), r"y must be 2-D \[M=5, N\]"),
        (lambda a: a.update(scales=torch.ones(3, device="meta")), r"all tensors must be on one device"),
        (lambda a: a.update(y=a["x"][:, :6]), r"y overlaps x in memory"),
        (lambda a: a.update(x=torch.randn(5, 16)[:, 8:]), None),
    ],
)
def test_add_lora_bad_inputs(mutate, msg):
    args = _multi_inputs()
    mutate(args)
    y_before = args["y"].clone()
    if msg is None:  # a valid variant of the same inputs: must not raise
        lk.add_lora(args["y"], args["x"], args["lora_a"], args["lora_b"], args["adapter_ids"], args["scales"],
                    args["ranks"], args["slices"])
        return
    with pytest.raises(LoRAInputError, match=msg):
        lk.add_lora(args["y"], args["x"], args["lora_a"], args["lora_b"], args["adapter_ids"], args["scales"],
                    args["ranks"], args["slices"])
    if args["y"].device.type == "cpu" and args["y"].shape == y_before.shape:
        assert torch.equal(args["y"], y_before), "y was written before the error"


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda a: a.update(lora_a=torch.randn(2, 7)), r"lora_a\[0\] must be \[r, K=8\]"),
        (lambda a: a.update(lora_b=torch.randn(5, 2)), r"lora_b\[0\] must be \[N=6, r\]"),
        (lambda a: a.update(lora_b=torch.randn(6, 3)), r"rank mismatch in adapter 0"),
        (lambda a: a.update(scale=float("nan")), r"scale must be finite"),
        (lambda a: a.update(scale=[1.0, 2.0]), r"need one scale per adapter"),
        (lambda a: a.update(lora_a=torch.randn(2, 8, device="meta")), r"adapter 0 is on meta.* but weight is on cpu"),
        (lambda a: a.update(lora_a=torch.randint(0, 2, (2, 8))), r"lora_a\[0\] must have a floating dtype"),
    ],
)
@pytest.mark.parametrize("fn", ["merge_", "unmerge_"])
def test_merge_bad_inputs_leave_weight_untouched(mutate, msg, fn):
    W = torch.randn(6, 8)
    args = dict(lora_a=torch.randn(2, 8), lora_b=torch.randn(6, 2), scale=0.5)
    mutate(args)
    W0 = W.clone()
    with pytest.raises(LoRAInputError, match=msg):
        getattr(lk, fn)(W, args["lora_a"], args["lora_b"], args["scale"])
    assert torch.equal(W, W0)


def test_merge_weight_shape_error():
    with pytest.raises(LoRAInputError, match=r"weight must be 2-D"):
        lk.merge_(torch.randn(6), torch.randn(2, 6), torch.randn(6, 2), 1.0)


def test_module_errors():
    base = torch.nn.Linear(8, 6)
    with pytest.raises(ValueError, match="rank r must be a positive int"):
        lk.LoRALinear(base, r=0, alpha=1)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        lk.LoRALinear(base, r=2, alpha=1, dropout=1.5)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        lk.LoRALinear(torch.nn.Conv1d(2, 2, 1), r=2, alpha=1)
    layer = lk.LoRALinear(base, r=2, alpha=4)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(ValueError, match="no nn.Linear in the model matches"):
        lk.inject_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["q_proj"], r=1, alpha=1)


@pytest.mark.parametrize("fn", ["merge_", "unmerge_", "merge_exact_"])
def test_merge_rejects_aliased_weight(fn):
    W = torch.zeros(1, 8).expand(6, 8)  # stride 0: every row is the same memory
    with pytest.raises(LoRAInputError, match=r"weight has stride 0 in dim 0"):
        getattr(lk, fn)(W, torch.randn(2, 8), torch.randn(6, 2), 0.5)
    assert torch.equal(W, torch.zeros(6, 8))


def test_memory_overlaps_is_exact_for_views():
    from lora_kernels._checks import memory_overlaps as overlaps

    buf = torch.randn(6, 14)
    assert overlaps(buf, buf[1:]) and overlaps(buf, buf.t()) and overlaps(buf[:, :8], buf[:, 4:12])
    assert not overlaps(buf[:, :8], buf[:, 8:])  # side by side in every row: interleaved but disjoint
    assert not overlaps(buf[:2], buf[3:]) and not overlaps(buf, torch.randn(6, 14))
    assert not overlaps(buf[1], buf[0::2])  # a dense row inside the span of a strided view that skips it
    assert overlaps(buf[2], buf[0::2])
    assert not overlaps(buf[:, ::2], buf[:, 1::2]) and overlaps(buf[:, ::2], buf[:, 2::2])
    assert not overlaps(buf[:0], buf)
