// The time loops of gru_reg_forward / gru_reg_backward (the GRU with layer
// norm, zoneout and recurrent dropout), written once for every device, as
// reg_lstm.h is for the LSTM (its notes hold here too): per step one GEMM
// (the classic form: two) and one fused pass over the rows (reg_gru_rows.h).
#pragma once

#include <ATen/Dispatch.h>

#include <tuple>

#include "reg_common.h"
#include "reg_gru_rows.h"

namespace fusedrnn {
namespace reg {

// (output, h_n, gates, norm_hh, stats); the last three are what backward
// needs (with x_proj), in the accumulation dtype, with no rows unless train
// (and unless their feature is on):
//   gates   [N, 4H]  r, z, n, hn (hn = [LN(a) * ln_hh | a]_n + b_hn; classic: a_n + b_n)
//   norm_hh [N, 3H]  LN_3H(a_t), the normalised recurrent product (ln_hh)
//   stats   [N, 3]   rstd of LN(a_t), mean and rstd of LN(x_proj) (either norm
//                    on; the columns of one that is off hold 0)
using GruRegForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
// (d_x_proj, d_h0, d_w_hh, d_b_hh, d_ln_hh, d_ln_ih, d_b_ih); [0] where absent.
using GruRegBackwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

inline void gru_reg_check_form(const RegInputs& r, bool reset_after, const char* op) {
  TORCH_CHECK(!r.zone_c.has_value() && !r.ln_c(), op,
              ": zone_c, ln_c_w and ln_c_b are the LSTM's cell state's; a GRU has none");
  TORCH_CHECK(reset_after || (!r.ln_hh.has_value() && !r.ln_ih.has_value()), op,
              ": layer norm (ln_hh, ln_ih) needs the GRU form with reset_after=True");
}

inline bool gru_any_norm(const RegInputs& r) {
  return r.ln_hh.has_value() || r.ln_ih.has_value();
}

// x [N, 3H] (contiguous, T = float/double), the rest checked, prepared.
template <typename K, typename T>
GruRegForwardOut gru_reg_forward_loop(const Tensor& x, const Tensor& h0, const Tensor& w_hh,
                                      const Tensor& b_hh, const Schedule& s, int64_t H,
                                      bool reset_after, bool train, const RegInputs& r) {
  const auto opts = x.options();
  const int64_t G = kGruGates * H;
  Tensor h = h0.contiguous().clone();
  Tensor hm = r.rec_mask.has_value() ? (*r.rec_mask * h).contiguous() : Tensor();
  Tensor out = step_buffer<K>({s.N, H}, opts);
  Tensor gates = step_buffer<K>({train ? s.N : s.B, kGruSaved * H}, opts);  // scratch unless train
  Tensor norm_hh = step_buffer<K>({rows_if(train && r.ln_hh.has_value(), s.N), G}, opts);
  Tensor stats = at::zeros({rows_if(train && gru_any_norm(r), s.N), kGruStats}, opts);
  Tensor xs = r.ln_ih.has_value() ? at::empty({s.B, G}, opts) : Tensor();
  // torch's form: a = hm W_hh^T [B, 3H]; classic: a = hm W_rz^T [B, 2H],
  // rh = r * hm, a_n = rh W_n^T.
  Tensor a = at::empty({s.B, reset_after ? G : 2 * H}, opts);
  Tensor rh = reset_after ? Tensor() : at::empty({s.B, H}, opts);
  Tensor a_n = reset_after ? Tensor() : at::empty({s.B, H}, opts);
  const Tensor w_t = w_hh.t();
  using Gemm = typename StepGemmOf<K>::type;  // Note [One GEMM call site]
  const Gemm rec_gemm(reset_after ? w_t : w_t.narrow(1, 0, 2 * H));
  const Gemm n_gemm(reset_after ? Tensor() : w_t.narrow(1, 2 * H, H));
  const Tensor& rec_in = hm.defined() ? hm : h;

  time_loop<K, T>([&] {  // Note [The time loop]
    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = s.time_at(step), bt = s.sizes[t], off = s.offsets[t];
      T* gates_rows = gates.data_ptr<T>() + (train ? off * kGruSaved * H : 0);
      if (!reset_after) {
        rec_gemm(first_rows(a, bt), first_rows(rec_in, bt));
        GruResetRows<T> rr;
        rr.rows = bt;
        rr.H = H;
        rr.x = x.data_ptr<T>() + off * G;
        rr.a = a.data_ptr<T>();
        rr.b_hh = ptr_or_null<T>(b_hh);
        rr.hm = rec_in.data_ptr<T>();
        rr.gates = gates_rows;
        rr.rh = rh.data_ptr<T>();
        K::run(rr);
        n_gemm(first_rows(a_n, bt), first_rows(rh, bt));
      }
      GruForwardRows<T> f;
      f.rows = bt;
      f.H = H;
      f.reset_after = reset_after;
      f.x = x.data_ptr<T>() + off * G;
      f.in = input_norm<T>(r, xs);
      f.a = reset_after ? a.data_ptr<T>() : nullptr;
      f.a_n = reset_after ? nullptr : a_n.data_ptr<T>();
      f.b_hh = ptr_or_null<T>(b_hh);
      f.ln_hh = ptr<T>(r.ln_hh);
      f.gates = gates_rows;
      if (train && r.ln_hh.has_value()) f.norm_hh = norm_hh.data_ptr<T>() + off * G;
      if (stats.numel() > 0) f.stats = stats.data_ptr<T>() + off * kGruStats;
      f.hidden.P = H;
      f.hidden.zone_h = r.zone_h.has_value() ? ptr<T>(r.zone_h) + off * H : nullptr;
      f.hidden.rec_mask = ptr<T>(r.rec_mask);
      f.hidden.h = h.data_ptr<T>();
      f.hidden.hm = ptr_or_null<T>(hm);
      f.hidden.out = out.data_ptr<T>() + off * H;
      if (reset_after) {
        rec_gemm.template then_rows<K>(first_rows(a, bt), first_rows(rec_in, bt), f);
      } else {
        K::run(f);
      }
    }
  });
  if (!train) gates = at::empty({0, kGruSaved * H}, opts);
  return {out, h, gates, norm_hh, stats};
}

// x_proj [T, B, 3H] or packed [N, 3H]; h0 [B, H]; w_hh [3H, H]; b_hh [3H] or
// none; r as in RegInputs (no zone_c or cell norm; ln_hh needs reset_after).
template <typename K>
GruRegForwardOut gru_reg_forward_impl(const Tensor& x_proj, const Tensor& h0, const Tensor& w_hh,
                                      const OptTensor& b_hh, const OptTensor& batch_sizes,
                                      bool reverse, bool reset_after, bool train,
                                      const RegInputs& r) {
  constexpr const char* op = "fusedrnn::gru_reg_forward";
  const NoAutocast no_autocast;
  const auto checked =
      gru_check_forward(x_proj, h0, w_hh, b_hh, batch_sizes, reverse, reset_after, op);
  const Schedule& s = std::get<0>(checked);
  const int64_t H = std::get<1>(checked);
  gru_reg_check_form(r, reset_after, op);
  check_reg(x_proj, r, s, kGruGates, H, H, op);
  const auto dtype = x_proj.scalar_type();
  const auto acc = acc_dtype(dtype);  // Note [Regularised halves]
  auto prep = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  GruRegForwardOut res;
  AT_DISPATCH_FLOATING_TYPES(acc, "gru_reg_forward", [&] {
    res = gru_reg_forward_loop<K, scalar_t>(
        prep(x_proj).view({s.N, kGruGates * H}), prep(h0), prep(w_hh),
        b_hh.has_value() ? prep(*b_hh) : Tensor(), s, H, reset_after, train,
        r.prepared(acc, s.N));
  });
  auto& [out, h_n, gates, norm_hh, stats] = res;
  out = out.view(detail::with_last(x_proj.sizes(), H)).to(dtype);
  h_n = h_n.to(dtype);
  return res;
}

template <typename K, typename T>
GruRegBackwardOut gru_reg_backward_loop(const Tensor& g_out, const Tensor& g_h_n,
                                        const Tensor& x, const Tensor& out, const Tensor& gates,
                                        const Tensor& norm_hh, const Tensor& stats,
                                        const Tensor& h0,
                                        const Tensor& w_hh, const Schedule& s,
                                        int64_t H, bool packed, bool reset_after, bool has_bias,
                                        const RegInputs& r) {
  const auto opts = g_out.options();
  const int64_t G = kGruGates * H;
  const bool ln = r.ln_hh.has_value(), ln_ih = r.ln_ih.has_value();
  Tensor dh = g_h_n.clone();
  Tensor dh_mm = at::zeros({s.B, H}, opts);  // Note [Deferred recurrent gradient]
  // Note [Gain gradients summed in the loop]: there dab, and dx with ln_ih
  // (then not the op's result), hold one step's rows.
  const int64_t slots = sum_slots<K>();
  const bool step_dab = slots > 0, step_dx = slots > 0 && ln_ih;
  const LoopSums hh_sums(slots > 0 && ln, slots > 0 && ln && has_bias, slots, G, opts);
  const LoopSums ih_sums(slots > 0 && ln_ih, slots > 0 && ln_ih && r.b_ih.has_value(), slots, G,
                         opts);
  Tensor dx = step_dx ? at::empty({s.B, G}, opts) : step_buffer<K>({s.N, G}, opts);
  // d a; the classic form's is d x_proj itself (no layer norm, hn's gradient is n's).
  Tensor da = reset_after ? step_buffer<K>({s.N, G}, opts) : dx;
  Tensor dab =
      ln ? (step_dab ? at::empty({s.B, G}, opts) : step_buffer<K>({s.N, G}, opts)) : Tensor();
  Tensor dx_raw = ln_ih ? step_buffer<K>({s.N, G}, opts) : dx;
  Tensor drh = reset_after ? Tensor() : at::empty({s.B, H}, opts);
  Tensor dh_new = at::empty({s.B, H}, opts);  // dL/dh~, per step
  using Gemm = typename StepGemmOf<K>::type;  // Note [One GEMM call site]
  const Gemm rec_gemm(reset_after ? w_hh : Tensor());
  const Gemm rz_gemm(reset_after ? Tensor() : w_hh.narrow(0, 0, 2 * H));
  const Gemm n_gemm(reset_after ? Tensor() : w_hh.narrow(0, 2 * H, H));

  time_loop<K, T>([&] {  // Note [The time loop]
    for (int64_t step = s.T - 1; step >= 0; --step) {
      const int64_t t = s.time_at(step), bt = s.sizes[t], off = s.offsets[t];
      const int64_t prow = s.prev_rows(t);
      GruBackwardRows<T> b;
      b.rows = bt;
      b.H = H;
      b.reset_after = reset_after;
      b.gates = gates.data_ptr<T>() + off * kGruSaved * H;
      b.h_prev = prow > 0 ? out.data_ptr<T>() + s.offsets[s.prev_time(t)] * H : nullptr;
      b.prev_rows = prow;
      b.h0 = h0.data_ptr<T>();
      if (ln) {
        b.norm_hh = norm_hh.data_ptr<T>() + off * G;
        b.ln_hh = ptr<T>(r.ln_hh);
        b.dab = dab.data_ptr<T>() + (step_dab ? 0 : off * G);
        b.hh_sums = hh_sums.rows<T>();
      }
      if (ln_ih) {
        b.x = x.data_ptr<T>() + off * G;
        b.ln_ih = ptr<T>(r.ln_ih);
        b.ih_sums = ih_sums.rows<T>();
      }
      if (stats.numel() > 0) b.stats = stats.data_ptr<T>() + off * kGruStats;
      b.dx_raw = dx_raw.data_ptr<T>() + off * G;
      b.hidden.P = H;
      b.hidden.grad_out = g_out.data_ptr<T>() + off * H;
      b.hidden.zone_h = r.zone_h.has_value() ? ptr<T>(r.zone_h) + off * H : nullptr;
      b.hidden.rec_mask = ptr<T>(r.rec_mask);
      b.hidden.dh = dh.data_ptr<T>();
      b.hidden.dh_mm = dh_mm.data_ptr<T>();
      b.dh_new = dh_new.data_ptr<T>();
      b.dx = dx.data_ptr<T>() + (step_dx ? 0 : off * G);
      b.da = da.data_ptr<T>() + off * G;
      const Tensor da_rows = da.narrow(0, off, bt);
      if (reset_after) {
        rec_gemm.template after_rows<K>(b, first_rows(dh_mm, bt), da_rows);
        continue;
      }
      K::run(b);
      // Classic form: d(r hm) = dhn W_n, then r's gradient, then through W_rz.
      n_gemm(first_rows(drh, bt), da_rows.narrow(1, 2 * H, H));
      GruResetBackwardRows<T> rb;
      rb.rows = bt;
      rb.H = H;
      rb.gates = b.gates;
      rb.h_prev = b.h_prev;
      rb.prev_rows = prow;
      rb.h0 = b.h0;
      rb.rec_mask = ptr<T>(r.rec_mask);
      rb.drh = drh.data_ptr<T>();
      rb.dx = b.dx;
      rb.dh_mm = dh_mm.data_ptr<T>();
      K::run(rb);
      rz_gemm(first_rows(dh_mm, bt), da_rows.narrow(1, 0, 2 * H), /*accumulate=*/true);
    }
  });

  const Tensor none = at::empty({0}, opts);
  Tensor d_h0 = r.rec_mask.has_value() ? dh + *r.rec_mask * dh_mm : dh + dh_mm;
  Tensor d_w_hh;
  if (reset_after) {
    d_w_hh = recurrent_weight_grad<K>(da, out, h0, r.rec_mask, s, packed);
  } else {
    // W_rz saw hm; W_n saw r * hm.
    const Tensor hm = masked_prev(out, h0, r.rec_mask, s, packed);
    const Tensor r_all = gates.narrow(1, 0, H);
    d_w_hh = at::cat({weight_grad<K>(da.narrow(1, 0, 2 * H), hm),
                      weight_grad<K>(da.narrow(1, 2 * H, H), r_all * hm)});
  }
  // Each norm's gain and the bias after it: summed in the loop, or from one
  // pass over their gradient (Note [Norm gradients in one pass]): dab for the
  // recurrent side, dx for the input side.
  Tensor d_b_hh = none, d_ln_hh = none, d_ln_ih = none, d_b_ih = none;
  const auto dtype = opts.dtype().toScalarType();
  if (ln && slots > 0) {
    d_ln_hh = LoopSums::total(hh_sums.gain, dtype);
    if (has_bias) d_b_hh = LoopSums::total(hh_sums.bias, dtype);
  } else if (ln) {
    const NormGrads g = norm_grads(dab, norm_hh, Tensor(), Tensor(), Tensor(), has_bias);
    d_ln_hh = g.hh;
    if (has_bias) d_b_hh = g.sum;
  } else if (has_bias) {
    d_b_hh = da.sum(0);
  }
  if (ln_ih && slots > 0) {
    d_ln_ih = LoopSums::total(ih_sums.gain, dtype);
    if (r.b_ih.has_value()) d_b_ih = LoopSums::total(ih_sums.bias, dtype);
  } else if (ln_ih) {
    const NormGrads g = norm_grads(dx, Tensor(), x, stats.select(1, kGruStatsIh),
                                   stats.select(1, kGruStatsIh + 1), r.b_ih.has_value());
    d_ln_ih = g.ih;
    if (r.b_ih.has_value()) d_b_ih = g.sum;
  }
  return {dx_raw, d_h0, d_w_hh, d_b_hh, d_ln_hh, d_ln_ih, d_b_ih};
}

// Checks what gru_reg_backward gets against the layer's shapes; returns the
// schedule and H.
inline std::tuple<Schedule, int64_t> gru_reg_check_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& x_proj,
    const Tensor& output, const Tensor& gates, const Tensor& norm_hh, const Tensor& stats,
    const Tensor& h0, const Tensor& w_hh, const OptTensor& batch_sizes, bool reverse,
    bool reset_after, const RegInputs& r) {
  constexpr const char* op = "fusedrnn::gru_reg_backward";
  const Schedule s =
      gru_check_backward_states(grad_output, grad_h_n, output, h0, w_hh, batch_sizes, reverse, op);
  const int64_t H = w_hh.size(1);
  check_same(grad_output, x_proj, op, "x_proj", "grad_output");
  check_shape(x_proj, detail::with_last(grad_output.sizes(), kGruGates * H), op, "x_proj");
  for (auto [t, name] : {std::pair{&gates, "gates"}, {&norm_hh, "norm_hh"}, {&stats, "stats"}}) {
    check_saved_acc(grad_output, *t, op, name);
  }
  const bool ln = r.ln_hh.has_value();
  check_shape(gates, {s.N, kGruSaved * H}, op, "gates");
  check_shape(norm_hh, {rows_if(ln, s.N), kGruGates * H}, op, "norm_hh");
  check_shape(stats, {rows_if(gru_any_norm(r), s.N), kGruStats}, op, "stats");
  gru_reg_check_form(r, reset_after, op);
  check_reg(grad_output, r, s, kGruGates, H, H, op);
  return {s, H};
}

// grad_output like output; grad_h_n [B, H]; output and the saved tensors as
// gru_reg_forward returned them; the rest its arguments.
template <typename K>
GruRegBackwardOut gru_reg_backward_impl(const Tensor& grad_output, const Tensor& grad_h_n,
                                        const Tensor& x_proj, const Tensor& output,
                                        const Tensor& gates, const Tensor& norm_hh,
                                        const Tensor& stats, const Tensor& h0,
                                        const Tensor& w_hh, const OptTensor& batch_sizes,
                                        bool reverse,
                                        bool reset_after, bool has_bias, const RegInputs& r) {
  const NoAutocast no_autocast;
  const auto checked = gru_reg_check_backward(grad_output, grad_h_n, x_proj, output, gates,
                                              norm_hh, stats, h0, w_hh, batch_sizes, reverse,
                                              reset_after, r);
  const Schedule& s = std::get<0>(checked);
  const int64_t H = std::get<1>(checked);
  const auto dtype = grad_output.scalar_type();
  const auto acc = acc_dtype(dtype);  // Note [Regularised halves]
  auto prep = [&](const Tensor& t) { return t.to(acc).contiguous(); };
  GruRegBackwardOut res;
  AT_DISPATCH_FLOATING_TYPES(acc, "gru_reg_backward", [&] {
    res = gru_reg_backward_loop<K, scalar_t>(
        prep(grad_output).view({s.N, H}), prep(grad_h_n),
        // Note [Input norm recomputed]: x_proj is read only with ln_ih.
        r.ln_ih.has_value() ? prep(x_proj).view({s.N, kGruGates * H}) : Tensor(),
        prep(output).view({s.N, H}), gates.contiguous(), norm_hh.contiguous(),
        stats.contiguous(), prep(h0), prep(w_hh), s, H,
        batch_sizes.has_value(), reset_after, has_bias, r.prepared(acc, s.N));
  });
  auto& [dx, d_h0, d_w_hh, d_b_hh, d_ln_hh, d_ln_ih, d_b_ih] = res;
  dx = dx.view(detail::with_last(grad_output.sizes(), kGruGates * H));
  for (Tensor* t : {&dx, &d_h0, &d_w_hh, &d_b_hh, &d_ln_hh, &d_ln_ih, &d_b_ih}) {
    *t = t->to(dtype);
  }
  return res;
}

}  // namespace reg
}  // namespace fusedrnn
