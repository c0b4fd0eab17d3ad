// Autograd of jitrope::pos2d_add_indexed as C++ autograd Functions (like pos2d_add_autograd.cpp),
// so the op trains from LibTorch as well as from Python. grad_x is grad_out itself; the table
// gradients come from the pos2d_add_indexed_backward op. That op is linear in grad_out and its
// adjoint is a pos2d_add_indexed onto zeros, so it is differentiable too (any order). Table sizes
// and grad_out's shape travel as SymInts so that torch.compile traces the backward with dynamic
// shapes. rows and cols are indices: they get no gradient.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/pos2d_add_indexed.h"

namespace jitrope {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class Pos2dAddIndexedBackwardFunction : public torch::autograd::Function<Pos2dAddIndexedBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& grad_out,
      const at::Tensor& rows,
      const at::Tensor& cols,
      const c10::SymInt& max_h,
      const c10::SymInt& max_w) {
    ctx->save_for_backward({rows, cols});
    ctx->saved_data["shape"] = grad_out.sym_sizes();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_h, grad_w] = pos2d_add_indexed_backward_symint(grad_out, rows, cols, max_h, max_w);
    return {grad_h, grad_w};
  }

  // d(<grad_h, gg_h> + <grad_w, gg_w>) / d grad_out puts gg_h[rows[n]] + gg_w[cols[n]] on every
  // token: pos2d_add_indexed of gg_h, gg_w onto zeros.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor base = at::zeros_symint(ctx->saved_data["shape"].toSymIntVector(), grads[0].options());
    return {
        pos2d_add_indexed(base, grads[0], grads[1], saved[0], saved[1]), Variable(), Variable(), Variable(),
        Variable()};
  }
};

class Pos2dAddIndexedFunction : public torch::autograd::Function<Pos2dAddIndexedFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& x,
      const Variable& pos_h,
      const Variable& pos_w,
      const at::Tensor& rows,
      const at::Tensor& cols) {
    ctx->save_for_backward({rows, cols});
    ctx->saved_data["max_h"] = pos_h.sym_size(0);
    ctx->saved_data["max_w"] = pos_w.sym_size(0);
    at::AutoDispatchBelowADInplaceOrView guard;
    return {pos2d_add_indexed(x, pos_h, pos_w, rows, cols)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    Variable grad_h, grad_w;
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      const auto saved = ctx->get_saved_variables();
      // Through the dispatcher, so that under create_graph the backward is itself differentiable.
      std::tie(grad_h, grad_w) = pos2d_add_indexed_backward_symint(
          grad_out, saved[0], saved[1], ctx->saved_data["max_h"].toSymInt(), ctx->saved_data["max_w"].toSymInt());
    }
    return {
        ctx->needs_input_grad(0) ? grad_out : Variable(), ctx->needs_input_grad(1) ? grad_h : Variable(),
        ctx->needs_input_grad(2) ? grad_w : Variable(), Variable(), Variable()};
  }
};

at::Tensor pos2d_add_indexed_autograd(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols) {
  return Pos2dAddIndexedFunction::apply(x, pos_h, pos_w, rows, cols)[0];
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_indexed_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, c10::SymInt max_h, c10::SymInt max_w) {
  auto out = Pos2dAddIndexedBackwardFunction::apply(grad_out, rows, cols, max_h, max_w);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, Autograd, m) {
  m.impl("pos2d_add_indexed", &pos2d_add_indexed_autograd);
  m.impl("pos2d_add_indexed_backward", &pos2d_add_indexed_backward_autograd);
}

}  // namespace jitrope
