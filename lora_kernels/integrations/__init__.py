"""Integrations with serving engines. Each submodule imports its engine only inside itself (and only when used),
so ``import lora_kernels`` never needs them:

* :mod:`lora_kernels.integrations.vllm`: a vLLM ``PunicaWrapper`` backed by lora_kernels' ops, registered through
  the ``vllm.general_plugins`` entry point and switched on by ``LORA_KERNELS_VLLM=1``.
"""
