// Note [a plain cell in one call]
// A plain LSTMCell or GRUCell is the projection and one step of the layer
// ops, fusedrnn::linear then fusedrnn::lstm_forward / gru_forward with T = 1.
// Called from Python, each op call cost its argument parsing, the wrapping of
// five results and the Python between them: at batch 1 H=256 on a 2-core
// Xeon the two ops took 56 us one after the other, the cell's Python 19 us
// more. lstm_cell and gru_cell make the same two calls from C++, as a
// CompositeImplicitAutograd kernel (and vmap's decomposition): autograd,
// vmap and fake tensors see the two layer ops as before; tracing records
// this one.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fusedrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename F>
c10::TypedOperatorHandle<F> op_named(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

Tensor projection(const Tensor& input, const Tensor& w_ih, const OptTensor& b_ih) {
  static const auto linear =
      op_named<Tensor(const Tensor&, const Tensor&, const OptTensor&)>("fusedrnn::linear");
  return linear.call(input, w_ih, b_ih).unsqueeze(0);  // [1, B, G*H]: one step
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
  static const auto forward =
      op_named<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
          const OptTensor&, const OptTensor&, bool, bool)>("fusedrnn::lstm_forward");
  const Tensor x_proj = projection(input, w_ih, b_ih);
  const bool train = needs_grad({x_proj, hx, cx, w_hh, b_hh.value_or(Tensor())});
  auto res = forward.call(x_proj, hx, cx, w_hh, std::nullopt, b_hh, std::nullopt, false, train);
  return {std::get<1>(res), std::get<2>(res)};
}

// input [B, I], hx [B, H] -> h' [B, H].
Tensor gru_cell(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                const OptTensor& b_ih, const OptTensor& b_hh, bool reset_after) {
  static const auto forward =
      op_named<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                  const OptTensor&, const OptTensor&, bool, bool,
                                                  bool)>("fusedrnn::gru_forward");
  const Tensor x_proj = projection(input, w_ih, b_ih);
  const bool train = needs_grad({x_proj, hx, w_hh, b_hh.value_or(Tensor())});
  return std::get<1>(
      forward.call(x_proj, hx, w_hh, b_hh, std::nullopt, false, reset_after, train));
}

void impl_cells(torch::Library& m) {
  m.impl("lstm_cell", &lstm_cell);
  m.impl("gru_cell", &gru_cell);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CompositeImplicitAutograd, m) { impl_cells(m); }

// vmap decomposes them too, to the layer ops' batching rules (without this
// it would loop over the mapped dimension).
TORCH_LIBRARY_IMPL(fusedrnn, FuncTorchBatchedDecomposition, m) { impl_cells(m); }

}  // namespace fusedrnn
