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

template <typename scalar_t, typename acc_t>
__global__ void lstm_forward_kernel(LstmForwardStep<scalar_t, acc_t> a) {
  const int64_t H = a.H, G = kLstmGates * H, n = a.rows * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = k / H, j = k % H;
    const scalar_t* x = a.x + b * G;
    const scalar_t* hh = a.hh + b * G;
    acc_t i, f, g, o, c, h;
    lstm_forward_point<acc_t>(acc_t(x[j]) + acc_t(hh[j]) + acc_t(a.b_hh[j]),
                              acc_t(x[H + j]) + acc_t(hh[H + j]) + acc_t(a.b_hh[H + j]),
                              acc_t(x[2 * H + j]) + acc_t(hh[2 * H + j]) + acc_t(a.b_hh[2 * H + j]),
                              acc_t(x[3 * H + j]) + acc_t(hh[3 * H + j]) + acc_t(a.b_hh[3 * H + j]),
                              a.c[k], i, f, g, o, c, h);
    a.c[k] = c;
    a.h[k] = scalar_t(h);
    if (a.out) a.out[k] = scalar_t(h);
    if (a.gates) {
      scalar_t* gs = a.gates + b * G;
      gs[j] = scalar_t(i);
      gs[H + j] = scalar_t(f);
      gs[2 * H + j] = scalar_t(g);
      gs[3 * H + j] = scalar_t(o);
      a.cells[k] = c;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void lstm_backward_kernel(LstmBackwardStep<scalar_t, acc_t> a) {
  const int64_t H = a.H, G = kLstmGates * H, n = a.rows * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = k / H, j = k % H;
    const scalar_t* gs = a.gates + b * G;
    const acc_t c_prev = b < a.prev_rows ? a.c_prev[k] : a.c0[k];
    const acc_t dh = acc_t(a.grad_h[k]) + (a.dh_rec ? a.dh_rec[k] : acc_t(0));
    acc_t di, df, dg, d_o, dcp;
    lstm_backward_point<acc_t>(acc_t(gs[j]), acc_t(gs[H + j]), acc_t(gs[2 * H + j]),
                               acc_t(gs[3 * H + j]), a.cells[k], c_prev, dh, a.dc[k], di, df,
                               dg, d_o, dcp);
    scalar_t* d = a.dgates + b * G;
    d[j] = scalar_t(di);
    d[H + j] = scalar_t(df);
    d[2 * H + j] = scalar_t(dg);
    d[3 * H + j] = scalar_t(d_o);
    a.dc[k] = dcp;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gru_forward_kernel(GruForwardStep<scalar_t, acc_t> a) {
  const int64_t H = a.H, G = kGruGates * H, n = a.rows * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = k / H, j = k % H;
    const scalar_t* x = a.x + b * G;
    const scalar_t* hh = a.hh + b * G;
    const acc_t hn = acc_t(hh[2 * H + j]) + acc_t(a.b_hh[2 * H + j]);
    acc_t r, z, nn, h;
    gru_forward_point<acc_t>(acc_t(x[j]), acc_t(x[H + j]), acc_t(x[2 * H + j]),
                             acc_t(hh[j]) + acc_t(a.b_hh[j]),
                             acc_t(hh[H + j]) + acc_t(a.b_hh[H + j]), hn, acc_t(a.h[k]), r, z,
                             nn, h, a.reset_after);
    a.h[k] = scalar_t(h);
    a.out[k] = scalar_t(h);
    if (a.gates) {
      scalar_t* gs = a.gates + b * kGruSaved * H;
      gs[j] = scalar_t(r);
      gs[H + j] = scalar_t(z);
      gs[2 * H + j] = scalar_t(nn);
      gs[3 * H + j] = scalar_t(hn);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gru_backward_kernel(GruBackwardStep<scalar_t, acc_t> a) {
  const int64_t H = a.H, G = kGruGates * H, n = a.rows * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = k / H, j = k % H;
    const scalar_t* gs = a.gates + b * kGruSaved * H;
    const acc_t h_prev = acc_t(b < a.prev_rows ? a.h_prev[k] : a.h0[k]);
    acc_t dr, dz, dn, dhn, dh_direct;
    const acc_t r = a.reset_after ? acc_t(gs[j]) : acc_t(1);
    gru_backward_point<acc_t>(r, acc_t(gs[H + j]), acc_t(gs[2 * H + j]),
                              acc_t(gs[3 * H + j]), h_prev, acc_t(a.grad_h[k]) + a.dh[k], dr,
                              dz, dn, dhn, dh_direct);
    scalar_t* dx = a.dx + b * G;
    scalar_t* dhh = a.dhh + b * G;
    dx[j] = dhh[j] = scalar_t(dr);
    dx[H + j] = dhh[H + j] = scalar_t(dz);
    dx[2 * H + j] = scalar_t(dn);
    dhh[2 * H + j] = scalar_t(dhn);
    a.dh[k] = dh_direct;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gru_reset_kernel(GruResetStep<scalar_t, acc_t> a) {
  const int64_t H = a.H, G = kGruGates * H, n = a.rows * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = k / H, j = k % H;
    a.rh[k] = scalar_t(gru_reset_point<acc_t>(acc_t(a.x[b * G + j]),
                                              acc_t(a.hh[b * G + j]) + acc_t(a.b_hh[j]),
                                              acc_t(a.h[k])));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gru_reset_backward_kernel(GruResetBackwardStep<scalar_t, acc_t> a) {
  const int64_t H = a.H, G = kGruGates * H, n = a.rows * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = k / H, j = k % H;
    const acc_t h_prev = acc_t(b < a.prev_rows ? a.h_prev[k] : a.h0[k]);
    acc_t dr, dh_prev;
    gru_reset_backward_point<acc_t>(acc_t(a.gates[b * kGruSaved * H + j]), h_prev,
                                    acc_t(a.drh[k]), dr, dh_prev);
    a.dx[b * G + j] = a.dhh[b * G + j] = scalar_t(dr);
    a.dh[k] += dh_prev;
  }
}

// One thread per (row, hidden unit) of the step, on the current stream,
// checked. Every step struct carries rows and H.
template <typename Step>
void launch(void (*kernel)(Step), const Step& a) {
  kernel<<<grid_for(a.rows * a.H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaKernels {
  template <typename scalar_t, typename acc_t>
  static void lstm_forward_step(const LstmForwardStep<scalar_t, acc_t>& a) {
    launch(lstm_forward_kernel<scalar_t, acc_t>, a);
  }
  template <typename scalar_t, typename acc_t>
  static void lstm_backward_step(const LstmBackwardStep<scalar_t, acc_t>& a) {
    launch(lstm_backward_kernel<scalar_t, acc_t>, a);
  }
  template <typename scalar_t, typename acc_t>
  static void gru_forward_step(const GruForwardStep<scalar_t, acc_t>& a) {
    launch(gru_forward_kernel<scalar_t, acc_t>, a);
  }
  template <typename scalar_t, typename acc_t>
  static void gru_backward_step(const GruBackwardStep<scalar_t, acc_t>& a) {
    launch(gru_backward_kernel<scalar_t, acc_t>, a);
  }
  template <typename scalar_t, typename acc_t>
  static void gru_reset_step(const GruResetStep<scalar_t, acc_t>& a) {
    launch(gru_reset_kernel<scalar_t, acc_t>, a);
  }
  template <typename scalar_t, typename acc_t>
  static void gru_reset_backward_step(const GruResetBackwardStep<scalar_t, acc_t>& a) {
    launch(gru_reset_backward_kernel<scalar_t, acc_t>, a);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cuda(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse,
    bool train) {
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x_proj.device());
  if (!w_hr.has_value() && persistent::use_persistent(w_hh, h0, kLstmGates, false, x_proj)) {
    return persistent::lstm_forward_cuda(x_proj, h0, c0, w_hh, b_hh, batch_sizes, reverse, train,
                                         persistent::kDeviceBlocks, persistent::kWidestChunk,
                                         persistent::kAutoMode);
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
      persistent::use_persistent(w_hh, grad_h_n, kLstmGates, true, grad_output)) {
    return persistent::lstm_backward_cuda(grad_output, grad_h_n, grad_c_n, output, gates, cells,
                                          h0, c0, w_hh, batch_sizes, reverse, has_bias,
                                          persistent::kDeviceBlocks, persistent::kWidestChunk,
                                          persistent::kAutoMode);
  }
  return lstm_backward_impl<CudaKernels>(grad_output, grad_h_n, grad_c_n, output, gates, cells,
                                         h0, c0, w_hh, w_hr, batch_sizes, reverse, has_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_cuda(
    const at::Tensor& x_proj, const at::Tensor& h0, const at::Tensor& w_hh, const OptTensor& b_hh,
    const OptTensor& batch_sizes, bool reverse, bool reset_after, bool train) {
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x_proj.device());
  if (reset_after && persistent::use_persistent(w_hh, h0, kGruGates, false, x_proj)) {
    return persistent::gru_forward_cuda(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, train,
                                        persistent::kDeviceBlocks, persistent::kWidestChunk,
                                        persistent::kAutoMode);
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
  if (reset_after && persistent::use_persistent(w_hh, grad_h_n, kGruGates, true, grad_output)) {
    return persistent::gru_backward_cuda(grad_output, grad_h_n, output, gates, h0, w_hh,
                                         batch_sizes, reverse, has_bias, persistent::kDeviceBlocks,
                                         persistent::kWidestChunk, persistent::kAutoMode);
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
