// Vec16: 16 floats in one AVX-512 register: the operators and the exp_/tanh_
// that gates.h uses, so the gate math runs on whole vectors, and the register
// operations of the GEMM (panel_gemm.h). vec8.h has the same for AVX2.
//
// Only for code compiled for AVX-512 (see Note [ISA translation units] in
// fused_ops.h). exp_ and tanh_ compute what the scalar host versions in gates.h
// do (Note [host float activations], Note [rational tanh]).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../gates.h"

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
  // Fewest accumulators a tile product keeps (Note [partial sums for a tile
  // of few accumulators] in panel_gemm.h): 4 take the L2's 64 bytes a cycle.
  static constexpr int kMinChains = 4;

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
  static void stream(float* p, Reg r) { _mm512_stream_ps(p, r); }  // 64-byte aligned p
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static T sum(Reg r) { return _mm512_reduce_add_ps(r); }
};

inline Vec16 operator+(Vec16 a, Vec16 b) { return _mm512_add_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a, Vec16 b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec16 operator*(Vec16 a, Vec16 b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec16 operator/(Vec16 a, Vec16 b) { return _mm512_div_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a) { return _mm512_xor_ps(a.v, _mm512_set1_ps(-0.0f)); }

FUSEDRNN_GATE_MATH Vec16 exp_(Vec16 x) {
  // min/max return their second operand when either is NaN: x goes second so
  // that a NaN survives the clamp (and the result is NaN, as std::exp's).
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(math::kExpMin),
                                  _mm512_min_ps(_mm512_set1_ps(math::kExpMax), x.v));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(xc, _mm512_set1_ps(math::kLog2e), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(math::kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(math::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(math::kExpPoly[5]);
#pragma GCC unroll 5
  for (int k = 4; k >= 0; --k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(math::kExpPoly[k]));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  // Note [Saturated exp] in gates.h: y * 2^n, rounded once: inf past the
  // top, exp(kExpMin) past the bottom.
  return _mm512_scalef_ps(y, n);
}

FUSEDRNN_GATE_MATH Vec16 tanh_(Vec16 x) {  // Note [rational tanh] in gates.h
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-math::kTanhClamp),
                                  _mm512_min_ps(_mm512_set1_ps(math::kTanhClamp), x.v));  // NaN passes
  const __m512 s = _mm512_mul_ps(xc, xc);
  __m512 p = _mm512_set1_ps(math::kTanhP[6]);
#pragma GCC unroll 6
  for (int k = 5; k >= 0; --k) p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(math::kTanhP[k]));
  __m512 q = _mm512_set1_ps(math::kTanhQ[3]);
#pragma GCC unroll 3
  for (int k = 2; k >= 0; --k) q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(math::kTanhQ[k]));
  const __m512 t = _mm512_div_ps(_mm512_mul_ps(xc, p), q);
  return _mm512_max_ps(_mm512_set1_ps(-1.0f), _mm512_min_ps(_mm512_set1_ps(1.0f), t));
}

}  // namespace simd
}  // namespace cpu
}  // namespace fusedrnn
