// Vec8: 8 floats in one AVX2 register, the counterpart of vec16.h for CPUs
// with AVX2 and FMA but no AVX-512: the operators and exp_/tanh_ of gates.h,
// and the register operations of the GEMM (panel_gemm.h).
//
// Only for code compiled for AVX2 and FMA (see Note [ISA translation units] in
// fused_ops.h). exp_ and tanh_ compute what vec16.h's do, lane for lane.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fusedrnn {
namespace cpu {
namespace simd {

struct Vec8 {
  using T = float;  // the element type
  using Reg = __m256;
  // Note [AVX2 tail masks]
  // AVX2 has no mask registers: a tail of n < 8 lanes is read and written with
  // vmaskmovps, which zeroes the lanes it skips on loads and touches no memory
  // beyond the n floats. Masked stores are slow on some AMD cores (Zen 2 and
  // before), and a tail is rare (the last panel of an H that is not a multiple
  // of 8), so full vectors take plain loads and stores: `full` is the same for
  // a whole epilogue row, a branch that predicts perfectly.
  struct Mask {
    __m256i lanes;
    bool full;
  };
  static constexpr int kLanes = 8;
  static constexpr int kRegs = 16;  // ymm registers
  // Column panels (backward, linear): 2 vectors, 16 columns, the width of the
  // classic 6 x 16 AVX2 SGEMM tile (BLIS, OpenBLAS Haswell).
  static constexpr int kColumnNV = 2;
  // Rows of a GEMM tile of nv vectors a row: 12 accumulators, which keep two
  // FMA pipes of latency 4-5 busy; panel_gemm.h fits the operands in the other 4.
  static constexpr int rows_per_tile(int nv) { return 12 / nv; }

  __m256 v;
  Vec8() = default;
  Vec8(__m256 x) : v(x) {}  // NOLINT: implicit on purpose
  Vec8(float x) : v(_mm256_set1_ps(x)) {}  // NOLINT
  static Mask mask(int64_t n) {
    if (n >= kLanes) return {_mm256_set1_epi32(-1), true};
    const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return {_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), index), false};
  }
  static Vec8 load(const float* p, Mask m) {
    return m.full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m.lanes);
  }
  void store(float* p, Mask m) const {
    if (m.full) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, m.lanes, v);
    }
  }

  // The GEMM's registers.
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, Reg r) { _mm256_storeu_ps(p, r); }
  static Reg set1(float x) { return _mm256_set1_ps(x); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
};

inline Vec8 operator+(Vec8 a, Vec8 b) { return _mm256_add_ps(a.v, b.v); }
inline Vec8 operator-(Vec8 a, Vec8 b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec8 operator*(Vec8 a, Vec8 b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec8 operator/(Vec8 a, Vec8 b) { return _mm256_div_ps(a.v, b.v); }
inline Vec8 operator-(Vec8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }

inline Vec8 exp_(Vec8 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-87.3365447504019f);
  // min/max return their second operand when either is NaN: x goes second so
  // that a NaN survives the clamp (and the result is NaN, as std::exp's).
  const __m256 xc = _mm256_max_ps(lo, _mm256_min_ps(hi, x.v));
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  // 2^n from its exponent bits, as gates.h's host_expf: the clamp keeps n in
  // [-126, 127], a normal number, so y * 2^n rounds as vec16.h's scalef does.
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
  // Note [Saturated exp] in gates.h: inf past the top, 0 past the bottom.
  const __m256 over = _mm256_cmp_ps(x.v, hi, _CMP_GT_OQ);
  const __m256 under = _mm256_cmp_ps(x.v, lo, _CMP_LT_OQ);
  return _mm256_andnot_ps(under, _mm256_blendv_ps(e, _mm256_set1_ps(__builtin_inff()), over));
}

inline Vec8 tanh_(Vec8 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign, x.v);
  const __m256 x2 = _mm256_mul_ps(x.v, x.v);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(x.v, x2), p, x.v);
  const __m256 e = exp_(Vec8(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)))).v;
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 big_abs = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  const __m256 big = _mm256_or_ps(big_abs, _mm256_and_ps(sign, x.v));
  const __m256 is_small = _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ);
  return _mm256_blendv_ps(big, small, is_small);
}

}  // namespace simd
}  // namespace cpu
}  // namespace fusedrnn
