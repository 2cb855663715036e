// dW = dY^T X over all steps, and db = the column sums of dY, for the fused
// float32 CPU path (weight_grad.cpp, AVX-512; Note [weight-gradient GEMM]).
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace fusedrnn {
namespace cpu {

// `rows` rows of dY [rows, M] and of X [rows, N], both float32, row-major and
// contiguous. The rows of all segments together are the sum's K.
struct GradRows {
  const float* dy;
  const float* x;
  int64_t rows;
};

// Returns dW [M, N] = sum over the segments' rows of dY^T X, and db [M]
// (want_db; else [0]) = the column sums of dY.
std::pair<at::Tensor, at::Tensor> weight_grad_fused(const std::vector<GradRows>& segs,
                                                    int64_t M, int64_t N, bool want_db,
                                                    const at::TensorOptions& options);

}  // namespace cpu
}  // namespace fusedrnn
