// Note [a plain cell in one call]
// A plain LSTMCell or GRUCell is the projection and one step of the layer
// ops, fusedrnn::linear then fusedrnn::lstm_forward / gru_forward with T = 1.
// Called from Python, each op call cost its argument parsing, the wrapping of
// five results and the Python between them: at batch 1 H=256 on a 2-core
// Xeon the two ops took 56 us one after the other, the cell's Python 19 us
// more. lstm_cell and gru_cell make the call from C++, as a
// CompositeImplicitAutograd kernel (and vmap's decomposition), through the
// layer op with its projection at T = 1 (Note [a layer and its projection in
// one node]); tracing records the cell's op.
//
// Note [a plain stack in one call]
// The same for LSTM and GRU: lstm_layers and gru_layers run the stack's
// calls of linear and the layer op, layer by layer and direction by
// direction, as functional.rnn_layers does, and concatenate and stack the
// results. A layer called one step at a time (a decoder's loop) spent more
// in Python than in its ops: GRU(256, 256) on one step of batch 1 took 160
// us against torch.nn's 125 us on a 2-core Xeon, its two ops about 50 us.
//
// Note [a layer and its projection in one node]
// Each layer and direction of a stack, and each cell call, is one op,
// lstm_input_forward / gru_input_forward (linear, then the layer op), with
// one autograd node whose backward runs the layer's backward op and then
// linear_backward (one op for the LSTM: Note [one product for both weight
// gradients] in cpu/rnn_cpu.cpp): C++ where no torch.func transform is
// active (Note [a layer's autograd in C++] in layer_autograd.cpp), else the
// ops' Python kernel. As two ops, a gradient-tracking call went through two Python
// autograd kernels and two Python backward nodes. Values and gradients are
// the two ops' bit for bit.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "plain_ops.h"

namespace fusedrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename F>
c10::TypedOperatorHandle<F> op_named(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

// x w_ih^T + b_ih.
Tensor projection(const Tensor& input, const Tensor& w_ih, const OptTensor& b_ih) {
  static const auto linear =
      op_named<Tensor(const Tensor&, const Tensor&, const OptTensor&)>("fusedrnn::linear");
  return linear.call(input, w_ih, b_ih);
}

const auto& lstm_forward_op() {
  static const auto op =
      op_named<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
          const OptTensor&, const OptTensor&, bool, bool)>("fusedrnn::lstm_forward");
  return op;
}

const auto& gru_forward_op() {
  static const auto op =
      op_named<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                  const OptTensor&, const OptTensor&, bool, bool,
                                                  bool)>("fusedrnn::gru_forward");
  return op;
}

const auto& lstm_input_forward_op() {
  static const auto op =
      op_named<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
          const OptTensor&, const OptTensor&, bool, bool)>("fusedrnn::lstm_input_forward");
  return op;
}

const auto& gru_input_forward_op() {
  static const auto op =
      op_named<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, const OptTensor&,
                                                  const OptTensor&, bool, bool, bool)>(
          "fusedrnn::gru_input_forward");
  return op;
}

// The layer ops with their projection (Note [a layer and its projection in
// one node]): linear, then lstm_forward / gru_forward. Where no gradient is
// needed the cells and stacks call these functions themselves: the op's
// dispatch would only add a hop.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_input_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, bool reverse, bool train) {
  return lstm_forward_op().call(projection(input, w_ih, b_ih), h0, c0, w_hh, std::nullopt,
                                b_hh, std::nullopt, reverse, train);
}

std::tuple<Tensor, Tensor, Tensor> gru_input_forward(const Tensor& input, const Tensor& h0,
                                                     const Tensor& w_ih, const Tensor& w_hh,
                                                     const OptTensor& b_ih, const OptTensor& b_hh,
                                                     bool reverse, bool reset_after, bool train) {
  return gru_forward_op().call(projection(input, w_ih, b_ih), h0, w_hh, b_hh,
                               std::nullopt, reverse, reset_after, train);
}

// The layers with their projection as the cells and stacks call them: the
// op (one autograd node) where a gradient is needed, else its function.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, bool reverse, bool train) {
  if (!train) return lstm_input_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, false);
  return lstm_input_forward_op().call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, true);
}

std::tuple<Tensor, Tensor, Tensor> gru_layer(const Tensor& input, const Tensor& h0,
                                             const Tensor& w_ih, const Tensor& w_hh,
                                             const OptTensor& b_ih, const OptTensor& b_hh,
                                             bool reverse, bool reset_after, bool train) {
  if (!train) {
    return gru_input_forward(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, reset_after, false);
  }
  return gru_input_forward_op().call(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, reset_after,
                                     true);
}

// _ops.needs_grad's answer outside tracing (a traced graph records this op).
bool needs_grad(std::initializer_list<Tensor> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor& t : tensors) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

// input [B, I], hx and cx [B, H] -> (h', c') [B, H].
std::tuple<Tensor, Tensor> lstm_cell(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                     const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                     const OptTensor& b_hh) {
  const bool train = needs_grad({input, hx, cx, w_ih, w_hh, b_ih.value_or(Tensor()),
                                 b_hh.value_or(Tensor())});
  auto res = lstm_layer(input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh, false, train);
  return {std::get<1>(res), std::get<2>(res)};
}

// input [B, I], hx [B, H] -> h' [B, H].
Tensor gru_cell(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                const OptTensor& b_ih, const OptTensor& b_hh, bool reset_after) {
  const bool train =
      needs_grad({input, hx, w_ih, w_hh, b_ih.value_or(Tensor()), b_hh.value_or(Tensor())});
  return std::get<1>(
      gru_layer(input.unsqueeze(0), hx, w_ih, w_hh, b_ih, b_hh, false, reset_after, train));
}

// The stacks' checks beyond the layer ops' own: input [T, B, I], the
// weights' count, and states [L*D, B, H] (H from w_hh).
void check_stack(const char* name, const Tensor& input, const OptTensor& h0, const OptTensor& c0,
                 at::TensorList weights, int64_t per_layer, int64_t num_layers, int64_t dirs) {
  TORCH_CHECK(input.dim() == 3, name, ": input must be 3-D [T, B, I], got ", input.dim(), "-D");
  TORCH_CHECK(num_layers >= 1, name, ": num_layers must be at least 1, got ", num_layers);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_layers * dirs * per_layer, name,
              ": expected ", num_layers * dirs * per_layer, " weights, got ", weights.size());
  TORCH_CHECK(weights[1].dim() == 2, name, ": w_hh must be 2-D, got ", weights[1].dim(), "-D");
  const std::vector<int64_t> want{num_layers * dirs, input.size(1), weights[1].size(1)};
  for (const OptTensor& s : {h0, c0}) {
    TORCH_CHECK(!s || s->sizes() == c10::IntArrayRef(want), name, ": states must be ",
                c10::IntArrayRef(want), ", got ", s->sizes());
  }
}

// State k of [L*D, B, H], or zeros like torch.nn's absent state.
Tensor state_at(const OptTensor& s, int64_t k, const Tensor& input, const Tensor& w_hh) {
  return s ? s->select(0, k) : at::zeros({input.size(1), w_hh.size(1)}, input.options());
}

// layer(k, layer_in, w, b_ih, b_hh, reverse) -> (output, h_n, c_n) of layer
// and direction k, w its w_ih and w_hh; the stack's output and its h_n (and
// c_n) stacked.
template <typename Layer>
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> run_stack(
    const Tensor& input, at::TensorList weights, bool has_biases, int64_t num_layers,
    int64_t dirs, const Layer& layer) {
  const int64_t per = has_biases ? 4 : 2;
  Tensor layer_in = input;
  std::vector<Tensor> h_n, c_n;
  for (int64_t l = 0; l < num_layers; ++l) {
    std::vector<Tensor> outs;
    for (int64_t d = 0; d < dirs; ++d) {
      const int64_t k = l * dirs + d;
      const Tensor* w = weights.data() + k * per;
      const OptTensor b_ih = has_biases ? OptTensor(w[2]) : std::nullopt;
      const OptTensor b_hh = has_biases ? OptTensor(w[3]) : std::nullopt;
      auto [out, h, c] = layer(k, layer_in, w, b_ih, b_hh, d == 1);
      outs.push_back(std::move(out));
      h_n.push_back(std::move(h));
      if (c.defined()) c_n.push_back(std::move(c));
    }
    layer_in = dirs == 1 ? outs[0] : at::cat(outs, -1);
  }
  return {layer_in, h_n, c_n};
}

std::tuple<Tensor, Tensor, Tensor> lstm_layers(const Tensor& input, const OptTensor& h0,
                                               const OptTensor& c0, at::TensorList weights,
                                               bool has_biases, int64_t num_layers,
                                               bool bidirectional) {
  const int64_t dirs = bidirectional ? 2 : 1;
  check_stack("fusedrnn::lstm_layers", input, h0, c0, weights, has_biases ? 4 : 2, num_layers,
              dirs);
  const auto layer = [&](int64_t k, const Tensor& x, const Tensor* w, const OptTensor& b_ih,
                         const OptTensor& b_hh, bool reverse) {
    const Tensor h = state_at(h0, k, input, w[1]), c = state_at(c0, k, input, w[1]);
    const bool train = needs_grad({x, h, c, w[0], w[1], b_ih.value_or(Tensor()),
                                   b_hh.value_or(Tensor())});
    auto r = lstm_layer(x, h, c, w[0], w[1], b_ih, b_hh, reverse, train);
    return std::make_tuple(std::get<0>(r), std::get<1>(r), std::get<2>(r));
  };
  auto [out, h_n, c_n] = run_stack(input, weights, has_biases, num_layers, dirs, layer);
  return {out, at::stack(h_n), at::stack(c_n)};
}

std::tuple<Tensor, Tensor> gru_layers(const Tensor& input, const OptTensor& h0,
                                      at::TensorList weights, bool has_biases, int64_t num_layers,
                                      bool bidirectional, bool reset_after) {
  const int64_t dirs = bidirectional ? 2 : 1;
  check_stack("fusedrnn::gru_layers", input, h0, std::nullopt, weights, has_biases ? 4 : 2,
              num_layers, dirs);
  const auto layer = [&](int64_t k, const Tensor& x, const Tensor* w, const OptTensor& b_ih,
                         const OptTensor& b_hh, bool reverse) {
    const Tensor h = state_at(h0, k, input, w[1]);
    const bool train =
        needs_grad({x, h, w[0], w[1], b_ih.value_or(Tensor()), b_hh.value_or(Tensor())});
    auto r = gru_layer(x, h, w[0], w[1], b_ih, b_hh, reverse, reset_after, train);
    return std::make_tuple(std::get<0>(r), std::get<1>(r), Tensor());
  };
  auto [out, h_n, c_n] = run_stack(input, weights, has_biases, num_layers, dirs, layer);
  return {out, at::stack(h_n)};
}

void impl_plain(torch::Library& m) {
  m.impl("lstm_cell", &lstm_cell);
  m.impl("gru_cell", &gru_cell);
  m.impl("lstm_layers", &lstm_layers);
  m.impl("gru_layers", &gru_layers);
}

void impl_input_forward(torch::Library& m) {
  m.impl("lstm_input_forward", &lstm_input_forward);
  m.impl("gru_input_forward", &gru_input_forward);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_input_backward_by_ops(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, const Tensor& output, const Tensor& gates, const Tensor& cells,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, bool reverse,
    bool has_bias, bool input_grad, bool w_ih_grad, bool b_ih_grad) {
  static const auto backward =
      op_named<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
          const OptTensor&, bool, bool)>("fusedrnn::lstm_backward");
  static const auto linear_backward =
      op_named<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                  bool, bool, bool)>("fusedrnn::linear_backward");
  auto [d_xp, d_h0, d_c0, d_w_hh, d_w_hr, d_b_hh] =
      backward.call(grad_output, grad_h_n, grad_c_n, output, gates, cells, h0, c0, w_hh,
                    std::nullopt, std::nullopt, reverse, has_bias);
  auto [d_x, d_w_ih, d_b_ih] =
      linear_backward.call(d_xp, input, w_ih, input_grad, w_ih_grad, b_ih_grad);
  return {d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh};
}

TORCH_LIBRARY_IMPL(fusedrnn, CompositeImplicitAutograd, m) { impl_plain(m); }

// The layers with their projection: every device, and autograd through
// their own kernel (fusedrnn/_ops.py); the LSTM's backward as two ops where
// the CPU's kernel (cpu/rnn_cpu.cpp) does not take it.
TORCH_LIBRARY_IMPL(fusedrnn, CompositeExplicitAutograd, m) {
  impl_input_forward(m);
  m.impl("lstm_input_backward", &lstm_input_backward_by_ops);
}

// vmap decomposes them all, to the layer ops' batching rules (without this
// it would loop over the mapped dimension).
TORCH_LIBRARY_IMPL(fusedrnn, FuncTorchBatchedDecomposition, m) {
  impl_plain(m);
  impl_input_forward(m);
}

}  // namespace fusedrnn
