// Vec4d: 4 doubles in one AVX2 register, the float64 counterpart of vec8.h
// and the AVX2 counterpart of vec8d.h: the operators and exp_/tanh_ of
// gates.h, and the register operations of the GEMM (panel_gemm.h).
//
// Only for code compiled for AVX2 and FMA (Note [ISA translation units] in
// fused_ops.h). exp_ and tanh_ compute what vec8d.h's do, lane for lane
// (Note [vector double activations] in gates.h), with the same saturation and
// NaN behaviour.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../gates.h"

namespace fusedrnn {
namespace cpu {
namespace simd {

struct Vec4d {
  using T = double;  // the element type
  using Reg = __m256d;
  // A tail of n < 4 lanes, as vec8.h's (Note [AVX2 tail masks]).
  struct Mask {
    __m256i lanes;
    bool full;
  };
  static constexpr int kLanes = 4;
  static constexpr int kRegs = 16;  // ymm registers
  // Column panels (backward, linear): 2 vectors, 8 columns; tiles of 12
  // accumulators, as vec8.h's.
  static constexpr int kColumnNV = 2;
  static constexpr int rows_per_tile(int nv) { return 12 / nv; }
  // Fewest accumulators a tile product keeps (Note [partial sums for a tile
  // of few accumulators] in panel_gemm.h): two FMA pipes of latency 4.
  static constexpr int kMinChains = 8;

  __m256d v;
  Vec4d() = default;
  Vec4d(__m256d x) : v(x) {}  // NOLINT: implicit on purpose
  Vec4d(double x) : v(_mm256_set1_pd(x)) {}  // NOLINT
  static Mask mask(int64_t n) {
    if (n >= kLanes) return {_mm256_set1_epi64x(-1), true};
    const __m256i index = _mm256_setr_epi64x(0, 1, 2, 3);
    return {_mm256_cmpgt_epi64(_mm256_set1_epi64x(n), index), false};
  }
  static Vec4d load(const double* p, Mask m) {
    return m.full ? _mm256_loadu_pd(p) : _mm256_maskload_pd(p, m.lanes);
  }
  void store(double* p, Mask m) const {
    if (m.full) {
      _mm256_storeu_pd(p, v);
    } else {
      _mm256_maskstore_pd(p, m.lanes, v);
    }
  }

  // The GEMM's registers.
  static Reg zero() { return _mm256_setzero_pd(); }
  static Reg loadu(const double* p) { return _mm256_loadu_pd(p); }
  static void storeu(double* p, Reg r) { _mm256_storeu_pd(p, r); }
  static Reg set1(double x) { return _mm256_set1_pd(x); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_pd(a, b, c); }
  static T sum(Reg r) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(r), _mm256_extractf128_pd(r, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};

inline Vec4d operator+(Vec4d a, Vec4d b) { return _mm256_add_pd(a.v, b.v); }
inline Vec4d operator-(Vec4d a, Vec4d b) { return _mm256_sub_pd(a.v, b.v); }
inline Vec4d operator*(Vec4d a, Vec4d b) { return _mm256_mul_pd(a.v, b.v); }
inline Vec4d operator/(Vec4d a, Vec4d b) { return _mm256_div_pd(a.v, b.v); }
inline Vec4d operator-(Vec4d a) { return _mm256_xor_pd(a.v, _mm256_set1_pd(-0.0)); }

// 2^k for integer k in [-1022, 1023], from its exponent bits.
inline __m256d pow2_bits(__m256d k) {
  const __m256i e = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(k));
  return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(e, _mm256_set1_epi64x(1023)), 52));
}

// Note [vector double activations] in gates.h.
FUSEDRNN_GATE_MATH Vec4d exp_(Vec4d x) {
  constexpr double kMax = math::kExpMaxD, kMin = math::kExpMinD;
  // min/max return their second operand when either is NaN: x goes second so
  // that a NaN survives the clamp (and the result is NaN, as std::exp's).
  const __m256d xc =
      _mm256_max_pd(_mm256_set1_pd(kMin), _mm256_min_pd(_mm256_set1_pd(kMax), x.v));
  const __m256d n = _mm256_floor_pd(
      _mm256_fmadd_pd(xc, _mm256_set1_pd(math::kLog2eD), _mm256_set1_pd(0.5)));
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(math::kLn2HiD), xc);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(math::kLn2LoD), r);
  const __m256d r2 = _mm256_mul_pd(r, r);
  __m256d p = _mm256_set1_pd(math::kExpPD[0]);
#pragma GCC unroll 2
  for (int k = 1; k < 3; ++k) p = _mm256_fmadd_pd(p, r2, _mm256_set1_pd(math::kExpPD[k]));
  p = _mm256_mul_pd(p, r);
  __m256d q = _mm256_set1_pd(math::kExpQD[0]);
#pragma GCC unroll 3
  for (int k = 1; k < 4; ++k) q = _mm256_fmadd_pd(q, r2, _mm256_set1_pd(math::kExpQD[k]));
  const __m256d y = _mm256_fmadd_pd(_mm256_set1_pd(2.0),
                                    _mm256_div_pd(p, _mm256_sub_pd(q, p)), _mm256_set1_pd(1.0));
  // y * 2^h * 2^(n - h), y * 2^h exact, so one rounding, as vec8d.h's scalef
  // (n reaches 1024 at the top, beyond one factor's exponent range).
  const __m256d h = _mm256_floor_pd(_mm256_mul_pd(n, _mm256_set1_pd(0.5)));
  const __m256d scaled =
      _mm256_mul_pd(_mm256_mul_pd(y, pow2_bits(h)), pow2_bits(_mm256_sub_pd(n, h)));
  // Note [Saturated exp] in gates.h: inf past the top, 0 past the bottom.
  const __m256d over = _mm256_cmp_pd(x.v, _mm256_set1_pd(kMax), _CMP_GT_OQ);
  const __m256d under = _mm256_cmp_pd(x.v, _mm256_set1_pd(kMin), _CMP_LT_OQ);
  const __m256d e = _mm256_blendv_pd(scaled, _mm256_set1_pd(__builtin_inf()), over);
  return _mm256_blendv_pd(e, _mm256_setzero_pd(), under);
}

// Note [vector double activations] in gates.h.
FUSEDRNN_GATE_MATH Vec4d tanh_(Vec4d x) {
  const __m256d sign = _mm256_set1_pd(-0.0);
  const __m256d a = _mm256_andnot_pd(sign, x.v);
  const __m256d x2 = _mm256_mul_pd(x.v, x.v);
  __m256d p = _mm256_set1_pd(math::kTanhPD[0]);
#pragma GCC unroll 2
  for (int k = 1; k < 3; ++k) p = _mm256_fmadd_pd(p, x2, _mm256_set1_pd(math::kTanhPD[k]));
  __m256d q = _mm256_add_pd(x2, _mm256_set1_pd(math::kTanhQD[0]));
#pragma GCC unroll 2
  for (int k = 1; k < 3; ++k) q = _mm256_fmadd_pd(q, x2, _mm256_set1_pd(math::kTanhQD[k]));
  // The sign bit ORed back in keeps tanh(-0) = -0.
  const __m256d small = _mm256_or_pd(
      _mm256_fmadd_pd(_mm256_mul_pd(x.v, x2), _mm256_div_pd(p, q), x.v), _mm256_and_pd(sign, x.v));
  const __m256d e = exp_(Vec4d(_mm256_mul_pd(a, _mm256_set1_pd(-2.0)))).v;
  const __m256d one = _mm256_set1_pd(1.0);
  const __m256d big_abs = _mm256_div_pd(_mm256_sub_pd(one, e), _mm256_add_pd(one, e));
  const __m256d big = _mm256_or_pd(big_abs, _mm256_and_pd(sign, x.v));
  const __m256d is_small = _mm256_cmp_pd(a, _mm256_set1_pd(math::kTanhSmallD), _CMP_LT_OQ);
  return _mm256_blendv_pd(big, small, is_small);
}

}  // namespace simd
}  // namespace cpu
}  // namespace fusedrnn
