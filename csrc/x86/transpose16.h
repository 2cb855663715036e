// 16 x 16 float transposes (AVX-512), for packing weight rows into the
// k-major panels of the fused GEMMs: a transposed copy element by element
// costs more than the product it feeds at batch 1 (about 85 us for a 1 MB
// W_hh, against 20 us for ATen's whole addmm of one step). Only the AVX-512
// translation unit instantiates them.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

namespace fusedrnn {
namespace cpu {

// dst[k * ldd + c] = src[c * lds + k] for c < 16, k < nk (<= 16): row c of
// src is read where c < nrows, and is 0 beyond. (Templates, so that only the
// AVX-512 translation unit, which instantiates them, compiles their bodies.)
template <int Lanes>
void transpose16(const float* src, int64_t lds, int nrows, int nk, float* dst,
                        int64_t ldd) {
  static_assert(Lanes == 16, "16 x 16 transposes need AVX-512");
  const __mmask16 km = nk >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nk) - 1);
  __m512 r[16], t[16];
  for (int c = 0; c < 16; ++c) {
    r[c] = c < nrows ? _mm512_maskz_loadu_ps(km, src + c * lds) : _mm512_setzero_ps();
  }
  // 32-bit, then 64-bit interleaves within 128-bit lanes; then 128-bit lanes
  // across registers in two rounds.
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  for (int k = 0; k < nk; ++k) _mm512_storeu_ps(dst + k * ldd, r[k]);
}

// Rows row0.. of w [*, K] (nrows of them, at most 16; zeros after) as
// columns c0..c0+15 of a panel [K][width]: panel[k][c0 + c] = w[row0 + c][k].
template <int Lanes>
void pack_rows_into_panel(const float* w, int64_t K, int nrows, float* panel,
                                 int64_t width, int64_t c0) {
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int nk = static_cast<int>(K - k0 < 16 ? K - k0 : 16);
    transpose16<Lanes>(w + k0, K, nrows, nk, panel + k0 * width + c0, width);
  }
}

// Panel p of w [N, KU] read as B = w^T, in 32-bit units (a float, or a pair
// of bfloat16 along k): panel[k][c] = w[W p + c][k], 0 beyond N; W a
// multiple of 16.
template <int64_t W, int Lanes>
void pack_units_panel(const float* w, int64_t N, int64_t KU, int64_t p, float* panel) {
  static_assert(W % 16 == 0, "whole 16 x 16 transposes");
  for (int64_t c0 = 0; c0 < W; c0 += 16) {
    const int64_t row = p * W + c0;
    const int rows = static_cast<int>(row >= N ? 0 : (N - row < 16 ? N - row : 16));
    pack_rows_into_panel<Lanes>(w + (row < N ? row : N) * KU, KU, rows, panel, W, c0);
  }
}

// All panels of w, panels [P][KU][W], in parallel.
template <int64_t W, int Lanes>
void pack_units_transposed(const float* w, int64_t N, int64_t KU, float* panels) {
  const int64_t P = (N + W - 1) / W;
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_units_panel<W, Lanes>(w, N, KU, p, panels + p * KU * W);
  });
}

}  // namespace cpu
}  // namespace fusedrnn
