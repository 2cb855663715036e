// Note [a layer's autograd in C++]
// A gradient-tracking call of lstm_input_forward / gru_input_forward (every
// training call of a plain cell, and of each layer and direction of a plain
// stack) records a C++ autograd node here, where no torch.func transform is
// active: its forward calls the op below autograd, and its backward the
// layer's backward op and then linear_backward (the LSTM's: both in one op,
// lstm_input_backward), from C++. The ops' Python
// autograd kernel (fusedrnn/_autograd.py) does the same through Python: an
// argument conversion each way, autograd.Function.apply, a Python backward.
// Under a transform the Python kernel runs (Note [Autograd under torch.func]),
// and a backward that must build a graph (Note [Double backward]) calls the
// Python reference's gradients from here.
// On the 2-core Xeon, alternating runs of the --cells set against the build
// with two Python nodes per call, training at I=H=256: LSTMCell B=1 809-928
// -> 644-831 us, B=16 1100-1570 -> 997-1127 us; GRUCell B=1 622-771 -> 537-570
// us; LSTM on one step at B=1 897-960 -> 736-746 us; at T=100 B=1 (quick set)
// LSTM 3.38-3.39 -> 2.81-3.19 ms, GRU 2.75-2.86 -> 2.43-2.51 ms.
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "layer_autograd.h"

namespace fusedrnn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

template <typename F>
c10::TypedOperatorHandle<F> op_named(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

bool any_requires_grad(std::initializer_list<Tensor> ts) {
  for (const Tensor& t : ts) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

Tensor or_zeros(const Tensor& grad, const Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

// _ops._linear_grads: linear's gradients for those asked for; undefined for
// the others.
std::tuple<Tensor, Tensor, Tensor> linear_grads(const Tensor& grad, const Tensor& input,
                                                const Tensor& weight, bool need_x, bool need_w,
                                                bool need_b) {
  if (!(need_x || need_w || need_b)) return {};
  static const auto op = op_named<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, bool, bool, bool)>("fusedrnn::linear_backward");
  auto [dx, dw, db] = op.call(grad, input, weight, need_x, need_w, need_b);
  return {need_x ? dx : Tensor(), need_w ? dw : Tensor(), need_b ? db : Tensor()};
}

// Python's fusedrnn._ops.<fn>(*args): the reference's differentiable
// gradients (Note [Double backward]), None as undefined.
variable_list reference_grads(const char* fn, const py::tuple& args) {
  py::gil_scoped_acquire gil;
  const py::object grads = py::module_::import("fusedrnn._ops").attr(fn)(*args);
  variable_list out;
  for (const py::handle g : grads) out.push_back(g.is_none() ? Tensor() : py::cast<Tensor>(g));
  return out;
}

py::object py_or_none(const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }

// needs_input_grad per tensor argument (undefined: an absent one, false): the
// node's own indices count only the tensors given.
py::tuple arg_needs(AutogradContext* ctx, std::initializer_list<Tensor> args) {
  py::tuple needs(args.size());
  size_t i = 0, var = 0;
  for (const Tensor& t : args) needs[i++] = py::bool_(t.defined() && ctx->needs_input_grad(var++));
  return needs;
}

struct LstmInputForward : torch::autograd::Function<LstmInputForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0,
                               const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh, bool reverse) {
    static const auto op =
        op_named<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
            const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
            const OptTensor&, const OptTensor&, bool, bool)>("fusedrnn::lstm_input_forward");
    auto [out, h_n, c_n, gates, cells] =
        op.call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, true);
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, b_ih.value_or(Tensor()),
                            b_hh.value_or(Tensor()), out, gates, cells});
    ctx->saved_data["reverse"] = reverse;
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({gates, cells});
    return {out, h_n, c_n, gates, cells};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor &input = s[0], &h0 = s[1], &c0 = s[2], &w_ih = s[3], &w_hh = s[4],
                 &b_ih = s[5], &b_hh = s[6], &out = s[7], &gates = s[8], &cells = s[9];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor g_out = or_zeros(grads[0], out), g_h = or_zeros(grads[1], h0),
                 g_c = or_zeros(grads[2], c0);
    if (c10::GradMode::is_enabled() &&
        any_requires_grad({g_out, g_h, g_c, input, h0, c0, w_ih, w_hh, b_ih, b_hh})) {
      py::gil_scoped_acquire gil;
      const py::tuple needs = arg_needs(ctx, {input, h0, c0, w_ih, w_hh, b_ih, b_hh});
      variable_list r = reference_grads(
          "_lstm_input_reference_grads",
          py::make_tuple(input, h0, c0, w_ih, w_hh, py_or_none(b_ih), py_or_none(b_hh),
                         py::make_tuple(g_out, g_h, g_c), needs, reverse));
      r.emplace_back();  // reverse
      return r;
    }
    static const auto op =
        op_named<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
            const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
            const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
            const Tensor&, bool, bool, bool, bool, bool)>("fusedrnn::lstm_input_backward");
    const bool need_x = ctx->needs_input_grad(0), need_w_ih = ctx->needs_input_grad(3);
    const bool need_b_ih = b_ih.defined() && ctx->needs_input_grad(5);
    auto [d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh] =
        op.call(g_out, g_h, g_c, input, out, gates, cells, h0, c0, w_ih, w_hh, reverse,
                b_hh.defined(), need_x, need_w_ih, need_b_ih);
    return {need_x ? d_x : Tensor(),
            d_h0,
            d_c0,
            need_w_ih ? d_w_ih : Tensor(),
            d_w_hh,
            need_b_ih ? d_b_ih : Tensor(),
            b_hh.defined() ? d_b_hh : Tensor(),
            Tensor()};
  }
};

struct GruInputForward : torch::autograd::Function<GruInputForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0,
                               const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                               const OptTensor& b_hh, bool reverse, bool reset_after) {
    static const auto op =
        op_named<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, const OptTensor&,
                                                    const OptTensor&, bool, bool, bool)>(
            "fusedrnn::gru_input_forward");
    auto [out, h_n, gates] =
        op.call(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, reset_after, true);
    ctx->save_for_backward(
        {input, h0, w_ih, w_hh, b_ih.value_or(Tensor()), b_hh.value_or(Tensor()), out, gates});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["reset_after"] = reset_after;
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({gates});
    return {out, h_n, gates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor &input = s[0], &h0 = s[1], &w_ih = s[2], &w_hh = s[3], &b_ih = s[4],
                 &b_hh = s[5], &out = s[6], &gates = s[7];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const bool reset_after = ctx->saved_data["reset_after"].toBool();
    const Tensor g_out = or_zeros(grads[0], out), g_h = or_zeros(grads[1], h0);
    if (c10::GradMode::is_enabled() &&
        any_requires_grad({g_out, g_h, input, h0, w_ih, w_hh, b_ih, b_hh})) {
      py::gil_scoped_acquire gil;
      const py::tuple needs = arg_needs(ctx, {input, h0, w_ih, w_hh, b_ih, b_hh});
      variable_list r = reference_grads(
          "_gru_input_reference_grads",
          py::make_tuple(input, h0, w_ih, w_hh, py_or_none(b_ih), py_or_none(b_hh),
                         py::make_tuple(g_out, g_h), needs, reverse, reset_after));
      r.emplace_back();  // reverse
      r.emplace_back();  // reset_after
      return r;
    }
    static const auto op =
        op_named<std::tuple<Tensor, Tensor, Tensor, Tensor>(
            const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
            const Tensor&, const OptTensor&, bool, bool, bool)>("fusedrnn::gru_backward");
    auto [d_xp, d_h0, d_w_hh, d_b_hh] = op.call(g_out, g_h, out, gates, h0, w_hh, std::nullopt,
                                               reverse, reset_after, b_hh.defined());
    auto [d_x, d_w_ih, d_b_ih] =
        linear_grads(d_xp, input, w_ih, ctx->needs_input_grad(0), ctx->needs_input_grad(2),
                     b_ih.defined() && ctx->needs_input_grad(4));
    return {d_x, d_h0, d_w_ih, d_w_hh, d_b_ih, b_hh.defined() ? d_b_hh : Tensor(), Tensor(),
            Tensor()};
  }
};

OptTensor opt_tensor(const c10::IValue& v) {
  return v.isNone() ? std::nullopt : OptTensor(v.toTensor());
}

void push_all(torch::jit::Stack* stack, size_t n, const variable_list& outs) {
  torch::jit::drop(*stack, n);
  for (const Tensor& t : outs) stack->push_back(t);
}

bool lstm_input_forward_node(torch::jit::Stack* stack) {
  constexpr size_t n = 9;
  const auto a = torch::jit::last(*stack, n);
  if (!a[8].toBool()) return false;  // train=False: the Python kernel's error, on backward
  const variable_list outs = LstmInputForward::apply(
      a[0].toTensor(), a[1].toTensor(), a[2].toTensor(), a[3].toTensor(), a[4].toTensor(),
      opt_tensor(a[5]), opt_tensor(a[6]), a[7].toBool());
  push_all(stack, n, outs);
  return true;
}

bool gru_input_forward_node(torch::jit::Stack* stack) {
  constexpr size_t n = 9;
  const auto a = torch::jit::last(*stack, n);
  if (!a[8].toBool()) return false;
  const variable_list outs = GruInputForward::apply(
      a[0].toTensor(), a[1].toTensor(), a[2].toTensor(), a[3].toTensor(),
      opt_tensor(a[4]), opt_tensor(a[5]), a[6].toBool(), a[7].toBool());
  push_all(stack, n, outs);
  return true;
}

// functorch includes its front-mode key for as long as a transform is active.
bool no_transform(torch::jit::Stack* stack, bool (*node)(torch::jit::Stack*)) {
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    return false;
  }
  return node(stack);
}

}  // namespace

CppAutograd cpp_autograd(const std::string& name) {
  if (name == "lstm_input_forward") {
    return [](torch::jit::Stack* s) { return no_transform(s, &lstm_input_forward_node); };
  }
  if (name == "gru_input_forward") {
    return [](torch::jit::Stack* s) { return no_transform(s, &gru_input_forward_node); };
  }
  return nullptr;
}

}  // namespace fusedrnn
