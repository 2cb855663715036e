// The GRU's rows of the regularised op (reg_rows.h explains rows and Row).
// hm = rec_mask * h_{t-1}; torch's form (reset_after):
//
//   a     = hm W_hh^T                                      (the step's GEMM)
//   x          = [LN_3H(x_proj) * ln_ih + b_ih | x_proj]
//   hr, hz, hn = [LN_3H(a) * ln_hh | a] + b_hh
//   r = s(x_r + hr), z = s(x_z + hz), n = tanh(x_n + r hn)
//   h~ = (1 - z) n + z h_{t-1},  h_t = zoneout(zone_h, h_{t-1}, h~)
//
// The classic form (reset_after=false, no layer norm) takes two GEMMs:
// a_rz = hm W_rz^T, then (GruResetRows) r * hm, then a_n = (r hm) W_n^T and
// hn = a_n + b_n, n = tanh(x_n + hn). Saved gates are r, z, n, hn (kGruSaved).
#pragma once

#include "reg_rows.h"

namespace fusedrnn {
namespace reg {

// Classic form, between its GEMMs: r, z and r * hm.
template <typename T>
struct GruResetRows {
  int64_t rows = 0, H = 0;
  const T* x = nullptr;     // [rows, 3H]
  const T* a = nullptr;     // [rows, 2H] hm W_rz^T
  const T* b_hh = nullptr;  // [3H] or null
  const T* hm = nullptr;    // [B, H] the GEMM's input (h_{t-1}, masked)
  T* gates = nullptr;       // [rows, 4H] r, z written
  T* rh = nullptr;          // [B, H] r * hm
};

template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE void run_row(const Row& row, const GruResetRows<T>& a, int64_t b) {
  const int64_t H = a.H;
  const T* xr = a.x + b * kGruGates * H;
  const T* ar = a.a + b * 2 * H;
  const T* bias = a.b_hh;
  const T* hm = a.hm + b * H;
  T* gr = a.gates + b * kGruSaved * H;
  T* rh = a.rh + b * H;
  with_flag(bias != nullptr, [&](auto has_bias) {  // Note [Branch-free row loops]
    row.loop(H, [&](int64_t j) {
      T hr = ar[j], hz = ar[H + j];
      if constexpr (decltype(has_bias)::value) {
        hr += bias[j];
        hz += bias[H + j];
      }
      T r, z;
      gru_gates_point<T>(xr[j], xr[H + j], hr, hz, r, z);
      gr[j] = r;
      gr[H + j] = z;
      rh[j] = r * hm[j];
    });
  });
}

template <typename T>
struct GruForwardRows {
  int64_t rows = 0, H = 0;
  bool reset_after = true;
  const T* x = nullptr;       // [rows, 3H]
  InputNorm<T> in;            // the input side's layer norm, if on (reset_after only)
  T* a = nullptr;             // [rows, 3H] the step's GEMM (reset_after); overwritten
  const T* a_n = nullptr;     // [rows, H] (r hm) W_n^T (classic form), else null
  const T* b_hh = nullptr;    // [3H] or null
  const T* ln_hh = nullptr;   // [3H] or null (reset_after only)
  T* gates = nullptr;         // [rows, 4H] r, z, n, hn (saved, or scratch); classic: r, z in
  T* norm_hh = nullptr;       // [rows, 3H] saved LN_3H(a), or null
  T* stats = nullptr;         // [rows, kGruStats] saved, or null
  HiddenOut<T> hidden;        // hidden.h holds h_{t-1} until stored
};

template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE void run_row(const Row& row, const GruForwardRows<T>& a, int64_t b) {
  const int64_t H = a.H;
  const T* xr = a.in.row_x(row, a.x + b * kGruGates * H, kGruGates * H, b,
                           a.stats ? a.stats + b * kGruStats + kGruStatsIh : nullptr);
  T* ar = a.a ? a.a + b * kGruGates * H : nullptr;
  const T* an = a.a_n ? a.a_n + b * H : nullptr;
  const T* bias = a.b_hh;
  const T* hp = a.hidden.h + b * H;
  T* gr = a.gates + b * kGruSaved * H;
  T* ht = a.hidden.out + b * H;  // h~ until hidden stores it
  if (a.ln_hh) {
    const T rstd = ln_recurrent(row, ar, kGruGates * H, a.ln_hh,
                                a.norm_hh ? a.norm_hh + b * kGruGates * H : nullptr);
    if (a.stats && row.leader()) a.stats[b * kGruStats + kStatRstdHh] = rstd;
  }
  with_flag(a.reset_after, [&](auto torch_form) {  // Note [Branch-free row loops]
    with_flag(bias != nullptr, [&](auto has_bias) {
      row.loop(H, [&](int64_t j) {
        T r, z, n, h, hn;
        if constexpr (decltype(torch_form)::value) {
          T hr = ar[j], hz = ar[H + j];
          hn = ar[2 * H + j];
          if constexpr (decltype(has_bias)::value) {
            hr += bias[j];
            hz += bias[H + j];
            hn += bias[2 * H + j];
          }
          gru_forward_point<T>(xr[j], xr[H + j], xr[2 * H + j], hr, hz, hn, hp[j], r, z, n, h);
        } else {
          r = gr[j];
          z = gr[H + j];
          hn = an[j];
          if constexpr (decltype(has_bias)::value) hn += bias[2 * H + j];
          gru_output_point<T>(xr[2 * H + j], hn, T(1), z, hp[j], n, h);
        }
        store_gates(gr + j, H, r, z, n, hn);
        ht[j] = h;
      });
    });
  });
  a.hidden.store_row(row, b, ht);
}

template <typename T>
struct GruBackwardRows {
  int64_t rows = 0, H = 0;
  bool reset_after = true;
  const T* gates = nullptr;    // [rows, 4H] r, z, n, hn
  const T* h_prev = nullptr;   // [prev_rows, H] output of the step before, or null
  int64_t prev_rows = 0;       // rows >= prev_rows start from h0
  const T* h0 = nullptr;       // [B, H]
  const T* norm_hh = nullptr;  // [rows, 3H], with ln_hh
  const T* x = nullptr;        // [rows, 3H] the forward's x_proj, with ln_ih
  const T* stats = nullptr;    // [rows, kGruStats], with ln_hh or ln_ih
  const T* ln_hh = nullptr;
  const T* ln_ih = nullptr;
  HiddenGrad<T> hidden;
  T* dh_new = nullptr;         // [B, H] scratch: dL/dh~_t
  T* dx = nullptr;             // [rows, 3H] d x (classic: r part left to GruResetBackwardRows)
  T* dx_raw = nullptr;         // [rows, 3H] d x_proj through the input norm, with ln_ih
  T* dab = nullptr;            // [rows, 3H] d(LN_3H(a) * ln_hh + b_hh), with ln_hh
  T* da = nullptr;             // [rows, 3H] d a
  // Note [Gain gradients summed in the loop]: ln_hh's and b_hh's (dy = dab),
  // ln_ih's and b_ih's (dy = dx), each where asked.
  GainSums<T> hh_sums, ih_sums;
};

template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE void run_row(const Row& row, const GruBackwardRows<T>& a, int64_t b) {
  const int64_t H = a.H;
  const T* gr = a.gates + b * kGruSaved * H;
  const T* hp = b < a.prev_rows ? a.h_prev + b * H : a.h0 + b * H;
  T* dxr = a.dx + b * kGruGates * H;
  T* dst = (a.ln_hh ? a.dab : a.da) + b * kGruGates * H;
  T* dht = a.dh_new + b * H;
  T* dh = a.hidden.dh + b * H;
  a.hidden.take_row(row, b, dht);
  with_flag(a.reset_after, [&](auto torch_form) {  // Note [Branch-free row loops]
    row.loop(H, [&](int64_t j) {
      T r = T(1);
      if constexpr (decltype(torch_form)::value) r = gr[j];
      T dr, dz, dn, dhn, dh_direct;
      gru_backward_point<T>(r, gr[H + j], gr[2 * H + j], gr[3 * H + j], hp[j], dht[j], dr, dz,
                            dn, dhn, dh_direct);
      dh[j] += dh_direct;
      if constexpr (decltype(torch_form)::value) {
        dxr[j] = dr;
        dst[j] = dr;
      }
      dxr[H + j] = dz;
      dxr[2 * H + j] = dn;
      dst[H + j] = dz;
      dst[2 * H + j] = dhn;
    });
  });
  if (a.ln_hh) {
    const T* nh = a.norm_hh + b * kGruGates * H;
    const auto dy = [&](int64_t k) { return dst[k]; };
    const auto xhat = [&](int64_t k) { return nh[k]; };
    ln_backward(row, kGruGates * H, a.ln_hh, a.stats[b * kGruStats + kStatRstdHh], dy, xhat,
                a.da + b * kGruGates * H);
    a.hh_sums.add(row, dy, xhat);
  }
  if (a.ln_ih) {
    ln_input_backward(row, kGruGates * H, a.ln_ih, a.x + b * kGruGates * H,
                      a.stats + b * kGruStats + kGruStatsIh, dxr, a.dx_raw + b * kGruGates * H,
                      a.ih_sums);
  }
}

// Classic form, backward through r * hm given drh = d(r hm) = dhn W_n: r's
// pre-activation gradient, and d hm (its deferred recurrent gradient).
template <typename T>
struct GruResetBackwardRows {
  int64_t rows = 0, H = 0;
  const T* gates = nullptr;     // [rows, 4H]
  const T* h_prev = nullptr;    // [prev_rows, H] or null
  int64_t prev_rows = 0;
  const T* h0 = nullptr;        // [B, H]
  const T* rec_mask = nullptr;  // [B, H] or null
  const T* drh = nullptr;       // [B, H]
  T* dx = nullptr;              // [rows, 3H] r part written (= d a_r)
  T* dh_mm = nullptr;           // [B, H] d hm through r * hm
};

template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE void run_row(const Row& row, const GruResetBackwardRows<T>& a, int64_t b) {
  const int64_t H = a.H;
  const T* hp = b < a.prev_rows ? a.h_prev + b * H : a.h0 + b * H;
  const T* gr = a.gates + b * kGruSaved * H;
  const T* mr = a.rec_mask ? a.rec_mask + b * H : nullptr;
  const T* drh = a.drh + b * H;
  T* dxr = a.dx + b * kGruGates * H;
  T* dhm = a.dh_mm + b * H;
  with_flag(mr != nullptr, [&](auto masked) {  // Note [Branch-free row loops]
    row.loop(H, [&](int64_t j) {
      T hm = hp[j];
      if constexpr (decltype(masked)::value) hm = mr[j] * hm;
      T dr, d;
      gru_reset_backward_point<T>(gr[j], hm, drh[j], dr, d);
      dxr[j] = dr;
      dhm[j] = d;
    });
  });
}

}  // namespace reg
}  // namespace fusedrnn
