// The regularised ops as registered (ops.cpp has their schemas): each op's
// arguments gathered into RegInputs for the loops of reg_lstm.h and
// reg_gru.h, for one kernel policy K. Every device registers RegOps<K>'s
// functions (cpu/reg_cpu.cpp, cuda/reg_cuda.cu), so a schema change is made
// here once. K::DeviceGuard, where K has one, is held for the call (CUDA's
// device guard).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "reg_gru.h"
#include "reg_lstm.h"

namespace fusedrnn {
namespace reg {

template <typename K, typename = void>
struct DeviceGuardOf {
  struct type {
    explicit type(at::Device) {}
  };
};
template <typename K>
struct DeviceGuardOf<K, std::void_t<typename K::DeviceGuard>> {
  using type = typename K::DeviceGuard;
};

template <typename K>
struct RegOps {
  using Guard = typename DeviceGuardOf<K>::type;

  static LstmRegForwardOut lstm_forward(
      const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
      const OptTensor& w_hr, const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse,
      bool train, const OptTensor& rec_mask, const OptTensor& zone_h, const OptTensor& zone_c,
      const OptTensor& ln_hh, const OptTensor& ln_c_w, const OptTensor& ln_c_b,
      const OptTensor& ln_ih, const OptTensor& b_ih) {
    const Guard guard(x_proj.device());
    return lstm_reg_forward_impl<K>(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, train,
                                    {rec_mask, zone_h, zone_c, ln_hh, ln_c_w, ln_c_b, ln_ih, b_ih});
  }

  static LstmRegBackwardOut lstm_backward(
      const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
      const Tensor& x_proj, const Tensor& output, const Tensor& gates, const Tensor& cells,
      const Tensor& cell_new, const Tensor& norm_hh, const Tensor& stats, const Tensor& h0,
      const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
      bool reverse, bool has_bias, const OptTensor& rec_mask, const OptTensor& zone_h,
      const OptTensor& zone_c, const OptTensor& ln_hh, const OptTensor& ln_c_w,
      const OptTensor& ln_c_b, const OptTensor& ln_ih, const OptTensor& b_ih) {
    const Guard guard(grad_output.device());
    return lstm_reg_backward_impl<K>(
        grad_output, grad_h_n, grad_c_n, x_proj, output, gates, cells, cell_new, norm_hh, stats,
        h0, c0, w_hh, w_hr, batch_sizes, reverse, has_bias,
        {rec_mask, zone_h, zone_c, ln_hh, ln_c_w, ln_c_b, ln_ih, b_ih});
  }

  static GruRegForwardOut gru_forward(const Tensor& x_proj, const Tensor& h0, const Tensor& w_hh,
                                      const OptTensor& b_hh, const OptTensor& batch_sizes,
                                      bool reverse, bool reset_after, bool train,
                                      const OptTensor& rec_mask, const OptTensor& zone_h,
                                      const OptTensor& ln_hh, const OptTensor& ln_ih,
                                      const OptTensor& b_ih) {
    const Guard guard(x_proj.device());
    return gru_reg_forward_impl<K>(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after,
                                   train, {rec_mask, zone_h, {}, ln_hh, {}, {}, ln_ih, b_ih});
  }

  static GruRegBackwardOut gru_backward(
      const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& x_proj,
      const Tensor& output, const Tensor& gates, const Tensor& norm_hh, const Tensor& stats,
      const Tensor& h0, const Tensor& w_hh, const OptTensor& batch_sizes, bool reverse,
      bool reset_after, bool has_bias, const OptTensor& rec_mask, const OptTensor& zone_h,
      const OptTensor& ln_hh, const OptTensor& ln_ih, const OptTensor& b_ih) {
    const Guard guard(grad_output.device());
    return gru_reg_backward_impl<K>(grad_output, grad_h_n, x_proj, output, gates, norm_hh, stats,
                                    h0, w_hh, batch_sizes, reverse, reset_after, has_bias,
                                    {rec_mask, zone_h, {}, ln_hh, {}, {}, ln_ih, b_ih});
  }

  // The four ops' kernels, in a TORCH_LIBRARY_IMPL block of K's device.
  static void register_ops(torch::Library& m) {
    m.impl("lstm_reg_forward", &lstm_forward);
    m.impl("lstm_reg_backward", &lstm_backward);
    m.impl("gru_reg_forward", &gru_forward);
    m.impl("gru_reg_backward", &gru_backward);
  }
};

}  // namespace reg
}  // namespace fusedrnn
