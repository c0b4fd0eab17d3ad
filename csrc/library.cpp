// Schemas of every jitrope operator, in one TORCH_LIBRARY block. Kernels live beside each op:
// csrc/cpu/<op>_cpu.cpp, csrc/cuda/<op>_cuda.cu, csrc/autograd/<op>_autograd.cpp; the C++
// entry with argument checks is csrc/ops/<op>.cpp.
#include <torch/library.h>

TORCH_LIBRARY(jitrope, m) {
  // Factorized 2D position add (SPEC §3).
  m.def(
      "pos2d_add(Tensor x, Tensor pos_h, Tensor pos_w, int[2] grid, int token_offset=0, "
      "int row_offset=0, int col_offset=0) -> Tensor");
  // The inplace tag (mutates and returns its first argument) lets torch.compile functionalize it.
  m.def(
      "pos2d_add_(Tensor(a!) x, Tensor pos_h, Tensor pos_w, int[2] grid, int token_offset=0, "
      "int row_offset=0, int col_offset=0) -> Tensor(a!)",
      {at::Tag::inplace});
  // (grad_pos_h, grad_pos_w) of pos2d_add; the table sizes are SymInts so that autograd can
  // pass symbolic sizes under torch.compile's dynamic shapes.
  m.def(
      "pos2d_add_backward(Tensor grad_out, int[2] grid, SymInt max_h, SymInt max_w, "
      "int token_offset, int row_offset, int col_offset) -> (Tensor, Tensor)");
  // Fused 2D rotary embedding (SPEC §2).
  m.def("rope2d(Tensor x, Tensor coords, Tensor freqs, bool interleaved=True) -> Tensor");
  // The inplace tag lets functionalization (torch.compile, AOT) handle the aliased return.
  m.def(
      "rope2d_(Tensor(a!) x, Tensor coords, Tensor freqs, bool interleaved=True) -> Tensor(a!)",
      {at::Tag::inplace});
  // (grad_x, grad_freqs): grad_freqs is computed when x (the forward input) is given, else empty.
  m.def(
      "rope2d_backward(Tensor grad_out, Tensor coords, Tensor freqs, Tensor? x, bool interleaved=True) "
      "-> (Tensor, Tensor)");
}
