"""lora_shrink / lora_expand_ on the CUDA backend, run on the CPU by the emulator of tests/cuda_emu/ (the csrc/
multi-adapter kernels and glue compiled for the host; see tests/test_cuda_emulated.py): the routing ops
``torch.ops.lora_kernels.lora_shrink`` / ``lora_expand_`` with backend "cuda" reach the launchers in
``lora_kernels/cuda/shrink_expand.py`` and through them the extension's ``cuda_multi_lora_shrink`` /
``cuda_multi_lora_expand_``. fp32, fp16 and bf16 against the float64 reference; the emulated glue NaN-poisons the
shrink's output, and the expand's untouched rows/columns hold NaN that must survive bit for bit.

(The public API refuses the "cuda" backend for CPU tensors, so these tests call the registered ops directly; the
validation in front of them is the same for every backend and is tested in tests/test_shrink_expand.py.)
Skipped without g++ / CUDA headers, or with LORA_KERNELS_SKIP_EMULATOR=1.
"""

import pytest
import torch
from conftest import TOL, assert_close_rel
from test_shrink_expand import check_expand, make_ids, make_ranks, padded_stack, poisoned_y, stacked_vllm

from lora_kernels import reference as ref


ops = torch.ops.lora_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _emulated_extension(emu):
    """Every test here runs against the emulated extension (conftest.emu)."""


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 70])
@pytest.mark.parametrize("K,r_max,ranks", [(33, 1, None), (72, 16, "mixed"), (200, 40, "mixed")])
@pytest.mark.parametrize("a_layout", ["vllm", "padded"])
def test_shrink(dtype, M, K, r_max, ranks, a_layout):
    gen = torch.Generator().manual_seed(M * 11 + K + r_max)
    L = 4
    x = torch.randn(M, K + 3, generator=gen).to(dtype)[:, 3:]  # rows that break 16-byte alignment
    a = (torch.randn(L, r_max, K, generator=gen) / K**0.5).to(dtype)
    a = stacked_vllm(a, gen) if a_layout == "vllm" else padded_stack(a, gen)
    ids = make_ids("mixed", M, L, gen)
    rk = make_ranks(ranks, L, r_max)
    xa = ops.lora_shrink(x, a, ids, 0.5, rk, "cuda")
    assert xa.dtype == torch.float32 and xa.shape == (M, r_max)
    expected = ref.lora_shrink_ref(x.double(), a.double(), ids, 0.5, rk)
    assert_close_rel(xa, expected, TOL[torch.float32], f"cuda shrink {dtype}")
    assert torch.all(xa[expected == 0] == 0), "entries past a rank and rows with id -1 must be exactly 0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 70])
@pytest.mark.parametrize("N,r_max,ranks", [(1, 1, None), (37, 8, "mixed"), (130, 40, "mixed")])
@pytest.mark.parametrize("xa_dtype", [torch.float32, torch.float16])
def test_expand(dtype, M, N, r_max, ranks, xa_dtype):
    gen = torch.Generator().manual_seed(M + N * 3 + r_max)
    L, col = 5, 6
    ids = make_ids("mixed", M, L, gen)
    y = poisoned_y(M, N + 9, col, N, dtype, gen, ids)
    xa = torch.randn(3, M, r_max, generator=gen)[1].to(xa_dtype)  # a slice of vLLM's [S, M, r] buffer
    b = stacked_vllm((torch.randn(L, N, r_max, generator=gen) / r_max**0.5).to(dtype), gen)
    scales = torch.tensor([0.5, -1.25, 2.0, 0.0, 1.0])
    rk = make_ranks(ranks, L, r_max)
    y0 = y.clone()
    ops.lora_expand_(y, xa, b, ids, scales, rk, col, "cuda")
    expected = ref.lora_expand_ref(y0.double().clone(), xa.double(), b.double(), ids, scales.double(), rk, col)
    check_expand(y, y0, expected, ids, col, N, TOL[dtype], f"cuda expand {dtype}")


def test_opcheck():
    gen = torch.Generator().manual_seed(9)
    x, a = torch.randn(6, 12, generator=gen), torch.randn(3, 4, 12, generator=gen)
    ids, rk = torch.tensor([0, -1, 2, 1, 2, 0]), torch.tensor([4, 1, 3])
    torch.library.opcheck(ops.lora_shrink.default, (x, a, ids, 0.5, rk, "cuda"))
    y, xa, b = torch.randn(6, 10, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(3, 7, 4, generator=gen)
    torch.library.opcheck(ops.lora_expand_.default, (y, xa, b, ids, torch.rand(3), rk, 2, "cuda"))
