// The persistent CUDA kernel behind the public ops (cuda/persistent.cu):
// whether to take it for a call, and the calls themselves.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fusedrnn {
namespace persistent {

// FUSEDRNN_ALGO=auto|persistent|stepwise, read on every call.
//   stepwise:   cuBLAS GEMM + one pointwise launch per step, always.
//   persistent: the persistent kernel wherever it supports the call (no
//               proj_size, GRU in torch's form, W_hh slice fits on chip),
//               stepwise elsewhere.
//   auto:       persistent where supported, batch <= kAutoMaxBatch and staging
//               h_{t-1} (backward: dgates) exposes at most kAutoMaxRoundTrips
//               round trips to L2 per step.
bool use_persistent(int64_t H, int64_t B, int G, bool backward, const at::Tensor& like);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_lstm_forward(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& batch_sizes,
    bool reverse, bool train);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cuda_lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                   const at::Tensor& grad_c_n, const at::Tensor& output, const at::Tensor& gates,
                   const at::Tensor& cells, const at::Tensor& h0, const at::Tensor& c0,
                   const at::Tensor& w_hh, const c10::optional<at::Tensor>& batch_sizes,
                   bool reverse, bool has_bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_gru_forward(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& batch_sizes,
    bool reverse, bool train);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_gru_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, bool has_bias);

}  // namespace persistent
}  // namespace fusedrnn
