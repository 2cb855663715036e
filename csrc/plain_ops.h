// Layer calls made of the other ops (plain_ops.cpp), for the kernels that
// take them where their own way does not apply.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fusedrnn {

// fusedrnn::lstm_input_backward as lstm_backward, then linear_backward: any
// device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_input_backward_by_ops(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                           const at::Tensor& grad_c_n, const at::Tensor& input,
                           const at::Tensor& output, const at::Tensor& gates,
                           const at::Tensor& cells, const at::Tensor& h0, const at::Tensor& c0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh, bool reverse,
                           bool has_bias, bool input_grad, bool w_ih_grad, bool b_ih_grad);

}  // namespace fusedrnn
