// Schemas of every jitrope operator, in one TORCH_LIBRARY block. Each op's C++ entry points, its
// device check and its one host wrapper for the CPU and CUDA keys (checks, device guard,
// allocation, empty case) are csrc/ops/<op>.cpp; the wrapper calls the launchers of
// csrc/cpu/<op>_cpu.cpp or csrc/cuda/<op>_cuda.cu (declared in csrc/ops/<op>_impl.h); autograd is
// csrc/autograd/<op>_autograd.cpp.
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace {

// at::Tag::inplace (mutates and returns its first argument, so that torch.compile can
// functionalize the op) is newer than some PyTorch releases we build against (2.11 lacks it).
template <typename TagT, typename = void>
struct HasInplaceTag : std::false_type {};
template <typename TagT>
struct HasInplaceTag<TagT, std::void_t<decltype(TagT::inplace)>> : std::true_type {};

template <typename TagT = at::Tag>
std::vector<at::Tag> inplace_tags() {
  if constexpr (HasInplaceTag<TagT>::value) {
    return {TagT::inplace};
  } else {
    return {};
  }
}

}  // namespace

TORCH_LIBRARY(jitrope, m) {
  // A named (lvalue) vector: a temporary would bind to Library::def's (schema, kernel) overload.
  const std::vector<at::Tag> inplace = inplace_tags();
  // Factorized 2D position add (docs/ops.md).
  m.def(
      "pos2d_add(Tensor x, Tensor pos_h, Tensor pos_w, int[2] grid, int token_offset=0, "
      "int row_offset=0, int col_offset=0) -> Tensor");
  // The inplace tag (mutates and returns its first argument) lets torch.compile functionalize it.
  m.def(
      "pos2d_add_(Tensor(a!) x, Tensor pos_h, Tensor pos_w, int[2] grid, int token_offset=0, "
      "int row_offset=0, int col_offset=0) -> Tensor(a!)",
      inplace);
  // (grad_pos_h, grad_pos_w) of pos2d_add; the table sizes are SymInts so that autograd can
  // pass symbolic sizes under torch.compile's dynamic shapes.
  m.def(
      "pos2d_add_backward(Tensor grad_out, int[2] grid, SymInt max_h, SymInt max_w, "
      "int token_offset, int row_offset, int col_offset) -> (Tensor, Tensor)");
  // The factorized 2D table on packed tokens (docs/ops.md): token n gets pos_h[rows[n]] + pos_w[cols[n]],
  // -1 leaving that table out.
  m.def("pos2d_add_indexed(Tensor x, Tensor pos_h, Tensor pos_w, Tensor rows, Tensor cols) -> Tensor");
  // (grad_pos_h, grad_pos_w) of pos2d_add_indexed; SymInt table sizes as for pos2d_add_backward.
  m.def(
      "pos2d_add_indexed_backward(Tensor grad_out, Tensor rows, Tensor cols, SymInt max_h, SymInt max_w) "
      "-> (Tensor, Tensor)");
  // Fused 2D rotary embedding (docs/ops.md). freqs_index: token n turns by table
  // freqs_index[n] of freqs [F, 2, D/2] or [F, H, 2, D/2].
  m.def("rope2d(Tensor x, Tensor coords, Tensor freqs, bool interleaved=True, Tensor? freqs_index=None) -> Tensor");
  // The inplace tag lets functionalization (torch.compile, AOT) handle the aliased return.
  m.def(
      "rope2d_(Tensor(a!) x, Tensor coords, Tensor freqs, bool interleaved=True, Tensor? freqs_index=None) "
      "-> Tensor(a!)",
      inplace);
  // (grad_x, grad_freqs): grad_freqs is computed when x (the forward input) is given, else empty.
  m.def(
      "rope2d_backward(Tensor grad_out, Tensor coords, Tensor freqs, Tensor? x, bool interleaved=True, "
      "Tensor? freqs_index=None) -> (Tensor, Tensor)");
  // Fused qk-RMSNorm + 2D rotary embedding (docs/ops.md); coords/freqs None normalize only.
  m.def(
      "qk_norm_rope(Tensor qk, Tensor weight, Tensor? coords=None, Tensor? freqs=None, float eps=1e-6, "
      "bool interleaved=True, Tensor? freqs_index=None) -> Tensor");
  // (grad_qk, grad_weight, grad_freqs); grad_freqs is computed when freqs_grad, else empty.
  m.def(
      "qk_norm_rope_backward(Tensor grad_out, Tensor qk, Tensor weight, Tensor? coords, Tensor? freqs, float eps, "
      "bool interleaved, bool freqs_grad, Tensor? freqs_index=None) -> (Tensor, Tensor, Tensor)");
}
