// GoogleTest cases of jitrope::qk_norm_rope from LibTorch: the op through the C++ API (which calls
// the dispatcher), forward and backward through torch::autograd, against a reference written in
// ATen (the published order: RMSNorm, then rope2d), and its error messages.
#include <functional>
#include <optional>
#include <string>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "ops/qk_norm_rope.h"
#include "ops/rope2d.h"

#include "test_utils.h"

namespace {

using jitrope_test::expect_error;
using jitrope_test::qk_view;

// RMSNorm of each [D] row of qk: [2, B, H, N, D] with weight[s] in float64, differentiable.
torch::Tensor rms_norm_reference(const torch::Tensor& qk, const torch::Tensor& weight, double eps) {
  const auto x = qk.to(torch::kDouble);
  const auto y = x * torch::rsqrt(x.pow(2).mean(-1, true) + eps);
  return y * weight.to(torch::kDouble).view({2, 1, 1, 1, -1});
}

class QkNormRopeTest : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(QkNormRopeTest, ForwardAndAutogradMatchNormThenRope) {
  const auto [interleaved, per_head] = GetParam();
  torch::manual_seed(0);
  const int64_t B = 2, N = 7, H = 3, D = 12;
  const double eps = 1e-6;
  auto qkv = torch::randn({B, N, 3 * H * D}, torch::kDouble).requires_grad_();
  auto weight = (torch::rand({2, D}, torch::kDouble) + 0.5).requires_grad_();
  auto coords = torch::rand({N, 2}, torch::kDouble) * 10;
  auto freqs = (per_head ? torch::randn({H, 2, D / 2}, torch::kDouble) : torch::randn({2, D / 2}, torch::kDouble))
                   .requires_grad_();
  const auto out = jitrope::qk_norm_rope(qk_view(qkv, H, D), weight, coords, freqs, eps, interleaved);
  EXPECT_EQ(out.sizes(), qk_view(qkv, H, D).sizes());
  EXPECT_TRUE(out.is_contiguous());
  const auto ref = jitrope::rope2d(rms_norm_reference(qk_view(qkv, H, D), weight, eps), coords, freqs, interleaved);
  EXPECT_TRUE(torch::allclose(out, ref, 1e-12, 1e-12));

  const auto g = torch::randn_like(out);
  const auto grads = torch::autograd::grad({out}, {qkv, weight, freqs}, {g});
  const auto ref_grads = torch::autograd::grad({ref}, {qkv, weight, freqs}, {g});
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(torch::allclose(grads[i], ref_grads[i], 1e-10, 1e-10)) << "gradient " << i;
  }
  // Deterministic: the same bits again.
  const auto out2 = jitrope::qk_norm_rope(qk_view(qkv, H, D), weight, coords, freqs, eps, interleaved);
  const auto grads2 = torch::autograd::grad({out2}, {qkv, weight, freqs}, {g});
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(torch::equal(grads[i], grads2[i]));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Conventions, QkNormRopeTest, ::testing::Combine(::testing::Bool(), ::testing::Bool()), [](const auto& info) {
      return std::string(std::get<0>(info.param) ? "Interleaved" : "HalfSplit") +
          (std::get<1>(info.param) ? "PerHead" : "Shared");
    });

TEST(QkNormRope, NormalizeOnlyWithoutCoordsAndFreqs) {
  torch::manual_seed(1);
  auto qk = torch::randn({2, 3, 2, 5, 8}, torch::kDouble).requires_grad_();
  auto weight = (torch::rand({2, 8}, torch::kDouble) + 0.5).requires_grad_();
  const auto out = jitrope::qk_norm_rope(qk, weight);
  const auto ref = rms_norm_reference(qk, weight, 1e-6);
  EXPECT_TRUE(torch::allclose(out, ref, 1e-12, 1e-12));
  const auto g = torch::randn_like(out);
  const auto grads = torch::autograd::grad({out}, {qk, weight}, {g});
  const auto ref_grads = torch::autograd::grad({ref}, {qk, weight}, {g});
  EXPECT_TRUE(torch::allclose(grads[0], ref_grads[0], 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(grads[1], ref_grads[1], 1e-10, 1e-10));
}

TEST(QkNormRope, EmptyBatch) {
  const auto qk = torch::randn({2, 0, 2, 3, 4});
  auto weight = torch::ones({2, 4}).requires_grad_();
  const auto out = jitrope::qk_norm_rope(qk, weight, torch::rand({3, 2}), torch::rand({2, 2}));
  EXPECT_EQ(out.sizes(), qk.sizes());
  const auto [gq, gw, gf] = jitrope::qk_norm_rope_backward(
      torch::zeros_like(qk), qk, weight.detach(), torch::rand({3, 2}), torch::rand({2, 2}), 1e-6, true, true);
  EXPECT_EQ(gq.sizes(), qk.sizes());
  EXPECT_TRUE(torch::equal(gw, torch::zeros({2, 4})));
  EXPECT_TRUE(torch::equal(gf, torch::zeros({2, 2})));
}

TEST(QkNormRope, ErrorsNameTheArgument) {
  const auto qk = torch::randn({2, 2, 3, 5, 8});
  const auto w = torch::ones({2, 8});
  expect_error([&] { jitrope::qk_norm_rope(qk.select(0, 0), w); }, "qk must have shape [2, B, H, N, D]");
  expect_error([&] { jitrope::qk_norm_rope(qk, w.narrow(1, 0, 6)); }, "weight must have shape [2, D] = [2, 8]");
  expect_error([&] { jitrope::qk_norm_rope(qk.to(torch::kLong), w); }, "got torch.int64");
  expect_error([&] { jitrope::qk_norm_rope(qk, w, torch::rand({5, 2}), std::nullopt); }, "coords and freqs");
  expect_error(
      [&] { jitrope::qk_norm_rope(qk, w, torch::rand({4, 2}), torch::rand({2, 4})); },
      "coords must have shape [N, 2] = [5, 2]");
}

}  // namespace
