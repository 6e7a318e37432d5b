"""DoRA row norm without the N×K update (lora_kernels.dora) vs the float64 direct form."""

import pytest
import torch

from lora_kernels._checks import LoRAInputError
from lora_kernels.dora import dora_weight_norm, weight_row_sq_norm
import lora_kernels.dora as dora
from lora_kernels.reference import dora_weight_norm_ref


def _adapter(N, K, r, rel, dtype, seed=0):
    """W0, A, B with ‖s·B·A‖ = rel·‖W0‖ (s = 2), in dtype."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    A = torch.randn(r, K, generator=g) / K ** 0.5
    B = torch.randn(N, r, generator=g)
    B = B * (rel * W.norm() / (2.0 * (B @ A).norm()))
    return W.to(dtype), A.to(dtype), B.to(dtype)


def _rel(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.fixture(params=["expanded", "direct"])
def form(request, monkeypatch):
    """The expanded form (every size, as on real layers) or the direct one small weights take."""
    monkeypatch.setattr(dora, "SMALL_DIRECT_ELEMENTS", 0 if request.param == "expanded" else 1 << 30)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N,K,r,rel", [(257, 384, 16, 0.01), (64, 33, 1, 0.07), (31, 512, 64, 0.002), (1, 7, 3, 1.0)])
def test_matches_float64(dtype, N, K, r, rel, form):
    W, A, B = _adapter(N, K, r, rel, dtype)
    ref = dora_weight_norm_ref(W, A, B, 2.0)
    got = dora_weight_norm(W, A, B, 2.0)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert _rel(got, ref) <= tol
    cached = dora_weight_norm(W, A, B, 2.0, weight_sq=weight_row_sq_norm(W))
    assert torch.equal(cached, got)


def test_row_blocks_bounded(monkeypatch):
    """16-bit weights are upcast a block of rows at a time; the result does not depend on the block size."""
    W, A, B = _adapter(100, 64, 8, 0.05, torch.bfloat16)
    whole = dora_weight_norm(W, A, B, 0.5)
    monkeypatch.setattr(dora, "SMALL_DIRECT_ELEMENTS", 0)
    monkeypatch.setattr(dora, "ROW_BLOCK_BYTES", 64 * 4 * 7)  # 7 rows per block
    blocks = list(dora._row_blocks(W))
    assert len(blocks) == 15 and max(b[2].shape[0] for b in blocks) == 7
    assert _rel(dora_weight_norm(W, A, B, 0.5), dora_weight_norm_ref(W, A, B, 0.5)) <= 2e-6
    assert _rel(whole, dora_weight_norm_ref(W, A, B, 0.5)) <= 2e-6


@pytest.mark.parametrize("sync_free", [False, True])
def test_cancellation_rows_recomputed(sync_free, monkeypatch):
    """A row whose update almost cancels W0 (ΔW[n] ≈ −W0[n]): the expanded sum would lose every digit; the
    guarded function recomputes that row directly (found by nonzero on the CPU; on accelerators without a host
    sync, as the rows of smallest ratio)."""
    monkeypatch.setattr(dora, "SMALL_DIRECT_ELEMENTS", 0)
    monkeypatch.setattr(dora, "_SYNC_FREE_ON_CPU", sync_free)
    g = torch.Generator().manual_seed(3)
    K, r = 256, 4
    A = torch.randn(r, K, generator=g)
    W = torch.randn(6, K, generator=g)
    B = torch.randn(6, r, generator=g)
    W[2] = -(B[2] @ A) + 1e-3 * torch.randn(K, generator=g)  # ‖W0 + ΔW‖ ≈ 5e-4·‖ΔW‖ on row 2
    ref = dora_weight_norm_ref(W, A, B, 1.0)
    got = dora_weight_norm(W, A, B, 1.0)
    assert ((got.double() - ref).abs() / ref).max() <= 1e-3
    # the unguarded expansion is far off on that row (what the guard exists for)
    a, b = A.double(), B.double()
    sq = (W.float().double() ** 2).sum(1).float()
    cross = ((W.float() @ A.t()) * B).sum(1)
    quad = ((B @ (A @ A.t())) * B).sum(1)
    naive = (sq + 2 * cross + quad).clamp_min(0).sqrt()
    assert abs(naive[2].double() - ref[2]) / ref[2] > 1e-2


def test_sync_free_repair_asserts_when_too_many_rows_cancel(monkeypatch):
    monkeypatch.setattr(dora, "SMALL_DIRECT_ELEMENTS", 0)
    monkeypatch.setattr(dora, "_SYNC_FREE_ON_CPU", True)
    monkeypatch.setattr(dora, "MAX_REPAIR_ROWS", 1)
    g = torch.Generator().manual_seed(4)
    A = torch.randn(4, 256, generator=g)
    W = torch.randn(6, 256, generator=g)
    B = torch.randn(6, 4, generator=g)
    for n in (1, 4):
        W[n] = -(B[n] @ A) + 1e-3 * torch.randn(256, generator=g)
    with pytest.raises(RuntimeError, match="MAX_REPAIR_ROWS"):
        dora_weight_norm(W, A, B, 1.0)
    monkeypatch.setattr(dora, "MAX_REPAIR_ROWS", 2)
    ref = dora_weight_norm_ref(W, A, B, 1.0)
    assert ((dora_weight_norm(W, A, B, 1.0).double() - ref).abs() / ref).max() <= 1e-3


def test_errors():
    W, A, B = _adapter(8, 16, 2, 0.1, torch.float32)
    with pytest.raises(LoRAInputError, match="lora_a"):
        dora_weight_norm(W, A[:, :15], B, 1.0)
    with pytest.raises(LoRAInputError, match="lora_b"):
        dora_weight_norm(W, A, B[:7], 1.0)
    with pytest.raises(LoRAInputError, match="scale"):
        dora_weight_norm(W, A, B, float("nan"))
    with pytest.raises(LoRAInputError, match="weight_sq"):
        dora_weight_norm(W, A, B, 1.0, weight_sq=torch.ones(7))
