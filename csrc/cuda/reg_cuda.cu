// CUDA kernels of the regularised ops (lstm_reg_*, gru_reg_*) and their CUDA
// registration. The loops are reg_lstm.h / reg_gru.h, step-wise: each step's
// GEMMs through ATen (cuBLAS on the current stream; TF32 follows
// torch.backends.cuda.matmul.allow_tf32), then one launch of the step's row
// function (reg_lstm_rows.h / reg_gru_rows.h): one thread block per row, the
// LN statistics as block reductions.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../reg_gru.h"
#include "../reg_lstm.h"

namespace fusedrnn {
namespace {

constexpr int kRowThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kRowWarps = kRowThreads / kWarpSize;
constexpr unsigned kFullWarp = 0xffffffffu;

// The sum of v over the block, returned to every thread. Deterministic: a
// fixed tree within warps, then the warps' sums in order.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[kRowWarps];
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_down_sync(kFullWarp, v, o);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < kRowWarps; ++w) total += partial[w];
  __syncthreads();  // partial is reused by the next sum
  return total;
}

// One row on one block of kRowThreads (reg_rows.h). Host-device so that the
// shared row functions compile for both sides; only the device side runs.
struct CudaRow {
  template <typename F>
  FUSEDRNN_HOST_DEVICE void loop(int64_t n, F&& f) const {
#ifdef __CUDA_ARCH__
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) f(j);
    __syncthreads();  // what one thread wrote, the next loop's others read
#endif
  }
  template <typename T, typename F>
  FUSEDRNN_HOST_DEVICE T sum(int64_t n, F&& f) const {
    T s = T(0);
#ifdef __CUDA_ARCH__
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) s += f(j);
    s = block_sum(s);
#endif
    return s;
  }
  FUSEDRNN_HOST_DEVICE bool leader() const {
#ifdef __CUDA_ARCH__
    return threadIdx.x == 0;
#else
    return true;
#endif
  }
};

template <typename Rows>
__global__ void __launch_bounds__(kRowThreads) rows_kernel(const Rows a) {
  reg::run_row(CudaRow{}, a, int64_t(blockIdx.x));
}

struct CudaRegKernels {
  // One launch on the current stream, checked.
  template <typename Rows>
  static void run(const Rows& a) {
    if (a.rows == 0) return;
    rows_kernel<Rows><<<static_cast<unsigned>(a.rows), kRowThreads, 0,
                        at::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

reg::LstmRegForwardOut lstm_reg_forward_cuda(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse,
    bool train, const OptTensor& rec_mask, const OptTensor& zone_h, const OptTensor& zone_c,
    const OptTensor& ln_hh, const OptTensor& ln_c_w, const OptTensor& ln_c_b,
    const OptTensor& ln_ih, const OptTensor& b_ih) {
  const c10::cuda::CUDAGuard guard(x_proj.device());
  return reg::lstm_reg_forward_impl<CudaRegKernels>(
      x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, train,
      {rec_mask, zone_h, zone_c, ln_hh, ln_c_w, ln_c_b, ln_ih, b_ih});
}

reg::LstmRegBackwardOut lstm_reg_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& x_proj, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& cell_new, const at::Tensor& norm_hh,
    const at::Tensor& stats,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse, bool has_bias, const OptTensor& rec_mask,
    const OptTensor& zone_h, const OptTensor& zone_c, const OptTensor& ln_hh,
    const OptTensor& ln_c_w, const OptTensor& ln_c_b, const OptTensor& ln_ih,
    const OptTensor& b_ih) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  return reg::lstm_reg_backward_impl<CudaRegKernels>(
      grad_output, grad_h_n, grad_c_n, x_proj, output, gates, cells, cell_new, norm_hh, stats,
      h0, c0, w_hh, w_hr, batch_sizes, reverse, has_bias,
      {rec_mask, zone_h, zone_c, ln_hh, ln_c_w, ln_c_b, ln_ih, b_ih});
}

reg::GruRegForwardOut gru_reg_forward_cuda(const at::Tensor& x_proj, const at::Tensor& h0,
                                           const at::Tensor& w_hh, const OptTensor& b_hh,
                                           const OptTensor& batch_sizes, bool reverse,
                                           bool reset_after, bool train,
                                           const OptTensor& rec_mask, const OptTensor& zone_h,
                                           const OptTensor& ln_hh, const OptTensor& ln_ih,
                                           const OptTensor& b_ih) {
  const c10::cuda::CUDAGuard guard(x_proj.device());
  return reg::gru_reg_forward_impl<CudaRegKernels>(
      x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, train,
      {rec_mask, zone_h, {}, ln_hh, {}, {}, ln_ih, b_ih});
}

reg::GruRegBackwardOut gru_reg_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& x_proj,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& norm_hh,
    const at::Tensor& stats, const at::Tensor& h0, const at::Tensor& w_hh,
    const OptTensor& batch_sizes, bool reverse, bool reset_after, bool has_bias,
    const OptTensor& rec_mask, const OptTensor& zone_h, const OptTensor& ln_hh,
    const OptTensor& ln_ih, const OptTensor& b_ih) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  return reg::gru_reg_backward_impl<CudaRegKernels>(
      grad_output, grad_h_n, x_proj, output, gates, norm_hh, stats, h0, w_hh, batch_sizes,
      reverse, reset_after, has_bias, {rec_mask, zone_h, {}, ln_hh, {}, {}, ln_ih, b_ih});
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) {
  m.impl("lstm_reg_forward", &lstm_reg_forward_cuda);
  m.impl("lstm_reg_backward", &lstm_reg_backward_cuda);
  m.impl("gru_reg_forward", &gru_reg_forward_cuda);
  m.impl("gru_reg_backward", &gru_reg_backward_cuda);
}

}  // namespace fusedrnn
