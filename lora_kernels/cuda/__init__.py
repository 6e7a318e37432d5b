"""Launchers of the CUDA extension, one module per op family (mirroring ``lora_kernels/triton/``).

Each composes the extension's kernel ops (schemas and fakes in ``lora_kernels/ops/<family>.py``, C++ kernels in
``csrc/<family>.cu``, torch glue in ``csrc/<family>_torch.cpp``) into a family's launchers. Inputs were validated
by the caller; nothing here knows about modules.
"""
