// The persistent kernel as the rest of the CUDA code sees it (persistent.cu):
// whether it takes a call of the public ops, and its entry points. These are
// the CUDA kernels of the _persistent_* ops and also what the public ops'
// CUDA kernels (cuda/rnn_cuda.cu) call, with kDeviceBlocks, kWidestChunk and
// kAutoMode (layout.h) for the tuning arguments.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <stdexcept>
#include <tuple>

#include "layout.h"

namespace fusedrnn {
namespace persistent {

// FUSEDRNN_ALGO=auto|persistent|stepwise, read on every call.
//   stepwise:   cuBLAS GEMM + one pointwise launch per step, always.
//   persistent: the persistent kernel wherever it supports the call (no
//               proj_size, GRU in torch's form, W_hh slice fits on chip),
//               stepwise elsewhere.
//   auto:       stepwise until the persistent kernel has GPU results (Note
//               [auto is step-wise until measured] in persistent.cu); then
//               persistent where supported, batch <= kAutoMaxBatch and staging
//               h_{t-1} (backward: dgates) exposes at most kAutoMaxRoundTrips
//               round trips to L2 per step.
// H is read from w_hh's columns (the caller has no projection), B from the
// state's rows, dtype and device from `like`; whichever path runs checks
// every argument before any kernel.
bool use_persistent(const at::Tensor& w_hh, const at::Tensor& state, int gates, bool backward,
                    const at::Tensor& like);

// Whether this is packed input (batch_sizes given) and the current stream is
// capturing a CUDA graph: then the public ops run step-wise (Note [packed
// input under graph capture] in persistent.cu).
bool packed_while_capturing(const c10::optional<at::Tensor>& batch_sizes);

// Thrown by the entry points below when the cooperative launch itself fails
// (too few co-resident blocks, e.g. under MPS or on a partitioned GPU, or any
// launch error) before the kernel has run, so nothing has been written: the
// public ops catch it and run the step-wise path instead (rnn_cuda.cu); the
// _persistent_* ops let it through as a RuntimeError. FUSEDRNN_FORCE_COOP_FAIL=1
// forces it at every launch: a test hook, not a setting.
struct CooperativeLaunchFailed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The ops' arguments and results (ops.cpp, _persistent_*): those of
// lstm_forward etc. without w_hr and with reset_after, plus max_blocks,
// max_chunk and mode. Each holds its own device guard and NoAutocast.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cuda(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& batch_sizes,
    bool reverse, bool train, int64_t max_blocks, int64_t max_chunk, int64_t mode);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                   const at::Tensor& grad_c_n, const at::Tensor& output, const at::Tensor& gates,
                   const at::Tensor& cells, const at::Tensor& h0, const at::Tensor& c0,
                   const at::Tensor& w_hh, const c10::optional<at::Tensor>& batch_sizes,
                   bool reverse, bool has_bias, int64_t max_blocks, int64_t max_chunk,
                   int64_t mode);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_cuda(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& batch_sizes,
    bool reverse, bool train, int64_t max_blocks, int64_t max_chunk, int64_t mode);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, bool has_bias, int64_t max_blocks,
    int64_t max_chunk, int64_t mode);

}  // namespace persistent
}  // namespace fusedrnn
