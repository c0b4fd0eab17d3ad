// Autograd of jitrope::pos2d_add as C++ autograd Functions (like torchvision's
// ops/autograd/roi_align_kernel.cpp), so the op trains from LibTorch as well as from Python.
// grad_x is grad_out itself; the table gradients come from the pos2d_add_backward op. That op is
// linear in grad_out and its own adjoint is a pos2d_add onto zeros, so it is differentiable too
// (gradgradcheck, any order). Table sizes travel as SymInts so that torch.compile can trace the
// backward with dynamic shapes. The in-place twin follows common/autograd_utils.h (inference only).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/autograd_utils.h"
#include "ops/pos2d_add.h"

namespace jitrope {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

void save_geometry(
    AutogradContext* ctx, at::IntArrayRef grid, int64_t token_offset, int64_t row_offset, int64_t col_offset) {
  ctx->saved_data["grid"] = grid;
  ctx->saved_data["token_offset"] = token_offset;
  ctx->saved_data["row_offset"] = row_offset;
  ctx->saved_data["col_offset"] = col_offset;
}

class Pos2dAddBackwardFunction : public torch::autograd::Function<Pos2dAddBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& grad_out,
      at::IntArrayRef grid,
      const c10::SymInt& max_h,
      const c10::SymInt& max_w,
      int64_t token_offset,
      int64_t row_offset,
      int64_t col_offset) {
    save_geometry(ctx, grid, token_offset, row_offset, col_offset);
    ctx->saved_data["B"] = grad_out.sym_size(0);
    ctx->saved_data["N"] = grad_out.sym_size(1);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_h, grad_w] =
        pos2d_add_backward_symint(grad_out, grid, max_h, max_w, token_offset, row_offset, col_offset);
    return {grad_h, grad_w};
  }

  // d<grad_h, gg_h> + <grad_w, gg_w> / d grad_out puts gg_h[row] + gg_w[col] on every grid token
  // and zero elsewhere: pos2d_add of gg_h, gg_w onto zeros.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& s = ctx->saved_data;
    const c10::SymInt D = grads[0].sym_size(1);
    const at::Tensor base = at::zeros_symint({s.at("B").toSymInt(), s.at("N").toSymInt(), D}, grads[0].options());
    const auto grid = s.at("grid").toIntVector();
    at::Tensor grad_grad_out = pos2d_add(
        base, grads[0], grads[1], grid, s.at("token_offset").toInt(), s.at("row_offset").toInt(),
        s.at("col_offset").toInt());
    return {grad_grad_out, Variable(), Variable(), Variable(), Variable(), Variable(), Variable()};
  }
};

class Pos2dAddFunction : public torch::autograd::Function<Pos2dAddFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& x,
      const Variable& pos_h,
      const Variable& pos_w,
      at::IntArrayRef grid,
      int64_t token_offset,
      int64_t row_offset,
      int64_t col_offset) {
    save_geometry(ctx, grid, token_offset, row_offset, col_offset);
    ctx->saved_data["max_h"] = pos_h.sym_size(0);
    ctx->saved_data["max_w"] = pos_w.sym_size(0);
    at::AutoDispatchBelowADInplaceOrView guard;
    return {pos2d_add(x, pos_h, pos_w, grid, token_offset, row_offset, col_offset)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& s = ctx->saved_data;
    const at::Tensor& grad_out = grads[0];
    Variable grad_h, grad_w;
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      // Through the dispatcher, so that under create_graph the backward is itself differentiable.
      std::tie(grad_h, grad_w) = pos2d_add_backward_symint(
          grad_out, s.at("grid").toIntVector(), s.at("max_h").toSymInt(), s.at("max_w").toSymInt(),
          s.at("token_offset").toInt(), s.at("row_offset").toInt(), s.at("col_offset").toInt());
    }
    return {
        ctx->needs_input_grad(0) ? grad_out : Variable(),
        ctx->needs_input_grad(1) ? grad_h : Variable(),
        ctx->needs_input_grad(2) ? grad_w : Variable(),
        Variable(),
        Variable(),
        Variable(),
        Variable()};
  }
};

at::Tensor pos2d_add_autograd(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  return Pos2dAddFunction::apply(x, pos_h, pos_w, grid, token_offset, row_offset, col_offset)[0];
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_backward_autograd(
    const at::Tensor& grad_out,
    at::IntArrayRef grid,
    c10::SymInt max_h,
    c10::SymInt max_w,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  auto out = Pos2dAddBackwardFunction::apply(grad_out, grid, max_h, max_w, token_offset, row_offset, col_offset);
  return {out[0], out[1]};
}

at::Tensor& pos2d_add__autograd(
    at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  return inplace_for_inference("pos2d_add_", "pos2d_add", x, {&pos_h, &pos_w}, [&] {
    pos2d_add_(x, pos_h, pos_w, grid, token_offset, row_offset, col_offset);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, Autograd, m) {
  m.impl("pos2d_add", &pos2d_add_autograd);
  m.impl("pos2d_add_backward", &pos2d_add_backward_autograd);
  m.impl("pos2d_add_", &pos2d_add__autograd);
}

}  // namespace jitrope
