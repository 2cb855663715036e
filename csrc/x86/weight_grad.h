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
//
// Note [the next slice of X into L2]
// Packed X (K x N floats: 1.6 MB at K = 1600, N = 256; 13 MB at K = 3200,
// N = 1024) is read again for every block of dY's columns, so each panel
// slice came from L3 while the block's first tile waited on it. As in the
// step products (Note [the next slice into L2] in panel_gemm.h), the block's
// tiles on a slice bring the next one (the next panel's, or the next block's
// first) into L2, their shares of its lines spread evenly, one a k step.
// 2-core Xeon with AMX, float32, with and without in one process, in a new
// random order each round, medians of 25, two runs, GFLOP/s without / with
// (MKL's sgemm on the same dY^T X): K=1600 M=1024 N=256 188 / 194-197
// (219-222); K=6400 M=2048 N=512 174-192 / 181-206 (202-235); K=3200 M=4096
// N=1024 197-202 / 217-223 (245-251): 3-13% faster, still under MKL. The
// AVX2 path there (FUSEDRNN_CPU_ISA=avx2): 2-5% faster.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <tuple>
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
      // X's row: columns [0, n1) at xa, [n1, N) at xb.
      const int64_t n1 = s.x2 ? s.n1 : N;
      const E* xa = s.x + r * n1;
      const E* xb = s.x2 ? s.x2 + r * (N - n1) : nullptr;
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t c0 = q * kW, n = std::min(kW, N - c0);
        const int64_t na = std::clamp<int64_t>(n1 - c0, 0, n);  // of those from xa
        E* row = dst + (q * K2 + k / KP * KP) * kW + k % KP;
        if constexpr (KP == 1) {
          std::copy(xa + c0, xa + c0 + na, row);
          if (na < n) std::copy(xb + (c0 + na - n1), xb + (c0 + n - n1), row + na);
          std::fill(row + n, row + kW, E(0));
        } else {
          for (int64_t c = 0; c < kW; ++c) {
            row[c * KP] = c < na ? xa[c0 + c] : c < n ? xb[c0 + c - n1] : E(0);
          }
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
// of a row summed over the rows of X in order (up to kFewGradRows rows,
// fused.h).

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
// is faster. With AVX2 on both sides MKL's lead is larger. That is MKL on an
// Intel CPU: on AMD's it does not run its AVX-512 kernels, and ours were the
// faster at every short product measured (2-core Zen 4, float32, interleaved,
// shuffled, ours / ATen's): training steps at T=100 B=1, LSTM H=256, 512,
// 1024 0.92, 0.90, 0.95, GRU H=256 0.94; a cell's training step at B=16, 64,
// 128, LSTMCell H=256 0.87, 0.88, 0.91 and H=1024 0.85, 0.83, 0.85,
// GRUCell H=256 0.91 (B=16), 0.95 (B=64); at one row (B=1) LSTMCell H=256
// 0.89, H=1024 1.00, GRUCell 0.85 and 0.90; with AVX2 forced on our side
// 0.90-1.06. So ATen's mm takes them on Intel CPUs only (mm_grad_rows in
// fused.h). K rows of the segments; one segment of one block of X is read
// in place, more are gathered.

template <typename E>
std::pair<at::Tensor, at::Tensor> weight_grad_by_mm(const std::vector<GradRowsOf<E>>& segs,
                                                    int64_t K, int64_t M, int64_t N, bool want_db,
                                                    const at::TensorOptions& options) {
  const auto blob = [&](const E* p, int64_t rows, int64_t cols) {
    return at::from_blob(const_cast<E*>(p), {rows, cols}, options);
  };
  at::Tensor dy, x;
  if (segs.size() == 1 && !segs[0].x2) {
    dy = blob(segs[0].dy, K, M);
    x = blob(segs[0].x, K, N);
  } else {
    dy = at::empty({K, M}, options);
    x = at::empty({K, N}, options);
    int64_t k = 0;
    for (const GradRowsOf<E>& s : segs) {
      std::memcpy(dy.data_ptr<E>() + k * M, s.dy, sizeof(E) * s.rows * M);
      const int64_t n1 = s.x2 ? s.n1 : N;
      x.narrow(0, k, s.rows).narrow(1, 0, n1).copy_(blob(s.x, s.rows, n1));
      if (s.x2) x.narrow(0, k, s.rows).narrow(1, n1, N - n1).copy_(blob(s.x2, s.rows, N - n1));
      k += s.rows;
    }
  }
  at::Tensor dw = empty_for_steps({M, N}, options);  // as the GEMM's: cached, not faulted in
  at::mm_out(dw, dy.t(), x);
  return {dw, want_db ? dy.sum(0) : at::empty({0}, options)};
}

// dW = sum over the segments' rows of dY^T X, and db [M] (want_db; else
// [0]) = the column sums of dY; dW and db of options' dtype. dW comes as
// [M, n1] and [M, N - n1] (its columns from the two blocks of X where the
// segments' x2 is set; n1 = N, the second [M, 0], where it is not). The
// tile product Mma (panel_gemm.h's MmaVec; MmaBf16 for bfloat16 dY and X, k
// in pairs: KP = 2) accumulates in V::T.
template <typename V, typename In = typename V::T, typename Mma = MmaVec<V>, int KP = 1>
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad_blocks(
    const std::vector<GradRowsOf<In>>& segs, int64_t M, int64_t N, bool want_db,
    const at::TensorOptions& options) {
  using E = typename V::T;
  using Tile = WeightGradTile<V, In>;
  constexpr int kNV = Tile::kNV, kMR = Tile::kMR;
  constexpr int64_t kW = Tile::kW, kBlockK = Tile::kBlockK, kBlockTiles = Tile::kBlockTiles;
  static_assert(kBlockK % KP == 0, "blocks of whole k groups");
  int64_t K = 0;
  for (const GradRowsOf<In>& s : segs) K += s.rows;
  const int64_t n1 = !segs.empty() && segs[0].x2 ? segs[0].n1 : N;
  if constexpr (std::is_same_v<In, E>) {
    const bool few = K <= kFewGradRows && n1 == N;
    if (K > 0 && (few || K <= mm_grad_rows())) {  // as one [M, N], cut
      auto [w, b] = few ? weight_grad_few_rows<V>(segs, M, N, want_db, options)
                        : weight_grad_by_mm(segs, K, M, N, want_db, options);
      if (n1 == N) return {w, at::empty({M, 0}, options), b};
      return {w.narrow(1, 0, n1).contiguous(), w.narrow(1, n1, N - n1).contiguous(), b};
    }
  }
  at::Tensor dw1 = empty_for_steps({M, n1}, options), dw2 = empty_for_steps({M, N - n1}, options);
  at::Tensor db = at::empty({want_db ? M : 0}, options);
  if (K == 0 || M == 0 || N == 0) {
    dw1.zero_();
    dw2.zero_();
    db.zero_();
    return {dw1, dw2, db};
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
  // The slice of X after panel q's at depth k0 (kc deep): panel q + 1's at
  // k0, or the next block's first.
  const auto slice_after = [&](int64_t q, int64_t k0, int64_t kc) -> Ahead {
    const int64_t nq = q + 1 < Q ? q + 1 : 0, nk0 = q + 1 < Q ? k0 : k0 + kc;
    if (nk0 >= K2) return {};
    return {reinterpret_cast<const char*>(xpp + (nq * K2 + nk0) * kW),
            std::min(kBlockK, K2 - nk0) * kW * static_cast<int64_t>(sizeof(In)) / 64};
  };
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
          // Note [the next slice of X into L2]
          Ahead ahead = slice_after(q, k0, kc);
          const int64_t share = std::min(ceil_div(ahead.lines, nt), kc / Mma::kStepsPerLine);
          for (int64_t i = 0; i < nt; ++i) {
            E* tile = acc.data() + (i * Q + q) * kMR * kW;
            Mma::template rows<kMR, kNV>(kMR, ap.data() + i * (as_rows ? kMR : kc * kMR), sam,
                                         sak, panel, kc, tile, k0 > 0, 0, ahead.take(share));
          }
        }
      }
      if (db_out) {
        for (int64_t c = 0; c < mc; ++c) db_out[m0 + c] = static_cast<E>(sums[c]);
      }
      // Tiles to rows of dW's blocks.
      E *out1 = dw1.data_ptr<E>(), *out2 = dw2.data_ptr<E>();
      for (int64_t i = 0; i < nt; ++i) {
        for (int64_t r = 0; r < kMR && m0 + i * kMR + r < M; ++r) {
          const int64_t m = m0 + i * kMR + r;
          for (int64_t q = 0; q < Q; ++q) {
            const E* src = acc.data() + (i * Q + q) * kMR * kW + r * kW;
            const int64_t c0 = q * kW, n = std::min(kW, N - c0);
            const int64_t na = std::clamp<int64_t>(n1 - c0, 0, n);  // of those in dw1
            if (na > 0) std::copy(src, src + na, out1 + m * n1 + c0);
            if (na < n) std::copy(src + na, src + n, out2 + m * (N - n1) + (c0 + na - n1));
          }
        }
      }
    }
  });
  return {dw1, dw2, db};
}

// dW [M, N] and db of X in one block (no segment's x2 set).
template <typename V, typename In = typename V::T, typename Mma = MmaVec<V>, int KP = 1>
std::pair<at::Tensor, at::Tensor> weight_grad_fused(const std::vector<GradRowsOf<In>>& segs,
                                                    int64_t M, int64_t N, bool want_db,
                                                    const at::TensorOptions& options) {
  auto [dw, unused, db] = weight_grad_blocks<V, In, Mma, KP>(segs, M, N, want_db, options);
  return {dw, db};
}

}  // namespace
}  // namespace cpu
}  // namespace fusedrnn
