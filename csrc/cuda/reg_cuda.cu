// CUDA kernels of the regularised ops (lstm_reg_*, gru_reg_*) and their CUDA
// registration. The loops are reg_lstm.h / reg_gru.h, step-wise: each step's
// GEMMs through ATen (cuBLAS on the current stream; TF32 follows
// torch.backends.cuda.matmul.allow_tf32), then one launch of the step's row
// function (reg_lstm_rows.h / reg_gru_rows.h): one thread block per row, the
// LN statistics as block reductions.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../reg_ops.h"

namespace fusedrnn {
namespace {

constexpr int kRowThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kRowWarps = kRowThreads / kWarpSize;
// block_sum reads all kRowWarps sums: every row kernel runs kRowThreads threads.
static_assert(kRowThreads % kWarpSize == 0, "whole warps per row block");
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
  FUSEDRNN_HOST_DEVICE int64_t slot() const {
#ifdef __CUDA_ARCH__
    return blockIdx.x;
#else
    return 0;
#endif
  }
};

template <typename Rows>
__global__ void __launch_bounds__(kRowThreads) rows_kernel(const Rows a) {
  reg::run_row(CudaRow{}, a, int64_t(blockIdx.x));
}

struct CudaRegKernels {
  using DeviceGuard = c10::cuda::CUDAGuard;  // held for each op (reg_ops.h)
  // One launch on the current stream, checked.
  template <typename Rows>
  static void run(const Rows& a) {
    if (a.rows == 0) return;
    rows_kernel<Rows><<<static_cast<unsigned>(a.rows), kRowThreads, 0,
                        at::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) { reg::RegOps<CudaRegKernels>::register_ops(m); }

}  // namespace fusedrnn
