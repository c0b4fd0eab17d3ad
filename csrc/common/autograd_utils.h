// The one convention of jitrope's in-place twins (rope2d_, pos2d_add_) on the Autograd key: they
// are for inference, so they refuse, with a message naming the op, any input that would need a
// gradient while grad mode is on; otherwise they run the kernel below autograd and bump x's
// version counter, so that a tensor saved for a backward and then overwritten is detected.
#pragma once

#include <initializer_list>

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>

namespace jitrope {

template <typename F>
at::Tensor& inplace_for_inference(
    const char* op,
    const char* out_of_place,
    at::Tensor& x,
    std::initializer_list<const at::Tensor*> inputs,
    F&& kernel) {
  bool needs_grad = x.requires_grad();
  for (const at::Tensor* t : inputs) {
    needs_grad = needs_grad || (t->defined() && t->requires_grad());
  }
  TORCH_CHECK(
      !(c10::GradMode::is_enabled() && needs_grad), op,
      ": the in-place op is for inference and has no gradient, but an input requires grad; call ", out_of_place,
      ", or run under no_grad");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    kernel();
  }
  torch::autograd::increment_version(x);
  return x;
}

}  // namespace jitrope
