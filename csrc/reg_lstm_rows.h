// The LSTM's rows of the regularised op (reg_rows.h explains rows and Row):
//
//   a     = (rec_mask * h_{t-1}) W_hh^T                     (the step's GEMM)
//   gates = [LN_4H(x) * ln_ih + b_ih | x] + [LN_4H(a) * ln_hh | a] + b_hh
//                                                           -> i, f, g, o
//   c~    = f c_{t-1} + i g
//   h~    = o tanh([LN_H(c~) * ln_c_w + ln_c_b | c~])        (then W_hr^T)
//   c_t   = zoneout(zone_c, c_{t-1}, c~),  h_t = zoneout(zone_h, h_{t-1}, h~)
#pragma once

#include "reg_rows.h"

namespace fusedrnn {
namespace reg {

template <typename T>
struct LstmForwardRows {
  int64_t rows = 0, H = 0;
  const T* x = nullptr;       // [rows, 4H] input projection (+ b_ih unless in.ln_ih)
  InputNorm<T> in;            // the input side's layer norm, if on
  T* a = nullptr;             // [rows, 4H] the step's GEMM; overwritten
  const T* b_hh = nullptr;    // [4H]
  const T* ln_hh = nullptr;   // [4H]
  const T* ln_c_w = nullptr;  // [H] (with ln_c_b)
  const T* ln_c_b = nullptr;  // [H]
  const T* zone_c = nullptr;  // [rows, H]
  T* c = nullptr;             // [B, H] c_{t-1} in, c_t out
  T* c_new = nullptr;         // [rows, H] c~ (saved or scratch)
  T* gates = nullptr;         // [rows, 4H] activated i, f, g, o (saved, or = a)
  T* cells = nullptr;         // [rows, H] saved c_t, or null (not saved, or = c_new)
  T* norm_hh = nullptr;       // [rows, 4H] saved LN_4H(a), or null
  T* stats = nullptr;         // [rows, kLstmStats] saved, or null
  // Without projection (P == H), h~ goes through hidden; with it, to h_raw.
  HiddenOut<T> hidden;
  T* h_raw = nullptr;         // [rows, H] h~ before W_hr, or null
};

template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE void run_row(const Row& row, const LstmForwardRows<T>& a, int64_t b) {
  using math::sigmoid;
  using math::tanh_;
  const int64_t H = a.H, G = kLstmGates * H;
  T* ar = a.a + b * G;
  const T* bias = a.b_hh;
  T* gr = a.gates + b * G;
  T* cn = a.c_new + b * H;
  T* cr = a.c + b * H;
  T* st = a.stats ? a.stats + b * kLstmStats : nullptr;
  const T* xr = a.in.row_x(row, a.x + b * G, G, b, st ? st + kLstmStatsIh : nullptr);
  if (a.ln_hh) {
    const T rstd = ln_recurrent(row, ar, G, a.ln_hh, a.norm_hh ? a.norm_hh + b * G : nullptr);
    if (st && row.leader()) st[kStatRstdHh] = rstd;
  }
  // Note [Branch-free row loops]
  with_flag(bias != nullptr, [&](auto has_bias) {
    row.loop(H, [&](int64_t j) {
      T pre[kLstmGates];
      for (int g = 0; g < kLstmGates; ++g) {
        const int64_t k = g * H + j;
        pre[g] = xr[k] + ar[k];
        if constexpr (decltype(has_bias)::value) pre[g] += bias[k];
      }
      const T i = sigmoid(pre[0]), f = sigmoid(pre[1]), g = tanh_(pre[2]), o = sigmoid(pre[3]);
      gr[j] = i;
      gr[H + j] = f;
      gr[2 * H + j] = g;
      gr[3 * H + j] = o;
      cn[j] = f * cr[j] + i * g;
    });
  });
  T mean = T(0), rstd = T(1);
  if (a.ln_c_w) {
    ln_stats(row, cn, H, mean, rstd);
    if (st && row.leader()) {
      st[kStatMeanC] = mean;
      st[kStatRstdC] = rstd;
    }
  }
  // h~ = o tanh(y) into h_raw, or into the output row until hidden stores it.
  T* ht = a.h_raw ? a.h_raw + b * H : a.hidden.out + b * H;
  const T* w = a.ln_c_w;
  const T* wb = a.ln_c_b;
  with_flag(w != nullptr, [&](auto ln) {
    row.loop(H, [&](int64_t j) {
      T y = cn[j];
      if constexpr (decltype(ln)::value) y = (y - mean) * rstd * w[j] + wb[j];
      ht[j] = gr[3 * H + j] * tanh_(y);
    });
  });
  const T* zc = a.zone_c ? a.zone_c + b * H : nullptr;
  T* cells = a.cells ? a.cells + b * H : nullptr;
  with_flag(zc != nullptr, [&](auto zone) {
    with_flag(cells != nullptr, [&](auto saved) {
      row.loop(H, [&](int64_t j) {
        T c_t = cn[j];
        if constexpr (decltype(zone)::value) c_t = zoneout(zc[j], cr[j], c_t);
        cr[j] = c_t;
        if constexpr (decltype(saved)::value) cells[j] = c_t;
      });
    });
  });
  if (!a.h_raw) a.hidden.store_row(row, b, ht);
}

template <typename T>
struct LstmBackwardRows {
  int64_t rows = 0, H = 0;
  const T* gates = nullptr;    // [rows, 4H] i, f, g, o
  const T* c_new = nullptr;    // [rows, H] c~
  const T* c_prev = nullptr;   // [prev_rows, H] c of the step before, or null
  int64_t prev_rows = 0;       // rows >= prev_rows start from c0
  const T* c0 = nullptr;       // [B, H]
  const T* norm_hh = nullptr;  // [rows, 4H] LN_4H(a), with ln_hh
  const T* x = nullptr;        // [rows, 4H] the forward's x_proj, with ln_ih
  const T* stats = nullptr;    // [rows, kLstmStats], with layer norm
  const T* ln_hh = nullptr;
  const T* ln_ih = nullptr;
  const T* ln_c_w = nullptr;
  const T* ln_c_b = nullptr;
  const T* zone_c = nullptr;   // [rows, H]
  // dL/dh~_t [rows, H]: with projection, already through W_hr; else take_hidden
  // and the row fills it from hidden first.
  T* dh_raw = nullptr;
  bool take_hidden = false;
  HiddenGrad<T> hidden;
  T* dc = nullptr;             // [B, H] dL/dc_t in, dL/dc_{t-1} out
  T* dx = nullptr;             // [rows, 4H] d gates pre-activation (= d x_proj unless ln_ih)
  T* dx_raw = nullptr;         // [rows, 4H] d x_proj through the input norm, with ln_ih
  T* da = nullptr;             // [rows, 4H] d a (through LN_4H), with ln_hh
  T* dcn = nullptr;            // [rows, H] dL/d(cell norm output), with ln_c
  T* h_raw = nullptr;          // [rows, H] h~ recomputed for dW_hr, or null
  // Note [Gain gradients summed in the loop], each where asked: ln_hh's and
  // the biases' (dy = dx, the gates' pre-activation), ln_ih's (dy = dx),
  // the cell norm's gain and bias (dy = dcn).
  GainSums<T> gate_sums, ih_sums, c_sums;
};

template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE void run_row(const Row& row, const LstmBackwardRows<T>& a, int64_t b) {
  using math::tanh_;
  const int64_t H = a.H, G = kLstmGates * H;
  const T* gr = a.gates + b * G;
  const T* cn = a.c_new + b * H;
  const T* cp = b < a.prev_rows ? a.c_prev + b * H : a.c0 + b * H;
  T* dxr = a.dx + b * G;
  T* dcr = a.dc + b * H;
  T* dht = a.dh_raw + b * H;
  const T* st = a.stats ? a.stats + b * kLstmStats : nullptr;
  const T mean = a.ln_c_w ? st[kStatMeanC] : T(0);
  const T rstd = a.ln_c_w ? st[kStatRstdC] : T(1);
  if (a.take_hidden) a.hidden.take_row(row, b, dht);
  // h~ = o tanh(y), y the cell norm's output (or c~). Note [Branch-free row loops]
  const T* w = a.ln_c_w;
  const T* wb = a.ln_c_b;
  T* dcn = a.dcn ? a.dcn + b * H : nullptr;
  T* h_raw = a.h_raw ? a.h_raw + b * H : nullptr;
  with_flag(w != nullptr, [&](auto ln) {
    with_flag(h_raw != nullptr, [&](auto proj) {
      row.loop(H, [&](int64_t j) {
        const T dh = dht[j];
        T y = cn[j];
        if constexpr (decltype(ln)::value) y = (y - mean) * rstd * w[j] + wb[j];
        const T tc = tanh_(y);
        const T o = gr[3 * H + j];
        dxr[3 * H + j] = dh * tc * o * (T(1) - o);
        const T dy = dh * o * (T(1) - tc * tc);
        if constexpr (decltype(ln)::value) {
          dcn[j] = dy;
        } else {
          dxr[j] = dy;  // dL/dc~ so far, in the i slot
        }
        if constexpr (decltype(proj)::value) h_raw[j] = o * tc;
      });
    });
  });
  // dL/dc~ through the cell norm, into the i slot of dx for now; then the gates.
  if (w) {
    const auto dy = [&](int64_t j) { return dcn[j]; };
    const auto xhat = [&](int64_t j) { return (cn[j] - mean) * rstd; };
    ln_backward(row, H, w, rstd, dy, xhat, dxr);
    a.c_sums.add(row, dy, xhat);
  }
  const T* zc = a.zone_c ? a.zone_c + b * H : nullptr;
  with_flag(zc != nullptr, [&](auto zone) {
    row.loop(H, [&](int64_t j) {
      const T i = gr[j], f = gr[H + j], g = gr[2 * H + j];
      const T d_future = dcr[j];
      T dc_new, dc_prev;
      if constexpr (decltype(zone)::value) {
        dc_new = dxr[j] + (T(1) - zc[j]) * d_future;
        dc_prev = zc[j] * d_future;
      } else {
        dc_new = dxr[j] + d_future;
        dc_prev = T(0);
      }
      dxr[j] = dc_new * g * i * (T(1) - i);
      dxr[H + j] = dc_new * cp[j] * f * (T(1) - f);
      dxr[2 * H + j] = dc_new * i * (T(1) - g * g);
      dcr[j] = dc_new * f + dc_prev;
    });
  });
  const T* nh = a.ln_hh ? a.norm_hh + b * G : nullptr;
  const auto dy = [&](int64_t k) { return dxr[k]; };
  const auto xhat = [&](int64_t k) { return nh[k]; };
  if (a.ln_hh) ln_backward(row, G, a.ln_hh, st[kStatRstdHh], dy, xhat, a.da + b * G);
  a.gate_sums.add(row, dy, xhat);  // xhat read only with ln_hh's gain sum
  if (a.ln_ih) {
    ln_input_backward(row, G, a.ln_ih, a.x + b * G, st + kLstmStatsIh, dxr, a.dx_raw + b * G,
                      a.ih_sums);
  }
}

}  // namespace reg
}  // namespace fusedrnn
