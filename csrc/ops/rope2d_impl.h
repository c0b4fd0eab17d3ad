// Internals of jitrope::rope2d, shared by its host wrapper (ops/rope2d.cpp), its launchers
// (cpu/rope2d_cpu.cpp, cuda/rope2d_cuda.cu) and qk_norm_rope: the argument check, the
// accumulation-type tables and the launch description. Not installed: the C++ API is ops/rope2d.h.
// The wrapper checks the arguments, allocates every output, handles the empty case and the layouts
// the geometry cannot describe; a launcher fills what it is given.
#pragma once

#include <initializer_list>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "math/rope2d_math.h"

namespace jitrope {

// The one argument check of rope2d, rope2d_ and rope2d_backward (and of qk_norm_rope's rotation). `x_name`
// names the [..., H, N, D] tensor in messages ("x" or "grad_out"); `fwd_x` is the forward input a
// backward gets; `inplace` adds the checks of rope2d_; `freqs_index` (docs/ops.md) is checked down to
// its values (on CUDA that waits for the device), so that no kernel reads a table out of bounds.
// Throws c10::Error naming the argument, the shape it got and the shape it wanted.
void check_rope2d_args(
    const char* op,
    const char* x_name,
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const at::Tensor* fwd_x = nullptr,
    bool inplace = false,
    const std::optional<at::Tensor>& freqs_index = std::nullopt);

// Whether freqs has one row per head: [H, 2, D/2], or [F, H, 2, D/2] with freqs_index.
inline bool rope2d_per_head(const at::Tensor& freqs, const std::optional<at::Tensor>& freqs_index) {
  return freqs.dim() == (freqs_index.has_value() && freqs_index->defined() ? 4 : 3);
}

namespace detail {

// coords and freqs in the accumulation dtype, contiguous, freqs as [F * Hf, 2, D/2] (F = 1 without
// freqs_index): the table of group g for token n is row freqs_index[n] * Hf + g.
std::tuple<at::Tensor, at::Tensor> rope2d_acc_tables(
    const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs);

// freqs_index contiguous, or an undefined tensor without it.
inline at::Tensor rope2d_index(const std::optional<at::Tensor>& freqs_index) {
  return freqs_index.has_value() && freqs_index->defined() ? freqs_index->contiguous() : at::Tensor();
}

}  // namespace detail

// One rotation: out = R(phi) in, or R(-phi) in when `inverse`; with the forward input x (the
// backward with the freqs gradient) also grad_freqs = dL/dfreqs. in has at least one element.
struct Rope2dLaunch {
  at::Tensor in;                    // x, or grad_out in the backward: [..., H, N, D]
  at::Tensor out;                   // in's shape, any strides (in itself for rope2d_)
  at::Tensor x;                     // the forward input (in's shape), or undefined
  at::Tensor coords;                // accumulation dtype, contiguous [N, 2]
  at::Tensor freqs;                 // accumulation dtype, contiguous [F * Hf, 2, D/2] (F = 1 without freqs_index)
  at::Tensor index;                 // contiguous freqs_index [N], or undefined
  rope2d_math::Rope2dGeometry geo;  // of in, out (and x): groups = Hf
  bool interleaved, inverse;
  at::Tensor grad_freqs;  // accumulation dtype, freqs' [F * Hf, 2, D/2]: filled when x is defined
};

namespace cpu {
void rope2d_rotate(const Rope2dLaunch& a);
}  // namespace cpu

namespace cuda {
void rope2d_rotate(const Rope2dLaunch& a);
}  // namespace cuda

}  // namespace jitrope
