// C++ entry points of jitrope::pos2d_add (dispatcher calls, like torchvision's ops/roi_align.cpp),
// its device check on the BackendSelect key, and its one host wrapper for the CPU and CUDA keys:
// argument checks, device guard, outputs, the empty case, then the device's launcher
// (common/launch.h). Also the row layout (kernel_layout) that pos2d_add_indexed shares.
#include "ops/pos2d_add.h"

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "common/launch.h"
#include "common/op_utils.h"
#include "ops/pos2d_add_impl.h"

namespace jitrope {
namespace {

const auto& pos2d_add_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("jitrope::pos2d_add", "").typed<decltype(pos2d_add)>();
  return op;
}

const auto& pos2d_add_inplace_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("jitrope::pos2d_add_", "").typed<decltype(pos2d_add_)>();
  return op;
}

}  // namespace

at::Tensor pos2d_add(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  return pos2d_add_op().call(x, pos_h, pos_w, grid, token_offset, row_offset, col_offset);
}

at::Tensor& pos2d_add_(
    at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  return pos2d_add_inplace_op().call(x, pos_h, pos_w, grid, token_offset, row_offset, col_offset);
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_backward(
    const at::Tensor& grad_out,
    at::IntArrayRef grid,
    int64_t max_h,
    int64_t max_w,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jitrope::pos2d_add_backward", "")
                       .typed<decltype(pos2d_add_backward)>();
  return op.call(grad_out, grid, max_h, max_w, token_offset, row_offset, col_offset);
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_backward_symint(
    const at::Tensor& grad_out,
    at::IntArrayRef grid,
    c10::SymInt max_h,
    c10::SymInt max_w,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("jitrope::pos2d_add_backward", "")
                       .typed<decltype(pos2d_add_backward_symint)>();
  return op.call(grad_out, grid, std::move(max_h), std::move(max_w), token_offset, row_offset, col_offset);
}

namespace {

void check_activation(const char* op, const char* name, const at::Tensor& t) {
  check_defined(op, name, t);
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be a 3-D tensor [B, N, D], got shape ", t.sizes());
  check_float_dtype(op, name, t);
}

// A position table: [rows, D] with x's D and dtype (devices: check_same_device).
void check_table(const char* op, const char* name, const char* rows, const at::Tensor& table, const at::Tensor& x) {
  check_defined(op, name, table);
  const int64_t D = x.size(2);
  TORCH_CHECK(
      table.dim() == 2 && table.size(1) == D, op, ": ", name, " must be [", rows, ", D] with x's D = ", D,
      ", got shape ", table.sizes());
  check_same_dtype(op, name, table, "x", x);
}

// The grid (gh, gw) at the offsets must fit in the tables (max_h, max_w rows) and in N tokens.
// Written as differences so that no sum or product of user values can overflow.
void check_geometry(
    const char* op,
    const char* x_name,
    const at::Tensor& x,
    at::IntArrayRef grid,
    int64_t max_h,
    int64_t max_w,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  TORCH_CHECK(grid.size() == 2, op, ": grid must be (gh, gw), got ", grid.size(), " values ", grid);
  const int64_t gh = grid[0];
  const int64_t gw = grid[1];
  const int64_t N = x.size(1);
  TORCH_CHECK(gh >= 0 && gw >= 0, op, ": grid (gh, gw) must be non-negative, got ", grid);
  TORCH_CHECK(token_offset >= 0, op, ": token_offset must be >= 0, got ", token_offset);
  TORCH_CHECK(row_offset >= 0, op, ": row_offset must be >= 0, got ", row_offset);
  TORCH_CHECK(col_offset >= 0, op, ": col_offset must be >= 0, got ", col_offset);
  TORCH_CHECK(
      row_offset <= max_h && gh <= max_h - row_offset, op, ": grid rows need pos_h[", row_offset, " : ", row_offset,
      " + gh] with gh = ", gh, ", but pos_h has max_h = ", max_h, " rows (wanted max_h >= row_offset + gh)");
  TORCH_CHECK(
      col_offset <= max_w && gw <= max_w - col_offset, op, ": grid columns need pos_w[", col_offset, " : ", col_offset,
      " + gw] with gw = ", gw, ", but pos_w has max_w = ", max_w, " rows (wanted max_w >= col_offset + gw)");
  TORCH_CHECK(
      token_offset <= N && (gw == 0 || gh <= (N - token_offset) / gw), op, ": grid ", grid,
      " has gh*gw tokens starting at token_offset = ", token_offset, ", more than ", x_name,
      " holds: wanted N >= token_offset + gh*gw, got N = ", N, " (", x_name, " of shape ", x.sizes(), ")");
}

// Argument checks of pos2d_add / pos2d_add_ (each message names the operator, the argument, what
// it got and what it wanted); the in-place twin also refuses an x that overlaps itself or the tables.
void check_pos2d_add_args(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset,
    bool inplace) {
  const char* op = inplace ? "pos2d_add_" : "pos2d_add";
  check_activation(op, "x", x);
  check_same_device(op, {"x", x}, {{"pos_h", pos_h}, {"pos_w", pos_w}});
  check_table(op, "pos_h", "max_h", pos_h, x);
  check_table(op, "pos_w", "max_w", pos_w, x);
  check_geometry(op, "x", x, grid, pos_h.size(0), pos_w.size(0), token_offset, row_offset, col_offset);
  if (inplace) {
    check_inplace_overlap(op, "x", x, {&pos_h, &pos_w});
  }
}

// The same checks for pos2d_add_backward, which knows the tables only by their row counts.
void check_pos2d_add_backward_args(
    const at::Tensor& grad_out,
    at::IntArrayRef grid,
    int64_t max_h,
    int64_t max_w,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  constexpr const char* op = "pos2d_add_backward";
  check_activation(op, "grad_out", grad_out);
  TORCH_CHECK(max_h >= 0 && max_w >= 0, op, ": max_h and max_w must be >= 0, got ", max_h, " and ", max_w);
  check_geometry(op, "grad_out", grad_out, grid, max_h, max_w, token_offset, row_offset, col_offset);
}

}  // namespace

namespace {

// The entries every call passes before a backend kernel (common/op_utils.h: check_same_device).
// pos2d_add_backward takes one tensor and needs none.
at::Tensor pos2d_add_entry(
    c10::DispatchKeySet ks,
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  check_same_device("pos2d_add", {"x", x}, {{"pos_h", pos_h}, {"pos_w", pos_w}});
  return pos2d_add_op().redispatch(ks & kAfterEntry, x, pos_h, pos_w, grid, token_offset, row_offset, col_offset);
}

at::Tensor& pos2d_add__entry(
    c10::DispatchKeySet ks,
    at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  check_same_device("pos2d_add_", {"x", x}, {{"pos_h", pos_h}, {"pos_w", pos_w}});
  return pos2d_add_inplace_op().redispatch(
      ks & kAfterEntry, x, pos_h, pos_w, grid, token_offset, row_offset, col_offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, BackendSelect, m) {
  m.impl("pos2d_add", &pos2d_add_entry);
  m.impl("pos2d_add_", &pos2d_add__entry);
}

namespace detail {

bool leading_dims(const at::Tensor& t, pos2d_add_math::LeadingDims& lead) {
  lead = pos2d_add_math::LeadingDims{};
  for (int64_t d = 0; d < t.dim() - 2; ++d) {
    const int64_t size = t.size(d), stride = t.stride(d);
    if (size == 1) {
      continue;
    }
    if (lead.ndim > 0 && lead.stride[lead.ndim - 1] == stride * size) {
      lead.size[lead.ndim - 1] *= size;
      lead.stride[lead.ndim - 1] = stride;
      continue;
    }
    if (lead.ndim == pos2d_add_math::kMaxLeadingDims) {
      return false;
    }
    lead.size[lead.ndim] = size;
    lead.stride[lead.ndim] = stride;
    ++lead.ndim;
  }
  return true;
}

at::Tensor kernel_layout(const at::Tensor& t, pos2d_add_math::LeadingDims& lead) {
  const bool unit_channels = t.size(-1) <= 1 || t.stride(-1) == 1;
  if (unit_channels && leading_dims(t, lead)) {
    return t;
  }
  at::Tensor c = t.contiguous();
  TORCH_INTERNAL_ASSERT(leading_dims(c, lead));
  return c;
}

int64_t leading_count(const at::Tensor& t) {
  int64_t B = 1;
  for (int64_t d = 0; d < t.dim() - 2; ++d) {
    B *= t.size(d);
  }
  return B;
}

}  // namespace detail
namespace {

// The forward launch: x and out in kernel layout (out may be x).
void launch_forward(
    const at::Tensor& x,
    const at::Tensor& out,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset,
    bool grid_rows_only) {
  const Pos2dAddForward a{x,       out,          pos_h.contiguous(), pos_w.contiguous(), grid[0],
                          grid[1], token_offset, row_offset,         col_offset,         grid_rows_only};
  JITROPE_LAUNCH(x.device(), pos2d_add_forward, a);
}

at::Tensor pos2d_add_kernel(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  check_pos2d_add_args(x, pos_h, pos_w, grid, token_offset, row_offset, col_offset, /*inplace=*/false);
  const at::OptionalDeviceGuard guard(at::device_of(x));
  pos2d_add_math::LeadingDims lead;
  const at::Tensor xr = detail::kernel_layout(x, lead);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out.numel() > 0) {
    launch_forward(xr, out, pos_h, pos_w, grid, token_offset, row_offset, col_offset, /*grid_rows_only=*/false);
  }
  return out;
}

at::Tensor& pos2d_add__kernel(
    at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    at::IntArrayRef grid,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  check_pos2d_add_args(x, pos_h, pos_w, grid, token_offset, row_offset, col_offset, /*inplace=*/true);
  if (x.numel() == 0 || grid[0] * grid[1] == 0) {
    return x;
  }
  const at::OptionalDeviceGuard guard(at::device_of(x));
  pos2d_add_math::LeadingDims lead;
  const at::Tensor xr = detail::kernel_layout(x, lead);  // x itself, or a contiguous copy written back
  launch_forward(xr, xr, pos_h, pos_w, grid, token_offset, row_offset, col_offset, /*grid_rows_only=*/true);
  if (!xr.is_same(x)) {
    x.copy_(xr);
  }
  return x;
}

std::tuple<at::Tensor, at::Tensor> pos2d_add_backward_kernel(
    const at::Tensor& grad_out,
    at::IntArrayRef grid,
    int64_t max_h,
    int64_t max_w,
    int64_t token_offset,
    int64_t row_offset,
    int64_t col_offset) {
  check_pos2d_add_backward_args(grad_out, grid, max_h, max_w, token_offset, row_offset, col_offset);
  const at::OptionalDeviceGuard guard(at::device_of(grad_out));
  Pos2dAddBackward a;
  a.grad_out = detail::kernel_layout(grad_out, a.lead);
  const int64_t B = grad_out.size(0), D = grad_out.size(2);
  a.gh = grid[0];
  a.gw = grid[1];
  a.grad_h = at::empty({max_h, D}, grad_out.options());
  a.grad_w = at::empty({max_w, D}, grad_out.options());
  const int64_t cells = a.gh * a.gw;
  if (grad_out.numel() == 0 || cells == 0) {
    a.grad_h.zero_();
    a.grad_w.zero_();
    return {a.grad_h, a.grad_w};
  }
  a.chunks = pos2d_add_math::batch_chunks(B, cells * D);
  a.partials = at::empty({a.chunks.count, cells, D}, grad_out.options().dtype(acc_dtype(grad_out.scalar_type())));
  a.token_offset = token_offset;
  a.row_offset = row_offset;
  a.col_offset = col_offset;
  JITROPE_LAUNCH(grad_out.device(), pos2d_add_backward, a);
  return {a.grad_h, a.grad_w};
}

void register_kernels(torch::Library& m) {
  m.impl("pos2d_add", &pos2d_add_kernel);
  m.impl("pos2d_add_", &pos2d_add__kernel);
  m.impl("pos2d_add_backward", &pos2d_add_backward_kernel);
}

}  // namespace

JITROPE_REGISTER_KERNELS(register_kernels)

}  // namespace jitrope
