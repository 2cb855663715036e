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
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../cpu/step_buffers.h"
#include "fused.h"
#include "fused_loop.h"
#include "panel_gemm.h"

namespace fusedrnn {
namespace cpu {
namespace {

// The tile of V's backward panels: AVX-512 6 x 64, AVX2 6 x 16.
template <typename V>
struct WeightGradTile {
  static constexpr int kNV = V::kColumnNV;             // vectors per panel of X
  static constexpr int64_t kW = kNV * V::kLanes;       // panel width
  static constexpr int kMR = V::rows_per_tile(kNV);    // columns of dY per tile
  static constexpr int64_t kBlockK =
      32 * 1024 / (kW * static_cast<int64_t>(sizeof(typename V::T)));  // a 32 KiB panel slice
  static constexpr int64_t kBlockTiles = 192 / kMR;    // 192 columns of dY per block
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

// packed[q][k][c] = X[k][kW q + c], 0 beyond N.
template <int64_t kW, typename E>
at::Tensor pack_x(const RowIndex<E>& rows, int64_t K, int64_t N, const at::TensorOptions& options) {
  const int64_t Q = ceil_div(N, kW);
  at::Tensor packed = empty_for_steps({Q * K * kW}, options);
  E* dst = packed.data_ptr<E>();
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    rows.each(k0, k1, [&](int64_t k, int64_t r, const GradRowsOf<E>& s) {
      const E* x = s.x + r * N;
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t n = std::min(kW, N - q * kW);
        E* row = dst + (q * K + k) * kW;
        std::copy(x + q * kW, x + q * kW + n, row);
        std::fill(row + n, row + kW, E(0));
      }
    });
  });
  return packed;
}

// dW [M, N] = sum over the segments' rows of dY^T X, and db [M] (want_db;
// else [0]) = the column sums of dY.
template <typename V, typename E = typename V::T>
std::pair<at::Tensor, at::Tensor> weight_grad_fused(const std::vector<GradRowsOf<E>>& segs, int64_t M,
                                                  int64_t N, bool want_db,
                                                  const at::TensorOptions& options) {
  using Tile = WeightGradTile<V>;
  constexpr int kNV = Tile::kNV, kMR = Tile::kMR;
  constexpr int64_t kW = Tile::kW, kBlockK = Tile::kBlockK, kBlockTiles = Tile::kBlockTiles;
  int64_t K = 0;
  for (const GradRowsOf<E>& s : segs) K += s.rows;
  at::Tensor dw = at::empty({M, N}, options);
  at::Tensor db = at::empty({want_db ? M : 0}, options);
  if (K == 0 || M == 0 || N == 0) {
    dw.zero_();
    db.zero_();
    return {dw, db};
  }
  const RowIndex<E> rows{segs};
  const at::Tensor xp = pack_x<kW>(rows, K, N, options);
  const int64_t Q = ceil_div(N, kW), tiles = ceil_div(M, kMR);
  E* db_out = want_db ? db.data_ptr<E>() : nullptr;
  const int64_t grain = ceil_div(tiles, at::get_num_threads());
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    std::vector<E> ap(static_cast<size_t>(kBlockTiles * kBlockK * kMR));
    std::vector<double> sums(static_cast<size_t>(kBlockTiles * kMR));
    // The block's accumulators: tile i, panel q at acc[(i * Q + q) * kMR * kW].
    std::vector<E> acc(static_cast<size_t>(kBlockTiles * Q * kMR * kW));
    for (int64_t tb = t0; tb < t1; tb += kBlockTiles) {
      const int64_t nt = std::min(kBlockTiles, t1 - tb), m0 = tb * kMR;
      const int64_t mc = std::min(nt * kMR, M - m0);  // real columns of this block
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
        const int64_t kc = std::min(kBlockK, K - k0);
        // Pack dY[k0:k0+kc, m0:m0+mc] as ap[tile][k][kMR], zeros past mc.
        rows.each(k0, k0 + kc, [&](int64_t k, int64_t r, const GradRowsOf<E>& s) {
          const E* y = s.dy + r * M + m0;
          if (r + 4 < s.rows) {
            for (int64_t c = 0; c < mc; c += 16) __builtin_prefetch(y + 4 * M + c, 0, 3);
          }
          for (int64_t c = 0; c < mc; ++c) sums[c] += y[c];
          for (int64_t i = 0; i < nt; ++i) {
            E* dst = ap.data() + (i * kc + (k - k0)) * kMR;
            const int64_t n = std::min<int64_t>(kMR, mc - i * kMR);
            for (int64_t c = 0; c < n; ++c) dst[c] = y[i * kMR + c];
            for (int64_t c = n; c < kMR; ++c) dst[c] = E(0);
          }
        });
        for (int64_t q = 0; q < Q; ++q) {
          const E* panel = xp.data_ptr<E>() + (q * K + k0) * kW;
          for (int64_t i = 0; i < nt; ++i) {
            E* tile = acc.data() + (i * Q + q) * kMR * kW;
            mma_tile<V, kMR, kNV>(ap.data() + i * kc * kMR, 1, kMR, panel, kc, tile, k0 > 0);
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
