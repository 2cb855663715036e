// Per-row math of the regularised ops (layer norm, zoneout, recurrent
// dropout; fusedrnn/regularisers.py has the definitions), forward and
// backward, written once for the CPU and the GPU. One call handles one batch
// row of one time step: the LN statistics need the whole row, so a row is the
// unit of work. `Row` says how the row's elements are shared out:
//   row.loop(n, f)     f(j) for j in [0, n); every f(j) is visible afterwards
//   row.sum<T>(n, f)   the sum of f(j) over [0, n), known to every caller
//   row.leader()       true for exactly one caller (scalar stores)
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

#include "gates.h"

namespace fusedrnn {
namespace reg {

// fusedrnn.regularisers.LN_EPS.
constexpr double kLnEps = 1e-5;
// Columns of the LSTM's saved per-row statistics.
constexpr int kLstmStats = 3;  // rstd of LN(h W_hh^T), mean and rstd of LN(c)
constexpr int kStatRstdHh = 0, kStatMeanC = 1, kStatRstdC = 2;
constexpr int kGruStats = 1;   // rstd of LN(h W_hh^T)

FUSEDRNN_HOST_DEVICE float rsqrt_(float x) { return 1.0f / sqrtf(x); }
FUSEDRNN_HOST_DEVICE double rsqrt_(double x) { return 1.0 / sqrt(x); }

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

// LN(a) * gain of the recurrent product, in place: a [n] <- LN(a) * gain,
// norm [n] <- LN(a) when saved. Returns rstd.
template <typename T, typename Row>
FUSEDRNN_HOST_DEVICE T ln_recurrent(const Row& row, T* a, int64_t n, const T* gain, T* norm) {
  T mean, rstd;
  ln_stats(row, a, n, mean, rstd);
  row.loop(n, [&](int64_t k) {
    const T v = (a[k] - mean) * rstd;
    if (norm) norm[k] = v;
    a[k] = v * gain[k];
  });
  return rstd;
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

  FUSEDRNN_HOST_DEVICE void store(int64_t b, int64_t j, T h_new) const {
    const int64_t k = b * P + j;
    const T v = zone_h ? zoneout(zone_h[k], h[k], h_new) : h_new;
    h[k] = v;
    out[k] = v;
    if (hm) hm[k] = rec_mask[k] * v;
  }
};

// The gradient reaching h_t: from outside (grad_out), from the next step's
// zoneout (dh), and through the next step's GEMM (dh_mm = da W_hh, masked
// here, Note [Deferred recurrent gradient] in reg_lstm.h). Leaves in dh the
// part of dL/dh_{t-1} that zoneout takes past the cell; returns dL/dh~_t.
template <typename T>
struct HiddenGrad {
  int64_t P = 0;
  const T* grad_out = nullptr;  // [rows, P]
  const T* zone_h = nullptr;    // [rows, P] or null
  const T* rec_mask = nullptr;  // [B, P] or null
  T* dh = nullptr;              // [B, P] in/out
  const T* dh_mm = nullptr;     // [B, P]

  FUSEDRNN_HOST_DEVICE T take(int64_t b, int64_t j) const {
    const int64_t k = b * P + j;
    const T d = grad_out[k] + dh[k] + (rec_mask ? rec_mask[k] * dh_mm[k] : dh_mm[k]);
    if (!zone_h) {
      dh[k] = T(0);
      return d;
    }
    dh[k] = zone_h[k] * d;
    return (T(1) - zone_h[k]) * d;
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
  const int64_t P = a.dst.P;
  row.loop(P, [&](int64_t j) { a.dst.store(b, j, a.h_new[b * P + j]); });
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
  const int64_t P = a.src.P;
  row.loop(P, [&](int64_t j) { a.dh_new[b * P + j] = a.src.take(b, j); });
}

}  // namespace reg
}  // namespace fusedrnn
