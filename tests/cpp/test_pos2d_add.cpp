// jitrope::pos2d_add from LibTorch C++: the C++ API (dispatcher calls) against an ATen-written
// reference, autograd through torch::autograd (first and second order), the in-place twin, the
// backward op on its own, and the argument errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>

#include "ops/pos2d_add.h"

#include "test_utils.h"

namespace {

using jitrope_test::expect_error;

struct Case {
  int64_t B, prefix, gh, gw, trailing, D, max_h, max_w, token_offset, row_offset, col_offset;
  int64_t N() const {
    return prefix + gh * gw + trailing;
  }
};

const Case kCases[] = {
    {2, 0, 4, 4, 0, 8, 4, 4, 0, 0, 0},
    {3, 3, 3, 5, 4, 6, 5, 7, 3, 1, 2},   // non-square, prefix + trailing tokens, offsets
    {2, 1, 2, 3, 2, 5, 3, 3, 1, 0, 0},   // odd D
    {0, 1, 2, 3, 0, 4, 2, 3, 1, 0, 0},   // B = 0
    {5, 2, 6, 5, 1, 32, 8, 8, 2, 2, 3},  // D a multiple of the vector widths
};

// The op (docs/ops.md) in ATen ops, differentiable: the grid segment gets (pos_h[r] + pos_w[c]) added in the
// compute type and rounded once.
at::Tensor reference(const at::Tensor& x, const at::Tensor& pos_h, const at::Tensor& pos_w, const Case& c) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t cells = c.gh * c.gw;
  const auto table = (pos_h.narrow(0, c.row_offset, c.gh).to(acc).unsqueeze(1) +
                      pos_w.narrow(0, c.col_offset, c.gw).to(acc).unsqueeze(0))
                         .reshape({cells, x.size(2)});
  const auto seg = (x.narrow(1, c.token_offset, cells).to(acc) + table).to(x.scalar_type());
  const int64_t end = c.token_offset + cells;
  return at::cat({x.narrow(1, 0, c.token_offset), seg, x.narrow(1, end, x.size(1) - end)}, 1);
}

struct Inputs {
  at::Tensor x, pos_h, pos_w;
};

Inputs make_inputs(const Case& c, at::ScalarType dtype, bool requires_grad = false) {
  const auto opts = at::TensorOptions().dtype(dtype);
  Inputs in{
      torch::randn({c.B, c.N(), c.D}, opts), torch::randn({c.max_h, c.D}, opts), torch::randn({c.max_w, c.D}, opts)};
  in.x.set_requires_grad(requires_grad);
  in.pos_h.set_requires_grad(requires_grad);
  in.pos_w.set_requires_grad(requires_grad);
  return in;
}

at::Tensor run(const Inputs& in, const Case& c) {
  return jitrope::pos2d_add(in.x, in.pos_h, in.pos_w, {c.gh, c.gw}, c.token_offset, c.row_offset, c.col_offset);
}

TEST(Pos2dAdd, ForwardMatchesReference) {
  torch::manual_seed(0);
  for (const auto& c : kCases) {
    for (auto dtype : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
      const auto in = make_inputs(c, dtype);
      const auto out = run(in, c);
      EXPECT_TRUE(out.is_contiguous());
      // Same order of the same float32/float64 operations, rounded once: equal bits.
      EXPECT_TRUE(torch::equal(out, reference(in.x, in.pos_h, in.pos_w, c))) << "dtype " << dtype;
    }
  }
}

TEST(Pos2dAdd, NonContiguousInputs) {
  torch::manual_seed(1);
  const Case c = kCases[1];
  const auto in = make_inputs(c, at::kFloat);
  const auto want = reference(in.x, in.pos_h, in.pos_w, c);
  // Batch-major storage seen as [B, N, D], and a channel-strided view (copied by the kernel).
  const auto transposed = in.x.transpose(0, 1).contiguous().transpose(0, 1);
  const auto wide = torch::zeros({c.B, c.N(), 2 * c.D});
  wide.slice(2, 0, 2 * c.D, 2).copy_(in.x);
  for (const auto& x : {transposed, wide.slice(2, 0, 2 * c.D, 2)}) {
    EXPECT_TRUE(torch::equal(run({x, in.pos_h, in.pos_w}, c), want));
  }
}

TEST(Pos2dAdd, BackwardThroughAutograd) {
  torch::manual_seed(2);
  for (const auto& c : kCases) {
    for (auto dtype : {at::kDouble, at::kFloat}) {
      const auto in = make_inputs(c, dtype, /*requires_grad=*/true);
      const auto grad = torch::randn({c.B, c.N(), c.D}, at::TensorOptions().dtype(dtype));
      const auto got = torch::autograd::grad({run(in, c)}, {in.x, in.pos_h, in.pos_w}, {grad});
      const auto want =
          torch::autograd::grad({reference(in.x, in.pos_h, in.pos_w, c)}, {in.x, in.pos_h, in.pos_w}, {grad});
      const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
      for (size_t k = 0; k < 3; ++k) {
        EXPECT_TRUE(torch::allclose(got[k], want[k], tol, tol)) << "input " << k << " dtype " << dtype;
      }
    }
  }
}

TEST(Pos2dAdd, DoubleBackward) {
  // grad_pos_h[r] = sum over b, j of grad_out: its derivative in grad_out is 1 on the grid's
  // tokens and 0 on the others.
  torch::manual_seed(3);
  const Case c = kCases[1];
  const auto in = make_inputs(c, at::kDouble, /*requires_grad=*/true);
  const auto grad = torch::randn({c.B, c.N(), c.D}, at::kDouble).requires_grad_();
  const auto grads = torch::autograd::grad(
      {run(in, c)}, {in.pos_h}, {grad}, /*retain_graph=*/true,
      /*create_graph=*/true);
  const auto gg = torch::autograd::grad({grads[0].sum()}, {grad})[0];
  auto want = torch::zeros_like(gg);
  want.narrow(1, c.token_offset, c.gh * c.gw).fill_(1);
  EXPECT_TRUE(torch::equal(gg, want));
}

TEST(Pos2dAdd, BackwardOpIsDeterministicAndZeroOutsideTheGrid) {
  torch::manual_seed(4);
  const Case c{33, 2, 7, 9, 3, 40, 9, 11, 2, 1, 2};
  const auto grad = torch::randn({c.B, c.N(), c.D});
  const auto [h1, w1] =
      jitrope::pos2d_add_backward(grad, {c.gh, c.gw}, c.max_h, c.max_w, c.token_offset, c.row_offset, c.col_offset);
  const auto [h2, w2] =
      jitrope::pos2d_add_backward(grad, {c.gh, c.gw}, c.max_h, c.max_w, c.token_offset, c.row_offset, c.col_offset);
  EXPECT_TRUE(torch::equal(h1, h2));
  EXPECT_TRUE(torch::equal(w1, w2));
  const auto seg = grad.narrow(1, c.token_offset, c.gh * c.gw).to(at::kDouble).reshape({c.B, c.gh, c.gw, c.D});
  EXPECT_TRUE(torch::allclose(h1.narrow(0, c.row_offset, c.gh).to(at::kDouble), seg.sum({0, 2}), 1e-5, 1e-4));
  EXPECT_TRUE(torch::allclose(w1.narrow(0, c.col_offset, c.gw).to(at::kDouble), seg.sum({0, 1}), 1e-5, 1e-4));
  EXPECT_EQ(h1.narrow(0, 0, c.row_offset).abs().sum().item<float>(), 0.0f);
  EXPECT_EQ(w1.narrow(0, c.col_offset + c.gw, c.max_w - c.col_offset - c.gw).abs().sum().item<float>(), 0.0f);
}

TEST(Pos2dAdd, InPlaceTwin) {
  torch::manual_seed(5);
  const Case c = kCases[1];
  const auto in = make_inputs(c, at::kFloat);
  const auto want = run(in, c);
  auto y = in.x.clone();
  auto& ret = jitrope::pos2d_add_(y, in.pos_h, in.pos_w, {c.gh, c.gw}, c.token_offset, c.row_offset, c.col_offset);
  EXPECT_TRUE(ret.is_same(y));
  EXPECT_TRUE(torch::equal(y, want));
}

TEST(Pos2dAdd, ErrorsNameTheArgument) {
  const auto x = torch::randn({2, 10, 6});
  const auto h = torch::randn({3, 6});
  const auto w = torch::randn({4, 6});
  using jitrope::pos2d_add;
  expect_error([&] { pos2d_add(x[0], h, w, {2, 2}); }, "x must be a 3-D tensor [B, N, D], got shape [10, 6]");
  expect_error(
      [&] { pos2d_add(x, h.narrow(1, 0, 5), w, {2, 2}); }, "pos_h must be [max_h, D] with x's D = 6, got shape [3, 5]");
  expect_error(
      [&] { pos2d_add(x, h, w.unsqueeze(0), {2, 2}); }, "pos_w must be [max_w, D] with x's D = 6, got shape [1, 4, 6]");
  expect_error(
      [&] { pos2d_add(x.to(at::kLong), h.to(at::kLong), w.to(at::kLong), {2, 2}); },
      "x must be float16, bfloat16, float32 or float64, got torch.int64");
  expect_error(
      [&] { pos2d_add(x, h.to(at::kDouble), w, {2, 2}); },
      "pos_h must have x's dtype torch.float32, got torch.float64");
  expect_error(
      [&] { pos2d_add(x, h, w, {3, 2}, 0, 1); },
      "grid rows need pos_h[1 : 1 + gh] with gh = 3, but pos_h has max_h = 3 rows");
  expect_error(
      [&] { pos2d_add(x, h, w, {2, 5}); },
      "grid columns need pos_w[0 : 0 + gw] with gw = 5, but pos_w has max_w = 4 rows");
  expect_error(
      [&] { pos2d_add(x, h, w, {3, 3}, 2); }, "wanted N >= token_offset + gh*gw, got N = 10 (x of shape [2, 10, 6])");
  expect_error([&] { pos2d_add(x, h, w, {2, 2}, -1); }, "token_offset must be >= 0, got -1");
  expect_error([&] { pos2d_add(x, h, w, {2, 2}, 0, -2); }, "row_offset must be >= 0, got -2");
  expect_error([&] { pos2d_add(x, h, w, {2, 2}, 0, 0, -3); }, "col_offset must be >= 0, got -3");
  expect_error([&] { pos2d_add(x, h, w, {2, 2, 2}); }, "grid must be (gh, gw), got 3 values");
  expect_error([&] { pos2d_add(x, h, w, {-1, 2}); }, "grid (gh, gw) must be non-negative");
  EXPECT_THROW(pos2d_add(x, at::Tensor(), w, {2, 2}), c10::Error);
  expect_error(
      [&] { jitrope::pos2d_add_backward(x, {2, 2}, 1, 4, 0, 0, 0); },
      "pos2d_add_backward: grid rows need pos_h[0 : 0 + gh] with gh = 2, but pos_h has max_h = 1");
  auto y = x.clone();
  expect_error([&] { jitrope::pos2d_add_(y, h, w, {4, 2}); }, "pos2d_add_: grid rows need pos_h");
  auto expanded = x.narrow(0, 0, 1).expand({3, 10, 6});
  EXPECT_THROW(jitrope::pos2d_add_(expanded, h, w, {2, 2}), c10::Error);
}

}  // namespace
