// Helpers shared by the GoogleTest files of every op.
#pragma once

#include <functional>
#include <string>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace jitrope_test {

// fn must throw a c10::Error whose message contains needle (the argument name, the shape...).
inline void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an error containing: " << needle;
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message: " << e.what() << "\nwanted: " << needle;
  }
}

// q and k of a fused qkv projection [B, N, 3*H*D] as one strided [2, B, H, N, D] view.
inline torch::Tensor qk_view(const torch::Tensor& qkv, int64_t H, int64_t D) {
  const int64_t B = qkv.size(0), N = qkv.size(1);
  return qkv.view({B, N, 3, H, D}).permute({2, 0, 3, 1, 4}).slice(0, 0, 2);
}

}  // namespace jitrope_test
