// rope2d and pos2d_add through the installed C++ API, with autograd, against values worked out by
// hand (docs/ops.md). Exits non-zero on any mismatch.
#include <ATen/ATen.h>
#include <jitrope/ops/pos2d_add.h>
#include <jitrope/ops/rope2d.h>

#include <cmath>
#include <iostream>

static bool expect(const char* what, const at::Tensor& got, const at::Tensor& want) {
  if (at::allclose(got, want, 1e-12, 1e-12)) return true;
  std::cerr << what << ": got\n" << got << "\nwanted\n" << want << "\n";
  return false;
}

int main() {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  // One head, one token at (y, x) = (1, 1), one pair: phi = 1*pi/6 + 1*pi/3 = pi/2, so (3, 4)
  // turns to (-4, 3); d(sum out)/dx = (cos + sin, cos - sin) = (1, -1).
  auto x = at::tensor({3.0, 4.0}, f64).view({1, 1, 2}).requires_grad_();
  const auto freqs = at::tensor({M_PI / 6, M_PI / 3}, f64).view({2, 1});
  const auto y = jitrope::rope2d(x, at::ones({1, 2}, f64), freqs);
  y.sum().backward();
  bool ok = expect("rope2d", y, at::tensor({-4.0, 3.0}, f64).view({1, 1, 2}));
  ok &= expect("rope2d grad x", x.grad(), at::tensor({1.0, -1.0}, f64).view({1, 1, 2}));

  // Batch 2, a prefix token, then a 1x2 grid; D = 1: out[b] = (x0, x1 + 10 + 1, x2 + 10 + 2).
  // Gradient of the sum: each row of pos_h is used B*gw = 4 times, each row of pos_w B*gh = 2.
  auto t = at::tensor({1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, f64).view({2, 3, 1});
  auto pos_h = at::tensor({10.0}, f64).view({1, 1}).requires_grad_();
  auto pos_w = at::tensor({1.0, 2.0}, f64).view({2, 1}).requires_grad_();
  const auto p = jitrope::pos2d_add(t, pos_h, pos_w, {1, 2}, /*token_offset=*/1);
  p.sum().backward();
  ok &= expect("pos2d_add", p, at::tensor({1.0, 13.0, 15.0, 4.0, 16.0, 18.0}, f64).view({2, 3, 1}));
  ok &= expect("pos2d_add grad pos_h", pos_h.grad(), at::tensor({4.0}, f64).view({1, 1}));
  ok &= expect("pos2d_add grad pos_w", pos_w.grad(), at::tensor({2.0, 2.0}, f64).view({2, 1}));
  std::cout << "jitrope consumer: " << (ok ? "ok" : "FAILED") << "\n";
  return ok ? 0 : 1;
}
