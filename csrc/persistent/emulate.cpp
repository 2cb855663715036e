// The CPU emulator of the persistent CUDA kernel (phases.h), registered as
// the CPU kernels of the _persistent_* ops. It runs the kernel's phases block
// by block and thread by thread, with a grid barrier at the end of each step,
// so the layout, the indexing, the packed schedule and the tensor-core tiling
// (emulated, with tf32 rounding) are tested where no GPU is visible. It is a
// test vehicle, not a fast path.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "host.h"
#include "phases.h"

namespace fusedrnn {
namespace persistent {
namespace {

// The device the emulator assumes: an H100's SM count and its opt-in shared
// memory limit per block (fusedrnn/_ops.py has the same numbers for tests).
constexpr int64_t kEmulatedBlocks = 132;
constexpr int64_t kEmulatedSmemBytes = 232448;

// Every block's shared memory, poisoned (all bits set: NaN in every float
// type) so that reading what the kernel never wrote shows up in its results,
// and followed by a guard band that must keep its pattern: a write past a
// block's Layout::bytes is a bug the emulator would otherwise not see.
class SharedMemory {
 public:
  explicit SharedMemory(const Layout& L)
      : bytes_(L.bytes), stride_(L.bytes + kGuardBytes), mem_(L.blocks * stride_, kPoison) {
    for (int64_t b = 0; b < L.blocks; ++b) {
      std::fill_n(block(b) + bytes_, kGuardBytes, kGuard);
    }
  }
  unsigned char* block(int64_t b) { return mem_.data() + b * stride_; }
  void check_guards() {
    for (int64_t b = 0; b * stride_ < int64_t(mem_.size()); ++b) {
      const unsigned char* g = block(b) + bytes_;
      TORCH_CHECK(std::all_of(g, g + kGuardBytes, [](unsigned char c) { return c == kGuard; }),
                  "persistent emulator: block ", b, " wrote past its ", bytes_,
                  " bytes of shared memory");
    }
  }

 private:
  static constexpr int64_t kGuardBytes = 256;
  static constexpr unsigned char kPoison = 0xff, kGuard = 0xa5;
  int64_t bytes_, stride_;
  std::vector<unsigned char> mem_;
};

struct Emulator {
  static int64_t max_blocks(const at::Device&) { return kEmulatedBlocks; }
  static int64_t smem_bytes(const at::Device&) { return kEmulatedSmemBytes; }
  static bool tensor_cores(const at::Device&) { return true; }

  template <int G, int kMode, typename scalar_t, typename acc_t>
  static void forward(const ForwardArgs<scalar_t, acc_t>& a, const at::Device&) {
    const Layout& L = a.L;
    SharedMemory smem(L);
    auto block = [&](int64_t blk) { return smem.block(blk); };
    for (int64_t blk = 0; blk < L.blocks; ++blk) {
      for (int tid = 0; tid < kThreads; ++tid) {
        load_forward_weights<G>(a, blk, block(blk), tid, kThreads);
      }
    }
    const int64_t phases = forward_phases(L);
    for (int64_t s = 0; s < a.steps; ++s) {
      for (int64_t blk = 0; blk < L.blocks; ++blk) {
        for (int64_t ph = 0; ph < phases; ++ph) {
          for (int tid = 0; tid < kThreads; ++tid) {
            forward_phase<G, kMode>(a, blk, block(blk), s, ph, tid, kThreads);
          }
        }
      }
    }
    smem.check_guards();
  }

  template <int G, int kMode, typename scalar_t, typename acc_t>
  static void backward(const BackwardArgs<scalar_t, acc_t>& a, const at::Device&) {
    const Layout& L = a.L;
    SharedMemory smem(L);
    auto block = [&](int64_t blk) { return smem.block(blk); };
    for (int64_t blk = 0; blk < L.blocks; ++blk) {
      for (int tid = 0; tid < kThreads; ++tid) {
        load_backward_weights<G>(a, blk, block(blk), tid, kThreads);
      }
    }
    for (int64_t i = 0; i <= a.steps; ++i) {
      const int64_t phases = backward_phases(L, i, a.steps);
      for (int64_t blk = 0; blk < L.blocks; ++blk) {
        for (int64_t ph = 0; ph < phases; ++ph) {
          for (int tid = 0; tid < kThreads; ++tid) {
            backward_phase<G, kMode>(a, blk, block(blk), i, ph, tid, kThreads);
          }
        }
      }
    }
    smem.check_guards();
  }
};

// mode -1 on the CPU: what a GPU with TF32 off would pick.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_emulated(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse, bool train,
    int64_t max_blocks, int64_t max_chunk, int64_t mode) {
  return lstm_forward<Emulator>(x_proj, h0, c0, w_hh, b_hh, batch_sizes, reverse, train, max_blocks,
                                max_chunk, mode, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_emulated(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& output,
    const Tensor& gates, const Tensor& cells, const Tensor& h0, const Tensor& c0,
    const Tensor& w_hh, const OptTensor& batch_sizes, bool reverse, bool has_bias,
    int64_t max_blocks, int64_t max_chunk, int64_t mode) {
  return lstm_backward<Emulator>(grad_output, grad_h_n, grad_c_n, output, gates, cells, h0, c0,
                                 w_hh, batch_sizes, reverse, has_bias, max_blocks, max_chunk, mode,
                                 false);
}

std::tuple<Tensor, Tensor, Tensor> gru_forward_emulated(const Tensor& x_proj, const Tensor& h0,
                                                        const Tensor& w_hh, const OptTensor& b_hh,
                                                        const OptTensor& batch_sizes, bool reverse,
                                                        bool train, int64_t max_blocks,
                                                        int64_t max_chunk, int64_t mode) {
  return gru_forward<Emulator>(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, train, max_blocks,
                               max_chunk, mode, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_backward_emulated(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& output, const Tensor& gates,
    const Tensor& h0, const Tensor& w_hh, const OptTensor& batch_sizes, bool reverse, bool has_bias,
    int64_t max_blocks, int64_t max_chunk, int64_t mode) {
  return gru_backward<Emulator>(grad_output, grad_h_n, output, gates, h0, w_hh, batch_sizes,
                                reverse, has_bias, max_blocks, max_chunk, mode, false);
}

}  // namespace
}  // namespace persistent

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("_persistent_lstm_forward", &persistent::lstm_forward_emulated);
  m.impl("_persistent_lstm_backward", &persistent::lstm_backward_emulated);
  m.impl("_persistent_gru_forward", &persistent::gru_forward_emulated);
  m.impl("_persistent_gru_backward", &persistent::gru_backward_emulated);
}

}  // namespace fusedrnn
