// GoogleTest cases of per-sequence frequencies (docs/ops.md) from LibTorch: rope2d, rope2d_ and
// qk_norm_rope with freqs_index, where freqs [F, (H,) 2, D/2] holds one table per sequence and
// token n turns by table freqs_index[n]. Checked against one plain call per table, forward and
// through torch::autograd, the single-table case bit for bit, and the argument errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>
#include <string>
#include <tuple>

#include "ops/qk_norm_rope.h"
#include "ops/rope2d.h"

#include "test_utils.h"

namespace {

using jitrope_test::expect_error;
using jitrope_test::qk_view;

class FreqsIndexTest : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

// Tables in runs (packed sequences) and out of order, one table unused.
torch::Tensor make_index() {
  return torch::tensor({0, 0, 0, 2, 2, 3, 3, 3, 0, 2, 2}, torch::kLong);
}

TEST_P(FreqsIndexTest, Rope2dIsOnePlainCallPerTable) {
  const auto [interleaved, per_head] = GetParam();
  torch::manual_seed(0);
  const int64_t B = 2, N = 11, H = 3, D = 8, F = 4;
  auto qkv = torch::randn({B, N, 3 * H * D}, torch::kDouble).requires_grad_();
  const auto coords = torch::rand({N, 2}, torch::kDouble) * 12 - 2;
  auto freqs = (per_head ? torch::randn({F, H, 2, D / 2}, torch::kDouble) : torch::randn({F, 2, D / 2}, torch::kDouble))
                   .requires_grad_();
  const auto index = make_index();
  const auto out = jitrope::rope2d(qk_view(qkv, H, D), coords, freqs, interleaved, index);
  const auto g = torch::randn_like(out);
  const auto grads = torch::autograd::grad({out}, {qkv, freqs}, {g});

  auto want_gx = torch::zeros_like(qkv);
  auto want_gf = torch::zeros_like(freqs);
  for (int64_t f = 0; f < F; ++f) {
    const auto mask = index.eq(f);
    if (!mask.any().item<bool>()) {
      continue;
    }
    auto table = freqs.detach()[f].clone().requires_grad_();
    auto x = qkv.detach().clone().requires_grad_();
    const auto plain = jitrope::rope2d(qk_view(x, H, D), coords, table, interleaved);
    EXPECT_TRUE(
        torch::equal(
            out.index({"...", mask, torch::indexing::Slice()}), plain.index({"...", mask, torch::indexing::Slice()})))
        << "table " << f;
    const auto masked_g = g * mask.to(torch::kDouble).view({N, 1});
    const auto plain_grads = torch::autograd::grad({plain}, {x, table}, {masked_g});
    want_gx += plain_grads[0];
    want_gf[f] += plain_grads[1];
  }
  EXPECT_TRUE(torch::allclose(grads[0], want_gx, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(grads[1], want_gf, 1e-10, 1e-10));
  EXPECT_TRUE(torch::equal(grads[1][1], torch::zeros_like(grads[1][1])));  // table 1 is unused

  // Deterministic: the same bits again.
  const auto again = torch::autograd::grad(
      {jitrope::rope2d(qk_view(qkv, H, D), coords, freqs, interleaved, index)}, {qkv, freqs}, {g});
  EXPECT_TRUE(torch::equal(grads[0], again[0]));
  EXPECT_TRUE(torch::equal(grads[1], again[1]));

  // rope2d_ turns the same way.
  auto y = qk_view(qkv.detach().clone(), H, D);
  {
    torch::NoGradGuard no_grad;
    jitrope::rope2d_(y, coords, freqs.detach(), interleaved, index);
  }
  EXPECT_TRUE(torch::equal(y, out.detach()));
}

TEST_P(FreqsIndexTest, QkNormRopeIsOnePlainCallPerTable) {
  const auto [interleaved, per_head] = GetParam();
  torch::manual_seed(1);
  const int64_t B = 2, N = 11, H = 2, D = 12, F = 4;
  auto qkv = torch::randn({B, N, 3 * H * D}, torch::kDouble).requires_grad_();
  auto weight = (torch::rand({2, D}, torch::kDouble) + 0.5).requires_grad_();
  const auto coords = torch::rand({N, 2}, torch::kDouble) * 12 - 2;
  auto freqs = (per_head ? torch::randn({F, H, 2, D / 2}, torch::kDouble) : torch::randn({F, 2, D / 2}, torch::kDouble))
                   .requires_grad_();
  const auto index = make_index();
  const auto out = jitrope::qk_norm_rope(qk_view(qkv, H, D), weight, coords, freqs, 1e-6, interleaved, index);
  const auto g = torch::randn_like(out);
  const auto grads = torch::autograd::grad({out}, {qkv, weight, freqs}, {g});
  auto want_gf = torch::zeros_like(freqs);
  auto want_gw = torch::zeros_like(weight);
  for (int64_t f = 0; f < F; ++f) {
    const auto mask = index.eq(f);
    auto table = freqs.detach()[f].clone().requires_grad_();
    auto w = weight.detach().clone().requires_grad_();
    const auto plain = jitrope::qk_norm_rope(qk_view(qkv.detach(), H, D), w, coords, table, 1e-6, interleaved);
    EXPECT_TRUE(
        torch::equal(
            out.index({"...", mask, torch::indexing::Slice()}), plain.index({"...", mask, torch::indexing::Slice()})))
        << "table " << f;
    const auto plain_grads = torch::autograd::grad({plain}, {w, table}, {g * mask.to(torch::kDouble).view({N, 1})});
    want_gw += plain_grads[0];
    want_gf[f] += plain_grads[1];
  }
  EXPECT_TRUE(torch::allclose(grads[1], want_gw, 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(grads[2], want_gf, 1e-10, 1e-10));
}

TEST_P(FreqsIndexTest, OneTableIsThePlainCallBitForBit) {
  const auto [interleaved, per_head] = GetParam();
  torch::manual_seed(2);
  const int64_t B = 3, N = 70, H = 2, D = 16;  // more rows than one backward chunk
  auto qkv = torch::randn({B, N, 3 * H * D}).requires_grad_();
  auto weight = (torch::rand({2, D}) + 0.5).requires_grad_();
  const auto coords = torch::rand({N, 2}) * 30;
  const auto freqs = per_head ? torch::randn({H, 2, D / 2}) : torch::randn({2, D / 2});
  auto plain_f = freqs.clone().requires_grad_();
  auto table = freqs.unsqueeze(0).clone().requires_grad_();
  const auto index = torch::zeros({N}, torch::kLong);
  const auto g = torch::randn({2, B, H, N, D});

  const auto plain = jitrope::rope2d(qk_view(qkv, H, D), coords, plain_f, interleaved);
  const auto indexed = jitrope::rope2d(qk_view(qkv, H, D), coords, table, interleaved, index);
  EXPECT_TRUE(torch::equal(plain, indexed));
  auto a = torch::autograd::grad({plain}, {qkv, plain_f}, {g});
  auto b = torch::autograd::grad({indexed}, {qkv, table}, {g});
  EXPECT_TRUE(torch::equal(a[0], b[0]));
  EXPECT_TRUE(torch::equal(a[1], b[1][0]));

  const auto plain_n = jitrope::qk_norm_rope(qk_view(qkv, H, D), weight, coords, plain_f, 1e-6, interleaved);
  const auto indexed_n = jitrope::qk_norm_rope(qk_view(qkv, H, D), weight, coords, table, 1e-6, interleaved, index);
  EXPECT_TRUE(torch::equal(plain_n, indexed_n));
  a = torch::autograd::grad({plain_n}, {qkv, weight, plain_f}, {g});
  b = torch::autograd::grad({indexed_n}, {qkv, weight, table}, {g});
  EXPECT_TRUE(torch::equal(a[0], b[0]));
  EXPECT_TRUE(torch::equal(a[1], b[1]));
  EXPECT_TRUE(torch::equal(a[2], b[2][0]));
}

INSTANTIATE_TEST_SUITE_P(
    Conventions, FreqsIndexTest, ::testing::Combine(::testing::Bool(), ::testing::Bool()), [](const auto& info) {
      return std::string(std::get<0>(info.param) ? "Interleaved" : "HalfSplit") +
          (std::get<1>(info.param) ? "PerHead" : "Shared");
    });

TEST(FreqsIndex, BadIndexNamesTheArgument) {
  const auto x = torch::randn({2, 3, 5, 8});
  const auto c = torch::rand({5, 2});
  const auto f = torch::randn({4, 2, 4});
  const auto i = torch::tensor({0, 1, 2, 3, 0}, torch::kLong);
  expect_error(
      [&] { jitrope::rope2d(x, c, f, true, i.to(torch::kInt)); },
      "rope2d: freqs_index must be an int64 tensor [N], got dtype torch.int32");
  expect_error([&] { jitrope::rope2d(x, c, f, true, i.narrow(0, 0, 4)); }, "freqs_index must have shape [N] = [5]");
  expect_error(
      [&] { jitrope::rope2d(x, c, f, true, i - 1); },
      "freqs_index values must be in [0, F) = [0, 4) (the tables of freqs of shape [4, 2, 4]), got values in [-1, 2]");
  expect_error([&] { jitrope::rope2d(x, c, f, true, i + 1); }, "got values in [1, 4]");
  expect_error(
      [&] { jitrope::rope2d(x, c, f[0], true, i); },
      "freqs must have shape [F, 2, D/2] = [F, 2, 4] (shared) or [F, H, 2, D/2] = [F, 3, 2, 4] (per head) with "
      "freqs_index");
  expect_error(
      [&] { jitrope::rope2d(x, c, f, true, i.to(torch::kMeta)); },
      "rope2d: freqs_index must be on x's device cpu, got meta");
  expect_error(
      [&] { jitrope::rope2d_backward(x, c, f, x, true, i + 1); }, "rope2d_backward: freqs_index values must be in");
  const auto qk = torch::randn({2, 2, 3, 5, 8});
  const auto w = torch::ones({2, 8});
  expect_error(
      [&] { jitrope::qk_norm_rope(qk, w, std::nullopt, std::nullopt, 1e-6, true, i); },
      "qk_norm_rope: freqs_index needs coords and freqs");
  expect_error(
      [&] { jitrope::qk_norm_rope_backward(qk, qk, w, c, f, 1e-6, true, true, i * 2); },
      "qk_norm_rope_backward: freqs_index values must be in [0, F) = [0, 4)");
}

}  // namespace
