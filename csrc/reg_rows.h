// Per-row math of the regularised ops (layer norm, zoneout, recurrent
// dropout; fusedrnn/regularisers.py has the definitions), forward and
// backward, written once for the CPU and the GPU. One call handles one batch
// row of one time step: the LN statistics need the whole row, so a row is the
// unit of work. `Row` says how the row's elements are shared out:
//   row.loop(n, f)     f(j) for j in [0, n); every f(j) is visible afterwards
//   row.sum<T>(n, f)   the sum of f(j) over [0, n), known to every caller
//   row.leader()       true for exactly one caller (scalar stores)
//   row.slot()         an index no row running at the same time shares (the
//                      CPU: the thread's; CUDA: the row's), for GainSums
// The CPU runs a row on one thread (cpu/reg_cpu.cpp, CpuRow); CUDA runs it on
// one thread block (cuda/reg_cuda.cu, CudaRow).
//
// Everything here is in one type T (float or double): half types are
// computed in float32 by the caller (Note [Regularised halves] in reg_lstm.h).
// Pointers to step rows ([rows, ...]) start at the step's first row; pointers
// to state ([B, ...]) at row 0; both are indexed by the row b. Optional
// inputs are null when absent.
#pragma once

#include <cstdint>
#include <type_traits>

#include "gates.h"

namespace fusedrnn {
namespace reg {

// fusedrnn.regularisers.LN_EPS.
constexpr double kLnEps = 1e-5;
// Columns of the saved per-row statistics: rstd of LN(h W_hh^T), (LSTM)
// mean and rstd of LN(c), then mean and rstd of LN(x W_ih^T).
constexpr int kStatRstdHh = 0, kStatMeanC = 1, kStatRstdC = 2;
constexpr int kLstmStats = 5, kLstmStatsIh = 3;
constexpr int kGruStats = 3, kGruStatsIh = 1;

FUSEDRNN_HOST_DEVICE float rsqrt_(float x) { return 1.0f / sqrtf(x); }
FUSEDRNN_HOST_DEVICE double rsqrt_(double x) { return 1.0 / sqrt(x); }

// Note [Branch-free row loops]
// f(std::true_type) or f(std::false_type): a choice that holds for a whole
// loop (an optional input there or not) becomes a compile-time one, so the
// loop body has no branch. The CPU vectorises only branch-free loops, and
// its exp/tanh cost several times more unvectorised than the rest of a step.
template <typename F>
FUSEDRNN_HOST_DEVICE void with_flag(bool on, const F& f) {
  if (on) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// h_t = d h_{t-1} + (1 - d) h~_t, as the reference writes it.
template <typename T>
FUSEDRNN_HOST_DEVICE T zoneout(T d, T prev, T next) {
  return d * prev + (T(1) - d) * next;
}

// Mean and 1/sqrt(var + eps) of v[0, n) (biased variance, as F.layer_norm),
// in two passes: the one-pass form loses digits when |mean| >> std.
template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE void ln_stats(const Row& row, const T* v, int64_t n, T& mean, T& rstd) {
  mean = row.template sum<T>(n, [&](int64_t j) { return v[j]; }) / T(n);
  const T m = mean;
  const T var = row.template sum<T>(n, [&](int64_t j) {
    const T d = v[j] - m;
    return d * d;
  }) / T(n);
  rstd = rsqrt_(var + T(kLnEps));
}

// Backward of y = LN(v) * gain given dy, with xhat = LN(v) and rstd: writes
// dv[0, n). dy(j) and xhat(j) are functions of j (callers have them in
// different places); dv may overwrite what they read only at the same j.
template <typename T, typename Row, typename Dy, typename Xhat>
FUSEDRNN_HOST_DEVICE void ln_backward(const Row& row, int64_t n, const T* gain, T rstd,
                                      const Dy& dy, const Xhat& xhat, T* dv) {
  const T m1 = row.template sum<T>(n, [&](int64_t j) { return dy(j) * gain[j]; }) / T(n);
  const T m2 =
      row.template sum<T>(n, [&](int64_t j) { return dy(j) * gain[j] * xhat(j); }) / T(n);
  row.loop(n, [&](int64_t j) { dv[j] = rstd * (dy(j) * gain[j] - m1 - xhat(j) * m2); });
}

// Note [Gain gradients summed in the loop]
// The gradient of a norm's gain is the column sum over all rows of dy * xhat,
// and that of the bias after it the column sum of dy. Where the kernel
// policy sums them in the loop (K::sum_slots, reg_common.h: the CPU), each
// row adds its dy * xhat and dy, in double, to its slot's sums right after
// its norm's backward, and the slots are added up after the loop; dy then
// needs no buffer beyond the step. Before, a pass after the loop read dy,
// xhat (and x_proj) of all steps back from memory: 0.53 ms of a
// layer_norm=True GRU training step's 12.4 ms at T=100, B=16, H=256 (2-core
// AMD EPYC); the sums in the loop cost about 0.4 ms of row time, but the
// buffers of all steps they spare make the whole step 3-5% faster
// (benchmarks/NOTES.md, "Layer norm's gain gradients in the loop"). Where the
// policy does not, norm_grads does that pass (Note [Norm gradients in one
// pass] in reg_common.h).
template <typename T>
struct GainSums {
  int64_t n = 0;           // columns
  double* gain = nullptr;  // [slots, n]: sum of dy * xhat, or null
  double* bias = nullptr;  // [slots, n]: sum of dy, or null

  // Adds one row's dy(j) * xhat(j) and dy(j), j in [0, n).
  template <typename Row, typename Dy, typename Xhat>
  FUSEDRNN_HOST_DEVICE void add(const Row& row, const Dy& dy, const Xhat& xhat) const {
    double* g = gain ? gain + row.slot() * n : nullptr;
    double* s = bias ? bias + row.slot() * n : nullptr;
    with_flag(g != nullptr, [&](auto has_gain) {  // Note [Branch-free row loops]
      with_flag(s != nullptr, [&](auto has_bias) {
        constexpr bool kGain = std::decay_t<decltype(has_gain)>::value;
        constexpr bool kBias = std::decay_t<decltype(has_bias)>::value;
        if constexpr (kGain || kBias) {
          row.loop(n, [&](int64_t j) {
            const double d = static_cast<double>(dy(j));
            if constexpr (kGain) g[j] += d * static_cast<double>(xhat(j));
            if constexpr (kBias) s[j] += d;
          });
        }
      });
    });
  }
};

// LN(a) * gain of the recurrent product, in place: a [n] <- LN(a) * gain,
// norm [n] <- LN(a) when saved. Returns rstd.
template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE T ln_recurrent(const Row& row, T* a, int64_t n, const T* gain, T* norm) {
  T mean, rstd;
  ln_stats(row, a, n, mean, rstd);
  with_flag(norm != nullptr, [&](auto saved) {
    row.loop(n, [&](int64_t k) {
      const T v = (a[k] - mean) * rstd;
      if constexpr (decltype(saved)::value) norm[k] = v;
      a[k] = v * gain[k];
    });
  });
  return rstd;
}

// Note [Input norm recomputed]
// The input side of layer norm, LN(x) * ln_ih + b_ih with x a row of x_proj,
// is computed per row into scratch (the row's x from there on). Training
// saves only the row's mean and rstd: backward recomputes LN(x) from x_proj,
// which autograd keeps anyway, instead of reading a saved [N, G*H] copy that
// forward would have had to write.
template <typename T>
struct InputNorm {
  const T* ln_ih = nullptr;  // [n] or null: the row's x is x_proj's
  const T* b_ih = nullptr;   // [n] or null
  T* xs = nullptr;           // [B, n] scratch: LN(x) * ln_ih + b_ih

  // Row b's x for the gates: x [n] itself, or its normalised copy (mean and
  // rstd into st[0], st[1] when st is non-null).
  template <typename Row>
  FUSEDRNN_HOST_DEVICE const T* row_x(const Row& row, const T* x, int64_t n, int64_t b,
                                      T* st) const {
    if (!ln_ih) return x;
    T mean, rstd;
    ln_stats(row, x, n, mean, rstd);
    T* out = xs + b * n;
    with_flag(b_ih != nullptr, [&](auto has_bias) {  // Note [Branch-free row loops]
      row.loop(n, [&](int64_t k) {
        T y = (x[k] - mean) * rstd * ln_ih[k];
        if constexpr (decltype(has_bias)::value) y += b_ih[k];
        out[k] = y;
      });
    });
    if (st && row.leader()) {
      st[0] = mean;
      st[1] = rstd;
    }
    return out;
  }
};

// Backward of InputNorm for one row: dx [n] (dL/d the normalised x) through
// LN(x) * ln_ih into dx_raw [n], given x [n] and st[0], st[1] as row_x saved;
// ln_ih's and b_ih's gradients into sums where asked.
template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE void ln_input_backward(const Row& row, int64_t n, const T* ln_ih,
                                            const T* x, const T* st, const T* dx, T* dx_raw,
                                            const GainSums<T>& sums) {
  const T mean = st[0], rstd = st[1];
  const auto dy = [&](int64_t k) { return dx[k]; };
  const auto xhat = [&](int64_t k) { return (x[k] - mean) * rstd; };
  ln_backward(row, n, ln_ih, rstd, dy, xhat, dx_raw);
  sums.add(row, dy, xhat);
}

// ------------------------------------------------------------------ hidden state
// Where a new hidden state goes: zoneout, then the state, the output and the
// masked copy the next step's GEMM reads.
template <typename T>
struct HiddenOut {
  int64_t P = 0;
  const T* zone_h = nullptr;    // [rows, P] or null
  const T* rec_mask = nullptr;  // [B, P] or null
  T* h = nullptr;               // [B, P] h_{t-1} in, h_t out
  T* hm = nullptr;              // [B, P] rec_mask * h_t, or null (no mask)
  T* out = nullptr;             // [rows, P] output rows

  // Stores row b of h~ from src [P] (which may be that output row itself).
  template <typename Row>
  FUSEDRNN_HOST_DEVICE void store_row(const Row& row, int64_t b, const T* src) const {
    const T* zr = zone_h ? zone_h + b * P : nullptr;
    const T* mr = rec_mask ? rec_mask + b * P : nullptr;
    T* hr = h + b * P;
    T* hmr = hm ? hm + b * P : nullptr;
    T* orow = out + b * P;
    with_flag(zr != nullptr, [&](auto zone) {
      with_flag(hmr != nullptr, [&](auto masked) {
        row.loop(P, [&](int64_t j) {
          T v = src[j];
          if constexpr (decltype(zone)::value) v = zoneout(zr[j], hr[j], v);
          hr[j] = v;
          orow[j] = v;
          if constexpr (decltype(masked)::value) hmr[j] = mr[j] * v;
        });
      });
    });
  }
};

// The gradient reaching h_t: from outside (grad_out), from the next step's
// zoneout (dh), and through the next step's GEMM (dh_mm = da W_hh, masked
// here, Note [Deferred recurrent gradient] in reg_lstm.h).
template <typename T>
struct HiddenGrad {
  int64_t P = 0;
  const T* grad_out = nullptr;  // [rows, P]
  const T* zone_h = nullptr;    // [rows, P] or null
  const T* rec_mask = nullptr;  // [B, P] or null
  T* dh = nullptr;              // [B, P] in/out
  const T* dh_mm = nullptr;     // [B, P]

  // Row b: dst [P] <- dL/dh~_t; dh <- the part of dL/dh_{t-1} that zoneout
  // takes past the cell.
  template <typename Row>
  FUSEDRNN_HOST_DEVICE void take_row(const Row& row, int64_t b, T* dst) const {
    const T* g = grad_out + b * P;
    const T* zr = zone_h ? zone_h + b * P : nullptr;
    const T* mr = rec_mask ? rec_mask + b * P : nullptr;
    const T* mm = dh_mm + b * P;
    T* dr = dh + b * P;
    with_flag(zr != nullptr, [&](auto zone) {
      with_flag(mr != nullptr, [&](auto masked) {
        row.loop(P, [&](int64_t j) {
          T d = g[j] + dr[j];
          if constexpr (decltype(masked)::value) {
            d += mr[j] * mm[j];
          } else {
            d += mm[j];
          }
          if constexpr (decltype(zone)::value) {
            dr[j] = zr[j] * d;
            dst[j] = (T(1) - zr[j]) * d;
          } else {
            dr[j] = T(0);
            dst[j] = d;
          }
        });
      });
    });
  }
};

// A hidden state computed apart (the LSTM's projection h~ W_hr^T), stored.
template <typename T>
struct HiddenOutRows {
  int64_t rows = 0;
  const T* h_new = nullptr;  // [rows, P]
  HiddenOut<T> dst;
};

template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE void run_row(const Row& row, const HiddenOutRows<T>& a, int64_t b) {
  a.dst.store_row(row, b, a.h_new + b * a.dst.P);
}

// The gradient of a hidden state computed apart: dh~ [rows, P] out.
template <typename T>
struct HiddenGradRows {
  int64_t rows = 0;
  HiddenGrad<T> src;
  T* dh_new = nullptr;  // [rows, P]
};

template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE void run_row(const Row& row, const HiddenGradRows<T>& a, int64_t b) {
  a.src.take_row(row, b, a.dh_new + b * a.src.P);
}

}  // namespace reg
}  // namespace fusedrnn
