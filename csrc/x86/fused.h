// The fused float32 CPU path (AVX-512): the per-step GEMM and the pointwise
// update in one pass over each tile. Taken for padded (not packed) float32
// input without projection on CPUs with AVX-512; everything else runs the
// generic loop of recurrence.h.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fusedrnn {
namespace cpu {

bool fused_path_ok(const at::Tensor& x_proj, bool packed, bool proj);

// Same contracts as lstm_forward_impl / lstm_backward_impl etc. in
// recurrence.h, for x_proj [T, B, G*H]; arguments are already checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_fused(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const at::Tensor& b_hh, bool reverse, bool train);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_fused(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                    const at::Tensor& grad_c_n, const at::Tensor& output, const at::Tensor& gates,
                    const at::Tensor& cells, const at::Tensor& h0, const at::Tensor& c0,
                    const at::Tensor& w_hh, bool reverse, bool has_bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_fused(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh,
    const at::Tensor& b_hh, bool reverse, bool train);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_fused(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& w_hh, bool reverse,
    bool has_bias);

// The forwards above for bfloat16 (fused_avx512_bf16.cpp): H even, AVX512-BF16.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_fused_bf16(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const at::Tensor& b_hh, bool reverse, bool train);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_fused_bf16(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh,
    const at::Tensor& b_hh, bool reverse, bool train);

// y [M, N] = x [M, K] w [N, K]^T (+ b [N]); float32, contiguous.
at::Tensor linear_fused(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b);

// dx [M, K] = dy [M, N] w [N, K]; float32, contiguous.
at::Tensor linear_input_grad_fused(const at::Tensor& dy, const at::Tensor& w);

}  // namespace cpu
}  // namespace fusedrnn
