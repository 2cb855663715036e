// The time loops of the LSTM and GRU ops, written once for every device.
//
// Each op runs one layer and one direction. The input projection
// x_proj = x W_ih^T + b_ih is computed by the caller for all steps at once.
// Per step: one GEMM for all gates (h_{t-1} W_hh^T), then one pointwise
// pass, K::step(a) (K: CpuKernels or CudaKernels), that runs the per-unit glue
// of steps.h (add x_proj and b_hh, the gate math of gates.h, store the new
// state) over every row and hidden unit of the step. Backward runs the
// reverse loop the same way and forms dW_hh (and db_hh, dW_hr) with one GEMM
// or reduction each over all steps.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <tuple>

#include "checks.h"
#include "gates.h"
#include "steps.h"

namespace fusedrnn {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

namespace detail {

inline Tensor defined_or_zeros(const OptTensor& t, int64_t n, const Tensor& like) {
  return t.has_value() ? t->contiguous() : at::zeros({n}, like.options());
}

// at::mm_out wants an lvalue; our outputs are narrow() views of buffers.
inline void mm_to(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }

// dst (accumulation dtype) = or += a @ b, a and b in the storage dtype.
inline void mm_into(Tensor dst, const Tensor& a, const Tensor& b, bool accumulate) {
  if (dst.scalar_type() == a.scalar_type()) {
    if (accumulate) {
      dst.addmm_(a, b);
    } else {
      mm_to(dst, a, b);
    }
  } else if (accumulate) {
    dst.add_(at::mm(a, b));
  } else {
    dst.copy_(at::mm(a, b));
  }
}

// hp[rows of step t] = the state step t read: the output of the step before
// where that row was active there, else the initial state.   [N, P]
inline Tensor gather_prev(const Tensor& out, const Tensor& h0, const Schedule& s,
                          bool packed) {
  if (!packed) {
    const int64_t BT = s.B * (s.T - 1);
    return s.reverse ? at::cat({out.narrow(0, s.B, BT), h0})
                     : at::cat({h0, out.narrow(0, 0, BT)});
  }
  Tensor hp = at::empty({s.N, out.size(1)}, out.options());
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t bt = s.sizes[t], off = s.offsets[t];
    const int64_t prow = std::min(s.prev_rows(t), bt);
    if (prow > 0) {
      hp.narrow(0, off, prow).copy_(out.narrow(0, s.offsets[s.prev_time(t)], prow));
    }
    if (prow < bt) {
      hp.narrow(0, off + prow, bt - prow).copy_(h0.narrow(0, prow, bt - prow));
    }
  }
  return hp;
}

inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v(sizes.begin(), sizes.end());
  v.back() = last;
  return v;
}

}  // namespace detail

// ------------------------------------------------------------------ LSTM
// Checks the arguments of lstm_forward (or of `op`, which shares them);
// returns the schedule, H and P.
inline std::tuple<Schedule, int64_t, int64_t> lstm_check_forward(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse,
    const char* op = "fusedrnn::lstm_forward") {
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % kLstmGates == 0 && w_hh.size(0) > 0, op,
              ": w_hh must be 2-D [4*hidden_size, hidden_size or proj_size], got shape ",
              w_hh.sizes());
  const int64_t H = w_hh.size(0) / kLstmGates;
  const int64_t P = w_hh.size(1);
  const bool proj = w_hr.has_value();
  const Schedule s = make_schedule(x_proj, batch_sizes, kLstmGates * H, reverse, op);
  for (auto [t, name] : {std::pair{&h0, "h0"}, {&c0, "c0"}, {&w_hh, "w_hh"}}) {
    check_same(x_proj, *t, op, name);
  }
  if (proj) {
    check_same(x_proj, *w_hr, op, "w_hr");
    check_shape(*w_hr, {P, H}, op, "w_hr");
  } else {
    TORCH_CHECK(P == H, op, ": w_hh must have shape [", 4 * H, ", ", H,
                "] without w_hr, got ", w_hh.sizes());
  }
  check_shape(h0, {s.B, P}, op, "h0");
  check_shape(c0, {s.B, H}, op, "c0");
  if (b_hh.has_value()) {
    check_same(x_proj, *b_hh, op, "b_hh");
    check_shape(*b_hh, {kLstmGates * H}, op, "b_hh");
  }

  return {s, H, P};
}

// x_proj [T, B, 4H] or packed [N, 4H]; h0 [B, P]; c0 [B, H]; w_hh [4H, P];
// w_hr [P, H] (proj_size) or none, then P == H; b_hh [4H] or none.
// Returns output [T, B, P] / [N, P], h_n [B, P], c_n [B, H], and for backward
// (empty unless train) gates [N, 4H] (i, f, g, o) and cells [N, H] in the
// accumulation dtype.
template <typename K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_impl(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& b_hh, const OptTensor& batch_sizes,
    bool reverse, bool train) {
  // (No structured bindings: C++17 lambdas, as on torch < 2.13, cannot capture them.)
  const auto checked =
      lstm_check_forward(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse);
  const Schedule& s = std::get<0>(checked);
  const int64_t H = std::get<1>(checked), P = std::get<2>(checked);
  const bool proj = w_hr.has_value();
  const auto acc = acc_dtype(x_proj.scalar_type());
  const Tensor x = x_proj.contiguous();
  const Tensor w = w_hh.contiguous();
  const Tensor bias = detail::defined_or_zeros(b_hh, kLstmGates * H, x);
  Tensor h = h0.contiguous().clone();
  Tensor c = c0.to(acc).contiguous().clone();
  Tensor out = at::empty({s.N, P}, x.options());
  Tensor gates = at::empty({train ? s.N : 0, kLstmGates * H}, x.options());
  Tensor cells = at::empty({train ? s.N : 0, H}, x.options().dtype(acc));
  Tensor hh = at::empty({s.B, kLstmGates * H}, x.options());
  Tensor h_raw = proj ? at::empty({s.B, H}, x.options()) : Tensor();
  const Tensor w_t = w.t();
  const Tensor w_hr_t = proj ? w_hr->contiguous().t() : Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = s.time_at(step), bt = s.sizes[t], off = s.offsets[t];
      detail::mm_to(hh.narrow(0, 0, bt), h.narrow(0, 0, bt), w_t);
      LstmForwardStep<scalar_t, acc_t> a;
      a.rows = bt;
      a.H = H;
      a.x = x.data_ptr<scalar_t>() + off * kLstmGates * H;
      a.hh = hh.data_ptr<scalar_t>();
      a.b_hh = bias.data_ptr<scalar_t>();
      a.c = c.data_ptr<acc_t>();
      a.h = proj ? h_raw.data_ptr<scalar_t>() : h.data_ptr<scalar_t>();
      a.out = proj ? nullptr : out.data_ptr<scalar_t>() + off * H;
      a.gates = train ? gates.data_ptr<scalar_t>() + off * kLstmGates * H : nullptr;
      a.cells = train ? cells.data_ptr<acc_t>() + off * H : nullptr;
      K::step(a);
      if (proj) {
        detail::mm_to(h.narrow(0, 0, bt), h_raw.narrow(0, 0, bt), w_hr_t);
        out.narrow(0, off, bt).copy_(h.narrow(0, 0, bt));
      }
    }
  });
  out = out.view(detail::with_last(x_proj.sizes(), P));
  return {out, h, c.to(x.scalar_type()), gates, cells};
}

// The LSTM's weight gradients from the per-step ones, one GEMM or reduction
// each over all steps: (d_w_hh, d_w_hr ([0] without projection), d_b_hh ([0]
// without bias)). dg [N, 4H]; dhp [N, P] dL/dh_t (projection only, else
// undefined); out, gates, cells as saved by forward.
inline std::tuple<Tensor, Tensor, Tensor> lstm_weight_grads(
    const Tensor& dg, const Tensor& dhp, const Tensor& out, const Tensor& h0,
    const Tensor& gates, const Tensor& cells, const Schedule& s, bool packed, bool has_bias) {
  const int64_t H = cells.size(1);
  const auto dtype = dg.scalar_type();
  const auto opts = dg.options();
  const Tensor hp = detail::gather_prev(out, h0.contiguous(), s, packed);
  Tensor d_w_hh = at::mm(dg.t(), hp);
  Tensor d_b_hh = has_bias ? dg.sum(0, false, acc_dtype(dtype)).to(dtype) : at::empty({0}, opts);
  Tensor d_w_hr = at::empty({0}, opts);
  if (dhp.defined()) {
    const Tensor o = gates.narrow(1, 3 * H, H).to(acc_dtype(dtype));
    const Tensor h_raw = (o * at::tanh(cells)).to(dtype);
    d_w_hr = at::mm(dhp.t(), h_raw);
  }
  return {d_w_hh, d_w_hr, d_b_hh};
}

// What every LSTM backward op gets besides its saved tensors, checked as the
// forward checks it, with grad_output standing in for x_proj: the state
// gradients, output, h0, c0 and the weights (P = H without projection).
// Returns the schedule.
inline Schedule lstm_check_backward_states(const Tensor& grad_output, const Tensor& grad_h_n,
                                           const Tensor& grad_c_n, const Tensor& output,
                                           const Tensor& h0, const Tensor& c0,
                                           const Tensor& w_hh, const OptTensor& w_hr,
                                           const OptTensor& batch_sizes, bool reverse,
                                           const char* op) {
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % kLstmGates == 0 && w_hh.size(0) > 0, op,
              ": w_hh must be 2-D [4*hidden_size, hidden_size or proj_size], got shape ",
              w_hh.sizes());
  const int64_t H = w_hh.size(0) / kLstmGates, P = w_hh.size(1);
  const Schedule s = make_schedule(grad_output, batch_sizes, P, reverse, op, "grad_output",
                                   "w_hh.size(1)");
  for (auto [t, name] : {std::pair{&grad_h_n, "grad_h_n"}, {&grad_c_n, "grad_c_n"},
                         {&output, "output"}, {&h0, "h0"}, {&c0, "c0"}, {&w_hh, "w_hh"}}) {
    check_same(grad_output, *t, op, name, "grad_output");
  }
  if (w_hr.has_value()) {
    check_same(grad_output, *w_hr, op, "w_hr", "grad_output");
    check_shape(*w_hr, {P, H}, op, "w_hr");
  } else {
    TORCH_CHECK(P == H, op, ": w_hh must have shape [", 4 * H, ", ", H, "] without w_hr, got ",
                w_hh.sizes());
  }
  check_shape(output, grad_output.sizes(), op, "output");
  check_shape(grad_h_n, {s.B, P}, op, "grad_h_n");
  check_shape(grad_c_n, {s.B, H}, op, "grad_c_n");
  check_shape(h0, {s.B, P}, op, "h0");
  check_shape(c0, {s.B, H}, op, "c0");
  return s;
}

// Checks everything lstm_backward gets before any kernel reads it: the
// states, and gates and cells as lstm_forward saved them. Returns the schedule.
inline Schedule lstm_check_backward(const Tensor& grad_output, const Tensor& grad_h_n,
                                    const Tensor& grad_c_n, const Tensor& output,
                                    const Tensor& gates, const Tensor& cells, const Tensor& h0,
                                    const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr,
                                    const OptTensor& batch_sizes, bool reverse, const char* op) {
  const Schedule s = lstm_check_backward_states(grad_output, grad_h_n, grad_c_n, output, h0, c0,
                                                w_hh, w_hr, batch_sizes, reverse, op);
  const int64_t H = w_hh.size(0) / kLstmGates;
  check_same(grad_output, gates, op, "gates", "grad_output");
  check_saved_acc(grad_output, cells, op, "cells");
  check_shape(gates, {s.N, kLstmGates * H}, op, "gates");
  check_shape(cells, {s.N, H}, op, "cells");
  return s;
}

// grad_output like output; grad_h_n [B, P]; grad_c_n [B, H]; the rest as
// saved by lstm_forward. Returns d_x_proj (like x_proj), d_h0, d_c0, d_w_hh,
// d_w_hr ([0] without w_hr), d_b_hh ([0] without bias).
template <typename K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_impl(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& output, const Tensor& gates, const Tensor& cells, const Tensor& h0,
    const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr,
    const OptTensor& batch_sizes, bool reverse, bool has_bias) {
  constexpr const char* op = "fusedrnn::lstm_backward";
  const int64_t H = w_hh.size(0) / kLstmGates;
  const int64_t P = w_hh.size(1);
  const bool proj = w_hr.has_value();
  const Schedule s = lstm_check_backward(grad_output, grad_h_n, grad_c_n, output, gates, cells,
                                         h0, c0, w_hh, w_hr, batch_sizes, reverse, op);
  const auto dtype = grad_output.scalar_type();
  const auto acc = acc_dtype(dtype);
  const auto opts = grad_output.options();

  const Tensor g_out = grad_output.contiguous().view({s.N, P});
  const Tensor out = output.contiguous().view({s.N, P});
  const Tensor gts = gates.contiguous();
  const Tensor cls = cells.contiguous();
  const Tensor c0a = c0.to(acc).contiguous();
  const Tensor w = w_hh.contiguous();
  const Tensor w_r = proj ? w_hr->contiguous() : Tensor();
  Tensor dh = grad_h_n.to(acc).contiguous().clone();
  Tensor dc = grad_c_n.to(acc).contiguous().clone();
  Tensor dg = at::empty({s.N, kLstmGates * H}, opts);
  Tensor dhp = proj ? at::empty({s.N, P}, opts) : Tensor();
  Tensor dh_raw = proj ? at::empty({s.B, H}, opts) : Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t step = s.T - 1; step >= 0; --step) {
      const int64_t t = s.time_at(step), bt = s.sizes[t], off = s.offsets[t];
      const int64_t prow = s.prev_rows(t);
      LstmBackwardStep<scalar_t, acc_t> a;
      a.rows = bt;
      a.H = H;
      a.gates = gts.data_ptr<scalar_t>() + off * kLstmGates * H;
      a.cells = cls.data_ptr<acc_t>() + off * H;
      a.c_prev = prow > 0 ? cls.data_ptr<acc_t>() + s.offsets[s.prev_time(t)] * H : nullptr;
      a.prev_rows = prow;
      a.c0 = c0a.data_ptr<acc_t>();
      a.dc = dc.data_ptr<acc_t>();
      a.dgates = dg.data_ptr<scalar_t>() + off * kLstmGates * H;
      if (proj) {
        // dL/dh_t (size P) = output grad + recurrent grad, then through W_hr.
        Tensor dh_t = dhp.narrow(0, off, bt);
        dh_t.copy_(dh.narrow(0, 0, bt) + g_out.narrow(0, off, bt));
        detail::mm_to(dh_raw.narrow(0, 0, bt), dh_t, w_r);
        a.grad_h = dh_raw.data_ptr<scalar_t>();
        a.dh_rec = nullptr;
      } else {
        a.grad_h = g_out.data_ptr<scalar_t>() + off * H;
        a.dh_rec = dh.data_ptr<acc_t>();
      }
      K::step(a);
      detail::mm_into(dh.narrow(0, 0, bt), dg.narrow(0, off, bt), w, /*accumulate=*/false);
    }
  });

  const auto wg = lstm_weight_grads(dg, dhp, out, h0, gts, cls, s, batch_sizes.has_value(),
                                    has_bias);
  Tensor d_x = dg.view(detail::with_last(grad_output.sizes(), kLstmGates * H));
  return {d_x, dh.to(dtype), dc.to(dtype), std::get<0>(wg), std::get<1>(wg), std::get<2>(wg)};
}

// ------------------------------------------------------------------ GRU
// Checks the arguments of gru_forward (or of `op`, which shares them);
// returns the schedule and H.
inline std::tuple<Schedule, int64_t> gru_check_forward(
    const Tensor& x_proj, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_hh,
    const OptTensor& batch_sizes, bool reverse, bool reset_after,
    const char* op = "fusedrnn::gru_forward") {
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) > 0 && w_hh.size(0) == kGruGates * w_hh.size(1),
              op, ": w_hh must be 2-D [3*hidden_size, hidden_size], got shape ", w_hh.sizes());
  const int64_t H = w_hh.size(1);
  const Schedule s = make_schedule(x_proj, batch_sizes, kGruGates * H, reverse, op);
  check_same(x_proj, h0, op, "h0");
  check_same(x_proj, w_hh, op, "w_hh");
  check_shape(h0, {s.B, H}, op, "h0");
  if (b_hh.has_value()) {
    check_same(x_proj, *b_hh, op, "b_hh");
    check_shape(*b_hh, {kGruGates * H}, op, "b_hh");
  }

  return {s, H};
}

// x_proj [T, B, 3H] or packed [N, 3H]; h0 [B, H]; w_hh [3H, H]; b_hh [3H] or
// none. Returns output [T, B, H] / [N, H], h_n [B, H], and for backward
// (empty unless train) gates [N, 4H] = r, z, n, W_hn h + b_hn.
template <typename K>
std::tuple<Tensor, Tensor, Tensor> gru_forward_impl(
    const Tensor& x_proj, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_hh,
    const OptTensor& batch_sizes, bool reverse, bool reset_after, bool train) {
  const auto checked = gru_check_forward(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after);
  const Schedule& s = std::get<0>(checked);
  const int64_t H = std::get<1>(checked);
  const Tensor x = x_proj.contiguous();
  const Tensor w_t = w_hh.contiguous().t();
  const Tensor bias = detail::defined_or_zeros(b_hh, kGruGates * H, x);
  Tensor h = h0.contiguous().clone();
  Tensor out = at::empty({s.N, H}, x.options());
  Tensor gates = at::empty({train ? s.N : 0, kGruSaved * H}, x.options());
  Tensor hh = at::empty({s.B, kGruGates * H}, x.options());
  // Classic form: r * h_{t-1}, the input of the W_hn matmul.
  Tensor rh = reset_after ? Tensor() : at::empty({s.B, H}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gru_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = s.time_at(step), bt = s.sizes[t], off = s.offsets[t];
      if (reset_after) {
        detail::mm_to(hh.narrow(0, 0, bt), h.narrow(0, 0, bt), w_t);
      } else {
        // hh[:, :2H] = h W_rz^T; rh = r * h; hh[:, 2H:] = rh W_n^T.
        const Tensor hh_rows = hh.narrow(0, 0, bt);
        hh_rows.narrow(1, 0, 2 * H).copy_(at::mm(h.narrow(0, 0, bt), w_t.narrow(1, 0, 2 * H)));
        GruResetStep<scalar_t, acc_t> r;
        r.rows = bt;
        r.H = H;
        r.x = x.data_ptr<scalar_t>() + off * kGruGates * H;
        r.hh = hh.data_ptr<scalar_t>();
        r.b_hh = bias.data_ptr<scalar_t>();
        r.h = h.data_ptr<scalar_t>();
        r.rh = rh.data_ptr<scalar_t>();
        K::step(r);
        hh_rows.narrow(1, 2 * H, H).copy_(at::mm(rh.narrow(0, 0, bt), w_t.narrow(1, 2 * H, H)));
      }
      GruForwardStep<scalar_t, acc_t> a;
      a.rows = bt;
      a.H = H;
      a.x = x.data_ptr<scalar_t>() + off * kGruGates * H;
      a.hh = hh.data_ptr<scalar_t>();
      a.b_hh = bias.data_ptr<scalar_t>();
      a.h = h.data_ptr<scalar_t>();
      a.out = out.data_ptr<scalar_t>() + off * H;
      a.gates = train ? gates.data_ptr<scalar_t>() + off * kGruSaved * H : nullptr;
      a.reset_after = reset_after;
      K::step(a);
    }
  });
  out = out.view(detail::with_last(x_proj.sizes(), H));
  return {out, h, gates};
}

// The GRU's weight gradients from the per-step ones: (d_w_hh, d_b_hh ([0]
// without bias)). dhh [N, 3H]; out, gates as saved by forward.
inline std::tuple<Tensor, Tensor> gru_weight_grads(const Tensor& dhh, const Tensor& out,
                                                   const Tensor& h0, const Tensor& gates,
                                                   const Schedule& s, bool packed,
                                                   bool reset_after, bool has_bias) {
  const int64_t H = out.size(1);
  const auto dtype = dhh.scalar_type();
  const Tensor hp = detail::gather_prev(out, h0.contiguous(), s, packed);
  Tensor d_w_hh;
  if (reset_after) {
    d_w_hh = at::mm(dhh.t(), hp);
  } else {
    // W_rz saw h_{t-1}; W_n saw r * h_{t-1}.
    const Tensor r = gates.narrow(1, 0, H);
    d_w_hh = at::cat({at::mm(dhh.narrow(1, 0, 2 * H).t(), hp),
                      at::mm(dhh.narrow(1, 2 * H, H).t(), r * hp)});
  }
  Tensor d_b_hh = has_bias ? dhh.sum(0, false, acc_dtype(dtype)).to(dtype)
                           : at::empty({0}, dhh.options());
  return {d_w_hh, d_b_hh};
}

// What every GRU backward op gets besides its saved tensors, as
// lstm_check_backward_states. Returns the schedule.
inline Schedule gru_check_backward_states(const Tensor& grad_output, const Tensor& grad_h_n,
                                          const Tensor& output, const Tensor& h0,
                                          const Tensor& w_hh, const OptTensor& batch_sizes,
                                          bool reverse, const char* op) {
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(1) > 0 && w_hh.size(0) == kGruGates * w_hh.size(1),
              op, ": w_hh must be 2-D [3*hidden_size, hidden_size], got shape ", w_hh.sizes());
  const int64_t H = w_hh.size(1);
  const Schedule s = make_schedule(grad_output, batch_sizes, H, reverse, op, "grad_output",
                                   "w_hh.size(1)");
  for (auto [t, name] : {std::pair{&grad_h_n, "grad_h_n"}, {&output, "output"}, {&h0, "h0"},
                         {&w_hh, "w_hh"}}) {
    check_same(grad_output, *t, op, name, "grad_output");
  }
  check_shape(output, grad_output.sizes(), op, "output");
  check_shape(grad_h_n, {s.B, H}, op, "grad_h_n");
  check_shape(h0, {s.B, H}, op, "h0");
  return s;
}

// Checks everything gru_backward gets, as lstm_check_backward; returns the
// schedule.
inline Schedule gru_check_backward(const Tensor& grad_output, const Tensor& grad_h_n,
                                   const Tensor& output, const Tensor& gates, const Tensor& h0,
                                   const Tensor& w_hh, const OptTensor& batch_sizes, bool reverse,
                                   const char* op) {
  const Schedule s =
      gru_check_backward_states(grad_output, grad_h_n, output, h0, w_hh, batch_sizes, reverse, op);
  check_same(grad_output, gates, op, "gates", "grad_output");
  check_shape(gates, {s.N, kGruSaved * w_hh.size(1)}, op, "gates");
  return s;
}

// reset_after=false is the classic form (Cho et al.): n = tanh(x_n + W_hn (r*h) + b_hn),
// two GEMMs per step; gates then saves W_hn (r*h) + b_hn as its fourth part.
// Returns d_x_proj (like x_proj), d_h0, d_w_hh, d_b_hh ([0] without bias).
template <typename K>
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_backward_impl(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& output,
    const Tensor& gates, const Tensor& h0, const Tensor& w_hh, const OptTensor& batch_sizes,
    bool reverse, bool reset_after, bool has_bias) {
  constexpr const char* op = "fusedrnn::gru_backward";
  const int64_t H = w_hh.size(1);
  const Schedule s = gru_check_backward(grad_output, grad_h_n, output, gates, h0, w_hh,
                                        batch_sizes, reverse, op);
  const auto dtype = grad_output.scalar_type();
  const auto opts = grad_output.options();

  const Tensor g_out = grad_output.contiguous().view({s.N, H});
  const Tensor out = output.contiguous().view({s.N, H});
  const Tensor gts = gates.contiguous();
  const Tensor h0c = h0.contiguous();
  const Tensor w = w_hh.contiguous();
  Tensor dh = grad_h_n.to(acc_dtype(dtype)).contiguous().clone();
  Tensor dx = at::empty({s.N, kGruGates * H}, opts);
  Tensor dhh = at::empty({s.N, kGruGates * H}, opts);
  Tensor drh = reset_after ? Tensor() : at::empty({s.B, H}, opts);
  const Tensor w_rz = w.narrow(0, 0, 2 * H), w_n = w.narrow(0, 2 * H, H);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gru_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t step = s.T - 1; step >= 0; --step) {
      const int64_t t = s.time_at(step), bt = s.sizes[t], off = s.offsets[t];
      const int64_t prow = s.prev_rows(t);
      GruBackwardStep<scalar_t, acc_t> a;
      a.rows = bt;
      a.H = H;
      a.gates = gts.data_ptr<scalar_t>() + off * kGruSaved * H;
      a.h_prev = prow > 0 ? out.data_ptr<scalar_t>() + s.offsets[s.prev_time(t)] * H : nullptr;
      a.prev_rows = prow;
      a.h0 = h0c.data_ptr<scalar_t>();
      a.grad_h = g_out.data_ptr<scalar_t>() + off * H;
      a.dh = dh.data_ptr<acc_t>();
      a.dx = dx.data_ptr<scalar_t>() + off * kGruGates * H;
      a.dhh = dhh.data_ptr<scalar_t>() + off * kGruGates * H;
      a.reset_after = reset_after;
      K::step(a);
      const Tensor dhh_rows = dhh.narrow(0, off, bt);
      if (reset_after) {
        detail::mm_into(dh.narrow(0, 0, bt), dhh_rows, w, /*accumulate=*/true);
        continue;
      }
      // Classic form: d(r h) = dhn W_n, then r's gradient, then through W_rz.
      detail::mm_to(drh.narrow(0, 0, bt), dhh_rows.narrow(1, 2 * H, H), w_n);
      GruResetBackwardStep<scalar_t, acc_t> r;
      r.rows = bt;
      r.H = H;
      r.gates = a.gates;
      r.h_prev = a.h_prev;
      r.prev_rows = prow;
      r.h0 = a.h0;
      r.drh = drh.data_ptr<scalar_t>();
      r.dh = a.dh;
      r.dx = a.dx;
      r.dhh = a.dhh;
      K::step(r);
      detail::mm_into(dh.narrow(0, 0, bt), dhh_rows.narrow(1, 0, 2 * H), w_rz,
                      /*accumulate=*/true);
    }
  });

  const auto wg = gru_weight_grads(dhh, out, h0c, gts, s, batch_sizes.has_value(), reset_after,
                                   has_bias);
  const Tensor& d_w_hh = std::get<0>(wg);
  const Tensor& d_b_hh = std::get<1>(wg);
  Tensor d_x = dx.view(detail::with_last(grad_output.sizes(), kGruGates * H));
  return {d_x, dh.to(dtype), d_w_hh, d_b_hh};
}

}  // namespace fusedrnn
