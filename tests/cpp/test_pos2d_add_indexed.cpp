// jitrope::pos2d_add_indexed from LibTorch C++: the C++ API (dispatcher calls) against a plain loop
// over tokens, autograd through torch::autograd (first and second order), the backward op on its
// own (a loop too, and its determinism), and the argument errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "ops/pos2d_add_indexed.h"

#include "test_utils.h"

namespace {

using jitrope_test::expect_error;

struct Case {
  std::vector<int64_t> lead;
  int64_t N, D, max_h, max_w;
};

const Case kCases[] = {
    {{2}, 24, 8, 5, 6},        {{}, 37, 5, 7, 4},  // x [N, D], odd D
    {{2, 1, 3}, 21, 16, 6, 6},                     // leading dims that merge
    {{0}, 12, 8, 3, 4},                            // B = 0
    {{3}, 300, 32, 3, 70},                         // rows used by ~75 tokens each: several segments per row
};

std::vector<int64_t> shape_of(const Case& c) {
  std::vector<int64_t> s = c.lead;
  s.push_back(c.N);
  s.push_back(c.D);
  return s;
}

// Indices in [-1, max): every kind of token (both tables, one, none) and repeated rows.
std::pair<at::Tensor, at::Tensor> make_indices(const Case& c) {
  auto rows = torch::randint(-1, std::max<int64_t>(c.max_h, 0), {c.N}, at::kLong);
  auto cols = torch::randint(-1, std::max<int64_t>(c.max_w, 0), {c.N}, at::kLong);
  return {rows, cols};
}

// The op (docs/ops.md) as a loop over tokens, in the compute type, rounded once; a token with no table is copied.
at::Tensor loop_reference(
    const at::Tensor& x,
    const at::Tensor& pos_h,
    const at::Tensor& pos_w,
    const at::Tensor& rows,
    const at::Tensor& cols) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = x.clone(at::MemoryFormat::Contiguous);
  const int64_t N = x.size(-2);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t r = rows[n].item<int64_t>(), c = cols[n].item<int64_t>();
    if (r < 0 && c < 0) {
      continue;
    }
    at::Tensor table;
    if (r >= 0 && c >= 0) {
      table = pos_h[r].to(acc) + pos_w[c].to(acc);
    } else {
      table = r >= 0 ? pos_h[r].to(acc) : pos_w[c].to(acc);
    }
    out.select(-2, n).copy_((x.select(-2, n).to(acc) + table).to(x.scalar_type()));
  }
  return out;
}

// The table gradients as a loop: grad_pos_h[r] += sum over the leading dims of grad_out[..., n, :].
std::pair<at::Tensor, at::Tensor> loop_backward(
    const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& cols, int64_t max_h, int64_t max_w) {
  const int64_t D = grad.size(-1);
  auto gh = torch::zeros({max_h, D}, at::kDouble);
  auto gw = torch::zeros({max_w, D}, at::kDouble);
  const auto g = grad.to(at::kDouble).reshape({-1, grad.size(-2), D}).sum(0);
  for (int64_t n = 0; n < grad.size(-2); ++n) {
    const int64_t r = rows[n].item<int64_t>(), c = cols[n].item<int64_t>();
    if (r >= 0) {
      gh[r] += g[n];
    }
    if (c >= 0) {
      gw[c] += g[n];
    }
  }
  return {gh, gw};
}

TEST(Pos2dAddIndexed, ForwardMatchesLoop) {
  torch::manual_seed(0);
  for (const auto& c : kCases) {
    const auto [rows, cols] = make_indices(c);
    for (auto dtype : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
      const auto opts = at::TensorOptions().dtype(dtype);
      const auto x = torch::randn(shape_of(c), opts);
      const auto h = torch::randn({c.max_h, c.D}, opts), w = torch::randn({c.max_w, c.D}, opts);
      const auto out = jitrope::pos2d_add_indexed(x, h, w, rows, cols);
      EXPECT_TRUE(out.is_contiguous());
      EXPECT_EQ(out.sizes(), x.sizes());
      // The same float32/float64 operations in the same order, rounded once: equal bits.
      EXPECT_TRUE(torch::equal(out, loop_reference(x, h, w, rows, cols))) << "dtype " << dtype << " N " << c.N;
    }
  }
}

TEST(Pos2dAddIndexed, NonContiguousInputs) {
  torch::manual_seed(1);
  const Case c = kCases[0];
  const auto [rows, cols] = make_indices(c);
  const auto x = torch::randn(shape_of(c));
  const auto h = torch::randn({c.max_h, c.D}), w = torch::randn({c.max_w, c.D});
  const auto want = loop_reference(x, h, w, rows, cols);
  // Token-major storage seen as [B, N, D], a channel-strided view (copied by the kernel), and
  // strided index tensors.
  const auto transposed = x.transpose(0, 1).contiguous().transpose(0, 1);
  auto wide = torch::zeros({2, c.N, 2 * c.D});
  wide.slice(2, 0, 2 * c.D, 2).copy_(x);
  for (const auto& xv : {transposed, wide.slice(2, 0, 2 * c.D, 2)}) {
    EXPECT_TRUE(torch::equal(jitrope::pos2d_add_indexed(xv, h, w, rows, cols), want));
  }
  const auto rows2 = torch::stack({rows, rows}, 1).select(1, 0);
  EXPECT_FALSE(rows2.is_contiguous());
  EXPECT_TRUE(torch::equal(jitrope::pos2d_add_indexed(x, h, w, rows2, cols), want));
}

TEST(Pos2dAddIndexed, BackwardThroughAutograd) {
  torch::manual_seed(2);
  for (const auto& c : kCases) {
    const auto [rows, cols] = make_indices(c);
    for (auto dtype : {at::kDouble, at::kFloat}) {
      const auto opts = at::TensorOptions().dtype(dtype);
      const auto x = torch::randn(shape_of(c), opts).requires_grad_();
      const auto h = torch::randn({c.max_h, c.D}, opts).requires_grad_();
      const auto w = torch::randn({c.max_w, c.D}, opts).requires_grad_();
      const auto grad = torch::randn(shape_of(c), opts);
      const auto got = torch::autograd::grad({jitrope::pos2d_add_indexed(x, h, w, rows, cols)}, {x, h, w}, {grad});
      const auto [wh, ww] = loop_backward(grad, rows, cols, c.max_h, c.max_w);
      const double tol = dtype == at::kDouble ? 1e-12 : 1e-4;
      EXPECT_TRUE(torch::equal(got[0], grad));
      EXPECT_TRUE(torch::allclose(got[1].to(at::kDouble), wh, tol, tol)) << "N " << c.N << " dtype " << dtype;
      EXPECT_TRUE(torch::allclose(got[2].to(at::kDouble), ww, tol, tol)) << "N " << c.N << " dtype " << dtype;
    }
  }
}

TEST(Pos2dAddIndexed, DoubleBackward) {
  // grad_pos_h[r] sums grad_out over the tokens with rows[n] == r: its derivative in grad_out is 1 on
  // the tokens with a row, 0 on the others.
  torch::manual_seed(3);
  const Case c = kCases[0];
  const auto [rows, cols] = make_indices(c);
  const auto x = torch::randn(shape_of(c), at::kDouble).requires_grad_();
  const auto h = torch::randn({c.max_h, c.D}, at::kDouble).requires_grad_();
  const auto w = torch::randn({c.max_w, c.D}, at::kDouble).requires_grad_();
  const auto grad = torch::randn(shape_of(c), at::kDouble).requires_grad_();
  const auto grads = torch::autograd::grad(
      {jitrope::pos2d_add_indexed(x, h, w, rows, cols)}, {h}, {grad},
      /*retain_graph=*/true, /*create_graph=*/true);
  const auto gg = torch::autograd::grad({grads[0].sum()}, {grad})[0];
  const auto want = (rows >= 0).to(at::kDouble).view({1, c.N, 1}).expand_as(gg);
  EXPECT_TRUE(torch::equal(gg, want));
}

TEST(Pos2dAddIndexed, BackwardOpIsDeterministic) {
  torch::manual_seed(4);
  for (int64_t B : {1, 33}) {
    const int64_t N = 1500, D = 40, max_h = 9, max_w = 11;
    const auto grad = torch::randn({B, N, D});
    const auto rows = torch::randint(-1, max_h, {N}, at::kLong), cols = torch::randint(-1, max_w, {N}, at::kLong);
    const auto [h1, w1] = jitrope::pos2d_add_indexed_backward(grad, rows, cols, max_h, max_w);
    const auto [h2, w2] = jitrope::pos2d_add_indexed_backward(grad, rows, cols, max_h, max_w);
    EXPECT_TRUE(torch::equal(h1, h2));
    EXPECT_TRUE(torch::equal(w1, w2));
    const auto [wh, ww] = loop_backward(grad, rows, cols, max_h, max_w);
    EXPECT_TRUE(torch::allclose(h1.to(at::kDouble), wh, 1e-4, 1e-4));
    EXPECT_TRUE(torch::allclose(w1.to(at::kDouble), ww, 1e-4, 1e-4));
  }
}

TEST(Pos2dAddIndexed, ErrorsNameTheArgument) {
  const auto x = torch::randn({2, 5, 6});
  const auto h = torch::randn({3, 6}), w = torch::randn({4, 6});
  const auto r = torch::tensor({0, 1, 2, -1, 0}, at::kLong), c = torch::tensor({3, -1, 0, 1, 2}, at::kLong);
  using jitrope::pos2d_add_indexed;
  expect_error(
      [&] { pos2d_add_indexed(x[0][0], h, w, r, c); },
      "x must have shape [..., N, D] (at least 2 dims), got shape [6]");
  expect_error(
      [&] { pos2d_add_indexed(x.to(at::kLong), h.to(at::kLong), w.to(at::kLong), r, c); },
      "x must be float16, bfloat16, float32 or float64, got torch.int64");
  expect_error(
      [&] { pos2d_add_indexed(x, h.narrow(1, 0, 5), w, r, c); },
      "pos_h must be [max_h, D] with x's D = 6, got shape [3, 5]");
  expect_error(
      [&] { pos2d_add_indexed(x, h, w.to(at::kDouble), r, c); },
      "pos_w must have x's dtype torch.float32, got torch.float64");
  expect_error(
      [&] { pos2d_add_indexed(x, h, w, r.to(at::kInt), c); },
      "rows must be an int64 tensor [N] (one index per token), got dtype torch.int32");
  expect_error(
      [&] { pos2d_add_indexed(x, h, w, r, c.narrow(0, 0, 4)); },
      "cols must have shape [N] = [5] (one index per token of x: [..., N, D] = [2, 5, 6]), got shape [4]");
  expect_error(
      [&] { pos2d_add_indexed(x, h, w, r + 1, c); },
      "rows must hold values in [-1, max_h) = [-1, 3) (a pos_h row, or -1 for none), got values in [0, 3]");
  expect_error(
      [&] { pos2d_add_indexed(x, h, w, r, c - 1); },
      "cols must hold values in [-1, max_w) = [-1, 4) (a pos_w row, or -1 for none), got values in [-2, 2]");
  expect_error(
      [&] { pos2d_add_indexed(x, h, w, r, c.to(at::kDouble)); },
      "cols must be an int64 tensor [N] (one index per token), got dtype torch.float64");
  // A meta tensor beside CPU ones dispatches to the Meta key, whose kernel is the Python fake (which
  // names the argument, tests/test_pos2d_add_indexed.py); without Python the dispatcher refuses it.
  EXPECT_THROW(pos2d_add_indexed(x, h, w, r.to(at::kMeta), c), c10::Error);
  EXPECT_THROW(pos2d_add_indexed(x, at::Tensor(), w, r, c), c10::Error);
  expect_error(
      [&] { jitrope::pos2d_add_indexed_backward(x, r, c, 2, 4); },
      "pos2d_add_indexed_backward: rows must hold values in [-1, max_h) = [-1, 2)");
  expect_error(
      [&] { jitrope::pos2d_add_indexed_backward(x, r, c, 3, -1); },
      "pos2d_add_indexed_backward: max_h and max_w must be >= 0, got 3 and -1");
}

}  // namespace
