// The one translation unit with the Python module entry point. The kernels themselves register through
// TORCH_LIBRARY_IMPL(lora_kernels, LORA_KERNELS_DISPATCH_KEY = CUDA, m) in the *_torch.cpp files (static initialisers run when the
// library is loaded, either as lora_kernels._C or as the JIT-built lora_kernels_cuda shared object).
#include <pybind11/pybind11.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME lora_kernels_cuda
#endif

namespace {
// Bumped whenever an op's C++ implementation changes behaviour.
constexpr const char* kVersion = "0.1.0";
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_kernels CUDA kernels (ops are registered under torch.ops.lora_kernels.cuda_*)";
  m.def("version", []() { return kVersion; }, "Version of the compiled lora_kernels CUDA extension");
}
