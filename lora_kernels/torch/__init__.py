"""The ``torch`` backend: launchers composed of plain PyTorch ops, one module per op family (mirroring
``lora_kernels/triton/`` and ``lora_kernels/cuda/``). It runs on every device torch supports (CPU, MPS, ROCm,
CUDA) and every float dtype. ``lora_kernels/reference.py`` stays the float64-faithful oracle the tests use.

(Absolute ``import torch`` inside this package still reaches PyTorch; nothing imports this package as ``torch``.)
"""
