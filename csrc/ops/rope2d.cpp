// C++ entry points of jitrope::rope2d (dispatcher calls), its device check on the BackendSelect key,
// its argument check and the geometry the CPU and CUDA kernels share.
#include "ops/rope2d.h"

#include <array>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/op_utils.h"
#include "ops/rope2d_impl.h"

namespace jitrope {
namespace {

using Rope2dSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
using Rope2dInplaceSig = at::Tensor&(at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
using Rope2dBackwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool);

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

}  // namespace

at::Tensor rope2d(const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs, bool interleaved) {
  return rope2d_op().call(x, coords, freqs, interleaved);
}

at::Tensor& rope2d_(at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs, bool interleaved) {
  return rope2d_inplace_op().call(x, coords, freqs, interleaved);
}

std::tuple<at::Tensor, at::Tensor> rope2d_backward(
    const at::Tensor& grad_out,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const std::optional<at::Tensor>& x,
    bool interleaved) {
  return rope2d_backward_op().call(grad_out, coords, freqs, x, interleaved);
}

void check_rope2d_args(
    const char* op,
    const char* x_name,
    const at::Tensor& x,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const at::Tensor* fwd_x,
    bool inplace) {
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
  check_floating(op, "freqs", "[2, D/2] or [H, 2, D/2]", freqs);
  const bool shared = freqs.dim() == 2 && freqs.size(0) == 2 && freqs.size(1) == D / 2;
  const bool per_head = freqs.dim() == 3 && freqs.size(0) == H && freqs.size(1) == 2 && freqs.size(2) == D / 2;
  TORCH_CHECK(
      shared || per_head, op, ": freqs must have shape [2, D/2] = [2, ", D / 2, "] (shared) or [H, 2, D/2] = [", H,
      ", 2, ", D / 2, "] (per head) for ", x_name, " of shape ", x.sizes(), ", got ", freqs.sizes());
  check_same_device(op, {x_name, x}, {{"coords", coords}, {"freqs", freqs}, {"x (the forward input)", fwd_x}});
  if (fwd_x != nullptr) {
    TORCH_CHECK(
        fwd_x->sizes() == x.sizes(), op, ": x (the forward input) must have grad_out's shape ", x.sizes(), ", got ",
        fwd_x->sizes());
    check_same_dtype(op, "x (the forward input)", *fwd_x, "grad_out", x);
  }
  if (inplace) {
    check_inplace_overlap(op, x_name, x, {&coords, &freqs});
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

}  // namespace

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
    geo.planes.sizes[i] = at::cuda::detail::IntDivider<uint32_t>(static_cast<uint32_t>(dim.size));
    for (t = 0; t < nt; ++t) {
      geo.planes.strides[i][t] = dim.stride[t];
    }
  }
  return true;
}

}  // namespace detail
namespace {

// The entries every call passes before a backend kernel (common/op_utils.h: check_same_device).
at::Tensor rope2d_entry(
    c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs, bool interleaved) {
  check_same_device("rope2d", {"x", x}, {{"coords", coords}, {"freqs", freqs}});
  return rope2d_op().redispatch(ks & kAfterEntry, x, coords, freqs, interleaved);
}

at::Tensor& rope2d__entry(
    c10::DispatchKeySet ks, at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs, bool interleaved) {
  check_same_device("rope2d_", {"x", x}, {{"coords", coords}, {"freqs", freqs}});
  return rope2d_inplace_op().redispatch(ks & kAfterEntry, x, coords, freqs, interleaved);
}

std::tuple<at::Tensor, at::Tensor> rope2d_backward_entry(
    c10::DispatchKeySet ks,
    const at::Tensor& grad_out,
    const at::Tensor& coords,
    const at::Tensor& freqs,
    const std::optional<at::Tensor>& x,
    bool interleaved) {
  check_same_device(
      "rope2d_backward", {"grad_out", grad_out}, {{"coords", coords}, {"freqs", freqs}, {"x (the forward input)", x}});
  return rope2d_backward_op().redispatch(ks & kAfterEntry, grad_out, coords, freqs, x, interleaved);
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, BackendSelect, m) {
  m.impl("rope2d", &rope2d_entry);
  m.impl("rope2d_", &rope2d__entry);
  m.impl("rope2d_backward", &rope2d_backward_entry);
}

}  // namespace jitrope
