"""The vLLM plugin module without vLLM (the main test run has none; tests/test_vllm_e2e.py runs it against the
real vLLM in its own CI stage): it imports, its entry point is a no-op unless LORA_KERNELS_VLLM=1, and the rank
reader it uses on vLLM's zero-padded stacked weights."""

import subprocess
import sys

import pytest
import torch

from lora_kernels.integrations import vllm as plugin


def test_package_and_plugin_import_without_vllm():
    code = ("import sys; sys.modules['vllm'] = None\n"  # any `import vllm` raises ImportError
            "import lora_kernels, lora_kernels.integrations.vllm as p\n"
            "p.register()\n"  # LORA_KERNELS_VLLM unset: must not touch vLLM
            "print('ok', p.enabled())")
    env = {k: v for k, v in __import__("os").environ.items() if k != plugin.ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok False"


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("0", False), ("", False), ("no", False)])
def test_enabled_reads_the_env_var(monkeypatch, value, on):
    monkeypatch.setenv(plugin.ENV, value)
    assert plugin.enabled() is on


def test_effective_ranks_of_zero_padded_stacks():
    L, r_max, K, N = 4, 8, 6, 5
    a = torch.zeros(L, 1, r_max, K)
    b = torch.zeros(L, 1, N, r_max)
    a[0, 0, :3] = 1.0  # slot 0: rank 3 in A and B
    b[0, 0, :, :3] = 1.0
    a[1, 0, :8] = 1.0  # slot 1: rank 8
    b[1, 0, :, :8] = 1.0
    b[2, 0, :, :5] = 1.0  # slot 2: only B nonzero up to 5 (A all zero): still 5, the padded result is kept
    a[2, 0, 1] = 1.0
    # slot 3: empty
    assert plugin.effective_ranks([a], [b]).tolist() == [3, 8, 5, 0]
    assert plugin.effective_ranks([a]).tolist() == [3, 8, 2, 0]
    assert plugin.effective_ranks((), [b]).tolist() == [3, 8, 5, 0]
    assert plugin.effective_ranks([a[:, 0]], [b[:, 0]]).tolist() == [3, 8, 5, 0]  # [L, r, K] views too
    # a zero inside the rank (a sparse column) does not shorten it: only the last nonzero column counts
    a[1, 0, 6] = 0.0
    b[1, 0, :, 6] = 0.0
    assert plugin.effective_ranks([a], [b]).tolist()[1] == 8


def test_slot_views_and_shape_errors():
    w = torch.randn(3, 1, 4, 5)
    assert plugin._slots(w, "w").shape == (3, 4, 5) and plugin._slots(w, "w").data_ptr() == w.data_ptr()
    with pytest.raises(ValueError, match=r"w must be \[L, 1, a, b\] as vLLM stacks it, got \[3, 2, 4, 5\]"):
        plugin._slots(torch.randn(3, 2, 4, 5), "w")
    with pytest.raises(ValueError, match=r"w must be \[L, 1, a, b\] or \[L, a, b\]"):
        plugin._slots(torch.randn(3, 4), "w")
