// CUDA pointwise steps and the CUDA registration of the ops. Where the
// persistent kernel takes a call (FUSEDRNN_ALGO, persistent/persistent.h) it
// runs the whole loop in one launch; otherwise the per-step
// GEMM (h_{t-1} W_hh^T, cuBLAS through ATen, so TF32 follows
// torch.backends.cuda.matmul.allow_tf32) and the loop live in recurrence.h;
// each step here is one launch over rows x hidden units on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../persistent/persistent.h"
#include "../recurrence.h"

namespace fusedrnn {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cap the grid; enough blocks to fill any current GPU.
constexpr int64_t kMaxBlocks = 4096;

inline dim3 grid_for(int64_t n) {
  return dim3(static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

// One thread per (row, hidden unit) of the step, in a grid-stride loop,
// through step_unit (steps.h). Every step struct carries rows and H.
template <typename Step>
__global__ void step_kernel(const Step a) {
  const int64_t H = a.H, n = a.rows * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    step_unit(a, k / H, k % H);
  }
}

struct CudaKernels {
  // One launch on the current stream, checked.
  template <typename Step>
  static void step(const Step& a) {
    if (a.rows * a.H == 0) return;  // a grid of no blocks is a launch error
    step_kernel<Step><<<grid_for(a.rows * a.H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Note [cooperative launch fallback]
// The persistent kernel needs all its blocks co-resident; a GPU shared under
// MPS or partitioned (MIG) may refuse the launch although the occupancy query
// said yes. That throws CooperativeLaunchFailed before the kernel runs, so
// nothing has been written, and the call runs step-wise from scratch: correct
// results, slower. One warning per process (TORCH_WARN_ONCE at this one call
// site), since a GPU that refuses once refuses every time.
void warn_fallback(const persistent::CooperativeLaunchFailed& e) {
  TORCH_WARN_ONCE(e.what(), "; fusedrnn runs the step-wise path instead (warned once)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cuda(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse,
    bool train) {
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x_proj.device());
  if (!w_hr.has_value() && !persistent::packed_while_capturing(batch_sizes) &&
      persistent::use_persistent(w_hh, h0, kLstmGates, false, x_proj)) {
    try {  // Note [cooperative launch fallback]
      return persistent::lstm_forward_cuda(x_proj, h0, c0, w_hh, b_hh, batch_sizes, reverse, train,
                                           persistent::kDeviceBlocks, persistent::kWidestChunk,
                                           persistent::kAutoMode);
    } catch (const persistent::CooperativeLaunchFailed& e) {
      warn_fallback(e);
    }
  }
  return lstm_forward_impl<CudaKernels>(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse,
                                        train);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                   const at::Tensor& grad_c_n, const at::Tensor& output, const at::Tensor& gates,
                   const at::Tensor& cells, const at::Tensor& h0, const at::Tensor& c0,
                   const at::Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
                   bool reverse, bool has_bias) {
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(grad_output.device());
  if (!w_hr.has_value() &&
      !persistent::packed_while_capturing(batch_sizes) &&
      persistent::use_persistent(w_hh, grad_h_n, kLstmGates, true, grad_output)) {
    try {  // Note [cooperative launch fallback]
      return persistent::lstm_backward_cuda(grad_output, grad_h_n, grad_c_n, output, gates, cells,
                                            h0, c0, w_hh, batch_sizes, reverse, has_bias,
                                            persistent::kDeviceBlocks, persistent::kWidestChunk,
                                            persistent::kAutoMode);
    } catch (const persistent::CooperativeLaunchFailed& e) {
      warn_fallback(e);
    }
  }
  return lstm_backward_impl<CudaKernels>(grad_output, grad_h_n, grad_c_n, output, gates, cells,
                                         h0, c0, w_hh, w_hr, batch_sizes, reverse, has_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_cuda(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh, const OptTensor& b_hh,
    const OptTensor& batch_sizes, bool reverse, bool reset_after, bool train) {
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x_proj.device());
  if (reset_after && !persistent::packed_while_capturing(batch_sizes) &&
      persistent::use_persistent(w_hh, h0, kGruGates, false, x_proj)) {
    try {  // Note [cooperative launch fallback]
      return persistent::gru_forward_cuda(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, train,
                                          persistent::kDeviceBlocks, persistent::kWidestChunk,
                                          persistent::kAutoMode);
    } catch (const persistent::CooperativeLaunchFailed& e) {
      warn_fallback(e);
    }
  }
  return gru_forward_impl<CudaKernels>(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after,
                                       train);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& w_hh,
    const OptTensor& batch_sizes, bool reverse, bool reset_after, bool has_bias) {
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(grad_output.device());
  if (reset_after && !persistent::packed_while_capturing(batch_sizes) &&
      persistent::use_persistent(w_hh, grad_h_n, kGruGates, true, grad_output)) {
    try {  // Note [cooperative launch fallback]
      return persistent::gru_backward_cuda(grad_output, grad_h_n, output, gates, h0, w_hh,
                                           batch_sizes, reverse, has_bias,
                                           persistent::kDeviceBlocks, persistent::kWidestChunk,
                                           persistent::kAutoMode);
    } catch (const persistent::CooperativeLaunchFailed& e) {
      warn_fallback(e);
    }
  }
  return gru_backward_impl<CudaKernels>(grad_output, grad_h_n, output, gates, h0, w_hh,
                                        batch_sizes, reverse, reset_after, has_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) {
  m.impl("lstm_forward", &lstm_forward_cuda);
  m.impl("lstm_backward", &lstm_backward_cuda);
  m.impl("gru_forward", &gru_forward_cuda);
  m.impl("gru_backward", &gru_backward_cuda);
}

}  // namespace fusedrnn
