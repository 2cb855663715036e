// Vec8d: 8 doubles in one AVX-512 register, the float64 counterpart of
// vec16.h: the operators and exp_/tanh_ of gates.h, and the register
// operations of the GEMM (panel_gemm.h).
//
// Only for code compiled for AVX-512 (Note [ISA translation units] in
// fused_ops.h). exp_ and tanh_: Note [vector double activations] in gates.h,
// with the saturation and NaN behaviour of vec16.h's.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../gates.h"

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

// Note [vector double activations] in gates.h.
FUSEDRNN_GATE_MATH Vec8d exp_(Vec8d x) {
  constexpr double kMax = math::kExpMaxD, kMin = math::kExpMinD;
  // min/max return their second operand when either is NaN: x goes second so
  // that a NaN survives the clamp (and the result is NaN, as std::exp's).
  const __m512d xc =
      _mm512_max_pd(_mm512_set1_pd(kMin), _mm512_min_pd(_mm512_set1_pd(kMax), x.v));
  const __m512d n = _mm512_roundscale_pd(
      _mm512_fmadd_pd(xc, _mm512_set1_pd(math::kLog2eD), _mm512_set1_pd(0.5)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(math::kLn2HiD), xc);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(math::kLn2LoD), r);
  const __m512d r2 = _mm512_mul_pd(r, r);
  __m512d p = _mm512_set1_pd(math::kExpPD[0]);
#pragma GCC unroll 2
  for (int k = 1; k < 3; ++k) p = _mm512_fmadd_pd(p, r2, _mm512_set1_pd(math::kExpPD[k]));
  p = _mm512_mul_pd(p, r);
  __m512d q = _mm512_set1_pd(math::kExpQD[0]);
#pragma GCC unroll 3
  for (int k = 1; k < 4; ++k) q = _mm512_fmadd_pd(q, r2, _mm512_set1_pd(math::kExpQD[k]));
  const __m512d y = _mm512_fmadd_pd(_mm512_set1_pd(2.0),
                                    _mm512_div_pd(p, _mm512_sub_pd(q, p)), _mm512_set1_pd(1.0));
  // Note [Saturated exp] in gates.h: inf past the top, 0 past the bottom.
  const __mmask8 over = _mm512_cmp_pd_mask(x.v, _mm512_set1_pd(kMax), _CMP_GT_OQ);
  const __mmask8 under = _mm512_cmp_pd_mask(x.v, _mm512_set1_pd(kMin), _CMP_LT_OQ);
  const __m512d e =
      _mm512_mask_blend_pd(over, _mm512_scalef_pd(y, n), _mm512_set1_pd(__builtin_inf()));
  return _mm512_mask_blend_pd(under, e, _mm512_setzero_pd());
}

// Note [vector double activations] in gates.h.
FUSEDRNN_GATE_MATH Vec8d tanh_(Vec8d x) {
  const __m512d sign = _mm512_set1_pd(-0.0);
  const __m512d a = _mm512_andnot_pd(sign, x.v);
  const __m512d x2 = _mm512_mul_pd(x.v, x.v);
  __m512d p = _mm512_set1_pd(math::kTanhPD[0]);
#pragma GCC unroll 2
  for (int k = 1; k < 3; ++k) p = _mm512_fmadd_pd(p, x2, _mm512_set1_pd(math::kTanhPD[k]));
  __m512d q = _mm512_add_pd(x2, _mm512_set1_pd(math::kTanhQD[0]));
#pragma GCC unroll 2
  for (int k = 1; k < 3; ++k) q = _mm512_fmadd_pd(q, x2, _mm512_set1_pd(math::kTanhQD[k]));
  // The sign bit ORed back in keeps tanh(-0) = -0.
  const __m512d small = _mm512_or_pd(
      _mm512_fmadd_pd(_mm512_mul_pd(x.v, x2), _mm512_div_pd(p, q), x.v), _mm512_and_pd(sign, x.v));
  const __m512d e = exp_(Vec8d(_mm512_mul_pd(a, _mm512_set1_pd(-2.0)))).v;
  const __m512d one = _mm512_set1_pd(1.0);
  const __m512d big_abs = _mm512_div_pd(_mm512_sub_pd(one, e), _mm512_add_pd(one, e));
  const __m512d big = _mm512_or_pd(big_abs, _mm512_and_pd(sign, x.v));
  const __mmask8 is_small = _mm512_cmp_pd_mask(a, _mm512_set1_pd(math::kTanhSmallD), _CMP_LT_OQ);
  return _mm512_mask_blend_pd(is_small, big, small);
}

}  // namespace simd
}  // namespace cpu
}  // namespace fusedrnn
