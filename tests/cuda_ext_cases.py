"""Test bodies of the CUDA extension's ops, shared by the GPU tests (tests/test_cuda_ext.py, device "cuda") and the
CPU-emulator tests (tests/test_cuda_emulated.py, device "cpu"). Each ``check_*`` runs one case on ``device``
against the float64 reference; the two test files only choose the parameter grids (the emulator's are smaller).
Not a test module itself (pytest collects ``test_*.py`` only).
"""

import pytest
import torch
from conftest import TOL, add_lora_lowp, assert_close_rel, assert_fa_rule, lora_linear_lowp

from lora_kernels import reference as ref
from lora_kernels.cuda import lora_linear as cuda_lora_linear

ops = torch.ops.lora_kernels


def rows(M, K, dtype, layout, device):
    """x [M, K] with the given memory layout: contiguous, padded rows (aligned or not) or column-major."""
    if layout == "contiguous":
        return torch.randn(M, K, dtype=dtype, device=device)
    if layout == "padded8":  # row stride a multiple of 8 elements (16-byte loads still allowed)
        return torch.randn(M, K + 8, dtype=dtype, device=device)[:, :K]
    if layout == "padded3":  # row stride breaks 16-byte alignment (scalar path)
        return torch.randn(M, K + 3, dtype=dtype, device=device)[:, 3:]
    if layout == "colmajor":
        return torch.randn(K, M, dtype=dtype, device=device).t()
    raise ValueError(layout)


def shrink_ref(x, a, ids, ranks):
    """float64 [M, r_max]: x[m]·A[i, j] for j < ranks[i], i = ids[m] in [0, L); 0 elsewhere."""
    L, r_max, _ = a.shape
    ids64 = ids.long()
    valid = (ids64 >= 0) & (ids64 < L)
    safe = ids64.clamp(0, max(L - 1, 0))
    xa = torch.einsum("mk,mjk->mj", x.double(), a.double()[safe])
    rk = ranks.long().clamp(0, r_max)[safe] if ranks is not None else torch.full_like(safe, r_max)
    keep = (torch.arange(r_max, device=x.device)[None, :] < rk[:, None]) & valid[:, None]
    return xa * keep


def expand_ref(y, xa, b, ids, scales, ranks, col):
    """float64 copy of y after y[m, col:col+N] += s_i · xa[m, :rank_i] · B[i, :, :rank_i]ᵀ for valid rows."""
    L, N, r_max = b.shape
    out = y.double().clone()
    ids64 = ids.long()
    valid = (ids64 >= 0) & (ids64 < L)
    safe = ids64.clamp(0, max(L - 1, 0))
    rk = ranks.long().clamp(0, r_max)[safe] if ranks is not None else torch.full_like(safe, r_max)
    keep = (torch.arange(r_max, device=y.device)[None, :] < rk[:, None]).double()
    upd = torch.einsum("mj,mnj->mn", xa.double() * keep, b.double()[safe]) * scales.double()[safe][:, None]
    out[valid, col : col + N] += upd[valid]
    return out


def ids_of(M, L, kind, dtype, device):
    if kind == "distinct":
        ids = torch.arange(M) % L
    elif kind == "same":
        ids = torch.full((M,), L - 1)
    else:  # mixed, with -1 (no adapter)
        ids = torch.randint(-1, L, (M,))
    return ids.to(dtype).to(device)


def check_shrink(dtype, M, K, r_max, layout, device):
    torch.manual_seed(M * 7 + K + r_max)
    L = 4
    x = rows(M, K, dtype, layout, device)
    a = torch.randn(L, r_max, K, dtype=dtype, device=device)
    for ids_dtype, kind, ranks in [
        (torch.int64, "distinct", None),
        (torch.int32, "mixed", torch.tensor([r_max, max(r_max // 2, 1), 0, 1], device=device, dtype=torch.int32)),
        (torch.int64, "same", torch.tensor([1, 2, 3, r_max], device=device)),
    ]:
        ids = ids_of(M, L, kind, ids_dtype, device)
        xa = ops.cuda_multi_lora_shrink(x, a, ids, ranks)
        assert xa.dtype == torch.float32 and xa.shape == (M, r_max)
        expected = shrink_ref(x, a, ids, ranks)
        assert_close_rel(xa, expected, TOL[torch.float32], f"shrink {dtype} {kind}")
        assert torch.all(xa[expected == 0] == 0), "entries past the rank / for id -1 must be exactly 0"


def check_shrink_mixed_dtypes_and_out_of_range_ids(x_dtype, a_dtype, device):
    torch.manual_seed(0)
    M, K, L, r_max = 37, 72, 3, 24
    x = torch.randn(M, K, dtype=x_dtype, device=device)
    a = torch.randn(L, r_max, K, dtype=a_dtype, device=device)
    ids = torch.randint(-3, L + 3, (M,), device=device)  # ids outside [0, L) give zero rows, never OOB reads
    ranks = torch.tensor([r_max, 5, 9], device=device)
    xa = ops.cuda_multi_lora_shrink(x, a, ids, ranks)
    assert_close_rel(xa, shrink_ref(x, a, ids, ranks), TOL[torch.float32], "mixed-dtype shrink")
    assert torch.all(xa[(ids < 0) | (ids >= L)] == 0)


def check_expand(dtype, M, N, r_max, y_layout, device):
    torch.manual_seed(M + N * 3 + r_max)
    L, col = 5, 3
    y = rows(M, N + 7, dtype, y_layout, device)
    xa = torch.randn(M, r_max, device=device)
    b = torch.randn(L, N, r_max, dtype=dtype, device=device)
    scales = torch.tensor([0.5, -1.25, 2.0, 0.0, 1.0], device=device)
    ranks = torch.tensor([r_max, 1, max(r_max - 3, 0), r_max, 0], device=device, dtype=torch.int32)
    for ids, rk in [(ids_of(M, L, "mixed", torch.int64, device), ranks), (ids_of(M, L, "distinct", torch.int32, device), None)]:
        y0 = y.clone()
        ops.cuda_multi_lora_expand_(y, xa, b, ids, scales, rk, col)
        expected = expand_ref(y0, xa, b, ids, scales, rk, col)
        assert_close_rel(y, expected, TOL[dtype], f"expand {dtype}")
        assert torch.equal(y[ids < 0], y0[ids < 0]), "rows with id -1 must be bit-identical"
        assert torch.equal(y[:, :col], y0[:, :col]) and torch.equal(y[:, col + N :], y0[:, col + N :]), "columns outside the slice changed"
        y = y0


def check_expand_strided_b_and_out_of_range_ids(device):
    torch.manual_seed(1)
    M, N, L, r_max = 50, 70, 3, 12
    y = torch.randn(M, N, dtype=torch.bfloat16, device=device)
    xa = torch.randn(M, r_max, device=device)
    b = torch.randn(L, r_max, N, dtype=torch.float32, device=device).transpose(1, 2)  # rank dim not contiguous
    ids = torch.randint(-2, L + 2, (M,), device=device)
    scales = torch.tensor([1.0, 0.5, -2.0], device=device, dtype=torch.float64)  # converted by the glue
    y0 = y.clone()
    ops.cuda_multi_lora_expand_(y, xa, b, ids, scales, None, 0)
    assert_close_rel(y, expand_ref(y0, xa, b, ids, scales, None, 0), TOL[torch.bfloat16], "strided B")
    bad = (ids < 0) | (ids >= L)
    assert torch.equal(y[bad], y0[bad])


def check_add_lora_packed_slices(dtype, M, widths, r_max, device, add_lora):
    """``add_lora(y, x, A, B, ids, scales, ranks, widths)`` runs the op under test in place."""
    torch.manual_seed(M + r_max)
    L, K = 6, 72
    x = torch.randn(M, K, dtype=dtype, device=device)
    y = torch.randn(M, sum(widths), dtype=dtype, device=device)
    A = [torch.randn(L, r_max, K, dtype=dtype, device=device) / K**0.5 for _ in widths]
    B = [torch.randn(L, w, r_max, dtype=dtype, device=device) for w in widths]
    ids = torch.randint(-1, L, (M,), device=device, dtype=torch.int32)
    scales = torch.rand(L, device=device) + 0.5
    ranks = torch.randint(0, r_max + 1, (L,), device=device)
    expected = ref.add_lora_ref(y.double().clone(), x.double(), [a.double() for a in A], [b.double() for b in B], ids,
                                scales.double(), ranks)
    y0 = y.clone()
    add_lora(y, x, A, B, ids, scales, ranks, widths)
    assert_close_rel(y, expected, TOL[dtype], f"add_lora cuda {dtype}")
    if dtype != torch.float32:
        assert_fa_rule(y, expected, add_lora_lowp(y0, x, A, B, ids, scales, ranks), f"add_lora cuda {dtype}")
    assert torch.equal(y[ids < 0], y0[ids < 0])


def linear_inputs(M, K, N, r, dtype, bias, layout, device):
    x = rows(M, K, dtype, layout, device)
    w = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
    a = torch.randn(r, K, dtype=dtype, device=device) / K**0.5
    b = torch.randn(N, r, dtype=dtype, device=device) / r**0.5
    bb = torch.randn(N, dtype=dtype, device=device) if bias else None
    return x, w, a, b, bb


def check_lora_linear_fwd(dtype, M, K, N, r, p, device):
    torch.manual_seed(M + K + N + r)
    for bias, layout in [(True, "contiguous"), (False, "padded3"), (True, "colmajor")]:
        x, w, a, b, bb = linear_inputs(M, K, N, r, dtype, bias, layout, device)
        y, xa = cuda_lora_linear.lora_linear_fwd_cuda(x, w, a, b, 0.75, bb, p, 1234)
        y_ref, xa_ref = ref.lora_linear_fwd_ref(x.double(), w.double(), a.double(), b.double(), 0.75,
                                                None if bb is None else bb.double(), p, 1234)
        assert y.dtype == dtype and xa.dtype == torch.float32
        assert_close_rel(xa, xa_ref, TOL[torch.float32], f"xa {dtype} {layout}")
        assert_close_rel(y, y_ref, TOL[dtype], f"y {dtype} {layout}")
        if dtype != torch.float32:
            y_lowp, _ = lora_linear_lowp(x, w, a, b, bb, 0.75, p, 1234, torch.zeros_like(y))
            assert_fa_rule(y, y_ref, y_lowp, f"y {dtype} {layout}")


def check_lora_linear_bwd(dtype, M, K, N, r, p, device):
    torch.manual_seed(M * 3 + K + r)
    x, w, a, b, _ = linear_inputs(M, K, N, r, dtype, False, "padded3" if M % 2 else "contiguous", device)
    _, xa = cuda_lora_linear.lora_linear_fwd_cuda(x, w, a, b, 0.5, None, p, 99)
    dy = torch.randn(M, N, dtype=dtype, device=device)
    expected = ref.lora_linear_bwd_ref(dy.double(), x.double(), xa.double(), w.double(), a.double(), b.double(), 0.5, p,
                                       99, (True, True, True, True))
    lowp = lora_linear_lowp(x, w, a, b, None, 0.5, p, 99, dy)[1] if dtype != torch.float32 else None
    for mask in [(True, True, True, True), (True, False, True, False), (False, True, False, False)]:
        got = cuda_lora_linear.lora_linear_bwd_cuda(dy, x, xa, w, a, b, 0.5, p, 99, mask)
        for name, g, e, want, like in zip(("dx", "dA", "dB", "dW"), got, expected, mask, (dy, a, b, w)):
            if not want:
                assert g is None, name
                continue
            assert g.dtype == like.dtype, name
            assert_close_rel(g, e, TOL[dtype], f"{name} {dtype} mask={mask}")
            if lowp is not None:
                assert_fa_rule(g, e, lowp[("dx", "dA", "dB", "dW").index(name)], f"{name} {dtype} mask={mask}")
    # LoRA-FA: x not saved, only dx and dB asked for
    dx, da, db, dw = cuda_lora_linear.lora_linear_bwd_cuda(dy, None, xa, w, a, b, 0.5, p, 99, (True, False, True, False))
    assert da is None and dw is None
    assert_close_rel(dx, expected[0], TOL[dtype], "dx without x")
    assert_close_rel(db, expected[2], TOL[dtype], "dB without x")


def check_dropout_mask_bit_exact(p, seed, M, K, device):
    x = torch.ones(M, K, dtype=torch.bfloat16, device=device)
    d = ops.cuda_lora_dropout(x, p, seed)
    keep = ref.dropout_keep_mask(seed, M, K, p, device=device)
    assert torch.equal(d != 0, keep)
    assert torch.all(d[keep] == torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))
    # the same mask inside the fused forward's shrink: with A = I, xa is drop(x) itself
    xr = torch.randn(M, K, device=device)
    z = torch.zeros(3, K, device=device)
    _, xa = cuda_lora_linear.lora_linear_fwd_cuda(xr, z, torch.eye(K, device=device), z, 1.0, None, p, seed)
    assert torch.equal(xa != 0, keep & (xr != 0))
    assert torch.equal(xa, ref.lora_dropout(xr, p, seed)), "kept values must be x / (1 - p) exactly (fp32)"


def check_opcheck_cuda_ops(device):
    from lora_kernels.serving import LoRABatchMeta

    torch.manual_seed(0)
    M, K, N, L, r = 9, 40, 24, 3, 8
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    a3 = torch.randn(L, r, K, dtype=torch.float16, device=device)
    b3 = torch.randn(L, N, r, dtype=torch.float16, device=device)
    ids = torch.randint(-1, L, (M,), device=device)
    scales = torch.rand(L, device=device)
    ranks = torch.tensor([r, 3, 1], device=device)
    xa = ops.cuda_multi_lora_shrink(x, a3, ids, ranks)
    y = torch.randn(M, N + 2, dtype=torch.float16, device=device)
    w = torch.randn(N, K, dtype=torch.float16, device=device)
    a, b = a3[0].clone(), b3[0].clone()
    bias = torch.randn(N, dtype=torch.float16, device=device)
    _, xa1 = ops.cuda_lora_linear_fwd(x, w, a, b, 0.5, bias, 0.1, 3)
    dy = torch.randn(M, N, dtype=torch.float16, device=device)
    wm = torch.randn(N, K, dtype=torch.bfloat16, device=device)
    meta = LoRABatchMeta(ids, L, block_m=16)
    grp = (meta.sorted_token_ids, meta.tiles, meta.block_m)
    cases = [
        (ops.cuda_multi_lora_shrink.default, (x, a3, ids, ranks, *grp)),
        (ops.cuda_multi_lora_expand_.default, (y, xa, b3, ids, scales, ranks, 1, *grp)),
        (ops.cuda_multi_lora_shrink.default, (x, a3, ids, ranks)),
        (ops.cuda_multi_lora_shrink.default, (x, a3, ids, None)),
        (ops.cuda_multi_lora_expand_.default, (y, xa, b3, ids, scales, ranks, 2)),
        (ops.cuda_lora_linear_fwd.default, (x, w, a, b, 0.5, bias, 0.1, 3)),
        (ops.cuda_lora_linear_bwd.default, (dy, x, xa1, w, a, b, 0.5, 0.1, 3, [True, True, True, False])),
        (ops.cuda_lora_linear_bwd.default, (dy, None, xa1, w, a, b, 0.5, 0.0, 3, [True, False, True, False])),
        (ops.cuda_lora_dropout.default, (x, 0.3, 11)),
        (ops.cuda_merge_.default, (wm, a.bfloat16(), b.bfloat16(), torch.tensor([0, r], dtype=torch.int32, device=device),
                                   torch.tensor([0.5], device=device))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def check_glue_errors_name_the_tensor(device):
    x = torch.randn(4, 8, device=device)
    a = torch.randn(2, 3, 8, device=device, dtype=torch.float64)
    ids = torch.zeros(4, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match="lora_a must be float16, bfloat16 or float32"):
        ops.cuda_multi_lora_shrink(x, a, ids, None)
    with pytest.raises(RuntimeError, match="adapter_ids must be int32 or int64"):
        ops.cuda_multi_lora_shrink(x, a.float(), ids.float(), None)
    with pytest.raises(RuntimeError, match="lora_a must be \\[L, r_max, K=8\\]"):
        ops.cuda_multi_lora_shrink(x, torch.randn(2, 3, 9, device=device), ids, None)
    y = torch.randn(4, 5, device=device)
    with pytest.raises(RuntimeError, match="do not fit in y"):
        ops.cuda_multi_lora_expand_(y, torch.randn(4, 3, device=device), torch.randn(2, 4, 3, device=device), ids,
                                    torch.ones(2, device=device), None, 2)
    with pytest.raises(RuntimeError, match="xa must be float32"):
        ops.cuda_multi_lora_expand_(y, torch.randn(4, 3, device=device).half(), torch.randn(2, 4, 3, device=device), ids,
                                    torch.ones(2, device=device), None, 0)
    with pytest.raises(RuntimeError, match="x is required for dA"):
        ops.cuda_lora_linear_bwd(torch.randn(4, 6, device=device), None, torch.randn(4, 2, device=device),
                                 torch.randn(6, 8, device=device), torch.randn(2, 8, device=device),
                                 torch.randn(6, 2, device=device), 1.0, 0.0, 0, [True, True, True, False])
