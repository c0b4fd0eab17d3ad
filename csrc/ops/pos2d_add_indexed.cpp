// C++ entry points of jitrope::pos2d_add_indexed (dispatcher calls), its device check on the
// BackendSelect key, and its one host wrapper for the CPU and CUDA keys: argument checks (index
// values included), device guard, outputs, the empty case, then the device's launcher
// (common/launch.h).
#include "ops/pos2d_add_indexed.h"

#include <algorithm>
#include <array>

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "common/launch.h"
#include "common/op_utils.h"
#include "ops/pos2d_add_impl.h"
#include "ops/pos2d_add_indexed_impl.h"

namespace jitrope {
namespace {

const auto& pos2d_add_indexed_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("jitrope::pos2d_add_indexed", "")
                             .typed<decltype(pos2d_add_indexed)>();
  return op;
}

const auto& pos2d_add_indexed_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("jitrope::pos2d_add_indexed_backward", "")
                             .typed<decltype(pos2d_add_indexed_backward)>();
  return op;
}

}  // namespace

at::Tensor pos2d_add_indexed(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols) {
  return pos2d_add_indexed_op().call(x, pos_h, pos_w, rows, cols);
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_indexed_backward(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w) {
  return pos2d_add_indexed_backward_op().call(grad_out, rows, cols, max_h, max_w);
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_indexed_backward_symint(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, c10::SymInt max_h, c10::SymInt max_w) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jitrope::pos2d_add_indexed_backward", "")
                       .typed<decltype(pos2d_add_indexed_backward_symint)>();
  return op.call(grad_out, rows, cols, std::move(max_h), std::move(max_w));
}

namespace {

void check_activation(const char* op, const char* name, const at::Tensor& t) {
  check_defined(op, name, t);
  TORCH_CHECK(t.dim() >= 2, op, ": ", name, " must have shape [..., N, D] (at least 2 dims), got shape ", t.sizes());
  check_float_dtype(op, name, t);
}

// A position table: [rows, D] with x's D, dtype and device.
void check_table(const char* op, const char* name, const char* rows, const at::Tensor& table, const at::Tensor& x) {
  check_defined(op, name, table);
  const int64_t D = x.size(-1);
  TORCH_CHECK(
      table.dim() == 2 && table.size(1) == D, op, ": ", name, " must be [", rows, ", D] with x's D = ", D,
      ", got shape ", table.sizes());
  check_same_dtype(op, name, table, "x", x);
  check_same_device(op, {"x", x}, {{name, table}});
}

// An index tensor: int64 [N], one entry per token of x, on x's device.
void check_index(const char* op, const char* name, const at::Tensor& idx, const char* x_name, const at::Tensor& x) {
  check_defined(op, name, idx);
  const int64_t N = x.size(-2);
  TORCH_CHECK(
      idx.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor [N] (one index per token), got dtype ",
      dtype_name(idx.scalar_type()));
  TORCH_CHECK(
      idx.dim() == 1 && idx.size(0) == N, op, ": ", name, " must have shape [N] = [", N, "] (one index per token of ",
      x_name, ": [..., N, D] = ", x.sizes(), "), got shape ", idx.sizes());
  check_same_device(op, {x_name, x}, {{name, idx}});
}

// rows and cols must lie in [-1, max_h) and [-1, max_w): read on the host (CPU), or as their
// minima and maxima in one synchronizing copy (CUDA and other devices). Meta tensors have no values.
void check_index_values(const char* op, const at::Tensor& rows, int64_t max_h, const at::Tensor& cols, int64_t max_w) {
  if (rows.numel() == 0 || rows.is_meta()) {
    return;
  }
  std::array<int64_t, 4> range{};  // min, max of rows, then of cols
  if (rows.is_cpu()) {
    const at::Tensor idx[2] = {rows.contiguous(), cols.contiguous()};
    for (int t = 0; t < 2; ++t) {
      const int64_t* p = idx[t].const_data_ptr<int64_t>();
      const auto [lo, hi] = std::minmax_element(p, p + idx[t].numel());
      range[2 * t] = *lo;
      range[2 * t + 1] = *hi;
    }
  } else {
    const auto [rmin, rmax] = at::aminmax(rows);
    const auto [cmin, cmax] = at::aminmax(cols);
    const at::Tensor host = at::stack({rmin, rmax, cmin, cmax}).to(at::kCPU);
    std::copy_n(host.const_data_ptr<int64_t>(), 4, range.begin());
  }
  TORCH_CHECK(
      range[0] >= -1 && range[1] < max_h, op, ": rows must hold values in [-1, max_h) = [-1, ", max_h,
      ") (a pos_h row, or -1 for none), got values in [", range[0], ", ", range[1], "]");
  TORCH_CHECK(
      range[2] >= -1 && range[3] < max_w, op, ": cols must hold values in [-1, max_w) = [-1, ", max_w,
      ") (a pos_w row, or -1 for none), got values in [", range[2], ", ", range[3], "]");
}

// Argument checks of pos2d_add_indexed; each message names the argument, what it got and what it
// wanted. The index values are checked too (on a CUDA device with one synchronizing read of their
// minima and maxima), so no kernel reads out of bounds.
void check_pos2d_add_indexed_args(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols) {
  constexpr const char* op = "pos2d_add_indexed";
  check_activation(op, "x", x);
  check_table(op, "pos_h", "max_h", pos_h, x);
  check_table(op, "pos_w", "max_w", pos_w, x);
  check_index(op, "rows", rows, "x", x);
  check_index(op, "cols", cols, "x", x);
  check_index_values(op, rows, pos_h.size(0), cols, pos_w.size(0));
}

// The same checks for pos2d_add_indexed_backward, which knows the tables only by their row counts.
void check_pos2d_add_indexed_backward_args(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w) {
  constexpr const char* op = "pos2d_add_indexed_backward";
  check_activation(op, "grad_out", grad_out);
  check_index(op, "rows", rows, "grad_out", grad_out);
  check_index(op, "cols", cols, "grad_out", grad_out);
  TORCH_CHECK(max_h >= 0 && max_w >= 0, op, ": max_h and max_w must be >= 0, got ", max_h, " and ", max_w);
  check_index_values(op, rows, max_h, cols, max_w);
}

// The entries every call passes before a backend kernel (common/op_utils.h: check_same_device).
at::Tensor pos2d_add_indexed_entry(
    c10::DispatchKeySet ks,
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols) {
  check_same_device(
      "pos2d_add_indexed", {"x", x}, {{"pos_h", pos_h}, {"pos_w", pos_w}, {"rows", rows}, {"cols", cols}});
  return pos2d_add_indexed_op().redispatch(ks & kAfterEntry, x, pos_h, pos_w, rows, cols);
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_indexed_backward_entry(
    c10::DispatchKeySet ks,
    const at::Tensor& grad_out,
    const at::Tensor& rows,
    const at::Tensor& cols,
    int64_t max_h,
    int64_t max_w) {
  check_same_device("pos2d_add_indexed_backward", {"grad_out", grad_out}, {{"rows", rows}, {"cols", cols}});
  return pos2d_add_indexed_backward_op().redispatch(ks & kAfterEntry, grad_out, rows, cols, max_h, max_w);
}

at::Tensor pos2d_add_indexed_kernel(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols) {
  check_pos2d_add_indexed_args(x, pos_h, pos_w, rows, cols);
  const at::OptionalDeviceGuard guard(at::device_of(x));
  Pos2dAddIndexedForward a;
  a.x = detail::kernel_layout(x, a.lead);
  a.out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (a.out.numel() == 0) {
    return a.out;
  }
  a.B = detail::leading_count(x);
  a.pos_h = pos_h.contiguous();
  a.pos_w = pos_w.contiguous();
  a.rows = rows.contiguous();
  a.cols = cols.contiguous();
  JITROPE_LAUNCH(x.device(), pos2d_add_indexed_forward, a);
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_indexed_backward_kernel(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w) {
  check_pos2d_add_indexed_backward_args(grad_out, rows, cols, max_h, max_w);
  const at::OptionalDeviceGuard guard(at::device_of(grad_out));
  Pos2dAddIndexedBackward a;
  a.grad_out = detail::kernel_layout(grad_out, a.lead);
  const int64_t N = grad_out.size(-2), D = grad_out.size(-1);
  a.grad_h = at::empty({max_h, D}, grad_out.options());
  a.grad_w = at::empty({max_w, D}, grad_out.options());
  if (grad_out.numel() == 0 || max_h + max_w == 0) {
    a.grad_h.zero_();
    a.grad_w.zero_();
    return {a.grad_h, a.grad_w};
  }
  a.B = detail::leading_count(grad_out);
  a.rows = rows.contiguous();
  a.cols = cols.contiguous();
  a.chunks = pos2d_add_math::batch_chunks(a.B, N * D);
  if (a.B > 1) {
    a.partials = at::empty({a.chunks.count, N, D}, grad_out.options().dtype(acc_dtype(grad_out.scalar_type())));
  }
  JITROPE_LAUNCH(grad_out.device(), pos2d_add_indexed_backward, a);
  return {a.grad_h, a.grad_w};
}

void register_kernels(torch::Library& m) {
  m.impl("pos2d_add_indexed", &pos2d_add_indexed_kernel);
  m.impl("pos2d_add_indexed_backward", &pos2d_add_indexed_backward_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, BackendSelect, m) {
  m.impl("pos2d_add_indexed", &pos2d_add_indexed_entry);
  m.impl("pos2d_add_indexed_backward", &pos2d_add_indexed_backward_entry);
}

JITROPE_REGISTER_KERNELS(register_kernels)

}  // namespace jitrope
