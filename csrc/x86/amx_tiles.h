// The step product on AMX tiles, for the bfloat16 translation unit
// (fused_avx512_bf16.cpp), which includes it after fused_ops.h; its functions
// carry the AMX target themselves and run only after cpu_isa.h's check.
#pragma once

#include <immintrin.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include <c10/util/BFloat16.h>

namespace fusedrnn {
namespace cpu {
namespace {

// Note [AMX tiles for the step product]
// Where the CPU has AMX (Intel Xeon since Sapphire Rapids), one tdpbf16ps
// multiplies a 16 x 32 bfloat16 tile of A by a 32 x 16 tile of B into 16 x 16
// float32 sums: 16 times the work per cycle of vdpbf16ps, and oneDNN's
// bfloat16 matmul (so torch.nn's bfloat16 layers) runs on it. B's tile is the
// VNNI layout, k in pairs: row r holds the pairs (2r, 2r + 1) of 16 columns,
// 64 bytes, which is a 16-row stretch of the k-pair panels of
// fused_avx512_bf16.cpp (the forward's gate panels and the backward's column
// panels alike), rows the panel's width apart: the same packed weights serve
// both instruction sets. A's tile is 16 rows of h_{t-1} (backward: dG) and 32
// k, read in place; a last block of fewer rows from a copy padded with zeros.
//
// Every tile is 16 rows of 64 bytes: C0..C3 the sums of the panel's NV (3 or
// 4) column groups of 16 (the LSTM's i, f, g, o of 16 units), A and B in the
// other four (product, product_pair). The depth is padded to a multiple of
// 32 (depth): the panels with rows of zeros (pack_deep), A by a zero-padded
// copy of its rows (a NaN or inf past a row's end would make 0 * NaN). The
// configuration
// is thread state that other libraries change too, so each call loads it and
// releases the tiles when done.
namespace amx {

using Bf16 = c10::BFloat16;
constexpr int64_t kLanes = 16;  // float32 columns of a tile row

constexpr int64_t kRows = 16;   // rows of a tile
constexpr int64_t kDepth = 32;  // k of one tdpbf16ps

// K rounded up to whole tdpbf16ps.
inline int64_t depth(int64_t K) { return (K + kDepth - 1) / kDepth * kDepth; }

// pack(w') for w' = w [K, ...] with zero rows up to depth(K) (dim: w's k
// dimension, 0 or 1): packings that take k from w's shape get the padded depth.
template <typename Pack>
Tensor pack_deep(const Tensor& w, int64_t dim, const Pack& pack) {
  const int64_t K = w.size(dim);
  if (depth(K) == K) return pack(w);
  std::vector<int64_t> sizes = w.sizes().vec();
  sizes[dim] = depth(K);
  Tensor padded = at::zeros(sizes, w.options());
  padded.narrow(dim, 0, K).copy_(w);
  return pack(padded);
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile"))) inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kRows;
    cfg.colsb[t] = 64;
  }
  // GCC 12 does not count ldtilecfg as reading cfg, and drops the stores
  // above without this barrier.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// tile [16][NV * 16] (float32) = a [16, K] (row stride lda) times panel
// (K / 2 k-pair rows of NV * 16 columns): A in 4, B in 5..7 in turn;
// between() after each k step (Note [the epilogue beside the tiles]).
template <int NV, typename Between>
__attribute__((target("amx-tile,amx-bf16"))) inline void product(const Bf16* a, int64_t lda,
                                                                  const Bf16* panel, int64_t K,
                                                                  float* tile,
                                                                  const Between& between) {
  constexpr int64_t kPairRow = NV * kLanes * 2;  // bfloat16 of a k-pair row of the panel
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  if constexpr (NV > 3) _tile_zero(3);
  for (int64_t k = 0; k < K; k += kDepth) {
    const Bf16* b = panel + k / 2 * kPairRow;
    _tile_loadd(4, a + k, lda * 2);
    _tile_loadd(5, b, kPairRow * 2);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, b + 2 * kLanes, kPairRow * 2);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, b + 4 * kLanes, kPairRow * 2);
    _tile_dpbf16ps(2, 4, 7);
    if constexpr (NV > 3) {
      _tile_loadd(5, b + 6 * kLanes, kPairRow * 2);
      _tile_dpbf16ps(3, 4, 5);
    }
    between();
  }
  constexpr int64_t ldt = NV * kLanes * 4;  // bytes per tile row
  _tile_stored(0, tile, ldt);
  _tile_stored(1, tile + kLanes, ldt);
  _tile_stored(2, tile + 2 * kLanes, ldt);
  if constexpr (NV > 3) _tile_stored(3, tile + 3 * kLanes, ldt);
}

// Two row blocks at once, four column groups (NV = 4) in two halves: C0..C3
// the sums of rows a0, a1 for groups 2h, 2h + 1, A in 4 and 5, B in 6 and 7.
// Each k step loads four tiles for four tdpbf16ps (one row block: five).
// The LSTM forward (bfloat16 inference, T=100 B=64 H=512, 2-core Xeon with
// AMX, interleaved): 7% faster; at H=1024, 4%.
template <typename Between>
__attribute__((target("amx-tile,amx-bf16"))) inline void product_pair(const Bf16* a0,
                                                                      const Bf16* a1,
                                                                      int64_t lda,
                                                                      const Bf16* panel,
                                                                      int64_t K, float* tile0,
                                                                      float* tile1,
                                                                      const Between& between) {
  constexpr int64_t kPairRow = 4 * kLanes * 2;
  constexpr int64_t ldt = 4 * kLanes * 4;
  for (int h = 0; h < 2; ++h) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < K; k += kDepth) {
      const Bf16* b = panel + k / 2 * kPairRow + 4 * h * kLanes;
      _tile_loadd(4, a0 + k, lda * 2);
      _tile_loadd(6, b, kPairRow * 2);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, b + 2 * kLanes, kPairRow * 2);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, a1 + k, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
      between();
    }
    _tile_stored(0, tile0 + 2 * h * kLanes, ldt);
    _tile_stored(1, tile0 + (2 * h + 1) * kLanes, ldt);
    _tile_stored(2, tile1 + 2 * h * kLanes, ldt);
    _tile_stored(3, tile1 + (2 * h + 1) * kLanes, ldt);
  }
}

// Note [the epilogue beside the tiles]
// tdpbf16ps runs on the AMX unit while the vector units wait, and a block's
// gate math then ran while the tiles waited. So each block's epilogue runs
// while the next block's tiles multiply: its rows spread over the k steps of
// the next product (between()), the rest after it, the two blocks' tiles in
// alternating buffers. Nothing a product reads is written by an epilogue of
// the same step: the product reads h_{t-1} (backward: dG of the step after),
// the epilogues write step t's rows. Interleaved in one process, bfloat16,
// the 2-core Xeon with AMX, T=100 B=64 I=H=512: LSTM inference 21.8 -> 18.8
// ms, GRU 19.0 -> 15.8 ms; training 2-5% (LSTM) and 7% (GRU) faster; LSTM
// inference at B=16 11%, at T=25 B=64 H=1024 8% faster.
template <typename Epi>
struct PendingRows {  // the rows of a finished block whose epilogue has not run
  const Epi& epi;
  int64_t steps;  // k steps of one product
  const float* tile = nullptr;
  int64_t ldt = 0, m0 = 0, p = 0;
  int rows = 0, done = 0, per_step = 1;
  void one() {  // after a k step
    for (int i = 0; i < per_step && done < rows; ++i, ++done) {
      epi(tile + done * ldt, ldt, m0 + done, 1, p);
    }
  }
  void finish() {
    while (done < rows) one();
  }
  void hand_over(const float* t, int64_t ld, int64_t m, int n, int64_t panel) {
    finish();
    tile = t, ldt = ld, m0 = m, p = panel, rows = n, done = 0;
    per_step = static_cast<int>((n + steps - 1) / steps);
  }
};

// run_panels (panel_gemm.h) on AMX tiles: panels [p0, p1) (packed to
// depth(K) rows by pack_deep) over rows a [M, K], each row block of up to 16
// (with four column groups, pairs of full blocks: product_pair) into
// epi(tile, NV * 16, m0, mr, p). Panels outermost, so that each is read from
// memory once per step however many row blocks run over it (a thread's share
// of W_hh is 4 MB at H = 1024: more than its L2). A last block of fewer rows
// runs on a copy padded with zeros to 16, so that one configuration serves
// every block; where K is not a multiple of 32, all rows do. Each block's
// epilogue runs during the next block's product (Note [the epilogue beside
// the tiles]); the panels go in alternating order (Note [panels in
// alternating order] in panel_gemm.h).
template <int NV, typename Epi>
__attribute__((target("amx-tile,amx-bf16"))) void run_panels(int64_t p0, int64_t p1,
                                                             int64_t M, int64_t K,
                                                             const Bf16* a, int64_t lda,
                                                             const Bf16* packed,
                                                             const Epi& epi) {
  static_assert(NV == 3 || NV == 4, "three or four column groups of 16");
  constexpr int64_t W = NV * kLanes;
  alignas(64) float tiles[2][2 * kRows * W];
  const int64_t KD = depth(K);
  // Rows read in place: the full blocks where K needs no padding.
  const int64_t full = KD == K ? M / kRows * kRows : 0;
  thread_local std::vector<Bf16> padded;  // rows full.. to a multiple of 16, depth KD
  if (full < M) {
    const int64_t rows = (M - full + kRows - 1) / kRows * kRows;
    padded.assign(static_cast<size_t>(rows * KD), Bf16(0.0f));
    for (int64_t m = full; m < M; ++m) {
      std::copy(a + m * lda, a + m * lda + K, padded.begin() + (m - full) * KD);
    }
  }
  // Row m0's block, and its row stride.
  const auto rows_at = [&](int64_t m0) {
    return m0 < full ? std::make_pair(a + m0 * lda, lda)
                     : std::make_pair(padded.data() + (m0 - full) * KD, KD);
  };
  // k steps of a product: a pair of blocks has twice one block's.
  const int64_t steps = (NV == 4 && M >= 2 * kRows ? 2 : 1) * KD / kDepth;
  PendingRows<Epi> pending{epi, steps};
  const auto between = [&pending] { pending.one(); };
  int cur = 0;
  const PanelOrder panel_at = panel_order(p0, p1);  // Note [panels in alternating order]
  configure();
  for (int64_t i = p0; i < p1; ++i) {
    const int64_t p = panel_at(i);
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int mr = static_cast<int>(std::min(kRows, M - m0));
      const Bf16* panel = packed + p * KD * W;
      const auto [rows, ld] = rows_at(m0);
      float* tile = tiles[cur];
      cur ^= 1;
      if constexpr (NV == 4) {
        if (m0 + 2 * kRows <= M) {  // two full blocks
          epi.prefetch(m0, 2 * kRows, p);
          product_pair(rows, rows_at(m0 + kRows).first, ld, panel, KD, tile, tile + kRows * W,
                       between);
          pending.hand_over(tile, W, m0, 2 * kRows, p);
          m0 += kRows;
          continue;
        }
      }
      epi.prefetch(m0, mr, p);
      product<NV>(rows, ld, panel, KD, tile, between);
      pending.hand_over(tile, W, m0, mr, p);
    }
  }
  pending.finish();
  _tile_release();
}

}  // namespace amx

}  // namespace
}  // namespace cpu
}  // namespace fusedrnn
