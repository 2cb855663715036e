// Vec8d: 8 doubles in one AVX-512 register, the float64 counterpart of
// vec16.h: the operators and exp_/tanh_ of gates.h, and the register
// operations of the GEMM (panel_gemm.h).
//
// Only for code compiled for AVX-512 (Note [ISA translation units] in
// fused_ops.h). exp_ and tanh_ are Cephes' double-precision rational
// approximations (within about 2 ulp of libm, which the generic loop calls),
// with the saturation and NaN behaviour of vec16.h's.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fusedrnn {
namespace cpu {
namespace simd {

struct Vec8d {
  using T = double;  // the element type
  using Reg = __m512d;
  using Mask = __mmask8;  // the first n lanes of a tail
  static constexpr int kLanes = 8;
  static constexpr int kRegs = 32;  // zmm registers
  // Column panels (backward, linear): 4 vectors, 32 columns.
  static constexpr int kColumnNV = 4;
  // Rows of a GEMM tile of nv vectors a row: at most 24 accumulators.
  static constexpr int rows_per_tile(int nv) { return nv >= 4 ? 6 : 8; }
  // Fewest accumulators a tile product keeps (Note [partial sums for a tile
  // of few accumulators] in panel_gemm.h): 4 take the L2's 64 bytes a cycle.
  static constexpr int kMinChains = 4;

  __m512d v;
  Vec8d() = default;
  Vec8d(__m512d x) : v(x) {}  // NOLINT: implicit on purpose
  Vec8d(double x) : v(_mm512_set1_pd(x)) {}  // NOLINT
  static Mask mask(int64_t n) { return n >= kLanes ? Mask(0xFF) : Mask((1u << n) - 1); }
  static Vec8d load(const double* p, Mask m) { return _mm512_maskz_loadu_pd(m, p); }
  void store(double* p, Mask m) const { _mm512_mask_storeu_pd(p, m, v); }

  // The GEMM's registers.
  static Reg zero() { return _mm512_setzero_pd(); }
  static Reg loadu(const double* p) { return _mm512_loadu_pd(p); }
  static void storeu(double* p, Reg r) { _mm512_storeu_pd(p, r); }
  static Reg set1(double x) { return _mm512_set1_pd(x); }
  static void stream(double* p, Reg r) { _mm512_stream_pd(p, r); }  // 64-byte aligned p
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_pd(a, b, c); }
  static T sum(Reg r) { return _mm512_reduce_add_pd(r); }
};

inline Vec8d operator+(Vec8d a, Vec8d b) { return _mm512_add_pd(a.v, b.v); }
inline Vec8d operator-(Vec8d a, Vec8d b) { return _mm512_sub_pd(a.v, b.v); }
inline Vec8d operator*(Vec8d a, Vec8d b) { return _mm512_mul_pd(a.v, b.v); }
inline Vec8d operator/(Vec8d a, Vec8d b) { return _mm512_div_pd(a.v, b.v); }
inline Vec8d operator-(Vec8d a) { return _mm512_xor_pd(a.v, _mm512_set1_pd(-0.0)); }

// exp(x) = 2^n exp(r), |r| <= ln2 / 2, with exp(r) = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)).
inline Vec8d exp_(Vec8d x) {
  constexpr double kMax = 7.09782712893383996843e2;   // log(DBL_MAX)
  constexpr double kMin = -7.08396418532264106224e2;  // log(2^-1022)
  // min/max return their second operand when either is NaN: x goes second so
  // that a NaN survives the clamp (and the result is NaN, as std::exp's).
  const __m512d xc =
      _mm512_max_pd(_mm512_set1_pd(kMin), _mm512_min_pd(_mm512_set1_pd(kMax), x.v));
  const __m512d n = _mm512_roundscale_pd(
      _mm512_fmadd_pd(xc, _mm512_set1_pd(1.4426950408889634073599), _mm512_set1_pd(0.5)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93145751953125e-1), xc);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.42860682030941723212e-6), r);
  const __m512d r2 = _mm512_mul_pd(r, r);
  __m512d p = _mm512_set1_pd(1.26177193074810590878e-4);
  p = _mm512_fmadd_pd(p, r2, _mm512_set1_pd(3.02994407707441961300e-2));
  p = _mm512_fmadd_pd(p, r2, _mm512_set1_pd(9.99999999999999999910e-1));
  p = _mm512_mul_pd(p, r);
  __m512d q = _mm512_set1_pd(3.00198505138664455042e-6);
  q = _mm512_fmadd_pd(q, r2, _mm512_set1_pd(2.52448340349684104192e-3));
  q = _mm512_fmadd_pd(q, r2, _mm512_set1_pd(2.27265548208155028766e-1));
  q = _mm512_fmadd_pd(q, r2, _mm512_set1_pd(2.00000000000000000009e0));
  const __m512d y = _mm512_fmadd_pd(_mm512_set1_pd(2.0),
                                    _mm512_div_pd(p, _mm512_sub_pd(q, p)), _mm512_set1_pd(1.0));
  // Note [Saturated exp] in gates.h: inf past the top, 0 past the bottom.
  const __mmask8 over = _mm512_cmp_pd_mask(x.v, _mm512_set1_pd(kMax), _CMP_GT_OQ);
  const __mmask8 under = _mm512_cmp_pd_mask(x.v, _mm512_set1_pd(kMin), _CMP_LT_OQ);
  const __m512d e =
      _mm512_mask_blend_pd(over, _mm512_scalef_pd(y, n), _mm512_set1_pd(__builtin_inf()));
  return _mm512_mask_blend_pd(under, e, _mm512_setzero_pd());
}

// |x| < 0.625: x + x^3 P(x^2) / Q(x^2); else sign(x) (1 - e) / (1 + e), e = exp(-2|x|).
inline Vec8d tanh_(Vec8d x) {
  const __m512d sign = _mm512_set1_pd(-0.0);
  const __m512d a = _mm512_andnot_pd(sign, x.v);
  const __m512d x2 = _mm512_mul_pd(x.v, x.v);
  __m512d p = _mm512_set1_pd(-9.64399179425052238628e-1);
  p = _mm512_fmadd_pd(p, x2, _mm512_set1_pd(-9.92877231001918586564e1));
  p = _mm512_fmadd_pd(p, x2, _mm512_set1_pd(-1.61468768441708447952e3));
  __m512d q = _mm512_add_pd(x2, _mm512_set1_pd(1.12811678491632931402e2));
  q = _mm512_fmadd_pd(q, x2, _mm512_set1_pd(2.23548839060100448583e3));
  q = _mm512_fmadd_pd(q, x2, _mm512_set1_pd(4.84406305325125486048e3));
  // The sign bit ORed back in keeps tanh(-0) = -0.
  const __m512d small = _mm512_or_pd(
      _mm512_fmadd_pd(_mm512_mul_pd(x.v, x2), _mm512_div_pd(p, q), x.v), _mm512_and_pd(sign, x.v));
  const __m512d e = exp_(Vec8d(_mm512_mul_pd(a, _mm512_set1_pd(-2.0)))).v;
  const __m512d one = _mm512_set1_pd(1.0);
  const __m512d big_abs = _mm512_div_pd(_mm512_sub_pd(one, e), _mm512_add_pd(one, e));
  const __m512d big = _mm512_or_pd(big_abs, _mm512_and_pd(sign, x.v));
  const __mmask8 is_small = _mm512_cmp_pd_mask(a, _mm512_set1_pd(0.625), _CMP_LT_OQ);
  return _mm512_mask_blend_pd(is_small, big, small);
}

}  // namespace simd
}  // namespace cpu
}  // namespace fusedrnn
