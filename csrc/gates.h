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
#define FUSEDRNN_GATE_MATH FUSEDRNN_HOST_DEVICE
#else
#define FUSEDRNN_HOST_DEVICE inline
// Note [activations inlined]
// The gate math of a tile (three sigmoids and two tanh per LSTM unit) is a
// few chains of dependent FMAs; only inlined into the epilogue do the
// chains of a row's gates interleave. GCC's inliner left sigmoid and tanh
// as calls in the bfloat16 LSTM forward (not in float32), where the
// products run twice as fast and the gate math weighs twice as much. Forced
// inline, 2-core AMD EPYC (Zen 4), the bfloat16 LSTM forward op at T=100
// B=64 I=H=512, alternating processes: 38.6-42.7 -> 36.2-36.8 ms (gate
// math 21% -> 15% of the products' samples); float32 unchanged. The tile
// products stay calls (mma_tile in x86/panel_gemm.h), so that the hot loop's
// code does not move with the inliner's budget. Only this file's gate math
// (and the vector exp_/tanh_ of x86/) is forced; other host code keeps inline.
#define FUSEDRNN_GATE_MATH inline __attribute__((always_inline))
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
// pointwise loop from vectorising. These branch-free versions vectorise with
// -O3, and x86/vec16.h and vec8.h compute the same, a vector at a time, lane
// for lane. Device code and double keep the library functions.
//
// exp: Cephes' range reduction and polynomial (within 2 ulp of libm).
// Note [Saturated exp]: as libm's, it overflows to inf; at the bottom it
// stops at exp(kExpMin), a normal number, where libm's goes on through the
// subnormals to 0. Its one use is the sigmoid 1 / (1 + exp(-x)), to which
// both give exactly 1 (1 + 1.6e-38 rounds to 1), so a saturated gate is
// exactly 0 or 1, its derivative exactly 0, and 0 * inf gives NaN where
// torch.nn's does. A subnormal result would cost a microcode assist on x86
// (about 250 cycles a vector against 12): the GRU forward with saturated
// gates (T=100 B=16 H=512, inputs times 100, 2-core Xeon) took 23 ms with
// exp going to 0, 19.5 ms with it stopping, as on ordinary inputs. Clamping
// x to [kExpMin, kExpMax] (NaN passes) keeps inf out of the reduction, and
// past the top the result is inf already, so no lane needs a select: y * 2^n
// rounds once, as AVX-512's scalef does, and 2^n is two normal factors
// (y * 2^h is exact).
constexpr float kExpMax = 89.0f;   // exp(88.73) overflows float
constexpr float kExpMin = -87.0f;  // exp(-87) = 1.6e-38, normal (from -87.34 on)
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {5.0000001201e-1f, 1.6666665459e-1f, 4.1665795894e-2f,
                               8.3334519073e-3f, 1.3981999507e-3f, 1.9875691500e-4f};

// Note [rational tanh]
// tanh(x) = x P(x^2) / Q(x^2) on |x| < kTanhClamp, P of degree 6 and Q of
// degree 3 (coefficients below, lowest first; P(0) = Q(0) = 1, so tiny x give
// x), held within [-1, 1]; +-1 exactly from kTanhClamp on, so inf gives +-1.
// The coefficients were fitted for the least maximum relative error of the
// float32 evaluation below, which is within 4.7 ulp of tanh over all floats
// on the vector paths and 5.7 on the generic one (no FMA; measured,
// tests/test_activations.py); the exp-based form it replaced was within 2.
// It takes half the instructions of that form, whose gate math was a fifth of
// the fused LSTM forward's time on AVX-512: the forward op (T=100, B=64,
// I=H=512, 2-core AMD EPYC) went from 16.1-17.0 to 15.2-15.7 ms in bfloat16
// and from 30.9-31.3 to 29.3-29.8 ms in float32, with the exp below.
constexpr float kTanhClamp = 9.0f;  // float tanh is 1 from 9.01 on, 1 - 2^-24 before
constexpr float kTanhP[7] = {1.0f, 0.13085774f, 0.0031058898f, 1.1173529e-05f,
                             -2.0297295e-08f, 5.309517e-11f, -8.5621526e-14f};
constexpr float kTanhQ[4] = {1.0f, 0.46419102f, 0.02450298f, 0.00025489012f};

// Note [vector double activations]
// x86/vec8d.h (AVX-512) and vec4d.h (AVX2) compute exp and tanh of doubles
// with Cephes' rational approximations, within about 2 ulp of libm (which
// the generic loop calls): exp(x) = 2^n exp(r), |r| <= ln2 / 2, exp(r) = 1 +
// 2 r P(r^2) / (Q(r^2) - r P(r^2)); tanh(x) = x + x^3 P(x^2) / Q(x^2) for
// |x| < kTanhSmallD, else sign(x) (1 - e) / (1 + e), e = exp(-2|x|).
// Coefficients highest degree first; tanh's Q is monic (its 1 not stored).
constexpr double kExpMaxD = 7.09782712893383996843e2;   // log(DBL_MAX)
constexpr double kExpMinD = -7.08396418532264106224e2;  // log(2^-1022)
constexpr double kLog2eD = 1.4426950408889634073599;
constexpr double kLn2HiD = 6.93145751953125e-1;
constexpr double kLn2LoD = 1.42860682030941723212e-6;
constexpr double kExpPD[3] = {1.26177193074810590878e-4, 3.02994407707441961300e-2,
                              9.99999999999999999910e-1};
constexpr double kExpQD[4] = {3.00198505138664455042e-6, 2.52448340349684104192e-3,
                              2.27265548208155028766e-1, 2.00000000000000000009e0};
constexpr double kTanhSmallD = 0.625;
constexpr double kTanhPD[3] = {-9.64399179425052238628e-1, -9.92877231001918586564e1,
                               -1.61468768441708447952e3};
constexpr double kTanhQD[3] = {1.12811678491632931402e2, 2.23548839060100448583e3,
                               4.84406305325125486048e3};

inline float pow2_bits(float k) {  // 2^k, k an integer in [-126, 127]
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline float host_expf(float x) {
  const float xc = x > kExpMax ? kExpMax : (x < kExpMin ? kExpMin : x);  // NaN passes
  const float n = std::floor(xc * kLog2e + 0.5f);
  const float r = xc - n * kLn2Hi - n * kLn2Lo;
  float p = kExpPoly[5];
  for (int k = 4; k >= 0; --k) p = p * r + kExpPoly[k];
  const float y = p * r * r + r + 1.0f;
  const float h = std::floor(n * 0.5f);
  return y * pow2_bits(h) * pow2_bits(n - h);
}

inline float host_tanhf(float x) {
  const float xc = x > kTanhClamp ? kTanhClamp : (x < -kTanhClamp ? -kTanhClamp : x);
  const float s = xc * xc;
  float p = kTanhP[6];
  for (int k = 5; k >= 0; --k) p = p * s + kTanhP[k];
  float q = kTanhQ[3];
  for (int k = 2; k >= 0; --k) q = q * s + kTanhQ[k];
  const float t = xc * p / q;
  return t > 1.0f ? 1.0f : (t < -1.0f ? -1.0f : t);  // NaN passes
}

FUSEDRNN_GATE_MATH float exp_(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return expf(x);
#else
  return host_expf(x);
#endif
}
FUSEDRNN_GATE_MATH double exp_(double x) { return exp(x); }

FUSEDRNN_GATE_MATH float tanh_(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return tanhf(x);
#else
  return host_tanhf(x);
#endif
}
FUSEDRNN_GATE_MATH double tanh_(double x) { return tanh(x); }

template <typename acc_t>
FUSEDRNN_GATE_MATH acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_(-x));
}

}  // namespace math

// ---------------------------------------------------------------- LSTM
// Forward for one hidden unit: pre-activations in, activated gates, the new
// cell state and the (unprojected) hidden output out.
template <typename acc_t>
FUSEDRNN_GATE_MATH void lstm_forward_point(
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
FUSEDRNN_GATE_MATH void lstm_backward_point(
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
FUSEDRNN_GATE_MATH void gru_gates_point(acc_t xr, acc_t xz, acc_t hr,
                                          acc_t hz, acc_t& r, acc_t& z) {
  using math::sigmoid;
  r = sigmoid(xr + hr);
  z = sigmoid(xz + hz);
}

template <typename acc_t>
FUSEDRNN_GATE_MATH void gru_output_point(acc_t xn, acc_t hn, acc_t r,
                                           acc_t z, acc_t h_prev, acc_t& n,
                                           acc_t& h) {
  using math::tanh_;
  n = tanh_(xn + r * hn);
  h = (acc_t(1) - z) * n + z * h_prev;
}

// reset_after=false (classic form): hn already is W_hn (r*h) + b_hn, so r
// does not enter n again.
template <typename acc_t>
FUSEDRNN_GATE_MATH void gru_forward_point(
    acc_t xr, acc_t xz, acc_t xn, acc_t hr, acc_t hz, acc_t hn, acc_t h_prev,
    acc_t& r, acc_t& z, acc_t& n, acc_t& h, bool reset_after = true) {
  gru_gates_point(xr, xz, hr, hz, r, z);
  gru_output_point(xn, hn, reset_after ? r : acc_t(1), z, h_prev, n, h);
}

// Classic form, before the W_hn matmul: r * h_prev.
template <typename acc_t>
FUSEDRNN_GATE_MATH acc_t gru_reset_point(acc_t xr, acc_t hr, acc_t h_prev) {
  using math::sigmoid;
  return sigmoid(xr + hr) * h_prev;
}

// Classic form, backward through r * h_prev given d(r h) = drh: the r
// pre-activation gradient and the part of dh_{t-1} through r * h.
template <typename acc_t>
FUSEDRNN_GATE_MATH void gru_reset_backward_point(acc_t r, acc_t h_prev, acc_t drh,
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
FUSEDRNN_GATE_MATH void gru_backward_point(
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
