// C++ entry points of jitrope::pos2d_add_indexed (dispatcher calls), the one place its arguments
// (index values included) are validated, and the leading-dims geometry its kernels share.
#include "ops/pos2d_add_indexed.h"
#include "ops/pos2d_add_indexed_impl.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>

#include "common/op_utils.h"

namespace jitrope {

at::Tensor pos2d_add_indexed(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jitrope::pos2d_add_indexed", "")
                       .typed<decltype(pos2d_add_indexed)>();
  return op.call(x, pos_h, pos_w, rows, cols);
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_indexed_backward(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jitrope::pos2d_add_indexed_backward", "")
                       .typed<decltype(pos2d_add_indexed_backward)>();
  return op.call(grad_out, rows, cols, max_h, max_w);
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

}  // namespace

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

void check_pos2d_add_indexed_backward_args(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w) {
  constexpr const char* op = "pos2d_add_indexed_backward";
  check_activation(op, "grad_out", grad_out);
  check_index(op, "rows", rows, "grad_out", grad_out);
  check_index(op, "cols", cols, "grad_out", grad_out);
  TORCH_CHECK(max_h >= 0 && max_w >= 0, op, ": max_h and max_w must be >= 0, got ", max_h, " and ", max_w);
  check_index_values(op, rows, max_h, cols, max_w);
}

namespace detail {

bool leading_dims(const at::Tensor& x, pos2d_add_indexed_math::LeadingDims& lead) {
  lead = pos2d_add_indexed_math::LeadingDims{};
  for (int64_t d = 0; d < x.dim() - 2; ++d) {
    const int64_t size = x.size(d), stride = x.stride(d);
    if (size == 1) {
      continue;
    }
    if (lead.ndim > 0 && lead.stride[lead.ndim - 1] == stride * size) {
      lead.size[lead.ndim - 1] *= size;
      lead.stride[lead.ndim - 1] = stride;
      continue;
    }
    if (lead.ndim == pos2d_add_indexed_math::kMaxLeadingDims) {
      return false;
    }
    lead.size[lead.ndim] = size;
    lead.stride[lead.ndim] = stride;
    ++lead.ndim;
  }
  return true;
}

}  // namespace detail
}  // namespace jitrope
