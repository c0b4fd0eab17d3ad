// C++ entry points of jitrope::rope2d (dispatcher calls), its device check on the BackendSelect key,
// its argument check, and its one host wrapper for the CPU and CUDA keys: argument checks, device
// guard, outputs, the empty case, the accumulation-type tables and the plane geometry (contiguous
// copies where it cannot describe a layout), then the device's launcher (common/launch.h).
#include "ops/rope2d.h"

#include <array>
#include <initializer_list>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/launch.h"
#include "common/op_utils.h"
#include "ops/rope2d_impl.h"

namespace jitrope {
namespace {

using Rope2dSig = decltype(rope2d);
using Rope2dInplaceSig = decltype(rope2d_);
using Rope2dBackwardSig = decltype(rope2d_backward);

const c10::TypedOperatorHandle<Rope2dSig>& rope2d_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("jitrope::rope2d", "").typed<Rope2dSig>();
  return op;
}

const c10::TypedOperatorHandle<Rope2dInplaceSig>& rope2d_inplace_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("jitrope::rope2d_", "").typed<Rope2dInplaceSig>();
  return op;
}

const c10::TypedOperatorHandle<Rope2dBackwardSig>& rope2d_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("jitrope::rope2d_backward", "").typed<Rope2dBackwardSig>();
  return op;
}

// freqs_index: int64 [N], and every value a row of freqs [F, ...]. The values are read on the host
// (one wait for a CUDA device): an index out of range must fail here, never read out of bounds.
void check_freqs_index(
    const char* op, const char* x_name, const at::Tensor& index, int64_t N, const at::Tensor& freqs) {
  TORCH_CHECK(
      index.scalar_type() == at::kLong, op, ": freqs_index must be an int64 tensor [N], got dtype ",
      dtype_name(index.scalar_type()));
  TORCH_CHECK(
      index.dim() == 1 && index.size(0) == N, op, ": freqs_index must have shape [N] = [", N,
      "] (one table per token of ", x_name, "), got ", index.sizes());
  if (N == 0) {
    return;
  }
  const auto [lo, hi] = at::aminmax(index);
  const at::Tensor range = at::stack({lo, hi}).cpu();
  const int64_t min = range[0].item<int64_t>(), max = range[1].item<int64_t>(), F = freqs.size(0);
  TORCH_CHECK(
      min >= 0 && max < F, op, ": freqs_index values must be in [0, F) = [0, ", F, ") (the tables of freqs of shape ",
      freqs.sizes(), "), got values in [", min, ", ", max, "]");
}

}  // namespace

at::Tensor rope2d(
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  return rope2d_op().call(x, coords, freqs, interleaved, freqs_index);
}

at::Tensor& rope2d_(
    at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  return rope2d_inplace_op().call(x, coords, freqs, interleaved, freqs_index);
}

std::tuple<at::Tensor, at::Tensor> rope2d_backward(
    const at::Tensor& grad_out,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const std::optional<at::Tensor>& x,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  return rope2d_backward_op().call(grad_out, coords, freqs, x, interleaved, freqs_index);
}

void check_rope2d_args(
    const char* op,
    const char* x_name,
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const at::Tensor* fwd_x,
    bool inplace,
    const std::optional<at::Tensor>& freqs_index) {
  check_defined(op, x_name, x);
  check_defined(op, "coords", coords);
  check_defined(op, "freqs", freqs);
  check_float_dtype(op, x_name, x);
  TORCH_CHECK(x.dim() >= 3, op, ": ", x_name, " must have shape [..., H, N, D] (at least 3 dims), got ", x.sizes());
  const int64_t H = x.size(-3), N = x.size(-2), D = x.size(-1);
  TORCH_CHECK(
      D % 2 == 0, op, ": ", x_name, " must have an even last dim D (channel pairs), got D = ", D, " in ", x_name,
      " of shape ", x.sizes());
  check_floating(op, "coords", "[N, 2]", coords);
  TORCH_CHECK(
      coords.dim() == 2 && coords.size(0) == N && coords.size(1) == 2, op, ": coords must have shape [N, 2] = [", N,
      ", 2] (one (row, column) per token of ", x_name, ": [..., H, N, D] = ", x.sizes(), "), got ", coords.sizes());
  const bool indexed = freqs_index.has_value() && freqs_index->defined();
  // With freqs_index, freqs has a leading table dim F: dims from `t` on are those of a plain call.
  const int64_t t = indexed ? 1 : 0;
  check_floating(op, "freqs", indexed ? "[F, 2, D/2] or [F, H, 2, D/2]" : "[2, D/2] or [H, 2, D/2]", freqs);
  const bool shared = freqs.dim() == 2 + t && freqs.size(t) == 2 && freqs.size(t + 1) == D / 2;
  const bool per_head =
      freqs.dim() == 3 + t && freqs.size(t) == H && freqs.size(t + 1) == 2 && freqs.size(t + 2) == D / 2;
  const char* table = indexed ? "F, " : "";
  TORCH_CHECK(
      shared || per_head, op, ": freqs must have shape [", table, "2, D/2] = [", table, "2, ", D / 2, "] (shared) or [",
      table, "H, 2, D/2] = [", table, H, ", 2, ", D / 2, "] (per head)", indexed ? " with freqs_index" : "", " for ",
      x_name, " of shape ", x.sizes(), ", got ", freqs.sizes());
  check_same_device(
      op, {x_name, x},
      {{"coords", coords}, {"freqs", freqs}, {"x (the forward input)", fwd_x}, {"freqs_index", freqs_index}});
  if (fwd_x != nullptr) {
    TORCH_CHECK(
        fwd_x->sizes() == x.sizes(), op, ": x (the forward input) must have grad_out's shape ", x.sizes(), ", got ",
        fwd_x->sizes());
    check_same_dtype(op, "x (the forward input)", *fwd_x, "grad_out", x);
  }
  if (indexed) {
    check_freqs_index(op, x_name, *freqs_index, N, freqs);
  }
  if (inplace) {
    check_inplace_overlap(op, x_name, x, {&coords, &freqs});
    if (indexed) {
      check_inplace_overlap(op, x_name, x, {&*freqs_index});
    }
  }
}

namespace detail {

std::tuple<at::Tensor, at::Tensor> rope2d_acc_tables(
    const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs) {
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t half = x.size(-1) / 2;
  auto c = coords.to(acc).contiguous();
  auto f = freqs.to(acc).contiguous().view({-1, 2, half});
  return {c, f};
}

}  // namespace detail
namespace {

// One dim of the planes with its stride in each tensor.
struct PlaneDim {
  int64_t size;
  std::array<int64_t, rope2d_math::kMaxTensors> stride;
};

// Plane dims, outermost first: the first n_plane_dims dims (the leading dims, and H too when all
// heads share one group), size-1 dims dropped, a dim merged into the one outside it when every
// tensor steps through both as one dim. `planes` gets their product.
std::vector<PlaneDim> coalesced_plane_dims(
    const std::array<at::IntArrayRef, rope2d_math::kMaxTensors>& strides,
    at::IntArrayRef sizes,
    int64_t nt,
    int64_t n_plane_dims,
    int64_t& planes) {
  std::vector<PlaneDim> dims;
  planes = 1;
  for (int64_t d = 0; d < n_plane_dims; ++d) {
    PlaneDim cur{sizes[d], {}};
    for (int64_t t = 0; t < nt; ++t) {
      cur.stride[t] = strides[t][d];
    }
    planes *= cur.size;
    if (cur.size == 1) {
      continue;
    }
    bool merge = !dims.empty();
    for (int64_t t = 0; merge && t < nt; ++t) {
      merge = dims.back().stride[t] == cur.stride[t] * cur.size;
    }
    if (merge) {
      dims.back().size *= cur.size;
      dims.back().stride = cur.stride;
    } else {
      dims.push_back(cur);
    }
  }
  return dims;
}

// Geometry of tensors of x's shape (tensor 0 gives the shape; 1 and 2 may differ in strides):
// frequency groups, and each group's planes coalesced into at most kMaxPlaneDims dims. Returns
// false when the leading dims cannot be coalesced that far (the kernels then work on contiguous
// copies).
bool make_rope2d_geometry(
    std::initializer_list<const at::Tensor*> tensors, bool per_head, rope2d_math::Rope2dGeometry& geo) {
  using rope2d_math::kMaxPlaneDims;
  using rope2d_math::kMaxTensors;
  const at::Tensor& x = **tensors.begin();
  const int64_t nd = x.dim();
  const int64_t nt = static_cast<int64_t>(tensors.size());
  TORCH_INTERNAL_ASSERT(nt >= 1 && nt <= kMaxTensors);

  std::array<at::IntArrayRef, kMaxTensors> strides;
  int64_t t = 0;
  for (const auto* ten : tensors) {
    TORCH_INTERNAL_ASSERT(ten->sizes() == x.sizes());
    strides[t++] = ten->strides();
  }
  geo = rope2d_math::Rope2dGeometry{};
  geo.n_tokens = x.size(-2);
  geo.half = x.size(-1) / 2;
  geo.groups = per_head ? x.size(-3) : 1;
  for (t = 0; t < nt; ++t) {
    geo.token_stride[t] = strides[t][nd - 2];
    geo.channel_stride[t] = strides[t][nd - 1];
    geo.group_stride[t] = per_head ? strides[t][nd - 3] : 0;
  }

  int64_t planes = 1;
  const std::vector<PlaneDim> dims = coalesced_plane_dims(strides, x.sizes(), nt, per_head ? nd - 3 : nd - 2, planes);
  TORCH_CHECK(
      planes <= std::numeric_limits<int32_t>::max(), "rope2d: x has ", planes,
      " [N, D] matrices per frequency row (product of the leading dims", per_head ? "" : " and H",
      "); at most 2^31 - 1 are supported");
  geo.planes_per_group = planes;
  if (static_cast<int64_t>(dims.size()) > kMaxPlaneDims) {
    return false;
  }
  geo.planes.ndim = static_cast<int>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) {
    const PlaneDim& dim = dims[dims.size() - 1 - i];
    geo.planes.sizes[i] = rope2d_math::PlaneDivider(static_cast<uint32_t>(dim.size));
    for (t = 0; t < nt; ++t) {
      geo.planes.strides[i][t] = dim.stride[t];
    }
  }
  return true;
}

// The entries every call passes before a backend kernel (common/op_utils.h: check_same_device).
at::Tensor rope2d_entry(
    c10::DispatchKeySet ks,
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  check_same_device("rope2d", {"x", x}, {{"coords", coords}, {"freqs", freqs}, {"freqs_index", freqs_index}});
  return rope2d_op().redispatch(ks & kAfterEntry, x, coords, freqs, interleaved, freqs_index);
}

at::Tensor& rope2d__entry(
    c10::DispatchKeySet ks,
    at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  check_same_device("rope2d_", {"x", x}, {{"coords", coords}, {"freqs", freqs}, {"freqs_index", freqs_index}});
  return rope2d_inplace_op().redispatch(ks & kAfterEntry, x, coords, freqs, interleaved, freqs_index);
}

std::tuple<at::Tensor, at::Tensor> rope2d_backward_entry(
    c10::DispatchKeySet ks,
    const at::Tensor& grad_out,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const std::optional<at::Tensor>& x,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  check_same_device(
      "rope2d_backward", {"grad_out", grad_out},
      {{"coords", coords}, {"freqs", freqs}, {"x (the forward input)", x}, {"freqs_index", freqs_index}});
  return rope2d_backward_op().redispatch(ks & kAfterEntry, grad_out, coords, freqs, x, interleaved, freqs_index);
}

// Fills a.geo for in, out (and x) and launches; where the geometry cannot describe the layout, the
// launcher works on contiguous copies and out gets the result.
void launch_rotate(Rope2dLaunch& a, const at::Tensor& in, const at::Tensor& out, const at::Tensor& x, bool per_head) {
  const bool fits = x.defined() ? make_rope2d_geometry({&in, &out, &x}, per_head, a.geo)
                                : make_rope2d_geometry({&in, &out}, per_head, a.geo);
  if (!fits) {
    at::Tensor tmp = at::empty(in.sizes(), in.options());
    launch_rotate(a, in.contiguous(), tmp, x.defined() ? x.contiguous() : x, per_head);
    out.copy_(tmp);
    return;
  }
  a.in = in;
  a.out = out;
  a.x = x;
  JITROPE_LAUNCH(in.device(), rope2d_rotate, a);
}

// out = in rotated by phi (or -phi when `inverse`); out may be in (rope2d_). With the forward input
// x, returns the freqs gradient [F * Hf, 2, D/2] in the accumulation dtype, else an undefined tensor.
at::Tensor rotate(
    const at::Tensor& in,
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const std::optional<at::Tensor>& freqs_index,
    bool interleaved,
    bool inverse) {
  Rope2dLaunch a;
  std::tie(a.coords, a.freqs) = detail::rope2d_acc_tables(in, coords, freqs);
  a.index = detail::rope2d_index(freqs_index);
  a.interleaved = interleaved;
  a.inverse = inverse;
  if (x.defined()) {
    a.grad_freqs = at::empty_like(a.freqs);
  }
  launch_rotate(a, in, out, x, rope2d_per_head(freqs, freqs_index));
  return a.grad_freqs;
}

at::Tensor rope2d_kernel(
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  check_rope2d_args("rope2d", "x", x, coords, freqs, nullptr, false, freqs_index);
  const at::OptionalDeviceGuard guard(at::device_of(x));
  at::Tensor out = at::empty_like(x);
  if (out.numel() > 0) {
    rotate(x, out, at::Tensor(), coords, freqs, freqs_index, interleaved, /*inverse=*/false);
  }
  return out;
}

at::Tensor& rope2d__kernel(
    at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  check_rope2d_args("rope2d_", "x", x, coords, freqs, nullptr, /*inplace=*/true, freqs_index);
  const at::OptionalDeviceGuard guard(at::device_of(x));
  if (x.numel() > 0) {
    rotate(x, x, at::Tensor(), coords, freqs, freqs_index, interleaved, /*inverse=*/false);
  }
  return x;
}

std::tuple<at::Tensor, at::Tensor> rope2d_backward_kernel(
    const at::Tensor& grad_out,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const std::optional<at::Tensor>& x,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  const bool want_freqs = x.has_value() && x->defined();
  check_rope2d_args(
      "rope2d_backward", "grad_out", grad_out, coords, freqs, want_freqs ? &*x : nullptr, false, freqs_index);
  const at::OptionalDeviceGuard guard(at::device_of(grad_out));
  at::Tensor grad_x = at::empty_like(grad_out);
  if (!want_freqs) {
    if (grad_x.numel() > 0) {
      rotate(grad_out, grad_x, at::Tensor(), coords, freqs, freqs_index, interleaved, /*inverse=*/true);
    }
    return {grad_x, at::empty({0}, freqs.options())};
  }
  at::Tensor grad_freqs = at::empty(freqs.sizes(), freqs.options());
  if (grad_x.numel() == 0) {
    grad_freqs.zero_();
  } else {
    grad_freqs.copy_(
        rotate(grad_out, grad_x, *x, coords, freqs, freqs_index, interleaved, /*inverse=*/true).view(freqs.sizes()));
  }
  return {grad_x, grad_freqs};
}

void register_kernels(torch::Library& m) {
  m.impl("rope2d", &rope2d_kernel);
  m.impl("rope2d_", &rope2d__kernel);
  m.impl("rope2d_backward", &rope2d_backward_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, BackendSelect, m) {
  m.impl("rope2d", &rope2d_entry);
  m.impl("rope2d_", &rope2d__entry);
  m.impl("rope2d_backward", &rope2d_backward_entry);
}

JITROPE_REGISTER_KERNELS(register_kernels)

}  // namespace jitrope
