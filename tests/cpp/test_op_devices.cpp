// Every jitrope op and backward op, called from LibTorch, refuses tensor arguments on different
// devices (the meta device included) with an error naming the argument and both devices: the
// device check every op runs at its entry, before any backend kernel.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>

#include "ops/pos2d_add.h"
#include "ops/pos2d_add_indexed.h"
#include "ops/qk_norm_rope.h"
#include "ops/rope2d.h"

#include "test_utils.h"

namespace {

using jitrope_test::expect_error;

const auto kMeta = torch::Device(torch::kMeta);

TEST(OpDevices, Rope2dRefusesMetaMixedWithCpu) {
  auto x = torch::randn({2, 3, 5, 8});
  const auto c = torch::rand({5, 2});
  const auto f = torch::randn({2, 4});
  expect_error([&] { jitrope::rope2d(x, c.to(kMeta), f); }, "rope2d: coords must be on x's device cpu, got meta");
  expect_error([&] { jitrope::rope2d(x, c, f.to(kMeta)); }, "rope2d: freqs must be on x's device cpu, got meta");
  expect_error([&] { jitrope::rope2d(x.to(kMeta), c, f); }, "rope2d: coords must be on x's device meta, got cpu");
  expect_error([&] { jitrope::rope2d_(x, c.to(kMeta), f); }, "rope2d_: coords must be on x's device cpu, got meta");
  expect_error(
      [&] { jitrope::rope2d_backward(x, c, f, x.to(kMeta), true); },
      "rope2d_backward: x (the forward input) must be on grad_out's device cpu, got meta");
  expect_error(
      [&] { jitrope::rope2d_backward(x, c, f.to(kMeta), std::nullopt, true); },
      "rope2d_backward: freqs must be on grad_out's device cpu, got meta");
}

TEST(OpDevices, Rope2dRefusesThroughAutograd) {
  auto x = torch::randn({2, 3, 5, 8}, torch::requires_grad());
  auto f = torch::randn({2, 4}, torch::requires_grad());
  expect_error(
      [&] { jitrope::rope2d(x, torch::rand({5, 2}).to(kMeta), f); }, "coords must be on x's device cpu, got meta");
}

TEST(OpDevices, QkNormRopeRefusesMetaMixedWithCpu) {
  const auto qk = torch::randn({2, 2, 3, 5, 8});
  const auto w = torch::ones({2, 8});
  const auto c = torch::rand({5, 2});
  const auto f = torch::randn({2, 4});
  expect_error(
      [&] { jitrope::qk_norm_rope(qk, w.to(kMeta)); }, "qk_norm_rope: weight must be on qk's device cpu, got meta");
  expect_error(
      [&] { jitrope::qk_norm_rope(qk, w, c, f.to(kMeta)); },
      "qk_norm_rope: freqs must be on qk's device cpu, got meta");
  expect_error(
      [&] { jitrope::qk_norm_rope_backward(qk.to(kMeta), qk, w, c, f, 1e-6, true, true); },
      "qk_norm_rope_backward: grad_out must be on qk's device cpu, got meta");
  expect_error(
      [&] { jitrope::qk_norm_rope_backward(qk, qk, w, c.to(kMeta), f, 1e-6, true, false); },
      "qk_norm_rope_backward: coords must be on qk's device cpu, got meta");
}

TEST(OpDevices, Pos2dAddRefusesMetaMixedWithCpu) {
  auto x = torch::randn({2, 7, 8});
  const auto ph = torch::randn({3, 8});
  const auto pw = torch::randn({4, 8});
  expect_error(
      [&] { jitrope::pos2d_add(x, ph.to(kMeta), pw, {2, 3}, 1); },
      "pos2d_add: pos_h must be on x's device cpu, got meta");
  expect_error(
      [&] { jitrope::pos2d_add_(x, ph, pw.to(kMeta), {2, 3}, 1); },
      "pos2d_add_: pos_w must be on x's device cpu, got meta");
}

// A meta x with CPU indices has no kernel to reach from LibTorch (the fake kernels are Python's):
// the entry's check names the argument instead of the dispatcher failing to find a Meta kernel.
TEST(OpDevices, Pos2dAddIndexedRefusesMetaMixedWithCpu) {
  const auto x = torch::randn({2, 7, 8});
  const auto ph = torch::randn({3, 8});
  const auto pw = torch::randn({4, 8});
  const auto idx = torch::zeros({7}, torch::kLong);
  expect_error(
      [&] { jitrope::pos2d_add_indexed(x, ph, pw.to(kMeta), idx, idx); },
      "pos2d_add_indexed: pos_w must be on x's device cpu, got meta");
  expect_error(
      [&] { jitrope::pos2d_add_indexed(x.to(kMeta), ph.to(kMeta), pw.to(kMeta), idx, idx.to(kMeta)); },
      "pos2d_add_indexed: rows must be on x's device meta, got cpu");
  expect_error(
      [&] { jitrope::pos2d_add_indexed_backward(x.to(kMeta), idx, idx.to(kMeta), 3, 4); },
      "pos2d_add_indexed_backward: rows must be on grad_out's device meta, got cpu");
}

TEST(OpDevices, CudaMixedWithCpuIsRefused) {
  if (!torch::cuda::is_available()) {
    GTEST_SKIP() << "needs a CUDA device";
  }
  const auto x = torch::randn({2, 3, 5, 8}, torch::kCUDA);
  expect_error(
      [&] { jitrope::rope2d(x, torch::rand({5, 2}), torch::randn({2, 4}, torch::kCUDA)); },
      "rope2d: coords must be on x's device cuda:0, got cpu");
}

}  // namespace
