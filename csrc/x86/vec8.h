// Vec8: 8 floats in one AVX2 register, the counterpart of vec16.h for CPUs
// with AVX2 and FMA but no AVX-512: the operators and exp_/tanh_ of gates.h,
// and the register operations of the GEMM (panel_gemm.h).
//
// Only for code compiled for AVX2 and FMA (see Note [ISA translation units] in
// fused_ops.h). exp_ and tanh_ compute what vec16.h's do, lane for lane.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../gates.h"

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
  // Fewest accumulators a tile product keeps (Note [partial sums for a tile
  // of few accumulators] in panel_gemm.h): two FMA pipes of latency 4.
  static constexpr int kMinChains = 8;

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
  static T sum(Reg r) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

inline Vec8 operator+(Vec8 a, Vec8 b) { return _mm256_add_ps(a.v, b.v); }
inline Vec8 operator-(Vec8 a, Vec8 b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec8 operator*(Vec8 a, Vec8 b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec8 operator/(Vec8 a, Vec8 b) { return _mm256_div_ps(a.v, b.v); }
inline Vec8 operator-(Vec8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }

// 2^k for integer k in [-126, 127], from its exponent bits.
inline __m256 pow2_bits(__m256 k) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
}

FUSEDRNN_GATE_MATH Vec8 exp_(Vec8 x) {
  // min/max return their second operand when either is NaN: x goes second so
  // that a NaN survives the clamp (and the result is NaN, as std::exp's).
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(math::kExpMin),
                                  _mm256_min_ps(_mm256_set1_ps(math::kExpMax), x.v));
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(xc, _mm256_set1_ps(math::kLog2e), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(math::kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(math::kLn2Lo), r);
  __m256 p = _mm256_set1_ps(math::kExpPoly[5]);
#pragma GCC unroll 5
  for (int k = 4; k >= 0; --k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(math::kExpPoly[k]));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  // Note [Saturated exp] in gates.h: y * 2^h * 2^(n - h), y * 2^h exact, so
  // one rounding, as vec16.h's scalef.
  const __m256 h = _mm256_floor_ps(_mm256_mul_ps(n, _mm256_set1_ps(0.5f)));
  return _mm256_mul_ps(_mm256_mul_ps(y, pow2_bits(h)), pow2_bits(_mm256_sub_ps(n, h)));
}

FUSEDRNN_GATE_MATH Vec8 tanh_(Vec8 x) {  // Note [rational tanh] in gates.h
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(-math::kTanhClamp),
                                  _mm256_min_ps(_mm256_set1_ps(math::kTanhClamp), x.v));  // NaN passes
  const __m256 s = _mm256_mul_ps(xc, xc);
  __m256 p = _mm256_set1_ps(math::kTanhP[6]);
#pragma GCC unroll 6
  for (int k = 5; k >= 0; --k) p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(math::kTanhP[k]));
  __m256 q = _mm256_set1_ps(math::kTanhQ[3]);
#pragma GCC unroll 3
  for (int k = 2; k >= 0; --k) q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(math::kTanhQ[k]));
  const __m256 t = _mm256_div_ps(_mm256_mul_ps(xc, p), q);
  return _mm256_max_ps(_mm256_set1_ps(-1.0f), _mm256_min_ps(_mm256_set1_ps(1.0f), t));
}

}  // namespace simd
}  // namespace cpu
}  // namespace fusedrnn
