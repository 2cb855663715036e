// The time loops of lstm_reg_forward / lstm_reg_backward (the LSTM with
// layer norm, zoneout and recurrent dropout), written once for every device:
// K::run(rows) runs one row function of reg_lstm_rows.h over a step's rows
// (cpu/reg_cpu.cpp, cuda/reg_cuda.cu). Per step: one GEMM for the recurrent
// product, then (in the same call, Note [One GEMM call site]) one fused pass
// over the rows (LN statistics, gates, cell norm, zoneout), and with
// proj_size a second GEMM and a pass for the hidden zoneout. Backward runs the reverse loop the same way, then forms dW_hh
// (and dW_hr) with one GEMM over all steps and db_hh and the gains' gradients
// with one reduction each.
//
// Note [Regularised halves]
// float16 and bfloat16 are converted to float32 once, the loop runs in float32
// (GEMMs included) and the results are rounded once. The saved tensors stay
// float32, so backward starts from exactly what forward computed.
#pragma once

#include <ATen/Dispatch.h>

#include <tuple>

#include "reg_common.h"
#include "reg_lstm_rows.h"

namespace fusedrnn {
namespace reg {

// (output, h_n, c_n, gates, cells, cell_new, norm_hh, stats); the last five
// are what backward needs (with x_proj), in the accumulation dtype, with no
// rows unless train (and unless their feature is on):
//   gates    [N, 4H]  activated i, f, g, o
//   cells    [N, H]   c_t, the state after zoneout
//   cell_new [N, H]   c~_t, before zoneout            (zone_c)
//   norm_hh  [N, 4H]  LN_4H(a_t), the normalised recurrent product (ln_hh)
//   stats    [N, 5]   rstd of LN(a_t), mean and rstd of the cell norm, mean
//                     and rstd of LN(x_proj) (any norm on; the columns of one
//                     that is off hold 0)
using LstmRegForwardOut =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
// (d_x_proj, d_h0, d_c0, d_w_hh, d_w_hr, d_b_hh, d_ln_hh, d_ln_c_w, d_ln_c_b,
// d_ln_ih, d_b_ih); [0] where absent.
using LstmRegBackwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                      Tensor, Tensor, Tensor, Tensor>;

// Whether any layer norm is on, so that the per-row statistics are saved.
inline bool lstm_any_norm(const RegInputs& r) {
  return r.ln_hh.has_value() || r.ln_c() || r.ln_ih.has_value();
}

// Checks every argument of lstm_reg_forward; returns the schedule, H and P.
inline std::tuple<Schedule, int64_t, int64_t> lstm_reg_check(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse,
    const RegInputs& r, const char* op) {
  const auto checked =
      lstm_check_forward(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, op);
  const int64_t H = std::get<1>(checked), P = std::get<2>(checked);
  check_reg(x_proj, r, std::get<0>(checked), kLstmGates, H, P, op);
  return checked;
}

// x_proj [N, 4H] (contiguous, T = float/double), the rest checked, prepared.
template <typename K, typename T>
LstmRegForwardOut lstm_reg_forward_loop(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                        const Tensor& w_hh, const Tensor& w_hr,
                                        const Tensor& b_hh, const Schedule& s, int64_t H,
                                        int64_t P, bool train, const RegInputs& r) {
  const bool proj = w_hr.defined();
  const auto opts = x.options();
  const int64_t G = kLstmGates * H;
  Tensor h = h0.contiguous().clone();
  Tensor c = c0.contiguous().clone();
  Tensor hm = r.rec_mask.has_value() ? (*r.rec_mask * h).contiguous() : Tensor();
  Tensor out = step_buffer<K>({s.N, P}, opts);
  Tensor gates = step_buffer<K>({rows_if(train, s.N), G}, opts);
  Tensor cells = step_buffer<K>({rows_if(train, s.N), H}, opts);
  Tensor cell_new = step_buffer<K>({rows_if(train && r.zone_c.has_value(), s.N), H}, opts);
  Tensor norm_hh = step_buffer<K>({rows_if(train && r.ln_hh.has_value(), s.N), G}, opts);
  Tensor stats = at::zeros({rows_if(train && lstm_any_norm(r), s.N), kLstmStats}, opts);
  Tensor a = at::empty({s.B, G}, opts);
  Tensor xs = r.ln_ih.has_value() ? at::empty({s.B, G}, opts) : Tensor();
  // c~ goes to cell_new, or (no zoneout: c~ is c_t) to cells, or to scratch.
  Tensor c_scratch = train ? Tensor() : at::empty({s.B, H}, opts);
  Tensor h_raw = proj ? at::empty({s.B, H}, opts) : Tensor();
  Tensor h_proj = proj ? at::empty({s.B, P}, opts) : Tensor();
  using Gemm = typename StepGemmOf<K>::type;  // Note [One GEMM call site]
  const Gemm rec_gemm(w_hh.t());
  const Gemm proj_gemm(proj ? w_hr.t() : Tensor());
  const Tensor& rec_in = hm.defined() ? hm : h;

  time_loop<K, T>([&] {  // Note [The time loop]
    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = s.time_at(step), bt = s.sizes[t], off = s.offsets[t];
      HiddenOut<T> hidden;
      hidden.P = P;
      hidden.zone_h = r.zone_h.has_value() ? ptr<T>(r.zone_h) + off * P : nullptr;
      hidden.rec_mask = ptr<T>(r.rec_mask);
      hidden.h = h.data_ptr<T>();
      hidden.hm = ptr_or_null<T>(hm);
      hidden.out = out.data_ptr<T>() + off * P;
      LstmForwardRows<T> f;
      f.rows = bt;
      f.H = H;
      f.x = x.data_ptr<T>() + off * G;
      f.in = input_norm<T>(r, xs);
      f.a = a.data_ptr<T>();
      f.b_hh = ptr_or_null<T>(b_hh);
      f.ln_hh = ptr<T>(r.ln_hh);
      f.ln_c_w = ptr<T>(r.ln_c_w);
      f.ln_c_b = ptr<T>(r.ln_c_b);
      f.zone_c = r.zone_c.has_value() ? ptr<T>(r.zone_c) + off * H : nullptr;
      f.c = c.data_ptr<T>();
      if (!train) {
        f.c_new = c_scratch.data_ptr<T>();
        f.gates = f.a;
      } else {
        f.gates = gates.data_ptr<T>() + off * G;
        if (r.zone_c.has_value()) {
          f.c_new = cell_new.data_ptr<T>() + off * H;
          f.cells = cells.data_ptr<T>() + off * H;
        } else {
          f.c_new = cells.data_ptr<T>() + off * H;
        }
        if (r.ln_hh.has_value()) f.norm_hh = norm_hh.data_ptr<T>() + off * G;
        if (stats.numel() > 0) f.stats = stats.data_ptr<T>() + off * kLstmStats;
      }
      f.hidden = hidden;
      f.h_raw = proj ? h_raw.data_ptr<T>() : nullptr;
      rec_gemm.template then_rows<K>(first_rows(a, bt), first_rows(rec_in, bt), f);
      if (proj) {
        proj_gemm(first_rows(h_proj, bt), first_rows(h_raw, bt));
        HiddenOutRows<T> o;
        o.rows = bt;
        o.h_new = h_proj.data_ptr<T>();
        o.dst = hidden;
        K::run(o);
      }
    }
  });
  return {out, h, c, gates, cells, cell_new, norm_hh, stats};
}

// x_proj [T, B, 4H] or packed [N, 4H]; h0 [B, P]; c0 [B, H]; w_hh [4H, P];
// w_hr [P, H] or none (P == H); b_hh [4H] or none; r as in RegInputs.
template <typename K>
LstmRegForwardOut lstm_reg_forward_impl(const Tensor& x_proj, const Tensor& h0,
                                        const Tensor& c0, const Tensor& w_hh,
                                        const OptTensor& w_hr, const OptTensor& b_hh,
                                        const OptTensor& batch_sizes, bool reverse, bool train,
                                        const RegInputs& r) {
  const NoAutocast no_autocast;
  const auto checked = lstm_reg_check(x_proj, h0, c0, w_hh, w_hr, b_hh, batch_sizes, reverse, r,
                                      "fusedrnn::lstm_reg_forward");
  const Schedule& s = std::get<0>(checked);
  const int64_t H = std::get<1>(checked), P = std::get<2>(checked);
  const auto dtype = x_proj.scalar_type();
  const auto acc = acc_dtype(dtype);  // Note [Regularised halves]
  auto prep = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  const Tensor x = prep(x_proj).view({s.N, kLstmGates * H});
  const Tensor w_r = w_hr.has_value() ? prep(*w_hr) : Tensor();
  const Tensor b = b_hh.has_value() ? prep(*b_hh) : Tensor();
  LstmRegForwardOut res;
  AT_DISPATCH_FLOATING_TYPES(acc, "lstm_reg_forward", [&] {
    res = lstm_reg_forward_loop<K, scalar_t>(x, prep(h0), prep(c0), prep(w_hh), w_r, b, s, H, P,
                                             train, r.prepared(acc, s.N));
  });
  auto& [out, h_n, c_n, gates, cells, cell_new, norm_hh, stats] = res;
  out = out.view(detail::with_last(x_proj.sizes(), P)).to(dtype);
  h_n = h_n.to(dtype);
  c_n = c_n.to(dtype);
  return res;
}

// Checks what lstm_reg_backward gets against the layer's shapes; returns the
// schedule, H and P.
inline std::tuple<Schedule, int64_t, int64_t> lstm_reg_check_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& x_proj, const Tensor& output, const Tensor& gates, const Tensor& cells,
    const Tensor& cell_new, const Tensor& norm_hh, const Tensor& stats, const Tensor& h0,
    const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
    bool reverse, const RegInputs& r) {
  constexpr const char* op = "fusedrnn::lstm_reg_backward";
  const Schedule s = lstm_check_backward_states(grad_output, grad_h_n, grad_c_n, output, h0, c0,
                                                w_hh, w_hr, batch_sizes, reverse, op);
  const int64_t H = w_hh.size(0) / kLstmGates, P = w_hh.size(1);
  check_same(grad_output, x_proj, op, "x_proj", "grad_output");
  check_shape(x_proj, detail::with_last(grad_output.sizes(), kLstmGates * H), op, "x_proj");
  for (auto [t, name] : {std::pair{&gates, "gates"}, {&cells, "cells"}, {&cell_new, "cell_new"},
                         {&norm_hh, "norm_hh"}, {&stats, "stats"}}) {
    check_saved_acc(grad_output, *t, op, name);
  }
  check_shape(gates, {s.N, kLstmGates * H}, op, "gates");
  check_shape(cells, {s.N, H}, op, "cells");
  check_shape(cell_new, {rows_if(r.zone_c.has_value(), s.N), H}, op, "cell_new");
  check_shape(norm_hh, {rows_if(r.ln_hh.has_value(), s.N), kLstmGates * H}, op, "norm_hh");
  check_shape(stats, {rows_if(lstm_any_norm(r), s.N), kLstmStats}, op, "stats");
  check_reg(grad_output, r, s, kLstmGates, H, P, op);
  return {s, H, P};
}

// Note [Deferred recurrent gradient]
// dL/dh_{t-1} has a part through the step's GEMM, rec_mask * (da W_hh), and a
// part past it (zoneout's, and the GRU's z h_{t-1}). The GEMM writes da W_hh
// into dh_mm and the pointwise part goes to dh; the next step's row pass adds
// them, masked, where it reads dL/dh (HiddenGrad), so no pass of its own
// does. dh_mm starts at zero, so rows no step has written add nothing; after
// the loop d h0 = dh + rec_mask * dh_mm.
template <typename K, typename T>
LstmRegBackwardOut lstm_reg_backward_loop(
    const Tensor& g_out, const Tensor& g_h_n, const Tensor& g_c_n, const Tensor& x,
    const Tensor& out, const Tensor& gates, const Tensor& cells, const Tensor& cell_new,
    const Tensor& norm_hh, const Tensor& stats, const Tensor& h0, const Tensor& c0,
    const Tensor& w_hh, const Tensor& w_hr, const Schedule& s, int64_t H, int64_t P, bool packed,
    bool has_bias, const RegInputs& r) {
  const bool proj = w_hr.defined();
  const auto opts = g_out.options();
  const int64_t G = kLstmGates * H;
  Tensor dh = g_h_n.clone();
  Tensor dh_mm = at::zeros({s.B, P}, opts);
  Tensor dc = g_c_n.clone();
  const bool ln_hh = r.ln_hh.has_value(), ln_ih = r.ln_ih.has_value();
  // b_ih (after the input norm) and b_hh both add to the gates' pre-activation,
  // whose gradient dx both norms' gains multiply too.
  const bool any_bias = has_bias || r.b_ih.has_value();
  // Note [Gain gradients summed in the loop]: there dcn, and dx when neither
  // da nor dx_raw is dx, hold one step's rows.
  const int64_t slots = sum_slots<K>();
  const bool in_loop = slots > 0 && (ln_hh || ln_ih);
  const bool step_dx = slots > 0 && ln_hh && ln_ih, step_c = slots > 0;
  const LoopSums gate_sums(in_loop && ln_hh, in_loop && any_bias, slots, G, opts);
  const LoopSums ih_sums(in_loop && ln_ih, false, slots, G, opts);
  const LoopSums c_sums(slots > 0 && r.ln_c(), slots > 0 && r.ln_c(), slots, H, opts);
  const auto rows_of = [&](bool one_step, int64_t cols) {
    return one_step ? at::empty({s.B, cols}, opts) : step_buffer<K>({s.N, cols}, opts);
  };
  Tensor dx = rows_of(step_dx, G);
  Tensor da = ln_hh ? step_buffer<K>({s.N, G}, opts) : dx;
  Tensor dx_raw = ln_ih ? step_buffer<K>({s.N, G}, opts) : dx;
  Tensor dcn = r.ln_c() ? rows_of(step_c, H) : Tensor();
  Tensor dh_new = proj ? step_buffer<K>({s.N, P}, opts) : Tensor();  // dL/d(h~ W_hr^T)
  Tensor dh_raw = at::empty({s.B, H}, opts);  // dL/dh~ (before W_hr^T)
  Tensor h_raw = proj ? step_buffer<K>({s.N, H}, opts) : Tensor();
  const Tensor& c_new = r.zone_c.has_value() ? cell_new : cells;
  using Gemm = typename StepGemmOf<K>::type;  // Note [One GEMM call site]
  const Gemm rec_gemm(w_hh);
  const Gemm proj_gemm(proj ? w_hr : Tensor());

  time_loop<K, T>([&] {  // Note [The time loop]
    for (int64_t step = s.T - 1; step >= 0; --step) {
      const int64_t t = s.time_at(step), bt = s.sizes[t], off = s.offsets[t];
      const int64_t prow = s.prev_rows(t);
      HiddenGrad<T> hg;
      hg.P = P;
      hg.grad_out = g_out.data_ptr<T>() + off * P;
      hg.zone_h = r.zone_h.has_value() ? ptr<T>(r.zone_h) + off * P : nullptr;
      hg.rec_mask = ptr<T>(r.rec_mask);
      hg.dh = dh.data_ptr<T>();
      hg.dh_mm = dh_mm.data_ptr<T>();
      if (proj) {
        HiddenGradRows<T> g;
        g.rows = bt;
        g.src = hg;
        g.dh_new = dh_new.data_ptr<T>() + off * P;
        K::run(g);
        proj_gemm(first_rows(dh_raw, bt), dh_new.narrow(0, off, bt));
      }
      LstmBackwardRows<T> b;
      b.rows = bt;
      b.H = H;
      b.gates = gates.data_ptr<T>() + off * G;
      b.c_new = c_new.data_ptr<T>() + off * H;
      b.c_prev = prow > 0 ? cells.data_ptr<T>() + s.offsets[s.prev_time(t)] * H : nullptr;
      b.prev_rows = prow;
      b.c0 = c0.data_ptr<T>();
      b.norm_hh = r.ln_hh.has_value() ? norm_hh.data_ptr<T>() + off * G : nullptr;
      b.stats = stats.numel() > 0 ? stats.data_ptr<T>() + off * kLstmStats : nullptr;
      b.ln_hh = ptr<T>(r.ln_hh);
      b.ln_ih = ptr<T>(r.ln_ih);
      b.x = r.ln_ih.has_value() ? x.data_ptr<T>() + off * G : nullptr;
      b.ln_c_w = ptr<T>(r.ln_c_w);
      b.ln_c_b = ptr<T>(r.ln_c_b);
      b.zone_c = r.zone_c.has_value() ? ptr<T>(r.zone_c) + off * H : nullptr;
      b.dh_raw = dh_raw.data_ptr<T>();
      b.take_hidden = !proj;
      b.hidden = hg;
      b.dc = dc.data_ptr<T>();
      b.dx = dx.data_ptr<T>() + (step_dx ? 0 : off * G);
      b.da = da.data_ptr<T>() + off * G;
      b.dx_raw = dx_raw.data_ptr<T>() + off * G;
      if (r.ln_c()) {
        b.dcn = dcn.data_ptr<T>() + (step_c ? 0 : off * H);
      }
      b.gate_sums = gate_sums.rows<T>();
      b.ih_sums = ih_sums.rows<T>();
      b.c_sums = c_sums.rows<T>();
      b.h_raw = proj ? h_raw.data_ptr<T>() + off * H : nullptr;
      rec_gemm.template after_rows<K>(b, first_rows(dh_mm, bt), da.narrow(0, off, bt));
    }
  });

  const Tensor none = at::empty({0}, opts);
  Tensor d_h0 = r.rec_mask.has_value() ? dh + *r.rec_mask * dh_mm : dh + dh_mm;
  Tensor d_w_hh = recurrent_weight_grad<K>(da, out, h0, r.rec_mask, s, packed);
  Tensor d_w_hr = proj ? weight_grad<K>(dh_new, h_raw) : none;
  // The norms' gains and the biases: summed in the loop, or from one pass
  // over dx (Note [Norm gradients in one pass]).
  const auto dtype = opts.dtype().toScalarType();
  NormGrads g;
  if (in_loop) {
    if (ln_hh) g.hh = LoopSums::total(gate_sums.gain, dtype);
    if (ln_ih) g.ih = LoopSums::total(ih_sums.gain, dtype);
    if (any_bias) g.sum = LoopSums::total(gate_sums.bias, dtype);
  } else if (ln_hh || ln_ih) {
    g = norm_grads(dx, ln_hh ? norm_hh : Tensor(), ln_ih ? x : Tensor(),
                   ln_ih ? stats.select(1, kLstmStatsIh) : Tensor(),
                   ln_ih ? stats.select(1, kLstmStatsIh + 1) : Tensor(), any_bias);
  } else if (any_bias) {
    g.sum = dx.sum(0);
  }
  Tensor d_b_hh = has_bias ? g.sum : none;
  Tensor d_b_ih = r.b_ih.has_value() ? (has_bias ? g.sum.clone() : g.sum) : none;
  Tensor d_ln_hh = ln_hh ? g.hh : none;
  Tensor d_ln_ih = ln_ih ? g.ih : none;
  Tensor d_ln_c_w = none, d_ln_c_b = none;
  if (r.ln_c() && step_c) {
    d_ln_c_w = LoopSums::total(c_sums.gain, dtype);
    d_ln_c_b = LoopSums::total(c_sums.bias, dtype);
  } else if (r.ln_c()) {  // the cell norm's xhat recomputed from c~, as the input norm's
    const NormGrads gc = norm_grads(dcn, Tensor(), c_new, stats.select(1, kStatMeanC),
                                    stats.select(1, kStatRstdC), true);
    d_ln_c_w = gc.ih;
    d_ln_c_b = gc.sum;
  }
  return {dx_raw, d_h0, dc, d_w_hh, d_w_hr, d_b_hh, d_ln_hh, d_ln_c_w, d_ln_c_b, d_ln_ih, d_b_ih};
}

// grad_output like output; grad_h_n [B, P]; grad_c_n [B, H]; output and the
// saved tensors as lstm_reg_forward returned them; the rest its arguments.
template <typename K>
LstmRegBackwardOut lstm_reg_backward_impl(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& x_proj, const Tensor& output, const Tensor& gates, const Tensor& cells,
    const Tensor& cell_new, const Tensor& norm_hh, const Tensor& stats, const Tensor& h0,
    const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
    bool reverse, bool has_bias, const RegInputs& r) {
  const NoAutocast no_autocast;
  const auto checked =
      lstm_reg_check_backward(grad_output, grad_h_n, grad_c_n, x_proj, output, gates, cells,
                              cell_new, norm_hh, stats, h0, c0, w_hh, w_hr, batch_sizes, reverse,
                              r);
  const Schedule& s = std::get<0>(checked);
  const int64_t H = std::get<1>(checked), P = std::get<2>(checked);
  const auto dtype = grad_output.scalar_type();
  const auto acc = acc_dtype(dtype);  // Note [Regularised halves]
  auto prep = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  LstmRegBackwardOut res;
  AT_DISPATCH_FLOATING_TYPES(acc, "lstm_reg_backward", [&] {
    res = lstm_reg_backward_loop<K, scalar_t>(
        prep(grad_output).view({s.N, P}), prep(grad_h_n), prep(grad_c_n),
        // Note [Input norm recomputed]: x_proj is read only with ln_ih.
        r.ln_ih.has_value() ? prep(x_proj).view({s.N, kLstmGates * H}) : Tensor(),
        prep(output).view({s.N, P}), gates.contiguous(), cells.contiguous(),
        cell_new.contiguous(), norm_hh.contiguous(), stats.contiguous(), prep(h0), prep(c0),
        prep(w_hh), w_hr.has_value() ? prep(*w_hr) : Tensor(), s, H, P,
        batch_sizes.has_value(), has_bias, r.prepared(acc, s.N));
  });
  auto& [dx, d_h0, d_c0, d_w_hh, d_w_hr, d_b_hh, d_ln_hh, d_ln_c_w, d_ln_c_b, d_ln_ih, d_b_ih] =
      res;
  dx = dx.view(detail::with_last(grad_output.sizes(), kLstmGates * H));
  for (Tensor* t : {&dx, &d_h0, &d_c0, &d_w_hh, &d_w_hr, &d_b_hh, &d_ln_hh, &d_ln_c_w, &d_ln_c_b,
                    &d_ln_ih, &d_b_ih}) {
    *t = t->to(dtype);
  }
  return res;
}

}  // namespace reg
}  // namespace fusedrnn
