// C++ entry points of jitrope::qk_norm_rope (dispatcher calls) and the one place its arguments are
// validated.
#include "ops/qk_norm_rope.h"

#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "common/op_utils.h"
#include "ops/rope2d.h"

namespace jitrope {

at::Tensor qk_norm_rope(
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jitrope::qk_norm_rope", "")
                       .typed<decltype(qk_norm_rope)>();
  return op.call(qk, weight, coords, freqs, eps, interleaved);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward(
    const at::Tensor& grad_out,
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved,
    bool freqs_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jitrope::qk_norm_rope_backward", "")
                       .typed<decltype(qk_norm_rope_backward)>();
  return op.call(grad_out, qk, weight, coords, freqs, eps, interleaved, freqs_grad);
}

void check_qk_norm_rope_args(
    const char* op,
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    const at::Tensor* grad_out,
    bool freqs_grad) {
  check_defined(op, "qk", qk);
  check_defined(op, "weight", weight);
  check_float_dtype(op, "qk", qk);
  TORCH_CHECK(
      qk.dim() == 5 && qk.size(0) == 2, op, ": qk must have shape [2, B, H, N, D] (q and k), got ", qk.sizes());
  const int64_t D = qk.size(4);
  TORCH_CHECK(D % 2 == 0, op, ": qk must have an even last dim D (channel pairs), got D = ", D, " in qk of shape ",
              qk.sizes());
  check_floating(op, "weight", "[2, D]", weight);
  TORCH_CHECK(
      weight.dim() == 2 && weight.size(0) == 2 && weight.size(1) == D, op, ": weight must have shape [2, D] = [2, ",
      D, "] (q and k norm weights for qk of shape ", qk.sizes(), "), got ", weight.sizes());
  check_same_device(op, "weight", weight, "qk", qk);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  const bool has_coords = coords.has_value() && coords->defined();
  const bool has_freqs = freqs.has_value() && freqs->defined();
  TORCH_CHECK(
      has_coords == has_freqs, op, ": coords and freqs must be given together (rotate) or both be None (normalize "
      "only), got ", has_coords ? "coords" : "freqs", " alone");
  if (has_coords) {
    check_rope2d_args(op, "qk", qk, *coords, *freqs);
  }
  TORCH_CHECK(has_coords || !freqs_grad, op, ": freqs_grad needs coords and freqs, got None");
  if (grad_out != nullptr) {
    check_defined(op, "grad_out", *grad_out);
    TORCH_CHECK(
        grad_out->sizes() == qk.sizes(), op, ": grad_out must have qk's shape ", qk.sizes(), ", got ",
        grad_out->sizes());
    check_same_dtype(op, "grad_out", *grad_out, "qk", qk);
    check_same_device(op, "grad_out", *grad_out, "qk", qk);
  }
}

namespace detail {

std::tuple<at::Tensor, at::Tensor> finish_param_grads(
    const at::Tensor& grad_weight_acc,
    const at::Tensor& grad_freqs_acc,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& freqs,
    bool freqs_grad) {
  at::Tensor grad_weight = grad_weight_acc.to(weight.scalar_type());
  at::Tensor grad_freqs = freqs_grad ? grad_freqs_acc.view(freqs->sizes()).to(freqs->scalar_type())
                                     : at::empty({0}, weight.options());
  return {grad_weight, grad_freqs};
}

}  // namespace detail
}  // namespace jitrope
