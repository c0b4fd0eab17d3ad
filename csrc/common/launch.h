// The one device switch of every op, in the manner of ATen's DispatchStub and flash-attention's
// mha_fwd -> run_mha_fwd: ops/<op>.cpp checks the arguments, guards the device, allocates the
// outputs and handles the empty case once, for both devices, then calls the launcher of the
// tensor's device: cpu::<name> (cpu/<op>_cpu.cpp) or cuda::<name> (cuda/<op>_cuda.cu, in builds
// with CUDA). Launchers are declared in ops/<op>_impl.h (not installed); each fills the outputs it
// is given and allocates nothing but its own scratch. The dispatcher only reaches an op's kernel
// with CPU or CUDA tensors, since ops/<op>.cpp registers it for those two keys alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#ifdef JITROPE_WITH_CUDA
#define JITROPE_LAUNCH(device, name, ...) \
  ((device).is_cuda() ? ::jitrope::cuda::name(__VA_ARGS__) : ::jitrope::cpu::name(__VA_ARGS__))
#else
#define JITROPE_LAUNCH(device, name, ...) ::jitrope::cpu::name(__VA_ARGS__)
#endif

// Registers an op's kernels (a function `void f(torch::Library&)`) for the CPU key and, in builds
// with CUDA, the CUDA key: the same host wrapper serves both devices.
#ifdef JITROPE_WITH_CUDA
#define JITROPE_REGISTER_KERNELS(register_fn) \
  TORCH_LIBRARY_IMPL(jitrope, CPU, m) {       \
    register_fn(m);                           \
  }                                           \
  TORCH_LIBRARY_IMPL(jitrope, CUDA, m) {      \
    register_fn(m);                           \
  }
#else
#define JITROPE_REGISTER_KERNELS(register_fn) \
  TORCH_LIBRARY_IMPL(jitrope, CPU, m) {       \
    register_fn(m);                           \
  }
#endif
