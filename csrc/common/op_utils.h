// The pieces every jitrope op shares, so that each op is written in one dialect: the accumulation
// type and the argument checks with one message style ("<op>: <argument> must ..., got ...", dtypes
// named as torch prints them: torch.int64). Host-only and not installed; the per-element math each
// op shares between CPU and CUDA lives in math/<op>_math.h, the compile-time dispatch of the
// kernels in common/static_switch.h.
#pragma once

#include <initializer_list>
#include <optional>
#include <string>

#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace jitrope {

// Accumulation (compute) type of a kernel: float32 for float16/bfloat16/float32, float64 for
// float64. The CPU and CUDA kernels and the math headers all use this one alias.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Accumulation dtype of tensors of `dtype` (the runtime twin of acc_type).
inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// "torch.float32": dtypes as Python users know them, in every C++ message.
inline std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
}

// Activations of every op: float16, bfloat16, float32 or float64 (float64 for gradcheck).
inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op, ": ", name,
      " must be float16, bfloat16, float32 or float64, got ", dtype_name(dt));
}

// Tables (coordinates, frequencies, weights) that the kernels convert to the accumulation type.
inline void check_floating(const char* op, const char* name, const char* shape, const at::Tensor& t) {
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor ", shape, ", got dtype ",
      dtype_name(t.scalar_type()));
}

inline void check_same_dtype(
    const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(
      t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have ", ref_name, "'s dtype ",
      dtype_name(ref.scalar_type()), ", got ", dtype_name(t.scalar_type()));
}

// A tensor argument of an op, by name, for check_same_device; an absent optional (or an undefined
// tensor) is skipped.
struct NamedTensor {
  const char* name;
  const at::Tensor* tensor;

  NamedTensor(const char* n, const at::Tensor& t) : name(n), tensor(&t) {}
  NamedTensor(const char* n, const std::optional<at::Tensor>& t) : name(n), tensor(t.has_value() ? &*t : nullptr) {}
  NamedTensor(const char* n, const at::Tensor* t) : name(n), tensor(t) {}

  bool present() const {
    return tensor != nullptr && tensor->defined();
  }
};

// The one device check of every op: each tensor argument lives on `ref`'s device. Every op runs it
// at its entry (ops/<op>.cpp registers it on the BackendSelect key, ahead of any backend kernel, the
// meta one included: a CPU x with meta coords would otherwise reach the meta kernel and come back
// as uninitialised CPU memory) and again in its argument check.
inline void check_same_device(const char* op, NamedTensor ref, std::initializer_list<NamedTensor> args) {
  if (!ref.present()) {
    return;  // the argument check names an undefined tensor
  }
  for (const NamedTensor& a : args) {
    TORCH_CHECK(
        !a.present() || a.tensor->device() == ref.tensor->device(), op, ": ", a.name, " must be on ", ref.name,
        "'s device ", ref.tensor->device(), ", got ", a.tensor->device());
  }
}

// What an op's BackendSelect entry redispatches to, after its device check: the keys below it.
constexpr c10::DispatchKeySet kAfterEntry(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);

// An in-place twin writes `x`: no element of x may be written twice (an expanded view), and x
// may not share memory with the tensors it reads.
inline void check_inplace_overlap(
    const char* op, const char* x_name, const at::Tensor& x, std::initializer_list<const at::Tensor*> inputs) {
  TORCH_CHECK(
      at::has_internal_overlap(x) != at::MemOverlap::Yes, op, ": ", x_name,
      " has overlapping memory (e.g. an expanded tensor) and cannot be written in place; use the out-of-place op");
  for (const at::Tensor* t : inputs) {
    const auto status = at::get_overlap_status(x, *t);
    TORCH_CHECK(
        status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", x_name,
        " shares memory with an input it reads and cannot be written in place; use the out-of-place op");
  }
}

}  // namespace jitrope
