// Vec16: 16 floats in one AVX-512 register: the operators and the exp_/tanh_
// that gates.h uses, so the gate math runs on whole vectors, and the register
// operations of the GEMM (panel_gemm.h). vec8.h has the same for AVX2.
//
// Only for code compiled for AVX-512 (see Note [ISA translation units] in
// fused_ops.h). exp_ and tanh_ use the same Cephes reductions and polynomials
// as the scalar host versions in gates.h.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fusedrnn {
namespace cpu {
namespace simd {

struct Vec16 {
  using T = float;  // the element type
  using Reg = __m512;
  using Mask = __mmask16;  // the first n lanes of a tail
  static constexpr int kLanes = 16;
  static constexpr int kRegs = 32;  // zmm registers
  // Column panels (backward, linear): 4 vectors, 64 columns.
  static constexpr int kColumnNV = 4;
  // Rows of a GEMM tile of nv vectors a row: at most 24 accumulators.
  static constexpr int rows_per_tile(int nv) { return nv >= 4 ? 6 : 8; }

  __m512 v;
  Vec16() = default;
  Vec16(__m512 x) : v(x) {}  // NOLINT: implicit on purpose
  Vec16(float x) : v(_mm512_set1_ps(x)) {}  // NOLINT
  static Mask mask(int64_t n) { return n >= kLanes ? Mask(0xFFFF) : Mask((1u << n) - 1); }
  static Vec16 load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  void store(float* p, Mask m) const { _mm512_mask_storeu_ps(p, m, v); }

  // The GEMM's registers.
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, Reg r) { _mm512_storeu_ps(p, r); }
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
};

inline Vec16 operator+(Vec16 a, Vec16 b) { return _mm512_add_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a, Vec16 b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec16 operator*(Vec16 a, Vec16 b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec16 operator/(Vec16 a, Vec16 b) { return _mm512_div_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a) { return _mm512_xor_ps(a.v, _mm512_set1_ps(-0.0f)); }

inline Vec16 exp_(Vec16 x) {
  // min/max return their second operand when either is NaN: x goes second so
  // that a NaN survives the clamp (and the result is NaN, as std::exp's).
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-87.3365447504019f),
                                  _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x.v));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  // Note [Saturated exp] in gates.h: inf past the top, 0 past the bottom.
  const __mmask16 over = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(88.3762626647949f), _CMP_GT_OQ);
  const __mmask16 under = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(-87.3365447504019f), _CMP_LT_OQ);
  const __m512 e = _mm512_mask_blend_ps(over, _mm512_scalef_ps(y, n),
                                        _mm512_set1_ps(__builtin_inff()));
  return _mm512_mask_blend_ps(under, e, _mm512_setzero_ps());
}

inline Vec16 tanh_(Vec16 x) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 a = _mm512_andnot_ps(sign, x.v);
  const __m512 x2 = _mm512_mul_ps(x.v, x.v);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(x.v, x2), p, x.v);
  const __m512 e = exp_(Vec16(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)))).v;
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 big_abs = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __m512 big = _mm512_or_ps(big_abs, _mm512_and_ps(sign, x.v));
  const __mmask16 is_small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(is_small, big, small);
}

}  // namespace simd
}  // namespace cpu
}  // namespace fusedrnn
