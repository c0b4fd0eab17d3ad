// C++ entry points of jitrope::qk_norm_rope (dispatcher calls), its device check on the
// BackendSelect key, and its one host wrapper for the CPU and CUDA keys: argument checks, device
// guard, accumulation-type tables, outputs and scratch, the empty case, then the device's launcher
// (common/launch.h), and the last step of the parameter gradients.
#include "ops/qk_norm_rope.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "common/launch.h"
#include "common/op_utils.h"
#include "math/qk_norm_rope_math.h"
#include "ops/qk_norm_rope_impl.h"
#include "ops/rope2d_impl.h"

namespace jitrope {
namespace {

const auto& qk_norm_rope_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("jitrope::qk_norm_rope", "").typed<decltype(qk_norm_rope)>();
  return op;
}

const auto& qk_norm_rope_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("jitrope::qk_norm_rope_backward", "")
                             .typed<decltype(qk_norm_rope_backward)>();
  return op;
}

}  // namespace

at::Tensor qk_norm_rope(
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  return qk_norm_rope_op().call(qk, weight, coords, freqs, eps, interleaved, freqs_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward(
    const at::Tensor& grad_out,
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved,
    bool freqs_grad,
    const std::optional<at::Tensor>& freqs_index) {
  return qk_norm_rope_backward_op().call(
      grad_out, qk, weight, coords, freqs, eps, interleaved, freqs_grad, freqs_index);
}

namespace {

// The one argument check of qk_norm_rope and qk_norm_rope_backward (with grad_out, the backward's
// checks too). Throws c10::Error naming the argument, the shape it got and the shape it wanted.
void check_qk_norm_rope_args(
    const char* op,
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    const at::Tensor* grad_out,
    bool freqs_grad,
    const std::optional<at::Tensor>& freqs_index) {
  check_defined(op, "qk", qk);
  check_defined(op, "weight", weight);
  check_float_dtype(op, "qk", qk);
  TORCH_CHECK(qk.dim() == 5 && qk.size(0) == 2, op, ": qk must have shape [2, B, H, N, D] (q and k), got ", qk.sizes());
  const int64_t D = qk.size(4);
  TORCH_CHECK(
      D % 2 == 0, op, ": qk must have an even last dim D (channel pairs), got D = ", D, " in qk of shape ", qk.sizes());
  check_floating(op, "weight", "[2, D]", weight);
  TORCH_CHECK(
      weight.dim() == 2 && weight.size(0) == 2 && weight.size(1) == D, op, ": weight must have shape [2, D] = [2, ", D,
      "] (q and k norm weights for qk of shape ", qk.sizes(), "), got ", weight.sizes());
  check_same_device(
      op, {"qk", qk},
      {{"weight", weight}, {"coords", coords}, {"freqs", freqs}, {"grad_out", grad_out}, {"freqs_index", freqs_index}});
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  const bool has_coords = coords.has_value() && coords->defined();
  const bool has_freqs = freqs.has_value() && freqs->defined();
  TORCH_CHECK(
      has_coords == has_freqs, op, ": coords and freqs must be given together (rotate) or both be None ",
      "(normalize only), got ", has_coords ? "coords" : "freqs", " alone");
  TORCH_CHECK(
      has_coords || !(freqs_index.has_value() && freqs_index->defined()), op,
      ": freqs_index needs coords and freqs, got None");
  if (has_coords) {
    check_rope2d_args(op, "qk", qk, *coords, *freqs, nullptr, false, freqs_index);
  }
  TORCH_CHECK(has_coords || !freqs_grad, op, ": freqs_grad needs coords and freqs, got None");
  if (grad_out != nullptr) {
    check_defined(op, "grad_out", *grad_out);
    TORCH_CHECK(
        grad_out->sizes() == qk.sizes(), op, ": grad_out must have qk's shape ", qk.sizes(), ", got ",
        grad_out->sizes());
    check_same_dtype(op, "grad_out", *grad_out, "qk", qk);
  }
}

// The backward's (grad_weight, grad_freqs) from the launcher's sums in the accumulation dtype:
// grad_weight [2, D] in weight's dtype; grad_freqs ([F * Hf, D] sums) in freqs' shape and dtype
// when freqs_grad, else an empty tensor.
std::tuple<at::Tensor, at::Tensor> finish_param_grads(
    const at::Tensor& grad_weight_acc,
    const at::Tensor& grad_freqs_acc,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& freqs,
    bool freqs_grad) {
  at::Tensor grad_weight = grad_weight_acc.to(weight.scalar_type());
  at::Tensor grad_freqs =
      freqs_grad ? grad_freqs_acc.view(freqs->sizes()).to(freqs->scalar_type()) : at::empty({0}, weight.options());
  return {grad_weight, grad_freqs};
}

// The runs of the backward's chunks with freqs_index (math/qk_norm_rope_math.h): run_table [chunks,
// runs] int64 on the CPU, runs being the most any chunk has. Reads the index on the host.
at::Tensor chunk_run_table(const at::Tensor& index, int64_t B, int64_t N, int64_t chunks, int64_t rows_per_chunk) {
  const at::Tensor idx = index.to(at::kCPU).contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const int64_t rows = B * N;
  std::vector<std::vector<int64_t>> tables(chunks);
  int64_t runs = 1;
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t row1 = std::min(rows, (k + 1) * rows_per_chunk);
    for (int64_t r0 = k * rows_per_chunk; r0 < row1; r0 = qk_norm_rope_math::run_end(ip, r0, row1, N)) {
      tables[k].push_back(ip[r0 % N]);
    }
    runs = std::max<int64_t>(runs, static_cast<int64_t>(tables[k].size()));
  }
  at::Tensor run_table = at::full({chunks, runs}, -1, idx.options());
  int64_t* rp = run_table.mutable_data_ptr<int64_t>();
  for (int64_t k = 0; k < chunks; ++k) {
    std::copy(tables[k].begin(), tables[k].end(), rp + k * runs);
  }
  return run_table;
}

// The entries every call passes before a backend kernel (common/op_utils.h: check_same_device).
at::Tensor qk_norm_rope_entry(
    c10::DispatchKeySet ks,
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  check_same_device(
      "qk_norm_rope", {"qk", qk},
      {{"weight", weight}, {"coords", coords}, {"freqs", freqs}, {"freqs_index", freqs_index}});
  return qk_norm_rope_op().redispatch(ks & kAfterEntry, qk, weight, coords, freqs, eps, interleaved, freqs_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward_entry(
    c10::DispatchKeySet ks,
    const at::Tensor& grad_out,
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved,
    bool freqs_grad,
    const std::optional<at::Tensor>& freqs_index) {
  check_same_device(
      "qk_norm_rope_backward", {"qk", qk},
      {{"grad_out", grad_out}, {"weight", weight}, {"coords", coords}, {"freqs", freqs}, {"freqs_index", freqs_index}});
  return qk_norm_rope_backward_op().redispatch(
      ks & kAfterEntry, grad_out, qk, weight, coords, freqs, eps, interleaved, freqs_grad, freqs_index);
}

QkNormRopeParams make_params(
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    const std::optional<at::Tensor>& freqs_index,
    double eps,
    bool interleaved) {
  QkNormRopeParams p;
  p.weight = weight.to(acc_dtype(qk.scalar_type())).contiguous();
  const bool rotate = coords.has_value() && coords->defined();
  if (rotate) {
    std::tie(p.coords, p.freqs) = detail::rope2d_acc_tables(qk, *coords, *freqs);
    p.index = detail::rope2d_index(freqs_index);
  }
  p.per_head = rotate && rope2d_per_head(*freqs, freqs_index);
  p.interleaved = interleaved;
  p.eps = eps;
  return p;
}

at::Tensor qk_norm_rope_kernel(
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved,
    const std::optional<at::Tensor>& freqs_index) {
  check_qk_norm_rope_args("qk_norm_rope", qk, weight, coords, freqs, eps, nullptr, false, freqs_index);
  const at::OptionalDeviceGuard guard(at::device_of(qk));
  QkNormRopeForward a;
  a.out = at::empty(qk.sizes(), qk.options().memory_format(at::MemoryFormat::Contiguous));
  if (a.out.numel() == 0) {
    return a.out;
  }
  a.qk = qk;
  a.L = detail::qk_layout(qk);
  a.p = make_params(qk, weight, coords, freqs, freqs_index, eps, interleaved);
  JITROPE_LAUNCH(qk.device(), qk_norm_rope_forward, a);
  return a.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward_kernel(
    const at::Tensor& grad_out,
    const at::Tensor& qk,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& coords,
    const std::optional<at::Tensor>& freqs,
    double eps,
    bool interleaved,
    bool freqs_grad,
    const std::optional<at::Tensor>& freqs_index) {
  check_qk_norm_rope_args("qk_norm_rope_backward", qk, weight, coords, freqs, eps, &grad_out, freqs_grad, freqs_index);
  const at::OptionalDeviceGuard guard(at::device_of(qk));
  const bool indexed = freqs_index.has_value() && freqs_index->defined();
  const auto acc = qk.options().dtype(acc_dtype(qk.scalar_type()));
  const int64_t D = qk.size(4);
  QkNormRopeBackward a;
  a.L = detail::qk_layout(qk);
  a.freqs_grad = freqs_grad;
  a.grad_qk = at::empty(qk.sizes(), qk.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t groups = freqs_grad && rope2d_per_head(*freqs, freqs_index) ? a.L.H : 1;
  const int64_t tables = indexed ? freqs->size(0) : 1;
  if (qk.numel() == 0) {
    a.grad_weight = at::zeros({2, D}, acc);
    a.grad_freqs = freqs_grad ? at::zeros({tables * groups, D}, acc) : at::Tensor();
  } else {
    a.grad_out = grad_out.contiguous();
    a.qk = qk;
    a.p = make_params(qk, weight, coords, freqs, freqs_index, eps, interleaved);
    const int64_t BN = a.L.B * a.L.N;
    a.chunks = qk_norm_rope_math::chunk_count(BN);
    a.rows_per_chunk = qk_norm_rope_math::rows_per_chunk(BN);
    // With the gradient of indexed freqs, the chunks' runs are read on the host (one wait for a device).
    if (freqs_grad && indexed) {
      a.run_table = chunk_run_table(*freqs_index, a.L.B, a.L.N, a.chunks, a.rows_per_chunk).to(qk.device());
    }
    const int64_t runs = a.run_table.defined() ? a.run_table.size(1) : 1;
    a.wpart = at::empty({2, a.L.H, a.chunks, D}, acc);
    a.grad_weight = at::empty({2, D}, acc);
    if (freqs_grad) {
      a.fpart = at::empty({2, a.L.H, a.chunks, runs, D}, acc);
      a.grad_freqs = at::empty({tables * groups, D}, acc);
    }
    JITROPE_LAUNCH(qk.device(), qk_norm_rope_backward, a);
  }
  auto [grad_weight, grad_freqs] = finish_param_grads(a.grad_weight, a.grad_freqs, weight, freqs, freqs_grad);
  return {a.grad_qk, grad_weight, grad_freqs};
}

void register_kernels(torch::Library& m) {
  m.impl("qk_norm_rope", &qk_norm_rope_kernel);
  m.impl("qk_norm_rope_backward", &qk_norm_rope_backward_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(jitrope, BackendSelect, m) {
  m.impl("qk_norm_rope", &qk_norm_rope_entry);
  m.impl("qk_norm_rope_backward", &qk_norm_rope_backward_entry);
}

JITROPE_REGISTER_KERNELS(register_kernels)

}  // namespace jitrope
