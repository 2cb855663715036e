// Float transposes of 16 x 16 (AVX-512) and 8 x 8 (AVX2) blocks, for packing
// weight rows into the k-major panels of the fused GEMMs: a transposed copy
// element by element costs more than the product it feeds at batch 1 (about
// 85 us for a 1 MB W_hh, against 20 us for ATen's whole addmm of one step).
// Each instruction set's translation unit instantiates its own width.
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

// The same for 8 x 8 blocks (AVX2): c < 8, k < nk (<= 8).
template <int Lanes>
void transpose8(const float* src, int64_t lds, int nrows, int nk, float* dst, int64_t ldd) {
  static_assert(Lanes == 8, "8 x 8 transposes are AVX2's");
  const __m256i km =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(nk), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 r[8], t[8];
  for (int c = 0; c < 8; ++c) {
    r[c] = c >= nrows ? _mm256_setzero_ps()
           : nk >= 8  ? _mm256_loadu_ps(src + c * lds)
                      : _mm256_maskload_ps(src + c * lds, km);
  }
  // 32-bit, then 64-bit interleaves within 128-bit lanes (k and k + 4 of four
  // rows in each register), then the lanes across registers.
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    r[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
    r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xee);
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int k = 0; k < nk; ++k) _mm256_storeu_ps(dst + k * ldd, t[k]);
}

// Whether transpose_block has blocks of this many floats (the vectors of
// AVX2 and AVX-512).
constexpr bool has_transpose_block(int64_t lanes) { return lanes == 8 || lanes == 16; }

// A Lanes x Lanes block by the transpose of the instruction set.
template <int Lanes>
void transpose_block(const float* src, int64_t lds, int nrows, int nk, float* dst, int64_t ldd) {
  if constexpr (Lanes == 16) {
    transpose16<Lanes>(src, lds, nrows, nk, dst, ldd);
  } else {
    transpose8<Lanes>(src, lds, nrows, nk, dst, ldd);
  }
}

// Rows row0.. of w [*, K] (nrows of them, at most Lanes; zeros after) as
// columns c0..c0+Lanes-1 of a panel [K][width]: panel[k][c0 + c] = w[row0 + c][k].
template <int Lanes>
void pack_rows_into_panel(const float* w, int64_t K, int nrows, float* panel,
                                 int64_t width, int64_t c0) {
  for (int64_t k0 = 0; k0 < K; k0 += Lanes) {
    const int nk = static_cast<int>(K - k0 < Lanes ? K - k0 : Lanes);
    transpose_block<Lanes>(w + k0, K, nrows, nk, panel + k0 * width + c0, width);
  }
}

// Panel p of w [N, KU] read as B = w^T, in 32-bit units (a float, or a pair
// of bfloat16 along k): panel[k][c] = w[W p + c][k], 0 beyond N; W a
// multiple of Lanes.
template <int64_t W, int Lanes>
void pack_units_panel(const float* w, int64_t N, int64_t KU, int64_t p, float* panel) {
  static_assert(W % Lanes == 0, "whole transposes");
  for (int64_t c0 = 0; c0 < W; c0 += Lanes) {
    const int64_t row = p * W + c0;
    const int rows = static_cast<int>(row >= N ? 0 : (N - row < Lanes ? N - row : Lanes));
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
