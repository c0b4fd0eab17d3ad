// GoogleTest cases of jitrope::rope2d from LibTorch: the op through the C++ API (which calls the
// dispatcher), forward and backward through torch::autograd, against a reference written in ATen,
// and its error messages.
#include <functional>
#include <optional>
#include <string>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "ops/rope2d.h"

#include "test_utils.h"

namespace {

using jitrope_test::expect_error;
using jitrope_test::qk_view;

// The op (docs/ops.md) in ATen, in float64: phi[h, n, m] = y_n f[h, 0, m] + x_n f[h, 1, m]; pairs (2m, 2m+1) or
// (m, m + D/2) turn by phi. Differentiable through LibTorch autograd.
torch::Tensor rope2d_reference(
    const torch::Tensor& x, const torch::Tensor& coords, const torch::Tensor& freqs, bool interleaved) {
  const int64_t D = x.size(-1), half = D / 2, N = x.size(-2);
  const auto f = (freqs.dim() == 2 ? freqs.unsqueeze(0) : freqs).to(torch::kDouble);
  const auto c = coords.to(torch::kDouble);
  const auto phi = c.select(1, 0).view({1, N, 1}) * f.select(1, 0).unsqueeze(1) +
      c.select(1, 1).view({1, N, 1}) * f.select(1, 1).unsqueeze(1);
  const auto cos = phi.cos(), sin = phi.sin();
  const auto xd = x.to(torch::kDouble);
  const auto a = interleaved ? xd.slice(-1, 0, D, 2) : xd.narrow(-1, 0, half);
  const auto b = interleaved ? xd.slice(-1, 1, D, 2) : xd.narrow(-1, half, half);
  const auto out_a = a * cos - b * sin;
  const auto out_b = a * sin + b * cos;
  const auto out = interleaved ? torch::stack({out_a, out_b}, -1).flatten(-2) : torch::cat({out_a, out_b}, -1);
  return out.to(x.scalar_type());
}

torch::Tensor random_coords(int64_t N) {
  auto c = torch::rand({N, 2}, torch::kDouble) * 20 - 4;
  c[0].zero_();
  return c;
}

class Rope2dTest : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(Rope2dTest, ForwardMatchesReferenceOnQkvView) {
  const auto [interleaved, per_head] = GetParam();
  torch::manual_seed(0);
  const int64_t B = 2, N = 7, H = 3, D = 12;
  const auto qkv = torch::randn({B, N, 3 * H * D}, torch::kDouble);
  const auto x = qk_view(qkv, H, D);
  const auto coords = random_coords(N);
  const auto freqs = per_head ? torch::randn({H, 2, D / 2}, torch::kDouble) : torch::randn({2, D / 2}, torch::kDouble);
  const auto out = jitrope::rope2d(x, coords, freqs, interleaved);
  EXPECT_EQ(out.sizes(), x.sizes());
  EXPECT_TRUE(torch::allclose(out, rope2d_reference(x, coords, freqs, interleaved), 1e-12, 1e-12));
  EXPECT_TRUE(torch::equal(out.select(-2, 0), x.select(-2, 0)));  // token 0 sits at (0, 0)

  const auto out32 =
      jitrope::rope2d(x.to(torch::kFloat), coords.to(torch::kFloat), freqs.to(torch::kFloat), interleaved);
  EXPECT_TRUE(torch::allclose(out32, out.to(torch::kFloat), 1e-5, 1e-5));
}

TEST_P(Rope2dTest, InPlaceMatchesOutOfPlace) {
  const auto [interleaved, per_head] = GetParam();
  torch::manual_seed(1);
  const int64_t B = 3, N = 5, H = 2, D = 8;
  auto qkv = torch::randn({B, N, 3 * H * D});
  const auto coords = random_coords(N).to(torch::kFloat);
  const auto freqs = per_head ? torch::randn({H, 2, D / 2}) : torch::randn({2, D / 2});
  const auto expected = jitrope::rope2d(qk_view(qkv, H, D), coords, freqs, interleaved);
  auto x = qk_view(qkv, H, D);
  auto& ret = jitrope::rope2d_(x, coords, freqs, interleaved);
  EXPECT_TRUE(ret.is_same(x));
  EXPECT_TRUE(torch::equal(x, expected));
}

TEST_P(Rope2dTest, BackwardThroughAutogradMatchesReference) {
  const auto [interleaved, per_head] = GetParam();
  torch::manual_seed(2);
  const int64_t B = 2, N = 6, H = 3, D = 8;
  const auto coords = random_coords(N);
  auto qkv = torch::randn({B, N, 3 * H * D}, torch::kDouble).requires_grad_();
  auto freqs = (per_head ? torch::randn({H, 2, D / 2}, torch::kDouble) : torch::randn({2, D / 2}, torch::kDouble))
                   .requires_grad_();
  const auto g = torch::randn({2, B, H, N, D}, torch::kDouble);

  const auto out = jitrope::rope2d(qk_view(qkv, H, D), coords, freqs, interleaved);
  const auto grads = torch::autograd::grad({out}, {qkv, freqs}, {g});
  const auto ref = rope2d_reference(qk_view(qkv, H, D), coords, freqs, interleaved);
  const auto ref_grads = torch::autograd::grad({ref}, {qkv, freqs}, {g});
  EXPECT_TRUE(torch::allclose(grads[0], ref_grads[0], 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(grads[1], ref_grads[1], 1e-10, 1e-10));
  EXPECT_EQ(grads[1].sizes(), freqs.sizes());

  // Deterministic: the same bits again.
  const auto out2 = jitrope::rope2d(qk_view(qkv, H, D), coords, freqs, interleaved);
  const auto grads2 = torch::autograd::grad({out2}, {qkv, freqs}, {g});
  EXPECT_TRUE(torch::equal(grads[0], grads2[0]));
  EXPECT_TRUE(torch::equal(grads[1], grads2[1]));
}

INSTANTIATE_TEST_SUITE_P(
    Conventions, Rope2dTest, ::testing::Combine(::testing::Bool(), ::testing::Bool()), [](const auto& info) {
      return std::string(std::get<0>(info.param) ? "Interleaved" : "HalfSplit") +
          (std::get<1>(info.param) ? "PerHead" : "Shared");
    });

TEST(Rope2d, BackwardOpWithoutInputIsInverseRotation) {
  torch::manual_seed(3);
  const auto g = torch::randn({2, 3, 5, 8}, torch::kDouble);
  const auto coords = random_coords(5);
  const auto freqs = torch::randn({2, 4}, torch::kDouble);
  const auto [grad_x, grad_freqs] = jitrope::rope2d_backward(g, coords, freqs, std::nullopt, true);
  EXPECT_EQ(grad_freqs.numel(), 0);
  EXPECT_TRUE(torch::allclose(grad_x, rope2d_reference(g, coords, -freqs, true), 1e-12, 1e-12));
}

TEST(Rope2d, ThroughTheDispatcherByName) {
  // The schema's C++ signature, freqs_index included.
  const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("jitrope::rope2d", "")
          .typed<at::Tensor(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, const std::optional<at::Tensor>&)>();
  const auto x = torch::randn({4, 2, 3, 6});
  const auto coords = torch::rand({3, 2});
  const auto freqs = torch::randn({2, 2, 3});
  EXPECT_TRUE(torch::equal(op.call(x, coords, freqs, false, std::nullopt), jitrope::rope2d(x, coords, freqs, false)));
}

TEST(Rope2d, EmptyBatchAndManyLeadingDims) {
  const auto coords = torch::rand({3, 2});
  const auto freqs = torch::randn({2, 2}).requires_grad_();
  auto empty = torch::randn({0, 2, 3, 4}).requires_grad_();
  auto out = jitrope::rope2d(empty, coords, freqs);
  EXPECT_EQ(out.sizes(), empty.sizes());
  out.sum().backward();
  EXPECT_TRUE(torch::equal(freqs.grad(), torch::zeros({2, 2})));

  // Seven permuted leading dims do not coalesce into the kernels' plane indexer: they fall back to
  // contiguous copies and still match.
  const auto x = torch::randn({2, 2, 2, 2, 2, 2, 2, 1, 3, 4}, torch::kDouble).permute({6, 5, 4, 3, 2, 1, 0, 7, 8, 9});
  const auto c64 = coords.to(torch::kDouble);
  const auto f64 = torch::randn({2, 2}, torch::kDouble);
  EXPECT_TRUE(torch::allclose(jitrope::rope2d(x, c64, f64), rope2d_reference(x, c64, f64, true), 1e-12, 1e-12));
}

TEST(Rope2d, DoubleBackwardIsRefused) {
  const auto coords = random_coords(5);
  auto x = torch::randn({2, 5, 8}, torch::kDouble).requires_grad_();
  auto freqs = torch::randn({2, 4}, torch::kDouble).requires_grad_();
  const auto out = jitrope::rope2d(x, coords, freqs);
  const auto v = torch::randn_like(out).requires_grad_();
  const auto grads = torch::autograd::grad({out}, {x, freqs}, {v}, /*retain_graph=*/true, /*create_graph=*/true);
  expect_error([&] { (grads[0].sum() + grads[1].sum()).backward(); }, "double backward");
}

TEST(Rope2d, BadInputsNameTheArgumentAndShape) {
  const auto x = torch::randn({2, 3, 5, 8});
  const auto c = torch::zeros({5, 2});
  const auto f = torch::zeros({2, 4});
  expect_error(
      [&] { jitrope::rope2d(torch::randn({5, 8}), c, f); },
      "x must have shape [..., H, N, D] (at least 3 dims), got [5, 8]");
  expect_error(
      [&] { jitrope::rope2d(torch::randn({2, 5, 7}), c, torch::zeros({2, 3})); }, "x must have an even last dim D");
  expect_error(
      [&] { jitrope::rope2d(x.to(torch::kLong), c, f); },
      "x must be float16, bfloat16, float32 or float64, got torch.int64");
  expect_error([&] { jitrope::rope2d(x, torch::zeros({4, 2}), f); }, "coords must have shape [N, 2] = [5, 2]");
  expect_error([&] { jitrope::rope2d(x, c.to(torch::kInt), f); }, "coords must be a floating tensor");
  expect_error(
      [&] { jitrope::rope2d(x, c, torch::zeros({2, 3})); },
      "freqs must have shape [2, D/2] = [2, 4] (shared) or [H, 2, D/2] = [3, 2, 4]");
  expect_error([&] { jitrope::rope2d(x, c, torch::zeros({4, 2, 4})); }, "got [4, 2, 4]");
  expect_error(
      [&] { jitrope::rope2d_backward(x, c, f, torch::randn({2, 3, 5, 6}), true); },
      "x (the forward input) must have grad_out's shape [2, 3, 5, 8], got [2, 3, 5, 6]");
  expect_error(
      [&] { jitrope::rope2d_backward(x.to(torch::kLong), c, f, std::nullopt, true); }, "grad_out must be float16");
  auto expanded = torch::randn({1, 5, 8}).expand({3, 5, 8});
  expect_error([&] { jitrope::rope2d_(expanded, c, f); }, "overlapping memory");
  auto needs_grad = x.clone().requires_grad_();
  expect_error([&] { jitrope::rope2d_(needs_grad, c, f); }, "in-place op is for inference");
}

}  // namespace
