// The weight gradients of the fused path, for one instruction set's
// vector type V (included by fused_ops.h): dW = dY^T X summed over all
// steps, and db = the column sums of dY.
//
// Note [weight-gradient GEMM]
// dW [M, N] = sum_k dY[k, m] X[k, n] over K = T*B rows (thousands), M = G*H,
// N = H (recurrent) or I (input projection). Both operands are read along k,
// with rows kilobytes apart. Read in place, the MR values of dY that a tile
// broadcasts per k sit in a new cache line at every k, all in the same L1 set
// (a row of 2^n floats apart), and MKL's SGEMM on this shape runs at about
// 40% of the FMA peak on the AMD CPUs we measure (benchmarks/NOTES.md, "CPU
// weight gradients"). So the loop is GotoBLAS's: X is packed once into
// panels as wide as the backward's ([K][kW]: 64 columns on AVX-512, 16 on
// AVX2); each thread owns a range of dY's columns and, per block of kBlockK
// rows and 192 columns, packs that block into tiles of MR columns ([k][MR]),
// reading each row of dY once, contiguously (and 4 rows ahead, prefetched);
// mma_tile then runs every tile of the block against every panel, the
// panel's kBlockK rows (32 KiB) staying in L1 across the block's tiles. The
// column sums db are taken during the same pack, in double. The sums run over
// k in the same order whatever the thread count, so the results do not
// depend on it.
//
// Note [dY's block as rows]
// Where a block is 128 rows deep (AVX-512: 64-column panels) and X is at
// most 4 panels wide, dY's block is not cut into tiles but copied as it is,
// kBlockK rows of 192 columns, and a tile reads its 6 columns of every row in
// place (mma_tile's k stride). The copy is a few vector moves a row where the
// tiles took 192 scalar ones; the rows' stride is an odd number of cache
// lines, so that a tile's 128 lines fall in every L1 set rather than in a
// few. A tile's rows then span two to three times the lines of its packed
// form, read again for every panel of X, so the gain shrinks as X widens
// (the pack's cost per FMA goes as 1 / N). 2-core Xeon, float32, both
// layouts alternating in one process, medians of 40, time as rows / as
// tiles for dY [T*B, 4H], X [T*B, H]: H=128 B=16 0.89, H=256 at B=8, 16 and
// 64 0.96, 0.95 and 0.97, H=384 0.99, H=512 at B=32 and 64 1.00-1.02 (T=100).
// With AVX2's 16-column panels a block is 512 rows deep, a tile's column
// strip no longer fits in L1 beside the panel slice, and the copy was
// slower (1.78 -> 2.09 against ATen's mm, alternating processes): AVX2
// keeps the tiles.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cpu/step_buffers.h"
#include "fused.h"
#include "fused_loop.h"
#include "panel_gemm.h"

namespace fusedrnn {
namespace cpu {
namespace {

// The tile of V's backward panels: AVX-512 6 x 64, AVX2 6 x 16. In: the
// element type of dY and X as packed (V::T, or bfloat16 in k-pairs).
template <typename V, typename In = typename V::T>
struct WeightGradTile {
  static constexpr int kNV = V::kColumnNV;             // vectors per panel of X
  static constexpr int64_t kW = kNV * V::kLanes;       // panel width
  static constexpr int kMR = V::rows_per_tile(kNV);    // columns of dY per tile
  static constexpr int64_t kBlockK =
      32 * 1024 / (kW * static_cast<int64_t>(sizeof(In)));  // a 32 KiB panel slice
  static constexpr int64_t kBlockTiles = 192 / kMR;    // 192 columns of dY per block
  // Note [dY's block as rows]: where (up to kRowsPanels panels of X), and the
  // copied rows' stride (an odd number of cache lines).
  static constexpr bool kRows = std::is_same_v<In, typename V::T> && kBlockK <= 128;
  static constexpr int64_t kRowsPanels = 4;
  static constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(In));
  static constexpr int64_t kLines = (kBlockTiles * kMR + kLine - 1) / kLine;
  static constexpr int64_t kRowStride = (kLines % 2 == 0 ? kLines + 1 : kLines) * kLine;
};

// Row k of the concatenated segments: which segment, and the row within it.
template <typename E>
struct RowIndex {
  const std::vector<GradRowsOf<E>>& segs;
  template <typename F>
  void each(int64_t k0, int64_t k1, F&& f) const {  // f(k, dy_row_index, segment)
    int64_t base = 0;
    for (const GradRowsOf<E>& s : segs) {
      const int64_t lo = std::max(k0, base), hi = std::min(k1, base + s.rows);
      for (int64_t k = lo; k < hi; ++k) f(k, k - base, s);
      base += s.rows;
    }
  }
};

// X in panels, k in groups of KP (1, or 2 for bfloat16 pairs; K2 = K rounded
// up to KP, the padding row 0): packed[q][k / KP][c][k % KP] = X[k][kW q + c],
// 0 beyond N.
template <int64_t kW, int KP, typename E>
at::Tensor pack_x(const RowIndex<E>& rows, int64_t K, int64_t N, const at::TensorOptions& options) {
  const int64_t Q = ceil_div(N, kW), K2 = ceil_div(K, KP) * KP;
  at::Tensor packed = empty_for_steps({Q * K2 * kW}, options);
  E* dst = packed.data_ptr<E>();
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    rows.each(k0, k1, [&](int64_t k, int64_t r, const GradRowsOf<E>& s) {
      const E* x = s.x + r * N;
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t n = std::min(kW, N - q * kW);
        E* row = dst + (q * K2 + k / KP * KP) * kW + k % KP;
        if constexpr (KP == 1) {
          std::copy(x + q * kW, x + q * kW + n, row);
          std::fill(row + n, row + kW, E(0));
        } else {
          for (int64_t c = 0; c < kW; ++c) row[c * KP] = c < n ? x[q * kW + c] : E(0);
        }
      }
    });
  });
  if (K2 > K) {  // the padding row of the last pair
    for (int64_t q = 0; q < Q; ++q) {
      for (int64_t c = 0; c < kW; ++c) dst[(q * K2 + K2 - KP) * kW + c * KP + KP - 1] = E(0);
    }
  }
  return packed;
}

// Note [weight gradients of a few rows]
// With a few rows (a cell's step at small batch), dW is a sum of that many
// outer products and the GEMM's packing costs more than dW itself: at one
// row, M = 3072, N = 1024, 0.50 ms against 0.22 ms for ATen's mm and 0.10 ms
// for torch.outer. Here each thread writes its rows of dW once, each vector
// of a row summed over the rows of X in order.
constexpr int64_t kFewGradRows = 8;

template <typename V>
std::pair<at::Tensor, at::Tensor> weight_grad_few_rows(
    const std::vector<GradRowsOf<typename V::T>>& segs, int64_t M, int64_t N, bool want_db,
    const at::TensorOptions& options) {
  using E = typename V::T;
  using Reg = typename V::Reg;
  const E* dy[kFewGradRows];  // row k of dY [.., M] and of X [.., N]
  const E* x[kFewGradRows];
  int K = 0;
  for (const GradRowsOf<E>& s : segs) {
    for (int64_t r = 0; r < s.rows; ++r, ++K) {
      dy[K] = s.dy + r * M;
      x[K] = s.x + r * N;
    }
  }
  at::Tensor dw = empty_for_steps({M, N}, options);
  at::Tensor db = at::empty({want_db ? M : 0}, options);
  E* w = dw.data_ptr<E>();
  E* b = want_db ? db.data_ptr<E>() : nullptr;
  const int64_t n_full = N / V::kLanes * V::kLanes;
  const auto tail = V::mask(N - n_full);
  at::parallel_for(0, M, ceil_div(M, at::get_num_threads()), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      Reg c[kFewGradRows];
      for (int k = 0; k < K; ++k) c[k] = V::set1(dy[k][m]);
      E* out = w + m * N;
      for (int64_t j = 0; j < n_full; j += V::kLanes) {
        Reg acc = V::zero();
        for (int k = 0; k < K; ++k) acc = V::fmadd(c[k], V::loadu(x[k] + j), acc);
        V::storeu(out + j, acc);
      }
      if (n_full < N) {
        Reg acc = V::zero();
        for (int k = 0; k < K; ++k) acc = V::fmadd(c[k], V::load(x[k] + n_full, tail).v, acc);
        V(acc).store(out + n_full, tail);
      }
      if (b) {
        double sum = 0.0;  // in double, as the GEMM's pack sums
        for (int k = 0; k < K; ++k) sum += static_cast<double>(dy[k][m]);
        b[m] = static_cast<E>(sum);
      }
    }
  });
  return {dw, db};
}

// Note [short products by ATen's mm]
// From 9 to 128 rows the weight gradient's packing of dY and X costs more
// than its product, and MKL's sgemm (ATen's mm) is faster on this shape:
// 2-core Xeon with AVX-512, float32, interleaved, dW and db for [1024, 16] x
// [16, 256] 76 / 54 us (ours / ATen's), [1024, 64] x [64, 256] 173 / 136 us,
// [4096, 32] x [32, 1024] 1.40 / 0.99 ms, [4096, 128] x [128, 1024] 3.98 /
// 3.59 ms; from 256 rows the two are within 4%. The same holds for dY W read
// once (short_product_by_mm in fused_ops.h: the input gradient, and d_h0 of a
// single step's backward) of one row ([1, 4096] x [4096, 1024] 674 / 412 us)
// and of more than one tile's rows up to 128 ([16, 1024] x [1024, 256] 90 /
// 59 us, [128, 4096] x [4096, 1024] 5.24 / 3.91 ms); of 2-6 rows W in place
// is faster. With AVX2 on both sides MKL's lead is larger. K rows of the
// segments; one segment is read in place, several are gathered.
constexpr int64_t kMmGradRows = 128;

template <typename E>
std::pair<at::Tensor, at::Tensor> weight_grad_by_mm(const std::vector<GradRowsOf<E>>& segs,
                                                    int64_t K, int64_t M, int64_t N, bool want_db,
                                                    const at::TensorOptions& options) {
  at::Tensor dy, x;
  if (segs.size() == 1) {
    dy = at::from_blob(const_cast<E*>(segs[0].dy), {K, M}, options);
    x = at::from_blob(const_cast<E*>(segs[0].x), {K, N}, options);
  } else {
    dy = at::empty({K, M}, options);
    x = at::empty({K, N}, options);
    int64_t k = 0;
    for (const GradRowsOf<E>& s : segs) {
      std::memcpy(dy.data_ptr<E>() + k * M, s.dy, sizeof(E) * s.rows * M);
      std::memcpy(x.data_ptr<E>() + k * N, s.x, sizeof(E) * s.rows * N);
      k += s.rows;
    }
  }
  at::Tensor dw = empty_for_steps({M, N}, options);  // as the GEMM's: cached, not faulted in
  at::mm_out(dw, dy.t(), x);
  return {dw, want_db ? dy.sum(0) : at::empty({0}, options)};
}

// dW [M, N] = sum over the segments' rows of dY^T X, and db [M] (want_db;
// else [0]) = the column sums of dY; dW and db of options' dtype. The tile
// product Mma (panel_gemm.h's MmaVec; MmaBf16 for bfloat16 dY and X, k in
// pairs: KP = 2) accumulates in V::T.
template <typename V, typename In = typename V::T, typename Mma = MmaVec<V>, int KP = 1>
std::pair<at::Tensor, at::Tensor> weight_grad_fused(const std::vector<GradRowsOf<In>>& segs,
                                                    int64_t M, int64_t N, bool want_db,
                                                    const at::TensorOptions& options) {
  using E = typename V::T;
  using Tile = WeightGradTile<V, In>;
  constexpr int kNV = Tile::kNV, kMR = Tile::kMR;
  constexpr int64_t kW = Tile::kW, kBlockK = Tile::kBlockK, kBlockTiles = Tile::kBlockTiles;
  static_assert(kBlockK % KP == 0, "blocks of whole k groups");
  int64_t K = 0;
  for (const GradRowsOf<In>& s : segs) K += s.rows;
  if constexpr (std::is_same_v<In, E>) {
    if (K > 0 && K <= kFewGradRows) return weight_grad_few_rows<V>(segs, M, N, want_db, options);
    if (K > 0 && K <= kMmGradRows) return weight_grad_by_mm(segs, K, M, N, want_db, options);
  }
  at::Tensor dw = empty_for_steps({M, N}, options);
  at::Tensor db = at::empty({want_db ? M : 0}, options);
  if (K == 0 || M == 0 || N == 0) {
    dw.zero_();
    db.zero_();
    return {dw, db};
  }
  const RowIndex<In> rows{segs};
  const int64_t K2 = ceil_div(K, KP) * KP;
  const at::Tensor xp = pack_x<kW, KP>(rows, K, N, options.dtype(c10::CppTypeToScalarType<In>::value));
  const In* xpp = xp.data_ptr<In>();
  const int64_t Q = ceil_div(N, kW), tiles = ceil_div(M, kMR);
  const bool as_rows = Tile::kRows && Q <= Tile::kRowsPanels;
  // A tile's strides in ap along its columns and along k.
  const int64_t sam = as_rows ? 1 : KP, sak = as_rows ? Tile::kRowStride : kMR;
  E* db_out = want_db ? db.data_ptr<E>() : nullptr;
  const int64_t grain = ceil_div(tiles, at::get_num_threads());
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    // Per thread, kept from call to call: fresh, their hundreds of KiB were
    // page-faulted in on every call (every element is written before it is
    // read). dY's block as ap[tile][k / KP][kMR][k % KP], or as rows
    // ap[k][kRowStride] (Tile::kRows).
    thread_local std::vector<In> ap;
    thread_local std::vector<double> sums;
    // The block's accumulators: tile i, panel q at acc[(i * Q + q) * kMR * kW].
    thread_local std::vector<E> acc;
    ap.resize(static_cast<size_t>(as_rows ? kBlockK * Tile::kRowStride
                                          : kBlockTiles * kBlockK * kMR));
    sums.resize(static_cast<size_t>(kBlockTiles * kMR));
    acc.resize(static_cast<size_t>(kBlockTiles * Q * kMR * kW));
    for (int64_t tb = t0; tb < t1; tb += kBlockTiles) {
      const int64_t nt = std::min(kBlockTiles, t1 - tb), m0 = tb * kMR;
      const int64_t mc = std::min(nt * kMR, M - m0);  // real columns of this block
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t k0 = 0; k0 < K2; k0 += kBlockK) {
        const int64_t kc = std::min(kBlockK, K2 - k0);  // a multiple of KP
        if (k0 + kc > K) {  // the padding row: zeros
          for (int64_t i = 0; i < nt; ++i) {
            In* dst = ap.data() + (i * kc + kc - KP) * kMR + KP - 1;
            for (int64_t c = 0; c < kMR; ++c) dst[c * KP] = In(0);
          }
        }
        // Pack dY[k0:k0+kc, m0:m0+mc], zeros past mc, as tiles or rows.
        rows.each(k0, std::min(k0 + kc, K), [&](int64_t k, int64_t r, const GradRowsOf<In>& s) {
          const In* y = s.dy + r * M + m0;
          if (r + 4 < s.rows) {
            for (int64_t c = 0; c < mc; c += 16) __builtin_prefetch(y + 4 * M + c, 0, 3);
          }
          for (int64_t c = 0; c < mc; ++c) sums[c] += static_cast<double>(y[c]);
          const int64_t kk = k - k0;
          if (as_rows) {
            In* dst = ap.data() + kk * Tile::kRowStride;
            std::memcpy(dst, y, sizeof(In) * mc);
            std::fill(dst + mc, dst + nt * kMR, In(0));
            return;
          }
          for (int64_t i = 0; i < nt; ++i) {
            In* dst = ap.data() + (i * kc + kk / KP * KP) * kMR + kk % KP;
            const int64_t n = std::min<int64_t>(kMR, mc - i * kMR);
            for (int64_t c = 0; c < n; ++c) dst[c * KP] = y[i * kMR + c];
            for (int64_t c = n; c < kMR; ++c) dst[c * KP] = In(0);
          }
        });
        for (int64_t q = 0; q < Q; ++q) {
          const In* panel = xpp + (q * K2 + k0) * kW;
          for (int64_t i = 0; i < nt; ++i) {
            E* tile = acc.data() + (i * Q + q) * kMR * kW;
            Mma::template rows<kMR, kNV>(kMR, ap.data() + i * (as_rows ? kMR : kc * kMR), sam,
                                         sak, panel, kc, tile, k0 > 0);
          }
        }
      }
      if (db_out) {
        for (int64_t c = 0; c < mc; ++c) db_out[m0 + c] = static_cast<E>(sums[c]);
      }
      // Tiles to rows of dW.
      E* out = dw.data_ptr<E>();
      for (int64_t i = 0; i < nt; ++i) {
        for (int64_t r = 0; r < kMR && m0 + i * kMR + r < M; ++r) {
          for (int64_t q = 0; q < Q; ++q) {
            const E* src = acc.data() + (i * Q + q) * kMR * kW + r * kW;
            const int64_t n = std::min(kW, N - q * kW);
            std::copy(src, src + n, out + (m0 + i * kMR + r) * N + q * kW);
          }
        }
      }
    }
  });
  return {dw, db};
}

}  // namespace
}  // namespace cpu
}  // namespace fusedrnn
