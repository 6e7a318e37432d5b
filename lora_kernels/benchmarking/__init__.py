"""Benchmark harnesses used by ``lora-kernels bench`` (op-level in ``core``, end-to-end in ``e2e``)."""
