// Pointwise LSTM and GRU math, forward and backward, written once for the CPU
// and the GPU. Kernels only index, convert to the accumulation type `acc_t`,
// call these functions and store. `acc_t` may also be a SIMD vector type
// (x86/vec16.h, vec8.h) that brings its own exp_/tanh_, found by
// argument-dependent lookup: the calls below are unqualified on purpose.
//
// Gate order is torch's: LSTM (i, f, g, o), GRU (r, z, n). Arguments named
// `*_pre` are pre-activations; others are activated values.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDRNN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDRNN_HOST_DEVICE inline
#endif

namespace fusedrnn {

constexpr int kLstmGates = 4;  // i, f, g, o
constexpr int kGruGates = 3;   // r, z, n
// The GRU saves r, z, n and the recurrent n pre-activation W_hn h + b_hn,
// which backward needs for dr.
constexpr int kGruSaved = 4;

namespace math {

// Note [host float activations]
// On the host, float exp/tanh from libm are scalar calls that keep the
// pointwise loop from vectorising. These branch-free versions (Cephes' range
// reduction and polynomials, within ~2 ulp of libm) vectorise with -O3. Device
// code and double keep the library functions.
inline float host_expf(float x) {
  constexpr float kMax = 88.3762626647949f;
  constexpr float kMin = -87.3365447504019f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  const float xc = x > kMax ? kMax : (x < kMin ? kMin : x);  // NaN passes through
  float n = std::floor(xc * kLog2e + 0.5f);
  float r = xc - n * kLn2Hi - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  // Note [Saturated exp]: past the clamp, libm's exp overflows to inf and
  // underflows to 0. So must ours: a saturated gate is then exactly 0 or 1, its
  // derivative exactly 0, and 0 * inf gives NaN where torch.nn's does.
  return x > kMax ? INFINITY : (x < kMin ? 0.0f : y * scale);
}

inline float host_tanhf(float x) {
  float a = std::fabs(x);
  // |x| < 0.625: odd polynomial, avoids the cancellation in 1 - e.
  float x2 = x * x;
  float p = -5.70498872745e-3f;
  p = p * x2 + 2.06390887954e-2f;
  p = p * x2 - 5.37397155531e-2f;
  p = p * x2 + 1.33314422036e-1f;
  p = p * x2 - 3.33332819422e-1f;
  float small = x + x * x2 * p;
  float e = host_expf(-2.0f * a);
  float big = std::copysign((1.0f - e) / (1.0f + e), x);
  return a < 0.625f ? small : big;
}

FUSEDRNN_HOST_DEVICE float exp_(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return expf(x);
#else
  return host_expf(x);
#endif
}
FUSEDRNN_HOST_DEVICE double exp_(double x) { return exp(x); }

FUSEDRNN_HOST_DEVICE float tanh_(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return tanhf(x);
#else
  return host_tanhf(x);
#endif
}
FUSEDRNN_HOST_DEVICE double tanh_(double x) { return tanh(x); }

template <typename acc_t>
FUSEDRNN_HOST_DEVICE acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_(-x));
}

}  // namespace math

// ---------------------------------------------------------------- LSTM
// Forward for one hidden unit: pre-activations in, activated gates, the new
// cell state and the (unprojected) hidden output out.
template <typename acc_t>
FUSEDRNN_HOST_DEVICE void lstm_forward_point(
    acc_t i_pre, acc_t f_pre, acc_t g_pre, acc_t o_pre, acc_t c_prev,
    acc_t& i, acc_t& f, acc_t& g, acc_t& o, acc_t& c, acc_t& h) {
  using math::sigmoid;
  using math::tanh_;
  i = sigmoid(i_pre);
  f = sigmoid(f_pre);
  g = tanh_(g_pre);
  o = sigmoid(o_pre);
  c = f * c_prev + i * g;
  h = o * tanh_(c);
}

// Backward for one hidden unit. dh: total gradient reaching h_t; dc: gradient
// reaching c_t from step t+1 (or from c_n). Returns the pre-activation
// gradients and the gradient for c_{t-1}.
template <typename acc_t>
FUSEDRNN_HOST_DEVICE void lstm_backward_point(
    acc_t i, acc_t f, acc_t g, acc_t o, acc_t c, acc_t c_prev, acc_t dh,
    acc_t dc, acc_t& di_pre, acc_t& df_pre, acc_t& dg_pre, acc_t& do_pre,
    acc_t& dc_prev) {
  using math::tanh_;
  const acc_t tc = tanh_(c);
  const acc_t dct = dc + dh * o * (acc_t(1) - tc * tc);
  di_pre = dct * g * i * (acc_t(1) - i);
  df_pre = dct * c_prev * f * (acc_t(1) - f);
  dg_pre = dct * i * (acc_t(1) - g * g);
  do_pre = dh * tc * o * (acc_t(1) - o);
  dc_prev = dct * f;
}

// ---------------------------------------------------------------- GRU
// PyTorch/cuDNN form: n = tanh(x_n + r * hn) with hn = W_hn h + b_hn.
// For the classic form (reset before the matmul) the caller passes r = 1 and
// hn = W_hn (r*h) + b_hn, so the same function serves both.
template <typename acc_t>
FUSEDRNN_HOST_DEVICE void gru_gates_point(acc_t xr, acc_t xz, acc_t hr,
                                          acc_t hz, acc_t& r, acc_t& z) {
  using math::sigmoid;
  r = sigmoid(xr + hr);
  z = sigmoid(xz + hz);
}

template <typename acc_t>
FUSEDRNN_HOST_DEVICE void gru_output_point(acc_t xn, acc_t hn, acc_t r,
                                           acc_t z, acc_t h_prev, acc_t& n,
                                           acc_t& h) {
  using math::tanh_;
  n = tanh_(xn + r * hn);
  h = (acc_t(1) - z) * n + z * h_prev;
}

// reset_after=false (classic form): hn already is W_hn (r*h) + b_hn, so r
// does not enter n again.
template <typename acc_t>
FUSEDRNN_HOST_DEVICE void gru_forward_point(
    acc_t xr, acc_t xz, acc_t xn, acc_t hr, acc_t hz, acc_t hn, acc_t h_prev,
    acc_t& r, acc_t& z, acc_t& n, acc_t& h, bool reset_after = true) {
  gru_gates_point(xr, xz, hr, hz, r, z);
  gru_output_point(xn, hn, reset_after ? r : acc_t(1), z, h_prev, n, h);
}

// Classic form, before the W_hn matmul: r * h_prev.
template <typename acc_t>
FUSEDRNN_HOST_DEVICE acc_t gru_reset_point(acc_t xr, acc_t hr, acc_t h_prev) {
  using math::sigmoid;
  return sigmoid(xr + hr) * h_prev;
}

// Classic form, backward through r * h_prev given d(r h) = drh: the r
// pre-activation gradient and the part of dh_{t-1} through r * h.
template <typename acc_t>
FUSEDRNN_HOST_DEVICE void gru_reset_backward_point(acc_t r, acc_t h_prev, acc_t drh,
                                                   acc_t& dr_pre, acc_t& dh_prev) {
  dr_pre = drh * h_prev * r * (acc_t(1) - r);
  dh_prev = drh * r;
}

// Backward for one hidden unit. dh: total gradient reaching h_t.
// dn_pre is the gradient of the tanh argument (= d x_n); dhn = dn_pre * r is
// the gradient of W_hn h + b_hn; dh_direct is the part of dh_{t-1} that does
// not go through the matmul (dh * z). For the classic form the caller passes
// r = 1 (then dhn = dn_pre and dr_pre = 0) and finishes r with
// gru_reset_backward_point once d(r h) = dhn W_hn is known.
template <typename acc_t>
FUSEDRNN_HOST_DEVICE void gru_backward_point(
    acc_t r, acc_t z, acc_t n, acc_t hn, acc_t h_prev, acc_t dh,
    acc_t& dr_pre, acc_t& dz_pre, acc_t& dn_pre, acc_t& dhn,
    acc_t& dh_direct) {
  dn_pre = dh * (acc_t(1) - z) * (acc_t(1) - n * n);
  dz_pre = dh * (h_prev - n) * z * (acc_t(1) - z);
  dr_pre = dn_pre * hn * r * (acc_t(1) - r);
  dhn = dn_pre * r;
  dh_direct = dh * z;
}

}  // namespace fusedrnn
