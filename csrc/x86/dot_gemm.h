// y = a w^T for a product of a few rows (a [M, K] with M <= dot_max_rows<V>(),
// w [N, K] row-major): each output is a dot product along a row of w, read
// in place. Include only from code compiled for V's instruction set (Note
// [ISA translation units] in fused_ops.h).
//
// Note [dot products for a few rows]
// At M = 1 (a cell's step at batch 1) a panel GEMM does one FMA per panel
// vector it loads, and the panels have to be packed (transposed) from w
// first, which costs more than the product: 305 us for a [1, 1024] times
// w [4096, 1024]^T, against 106-147 us for oneDNN's matmul, on the 2-core AMD
// EPYC. Reading w's rows as they are, R of them at a time against the M rows
// of a, needs no packing; the sums across each accumulator's lanes come once
// per output, at the end: 97 us.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fusedrnn {
namespace cpu {

// Rows of w read together: R accumulators per row of a.
constexpr int kDotRowsOfW = 4;

// Rows of a that dot_gemm takes: MR x R accumulators, R vectors of w and one
// of a in registers.
template <typename V>
constexpr int dot_rows() {
  return (V::kRegs - 1 - kDotRowsOfW) / kDotRowsOfW;
}

// Up to this many rows of a, dot_gemm beats the panel GEMM (which packs w):
// measured with AVX-512 at K = 512, N = 2048: 78 against 100 us at M = 7, 107
// against about 120 us at M = 12, 141 against 132 us at M = 16.
template <typename V>
constexpr int64_t dot_max_rows() {
  return 2 * dot_rows<V>();
}

// out(m0 + m, n) = sum_k a[m][k] w[n][k] (+ bias[n]) for m < MR, n in [n0, n1).
template <typename V, int MR, typename Out>
void dot_rows_range(int64_t K, const typename V::T* a, int64_t lda, const typename V::T* w,
                    const typename V::T* bias, const Out& out, int64_t m0, int64_t n0,
                    int64_t n1) {
  using T = typename V::T;
  using Reg = typename V::Reg;
  constexpr int R = kDotRowsOfW;
  constexpr int64_t L = V::kLanes;
  const int64_t k_full = K / L * L;
  const auto tail = V::mask(K - k_full);
  for (int64_t n = n0; n < n1; n += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, n1 - n));
    const T* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = w + (n + std::min(r, nr - 1)) * K;  // repeats: unused
    Reg acc[MR][R];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[m][r] = V::zero();
    const auto step = [&](const auto& load_w, const auto& load_a) {
      Reg wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wv[r] = load_w(rows[r]);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const Reg av = load_a(a + m * lda);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[m][r] = V::fmadd(av, wv[r], acc[m][r]);
      }
    };
    for (int64_t k = 0; k < k_full; k += L) {
      const auto full = [k](const T* p) { return V::loadu(p + k); };
      step(full, full);
    }
    if (k_full < K) {
      const auto part = [&](const T* p) { return V::load(p + k_full, tail).v; };
      step(part, part);
    }
    for (int m = 0; m < MR; ++m) {
      for (int r = 0; r < nr; ++r) {
        out(m0 + m, n + r) = V::sum(acc[m][r]) + (bias ? bias[n + r] : T(0));
      }
    }
  }
}

// Rows m0..m0+mr of out for n in [n0, n1), mr <= MR.
template <typename V, int MR, typename Out>
void dot_rows_of(int mr, int64_t K, const typename V::T* a, int64_t lda, const typename V::T* w,
                 const typename V::T* bias, const Out& out, int64_t m0, int64_t n0, int64_t n1) {
  if constexpr (MR > 1) {
    if (mr < MR) return dot_rows_of<V, MR - 1>(mr, K, a, lda, w, bias, out, m0, n0, n1);
  }
  dot_rows_range<V, MR>(K, a, lda, w, bias, out, m0, n0, n1);
}

// out(m, n) for all M rows of a and n in [n0, n1), on the calling thread:
// each group of rows of w run against every block of rows of a while it is
// in L1.
template <typename V, typename Out>
void dot_columns(int64_t M, int64_t K, const typename V::T* a, int64_t lda,
                 const typename V::T* w, const typename V::T* bias, const Out& out, int64_t n0,
                 int64_t n1) {
  constexpr int MR = dot_rows<V>();
  for (int64_t g0 = n0; g0 < n1; g0 += kDotRowsOfW) {
    const int64_t g1 = std::min(n1, g0 + kDotRowsOfW);
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
      dot_rows_of<V, MR>(mr, K, a + m0 * lda, lda, w, bias, out, m0, g0, g1);
    }
  }
}

// out(m, n) = (a [M, K] w [N, K]^T)[m][n] (+ bias[n]), out(m, n) a T&: the
// rows of w shared out over the threads in groups (dot_columns).
template <typename V, typename Out>
void dot_gemm(int64_t M, int64_t N, int64_t K, const typename V::T* a, int64_t lda,
              const typename V::T* w, const typename V::T* bias, const Out& out) {
  const int64_t groups = (N + kDotRowsOfW - 1) / kDotRowsOfW;
  const int64_t grain = (groups + at::get_num_threads() - 1) / at::get_num_threads();
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    dot_columns<V>(M, K, a, lda, w, bias, out, g0 * kDotRowsOfW,
                   std::min(N, g1 * kDotRowsOfW));
  });
}

}  // namespace cpu
}  // namespace fusedrnn
