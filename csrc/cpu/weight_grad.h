// The weight gradient of a linear map over all steps: dw [N, K] = dy [R, N]^T x [R, K].
//
// Note [weight gradients through oneDNN]
// MKL's SGEMM (at::mm) reaches about 40% of the FMA peak on this shape on the
// AMD CPUs we measure on, oneDNN's matmul about 80% (python -m benchmarks.gemm,
// "weight gradient" rows). ATen exposes oneDNN's backward-weights primitive
// only for its own tensor layout, so the operands are converted first; with
// the conversions it still measured 53-57 ms against at::mm's 69 ms for
// [6400, 2048]^T x [6400, 512]. Our own GEMM would need dy transposed or
// repacked first, which costs more than it saves. float32 where torch has
// oneDNN; everything else at::mm.
#pragma once

#include <ATen/ATen.h>

namespace fusedrnn {
namespace cpu {

inline at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& x) {
  if (dy.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && at::hasMKLDNN() &&
      dy.numel() > 0 && x.numel() > 0) {
    const at::Tensor shape = at::empty({dy.size(1), x.size(1)}, dy.options()).to_mkldnn();
    const auto grads = at::mkldnn_linear_backward_weights(dy.contiguous().to_mkldnn(),
                                                          x.contiguous().to_mkldnn(), shape, false);
    return std::get<0>(grads).to_dense();
  }
  return at::mm(dy.t(), x);
}

}  // namespace cpu
}  // namespace fusedrnn
