// Autograd of jitrope::rope2d as a C++ autograd::Function, so the op trains from LibTorch as well
// as from Python. The backward is its own op (rope2d_backward, CPU + CUDA kernels). The forward
// input x is saved only when freqs requires grad (dL/dphi needs it); coords is a constant.
// Double backward is not supported and says so. rope2d_ follows common/autograd_utils.h (inference
// only).
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/autograd_utils.h"
#include "ops/rope2d.h"

namespace jitrope {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class Rope2dFunction : public torch::autograd::Function<Rope2dFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& x,
      const Variable& coords,
      const Variable& freqs,
      bool interleaved,
      const std::optional<at::Tensor>& freqs_index) {
    ctx->saved_data["interleaved"] = interleaved;
    ctx->save_for_backward({coords, freqs, freqs.requires_grad() ? x : Variable(), freqs_index.value_or(Variable())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {rope2d(x, coords, freqs, interleaved, freqs_index)};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    if (!grad_outputs[0].defined()) {
      return {Variable(), Variable(), Variable(), Variable(), Variable()};
    }
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const Variable& v) { return v.defined() ? std::optional<at::Tensor>(v) : std::nullopt; };
    const Variable& x = saved[2];
    auto [grad_x, grad_freqs] = rope2d_backward(
        grad_outputs[0], saved[0], saved[1], optional(x), ctx->saved_data["interleaved"].toBool(), optional(saved[3]));
    return {grad_x, Variable(), x.defined() ? grad_freqs : Variable(), Variable(), Variable()};
  }
};

// rope2d_backward on the Autograd key (x, the forward input, optional); its own backward refuses.
class Rope2dBackwardFunction : public torch::autograd::Function<Rope2dBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* /*ctx*/,
      const Variable& grad_out,
      const Variable& coords,
      const Variable& freqs,
      const std::optional<at::Tensor>& x,
      bool interleaved,
      const std::optional<at::Tensor>& freqs_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_x, grad_freqs] = rope2d_backward(grad_out, coords, freqs, x, interleaved, freqs_index);
    return {grad_x, grad_freqs};
  }

  static variable_list backward(AutogradContext* /*ctx*/, const variable_list& /*grad_outputs*/) {
    TORCH_CHECK(
        false,
        "jitrope::rope2d: double backward (the gradient of rope2d_backward, e.g. create_graph=True "
        "followed by a second backward) is not supported");
  }
};

at::Tensor rope2d_autograd(
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  return Rope2dFunction::apply(x, coords, freqs, interleaved, freqs_index)[0];
}

std::tuple<at::Tensor, at::Tensor> rope2d_backward_autograd(
    const at::Tensor& grad_out,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const std::optional<at::Tensor>& x,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  const auto out = Rope2dBackwardFunction::apply(grad_out, coords, freqs, x, interleaved, freqs_index);
  return {out[0], out[1]};
}

at::Tensor& rope2d__autograd(
    at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  return inplace_for_inference(
      "rope2d_", "rope2d", x, {&coords, &freqs}, [&] { rope2d_(x, coords, freqs, interleaved, freqs_index); });
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, Autograd, m) {
  m.impl("rope2d", &rope2d_autograd);
  m.impl("rope2d_", &rope2d__autograd);
  m.impl("rope2d_backward", &rope2d_backward_autograd);
}

}  // namespace jitrope
