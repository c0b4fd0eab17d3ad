// Autograd of jitrope::qk_norm_rope as a C++ autograd::Function, so the op trains from LibTorch as
// well as from Python. The backward is its own op (qk_norm_rope_backward, CPU + CUDA kernels); it
// recomputes the per-row statistics from the saved qk instead of saving them. coords is a constant.
// Double backward is not supported and says so.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/qk_norm_rope.h"

namespace jitrope {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

// coords and freqs are optional (None: normalize only); a lone one reaches the kernel's check.
class QkNormRopeFunction : public torch::autograd::Function<QkNormRopeFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& qk,
      const Variable& weight,
      const std::optional<at::Tensor>& coords,
      const std::optional<at::Tensor>& freqs,
      double eps,
      bool interleaved,
      const std::optional<at::Tensor>& freqs_index) {
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["interleaved"] = interleaved;
    ctx->save_for_backward(
        {qk, weight, coords.value_or(Variable()), freqs.value_or(Variable()), freqs_index.value_or(Variable())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {qk_norm_rope(qk, weight, coords, freqs, eps, interleaved, freqs_index)};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    if (!grad_outputs[0].defined()) {
      return {Variable(), Variable(), Variable(), Variable(), Variable(), Variable(), Variable()};
    }
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const Variable& v) { return v.defined() ? std::optional<at::Tensor>(v) : std::nullopt; };
    // needs_input_grad counts the inputs that are tensors: freqs is input 3 when given (with coords).
    const bool freqs_grad = saved[3].defined() && ctx->needs_input_grad(3);
    auto [grad_qk, grad_weight, grad_freqs] = qk_norm_rope_backward(
        grad_outputs[0], saved[0], saved[1], optional(saved[2]), optional(saved[3]), ctx->saved_data["eps"].toDouble(),
        ctx->saved_data["interleaved"].toBool(), freqs_grad, optional(saved[4]));
    return {
        ctx->needs_input_grad(0) ? grad_qk : Variable(),
        ctx->needs_input_grad(1) ? grad_weight : Variable(),
        Variable(),
        freqs_grad ? grad_freqs : Variable(),
        Variable(),
        Variable(),
        Variable()};
  }
};

// coords and freqs are optional constants here (the backward op is not differentiable).
class QkNormRopeBackwardFunction : public torch::autograd::Function<QkNormRopeBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* /*ctx*/,
      const Variable& grad_out,
      const Variable& qk,
      const Variable& weight,
      const std::optional<at::Tensor>& coords,
      const std::optional<at::Tensor>& freqs,
      double eps,
      bool interleaved,
      bool freqs_grad,
      const std::optional<at::Tensor>& freqs_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [a, b, c] =
        qk_norm_rope_backward(grad_out, qk, weight, coords, freqs, eps, interleaved, freqs_grad, freqs_index);
    return {a, b, c};
  }

  static variable_list backward(AutogradContext* /*ctx*/, const variable_list& /*grad_outputs*/) {
    TORCH_CHECK(
        false,
        "jitrope::qk_norm_rope: double backward (the gradient of qk_norm_rope_backward, e.g. create_graph=True "
        "followed by a second backward) is not supported");
  }
};

at::Tensor qk_norm_rope_autograd(
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  return QkNormRopeFunction::apply(qk, weight, coords, freqs, eps, interleaved, freqs_index)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward_autograd(
    const at::Tensor& grad_out,
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved,
    bool freqs_grad,
    const std::optional<at::Tensor>& freqs_index) {
  const auto out =
      QkNormRopeBackwardFunction::apply(grad_out, qk, weight, coords, freqs, eps, interleaved, freqs_grad, freqs_index);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, Autograd, m) {
  m.impl("qk_norm_rope", &qk_norm_rope_autograd);
  m.impl("qk_norm_rope_backward", &qk_norm_rope_backward_autograd);
}

}  // namespace jitrope
