// The fused CPU path, written once for the vector types of vec16.h (AVX-512),
// vec8.h (AVX2), float32, and vec8d.h (AVX-512, float64): per time step, one
// parallel pass over panels of hidden units; each tile of gate
// pre-activations comes out of the GEMM (panel_gemm.h) and goes through
// gates.h while still in L1. Everything runs in the vector's element type.
//
// Forward, LSTM (GRU alike with 3 gates), L = lanes (AVX-512 16, or 8 for
// float64; AVX2 8):
//
//   packed W_hh panel p: [K = H][i L | f L | g L | o L]  (units Lp..Lp+L-1)
//   tile (MR rows x 4L)  = h_{t-1}[rows] @ panel  -> + x_proj + b_hh -> c_t, h_t
//
//   AVX-512: MR = 6 (LSTM), 8 (GRU); AVX2: MR = 3 (LSTM), 4 (GRU)
//
// Backward fuses the other way round: the tile of dh_{t-1} = dG_t @ W_hh
// (kColumnNV * L units per panel: AVX-512 64 (float64 32), AVX2 16, 6 rows a
// tile) goes straight into the pointwise backward of step t-1. Panels are
// split into one contiguous range per thread, so each thread keeps re-reading
// the same part of the weights from its own L2.
//
// Note [ISA translation units]
// Each instruction set has a translation unit that includes this file after
// `#pragma GCC target(...)` and its vector header, before any other include:
// fused_avx512.cpp, fused_avx2.cpp (fused_avx512_bf16.cpp for the bfloat16
// forward and backward). Everything here has internal linkage, so each unit has its own
// copy of the algorithm compiled for its instruction set, and the unit is
// entered only through its table of fused.h, after rnn_cpu.cpp has checked
// the CPU. The table is constant-initialised: loading the library runs no code
// compiled for an instruction set the CPU may lack.
// Inline functions a unit shares with other files (ATen's, the standard
// library's) also get a copy compiled for its instruction set, and the linker
// keeps the first copy it meets. setuptools links the objects in the sorted
// order of their sources, so the files of csrc/x86/ come after every generic
// one, and among themselves in increasing order of instruction set (avx2,
// avx512, avx512_bf16); setup.py checks this. A copy shared with a generic
// file is then the generic one, and one shared by two units the narrower one.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "dot_gemm.h"
#include "fused.h"
#include "fused_loop.h"
#include "weight_grad.h"

namespace fusedrnn {
namespace cpu {
namespace {

// The element type of V's lanes: float (vec16.h, vec8.h) or double (vec8d.h).
template <typename V>
using Elem = typename V::T;

// Columns of a backward (and linear) panel: V::kColumnNV vectors.
template <typename V>
constexpr int64_t kColumnPanel = V::kColumnNV * V::kLanes;

// Panel q of b [K, N] (U = kColumnPanel<V> columns), the backward's layout:
//   panel[k][c] = b[k][U q + c]     (0 beyond N)
template <typename V>
void pack_column_panel(const Elem<V>* b, int64_t K, int64_t N, int64_t q, Elem<V>* panel) {
  constexpr int64_t U = kColumnPanel<V>;
  const int64_t n = std::min<int64_t>(U, N - q * U);
  for (int64_t k = 0; k < K; ++k) {
    const Elem<V>* src = b + k * N + q * U;
    Elem<V>* row = panel + k * U;
    if (n == U) {  // whole vectors: std::copy was a call to memmove per row
      for (int64_t j = 0; j < U; j += V::kLanes) V::storeu(row + j, V::loadu(src + j));
    } else {
      std::copy(src, src + n, row);
      std::fill(row + n, row + U, Elem<V>(0));
    }
  }
}

// Panel p of w [N, K] read as B = w^T, U columns (a multiple of the lanes):
// panel[k][c] = w[U p + c][k] (0 beyond N).
template <typename V, int64_t U = kColumnPanel<V>>
void pack_transposed_panel(const Elem<V>* w, int64_t N, int64_t K, int64_t p, Elem<V>* panel) {
  if constexpr (std::is_same_v<Elem<V>, float> && has_transpose_block(V::kLanes)) {
    pack_units_panel<U, V::kLanes>(w, N, K, p, panel);
  } else {
    for (int64_t c = 0; c < U; ++c) {
      const int64_t row = p * U + c;
      for (int64_t k = 0; k < K; ++k) panel[k * U + c] = row < N ? w[row * K + k] : Elem<V>(0);
    }
  }
}

// All P panels [P, K, U], by pack(p, panel), in parallel.
template <typename V, typename PackPanel>
Tensor pack_panels(int64_t P, int64_t K, const at::TensorOptions& options,
                   const PackPanel& pack) {
  constexpr int64_t U = kColumnPanel<V>;
  Tensor packed = empty_for_steps({P, K, U}, options);
  Elem<V>* dst = packed.data_ptr<Elem<V>>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack(p, dst + p * K * U);
  });
  return packed;
}

// The panels of b [K, N] (pack_column_panel).
template <typename V>
Tensor pack_column_panels(const Tensor& b) {
  const int64_t K = b.size(0), N = b.size(1);
  const Elem<V>* src = b.data_ptr<Elem<V>>();
  return pack_panels<V>(ceil_div(N, kColumnPanel<V>), K, b.options(),
                        [&](int64_t q, Elem<V>* panel) {
                          pack_column_panel<V>(src, K, N, q, panel);
                        });
}

// The panels of w [N, K] read as B = w^T (pack_transposed_panel).
template <typename V>
Tensor pack_transposed_panels(const Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  const Elem<V>* src = w.data_ptr<Elem<V>>();
  return pack_panels<V>(ceil_div(N, kColumnPanel<V>), K, w.options(),
                        [&](int64_t p, Elem<V>* panel) {
                          pack_transposed_panel<V>(src, N, K, p, panel);
                        });
}

// The epilogue alone, with the recurrent term read from rec [M, ldr].
template <typename V, typename Epi>
void epilogue_only(int64_t p0, int64_t p1, int64_t M, const Elem<V>* rec,
                                   int64_t ldr, int64_t units_per_panel, const Epi& epi) {
  for (int64_t p = p0; p < p1; ++p) epi(rec ? rec + p * units_per_panel : nullptr, ldr, 0, M, p);
}

// f(r, b, j, u, m) for each row r of a backward epilogue's tile (batch row
// b = m0 + r) and each vector of panel p's units: column j of the tile, unit
// u, lane mask m for the units that exist.
template <typename V, typename F>
inline void each_unit_vector(int64_t H, int64_t m0, int mr, int64_t p, const F& f) {
  constexpr int64_t kUnitsPerPanel = kColumnPanel<V>, kLanes = V::kLanes;
  const int64_t u0 = p * kUnitsPerPanel;
  for (int r = 0; r < mr; ++r) {
    for (int64_t j = 0; j < kUnitsPerPanel && u0 + j < H; j += kLanes) {
      f(r, m0 + r, j, u0 + j, V::mask(H - u0 - j));
    }
  }
}

// The backward epilogues. S is the storage type of the saved gates, h and the
// gate gradients they write (V's element type, or bfloat16); the cell state,
// its gradient and the hidden state's gradient carried between steps are in
// V's type.
template <typename V, typename S = Elem<V>>
struct LstmBackwardEpi {
  int64_t H;
  const S *grad_out, *gates;          // [B, H], [B, 4H]
  const Elem<V> *cells, *c_prev;      // [B, H] each
  Elem<V>* dc;                        // [B, H] in/out
  S* dgates;                          // [B, 4H]
  void prefetch(int64_t m0, int mr, int64_t p) const {  // Note [prefetching the epilogue's rows]
    const int64_t u0 = p * kColumnPanel<V>, n = std::min<int64_t>(kColumnPanel<V>, H - u0);
    prefetch_rows(gates, 4, H, m0, mr, u0, n, V::kLanes);
    prefetch_rows(grad_out, 1, H, m0, mr, u0, n, V::kLanes);
    for (const Elem<V>* r : {cells, c_prev}) prefetch_rows(r, 1, H, m0, mr, u0, n, V::kLanes);
  }
  void operator()(const Elem<V>* rec, int64_t ldr, int64_t m0, int mr, int64_t p) const {
    each_unit_vector<V>(H, m0, mr, p, [&](int r, int64_t b, int64_t j, int64_t u, auto m) {
      const S* gs = gates + b * 4 * H + u;
      V di, df, dgg, d_o, dcp;
      lstm_backward_point<V>(
          load_v<V>(gs, m), load_v<V>(gs + H, m), load_v<V>(gs + 2 * H, m),
          load_v<V>(gs + 3 * H, m), V::load(cells + b * H + u, m),
          V::load(c_prev + b * H + u, m),
          load_v<V>(grad_out + b * H + u, m) + V::load(rec + r * ldr + j, m),
          V::load(dc + b * H + u, m), di, df, dgg, d_o, dcp);
      S* dg = dgates + b * 4 * H + u;
      store_v<V>(dg, di, m);
      store_v<V>(dg + H, df, m);
      store_v<V>(dg + 2 * H, dgg, m);
      store_v<V>(dg + 3 * H, d_o, m);
      dcp.store(dc + b * H + u, m);
    });
  }
};

template <typename V, typename S = Elem<V>>
struct GruBackwardEpi {
  int64_t H;
  const S *grad_out, *gates, *h_prev;  // [B, H], [B, 4H], [B, H]
  Elem<V>* dh;                         // [B, H] dh * z of the step after, then of this one
  S *dx, *dhh;                         // [B, 3H] each
  void prefetch(int64_t m0, int mr, int64_t p) const {  // Note [prefetching the epilogue's rows]
    const int64_t u0 = p * kColumnPanel<V>, n = std::min<int64_t>(kColumnPanel<V>, H - u0);
    prefetch_rows(gates, kGruSaved, H, m0, mr, u0, n, V::kLanes);
    for (const S* r : {h_prev, grad_out}) prefetch_rows(r, 1, H, m0, mr, u0, n, V::kLanes);
  }
  void operator()(const Elem<V>* rec, int64_t ldr, int64_t m0, int mr, int64_t p) const {
    each_unit_vector<V>(H, m0, mr, p, [&](int r, int64_t b, int64_t j, int64_t u, auto m) {
      const S* gs = gates + b * kGruSaved * H + u;
      V d = load_v<V>(grad_out + b * H + u, m) + V::load(dh + b * H + u, m);
      if (rec) d = d + V::load(rec + r * ldr + j, m);
      V dr, dz, dn, dhn, dh_direct;
      gru_backward_point<V>(load_v<V>(gs, m), load_v<V>(gs + H, m), load_v<V>(gs + 2 * H, m),
                            load_v<V>(gs + 3 * H, m), load_v<V>(h_prev + b * H + u, m), d, dr, dz,
                            dn, dhn, dh_direct);
      S* dxb = dx + b * 3 * H + u;
      S* dhhb = dhh + b * 3 * H + u;
      store_v<V>(dxb, dr, m);
      store_v<V>(dhhb, dr, m);
      store_v<V>(dxb + H, dz, m);
      store_v<V>(dhhb + H, dz, m);
      store_v<V>(dxb + 2 * H, dn, m);
      store_v<V>(dhhb + 2 * H, dhn, m);
      dh_direct.store(dh + b * H + u, m);
    });
  }
};

// dst = rec (+ add): the gradient for the initial hidden state.
template <typename V>
struct StoreEpi {
  int64_t H;
  const Elem<V>* add;  // [B, H] or null
  Elem<V>* dst;        // [B, H]
  void prefetch(int64_t, int, int64_t) const {}
  void operator()(const Elem<V>* rec, int64_t ldr, int64_t m0, int mr, int64_t p) const {
    each_unit_vector<V>(H, m0, mr, p, [&](int r, int64_t b, int64_t j, int64_t u, auto m) {
      V v = V::load(rec + r * ldr + j, m);
      if (add) v = v + V::load(add + b * H + u, m);
      v.store(dst + b * H + u, m);
    });
  }
};

// y[m][U p + c] = tile (+ bias) (+ what y held, with accumulate): a plain
// GEMM output, rows ldy apart; with stream, written past the caches (Note
// [streaming the projection's output]).
template <typename V>
struct StoreRowsEpi {
  // AVX-512's 64-byte vectors: Note [a panel's stores after its products].
  static constexpr bool kStoresRows = sizeof(typename V::Reg) == 64;
  int64_t N, ldy;
  const Elem<V>* bias;  // [N] or null
  Elem<V>* y;           // [M, ldy]
  bool accumulate;
  bool stream = false;
  void prefetch(int64_t, int, int64_t) const {}
  void operator()(const Elem<V>* rec, int64_t ldr, int64_t m0, int mr, int64_t p) const {
    constexpr int64_t kUnitsPerPanel = kColumnPanel<V>, kLanes = V::kLanes;
    const int64_t n0 = p * kUnitsPerPanel;
    for (int r = 0; r < mr; ++r) {
      Elem<V>* row = y + (m0 + r) * ldy + n0;
      for (int64_t j = 0; j < kUnitsPerPanel && n0 + j < N; j += kLanes) {
        const auto m = V::mask(N - n0 - j);
        V v = V::load(rec + r * ldr + j, m);
        if (bias) v = v + V::load(bias + n0 + j, m);
        if (accumulate) v = v + V::load(row + j, m);
        if (stream) {
          store_past_caches<V>(row + j, v, m);
        } else {
          v.store(row + j, m);
        }
      }
    }
  }
};

// Rows per block of a large GEMM: a block of A stays in L2 while each
// thread runs its panels over it.
constexpr int64_t kRowBlock = 192;

// Note [streaming the projection's output]
// The input projection writes x_proj (tens of MB at the larger sizes) with
// few FMAs per value at K = I = 256-512, and its plain stores first read
// each line they fill. Written past the caches (where a vector fills a line,
// as the saved gates: Note [streaming the saved gates]), fusedrnn::linear at
// [1600, 256] x [1024, 256]^T ran 12-19% faster and at [6400, 512] x [2048,
// 512]^T 8-21%, level with MKL's addmm (2-core Xeon with AMX, float32, in one
// process, shuffled order, two runs). The time loop then reads x_proj from
// memory rather than L3, and prefetches it (Note [prefetching the epilogue's
// rows]): the LSTM module, same runs, inference T=100 I=H=256 B=16 4-5%
// faster, I=H=512 B=64 7-8%, T=25 I=H=1024 B=64 even; training -1% and +1%,
// +8% and +12%, -5% and +1%. Streaming the input gradient too (N = I, K = 4H
// deep) made it 2% slower and training 1-7% slower: it keeps plain stores.
// AVX2's 32-byte vectors fill no line and store as before.

// y [M, N] (+)= a [M, K] @ B (+ bias), B packed (pack_column_panels' or
// pack_transposed_panels' layout); rows of a lda apart, of y ldy apart;
// stream: y past the caches (Note [streaming the projection's output]).
template <typename V>
void gemm_rows(int64_t M, int64_t N, int64_t K, const Elem<V>* a, int64_t lda, const Elem<V>* bp,
               const Elem<V>* bias, Elem<V>* y, int64_t ldy, bool accumulate = false,
               bool stream = false) {
  const int64_t P = ceil_div(N, kColumnPanel<V>);
  const int64_t grain = ceil_div(P, at::get_num_threads());
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t mc = 0; mc < M; mc += kRowBlock) {
      const StoreRowsEpi<V> epi{N, ldy, bias, y + mc * ldy, accumulate, stream};
      run_panels<V, V::kColumnNV>(p0, p1, std::min(kRowBlock, M - mc), K, a + mc * lda, lda, 1,
                                  bp, epi);
    }
    if (stream) _mm_sfence();  // before the threads join
  });
}

// Note [packing panel by panel]
// A product of one block of rows (M <= kRowBlock: a cell's step, the input
// projection at batch 1) uses each panel of B once. Packing all of B first
// sent a copy of it through memory (and, before the packed copy came from
// the step buffers' cache, faulted in a fresh one on every call): y = a w^T
// with a [64, 1024], w [4096, 1024] took 4.9 ms, oneDNN's matmul 1.6 ms, on
// the 2-core AMD EPYC. Here each thread packs one panel at a time, pack(p,
// panel), into a buffer that stays in L2, and runs all M rows over it at
// once: 1.4 ms.
template <typename V, typename PackPanel>
void gemm_panelwise(int64_t M, int64_t N, int64_t K, const Elem<V>* a, int64_t lda,
                    const PackPanel& pack, const Elem<V>* bias, Elem<V>* y, int64_t ldy) {
  constexpr int64_t U = kColumnPanel<V>;
  const int64_t P = ceil_div(N, U);
  const int64_t grain = ceil_div(P, at::get_num_threads());
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<Elem<V>> panel;
    panel.resize(static_cast<size_t>(K * U));
    for (int64_t p = p0; p < p1; ++p) {
      pack(p, panel.data());
      // Panel p as panel 0 of the columns from U p on.
      const StoreRowsEpi<V> epi{N - p * U, ldy, bias ? bias + p * U : nullptr, y + p * U, false};
      run_panels<V, V::kColumnNV>(0, 1, M, K, a, lda, 1, panel.data(), epi);
    }
  });
}

// Note [panels in place for one tile of rows]
// a [M, K] @ b [K, N] for M up to one tile's rows (a cell's backward at small
// B: dh = dG W_hh, dx = dG W_ih) reads each panel of b once, so packing b
// first (a copy of all of it) only adds memory traffic: the tile runs on b's
// own rows instead, ldb apart, and only the last panel, where N is not a
// multiple of its width, is copied (zero-padded). Panels [p0, p1) into
// epi(tile, width, 0, M, p).
template <typename V>
constexpr int in_place_rows() {
  return V::rows_per_tile(V::kColumnNV);
}

// Whether dY W of M rows, W read once, is ATen's mm (Note [short products by
// ATen's mm] in weight_grad.h): where ATen's mm takes the short products at
// all (mm_grad_rows), one row, or more than a tile's up to mm_grad_rows().
template <typename V>
bool short_product_by_mm(int64_t M) {
  const int64_t rows = mm_grad_rows();
  return rows > 0 && (M == 1 || (M > in_place_rows<V>() && M <= rows));
}

template <typename V, typename Epi>
void product_in_place(int64_t p0, int64_t p1, int64_t M, int64_t K, const Elem<V>* a,
                      int64_t lda, const Elem<V>* b, int64_t ldb, int64_t N, const Epi& epi) {
  constexpr int64_t U = kColumnPanel<V>;
  constexpr int MR = in_place_rows<V>();
  alignas(64) Elem<V> tile[MR * U];
  for (int64_t p = p0; p < p1; ++p) {
    const Elem<V>* panel = b + p * U;
    int64_t ldp = ldb;
    std::vector<Elem<V>> tail;
    if ((p + 1) * U > N) {
      tail.resize(static_cast<size_t>(K * U));
      pack_column_panel<V>(b, K, N, p, tail.data());
      panel = tail.data();
      ldp = U;
    }
    MmaVec<V>::template rows<MR, V::kColumnNV, true>(static_cast<int>(M), a, lda, 1, panel, K,
                                                     tile, false, ldp);
    epi(tile, U, 0, static_cast<int>(M), p);
  }
}

// Note [w in place for a few rows]
// y = a w^T for more rows of a than dot_gemm takes, up to 64, and rows of w
// at least 256 deep runs as y^T = w a^T: the rows of w are the tile's
// broadcast operand, read where they are, and only a is packed (transposed),
// into panels of NV vectors, as wide as the rows of a. Packing w cost as much
// as the product here, even panel by panel (Note [packing panel by panel]):
// on the 2-core AMD EPYC with AVX-512, w [4096, 1024], a [64, 1024]: 1.24
// against 1.49 ms (oneDNN's matmul 1.48 ms); a [32, 1024]: 0.65 against 0.99
// ms; a [16, 1024]: 0.46 against 0.57 ms; with K = 256 and 512 the two came
// out about even there. On the 2-core Xeon with AMX, interleaved, in place
// against panel by panel at K = 512 (w [2048, 512]): a [64, 512] 475 against
// 568 us (oneDNN 560 us), [32, 512] 273 against 395 us, [16, 512] 186 against
// 267 us; at K = 256 (w [1024, 256]): a [16, 256] 44 against 66 us, [32,
// 256] 67 against 98 us, [64, 256] even; the AVX2 kernels there 9-38%
// faster in place. So K >= 256.
constexpr int64_t kInPlaceMinDepth = 256;
constexpr int64_t kInPlaceMaxRows = 64;

// y[m][col(n)] = (a w^T)[m][n] (+ bias[n]), rows of y ldy apart.
template <typename V, int NV, typename Col>
void gemm_w_in_place(int64_t M, int64_t N, int64_t K, const Elem<V>* a, const Elem<V>* w,
                     const Elem<V>* bias, Elem<V>* y, int64_t ldy, const Col& col) {
  using T = Elem<V>;
  constexpr int64_t W = NV * V::kLanes;
  constexpr int MR = V::rows_per_tile(NV);
  const int64_t Q = ceil_div(M, W);
  std::vector<T> a_t(static_cast<size_t>(Q * K * W));  // a^T, Q panels [K][W]
  for (int64_t q = 0; q < Q; ++q) pack_transposed_panel<V, W>(a, M, K, q, a_t.data() + q * K * W);
  const int64_t tiles = ceil_div(N, MR);
  at::parallel_for(0, tiles, ceil_div(tiles, at::get_num_threads()), [&](int64_t t0, int64_t t1) {
    alignas(64) T tile[MR * W];
    int64_t cols[MR];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * MR;
      const int nr = static_cast<int>(std::min<int64_t>(MR, N - n));
      for (int r = 0; r < nr; ++r) cols[r] = col(n + r);
      for (int64_t q = 0; q < Q; ++q) {
        MmaVec<V>::template rows<MR, NV>(nr, w + n * K, K, 1, a_t.data() + q * K * W, K, tile,
                                         false);
        // The tile is rows n.. of y^T: stored transposed, a few stores per K FMAs.
        for (int64_t c = 0; c < std::min<int64_t>(W, M - q * W); ++c) {
          T* yr = y + (q * W + c) * ldy;
          for (int r = 0; r < nr; ++r) yr[cols[r]] = tile[r * W + c] + (bias ? bias[n + r] : T(0));
        }
      }
    }
  });
}

// gemm_w_in_place with panels of a^T as narrow as M allows.
template <typename V, typename Col>
void w_in_place(int64_t M, int64_t N, int64_t K, const Elem<V>* a, const Elem<V>* w,
                const Elem<V>* bias, Elem<V>* y, int64_t ldy, const Col& col) {
  constexpr int64_t L = V::kLanes;
  if (M <= L) return gemm_w_in_place<V, 1>(M, N, K, a, w, bias, y, ldy, col);
  if (M <= 2 * L) return gemm_w_in_place<V, 2>(M, N, K, a, w, bias, y, ldy, col);
  if constexpr (V::kColumnNV > 3) {
    if (M <= 3 * L) return gemm_w_in_place<V, 3>(M, N, K, a, w, bias, y, ldy, col);
  }
  gemm_w_in_place<V, V::kColumnNV>(M, N, K, a, w, bias, y, ldy, col);
}

// y [M, N] = a [M, K] w [N, K]^T (+ bias), w in place.
template <typename V>
void linear_w_in_place(int64_t M, int64_t N, int64_t K, const Elem<V>* a, const Elem<V>* w,
                       const Elem<V>* bias, Elem<V>* y) {
  w_in_place<V>(M, N, K, a, w, bias, y, N, [](int64_t n) { return n; });
}

// b [K, N] (any strides) packed for gemm_packed_fused: W^T panels where b is a
// transposed weight, else b's own.
template <typename V>
Tensor pack_rhs_fused(const Tensor& b) {
  return b.t().is_contiguous() ? pack_transposed_panels<V>(b.t())
                               : pack_column_panels<V>(b.contiguous());
}

// out [M, N] (+)= a [M, K] @ B, B packed by pack_rhs_fused (panels of
// kColumnPanel<V> columns, K * kColumnPanel<V> elements each: a range of
// them starts at an offset of the packed data); rows lda and ldo apart (the
// regularised ops' step GEMM, called per step with pointers: no tensor op).
template <typename V>
void gemm_packed_fused(int64_t M, int64_t N, int64_t K, const Elem<V>* a, int64_t lda,
                       const Elem<V>* packed, Elem<V>* out, int64_t ldo, bool accumulate) {
  gemm_rows<V>(M, N, K, a, lda, packed, nullptr, out, ldo, accumulate);
}

// Note [a single step with w in place]
// A single step (T = 1: a cell) of more rows than dot_gemm's reads each row
// of W_hh once, so, as for the projection (Note [w in place for a few rows]),
// the recurrent terms can come from W_hh's own rows against a^T, written
// straight into the layout of the forward tiles (panel p: gate g's units
// L p.. at g L), with the epilogue run over them after. 2-core Xeon with
// AMX, float32, the forward op at T=1, interleaved, in place / panel by panel
// (Note [a single step panel by panel]): LSTM B=16 H=256 100 / 122 us, B=32
// H=256 156 / 168 us, B=32 H=1024 1.32 / 2.02 ms, B=64 H=1024 2.36 / 2.90
// ms; GRU B=16 H=512 (training) 237 / 303 us; but LSTM B=64 H=256 299 / 249
// us, B=64 H=512 (training) 994 / 938 us, B=40 H=512 even. So up to 32 rows
// from H = 256 on, and up to 64 from H = 1024.
constexpr int64_t kStepInPlaceRows = 32;
constexpr int64_t kStepInPlaceDeepRows = 64;
constexpr int64_t kStepInPlaceDeep = 1024;

template <typename V>
struct VecGemm : PanelGemm<V, Elem<V>, MmaVec<V>, 1> {
  template <int NV, typename Epi>
  static bool single_step(int64_t B, int64_t H, int64_t G, const Elem<V>* a, const Elem<V>* w,
                          const Epi& epi) {
    if (H < kInPlaceMinDepth ||
        B > (H >= kStepInPlaceDeep ? kStepInPlaceDeepRows : kStepInPlaceRows)) {
      step_panel_by_panel<VecGemm, NV>(B, H, G, a, w, epi);
      return true;
    }
    constexpr int64_t L = V::kLanes;
    const int64_t ld = ceil_div(H, L) * G * L;
    const Tensor rec = empty_for_steps(
        {B, ld}, at::TensorOptions().dtype(c10::CppTypeToScalarType<Elem<V>>::value));
    Elem<V>* r = rec.data_ptr<Elem<V>>();
    w_in_place<V>(B, G * H, H, a, w, nullptr, r, ld,
                  [H, G](int64_t n) { return tile_column<L>(n, H, G); });
    epilogues_over<V>(r, B, H, G, epi);
    return true;
  }
};

template <typename V>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_fused(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const Tensor& b_hh, bool reverse, bool train, c10::IntArrayRef batch_sizes) {
  return lstm_forward_steps<VecGemm<V>>(x_proj, h0, c0, w_hh, b_hh, reverse, train, batch_sizes);
}

template <typename V>
std::tuple<Tensor, Tensor, Tensor> gru_forward_fused(const Tensor& x_proj, const Tensor& h0,
                                                   const Tensor& w_hh, const Tensor& b_hh,
                                                   bool reverse, bool train,
                                                   c10::IntArrayRef batch_sizes) {
  return gru_forward_steps<VecGemm<V>>(x_proj, h0, w_hh, b_hh, reverse, train, batch_sizes);
}

// (dW_hh, db_hh) from the steps' dG: dW_hh = sum over steps of dG_t^T h_{t-1},
// one GEMM (weight_grad.h) reading h_{t-1} in place (recurrent_grad_rows).
// dg: [T*B, G], out: [T, B, H], h0: [B, H] -> [G, H], and [G] or [0].
template <typename V>
std::pair<Tensor, Tensor> recurrent_weight_grads(const Tensor& dg, const Tensor& out,
                                                 const Tensor& h0, bool reverse, bool has_bias) {
  const int64_t T = out.size(0), B = out.size(1), H = out.size(2), G = dg.size(1);
  const auto segs = recurrent_grad_rows(dg.data_ptr<Elem<V>>(), out.data_ptr<Elem<V>>(),
                                        h0.data_ptr<Elem<V>>(), T, B, H, G, reverse);
  return weight_grad_fused<V>(segs, G, H, has_bias, dg.options());
}

// The backward's product dh_{t-1} = dG_t W_hh: W_hh [G, H] as B in column
// panels (pack) and the tile product that reads them (Mma); V's own here,
// bfloat16's in fused_avx512_bf16.cpp.
template <typename V>
struct ColumnPanels {
  using Mma = MmaVec<V>;
  template <typename Epi>
  static void run(int64_t p0, int64_t p1, int64_t M, int64_t K, const Elem<V>* a, int64_t lda,
                  const Elem<V>* packed, const Epi& epi) {
    run_panels<V, V::kColumnNV, Mma>(p0, p1, M, K, a, lda, 1, packed, epi);
  }
  static Tensor pack(const Tensor& w) { return pack_column_panels<V>(w); }
};

// One backward step's product, dG_s (a [B, G]) times W_hh's panels, into
// epi; on W_hh in place for a single step of few rows (in_place, V's type
// only: Note [panels in place for one tile of rows]).
template <typename V, typename Cols, typename S, typename Epi>
void backward_product(int64_t p0, int64_t p1, int64_t B, int64_t G, int64_t H, const S* a,
                      const typename Cols::Mma::Packed* wp, bool in_place, const Epi& epi) {
  if constexpr (std::is_same_v<S, Elem<V>>) {
    if (in_place) return product_in_place<V>(p0, p1, B, G, a, G, wp, H, H, epi);
  }
  Cols::run(p0, p1, B, G, a, G, wp, epi);
}

// The backward time loops, for the float types (S = V's element type, with
// the weight gradients) and bfloat16 (S = BFloat16: the product on bfloat16
// gate gradients; the caller forms the weight gradients, weight_grads false).
// grad_h_n, grad_c_n, cells and c0 are in V's type; the rest in S.
template <typename V, typename S = Elem<V>, typename Cols = ColumnPanels<V>>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_steps(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& output, const Tensor& gates, const Tensor& cells, const Tensor& h0,
    const Tensor& c0, const Tensor& w_hh, bool reverse, bool has_bias, bool weight_grads) {
  using E = Elem<V>;
  const int64_t T = grad_output.size(0), B = grad_output.size(1), H = w_hh.size(1);
  const int64_t G = kLstmGates * H, Q = ceil_div(H, kColumnPanel<V>);
  const Steps st{T, reverse};
  const Tensor go = grad_output.contiguous(), gts = gates.contiguous(), cls = cells.contiguous();
  const Tensor c0c = c0.contiguous(), ghn = grad_h_n.contiguous(), w = w_hh.contiguous();
  // One step (a cell): d_h0 from W_hh in place for one tile of rows (Note
  // [panels in place for one tile of rows]), else ATen's mm where that is
  // faster (Note [short products by ATen's mm]).
  const bool one_step = std::is_same_v<S, E> && T == 1;
  const bool in_place = one_step && B <= in_place_rows<V>();
  const bool by_mm = one_step && short_product_by_mm<V>(B);
  const Tensor packed = in_place || by_mm ? w : Cols::pack(w);
  Tensor dg = empty_for_steps({T * B, G}, go.options());
  Tensor dc = grad_c_n.contiguous().clone();
  Tensor d_h0 = at::empty({B, H}, ghn.options());
  const S *gop = go.data_ptr<S>(), *gtp = gts.data_ptr<S>();
  const E *clp = cls.data_ptr<E>(), *c0p = c0c.data_ptr<E>();
  const auto* wp = packed.data_ptr<typename Cols::Mma::Packed>();
  E* dcp = dc.data_ptr<E>();
  S* dgp = dg.data_ptr<S>();
  auto epi_at = [&](int64_t s) {
    const int64_t t = st.time_at(s);
    const E* c_prev = s == 0 ? c0p : clp + st.time_at(s - 1) * B * H;
    return LstmBackwardEpi<V, S>{H, gop + t * B * H, gtp + t * B * G, clp + t * B * H, c_prev,
                                 dcp, dgp + t * B * G};
  };
  // Steps in order: the pointwise backward of the last step (from grad_h_n),
  // T-1 fused GEMM + pointwise steps, then d_h0 = dG_0 W_hh.
  const StoreEpi<V> last{H, nullptr, d_h0.data_ptr<E>()};
  run_steps(by_mm ? 1 : T + 1, Q, [&](int64_t k, int64_t p0, int64_t p1) {
    if (k == 0) {
      epilogue_only<V>(p0, p1, B, ghn.data_ptr<E>(), H, kColumnPanel<V>, epi_at(T - 1));
      return;
    }
    const int64_t s = T - k;  // GEMM on dG of step s
    const S* a = dgp + st.time_at(s) * B * G;
    if (s >= 1) {
      backward_product<V, Cols>(p0, p1, B, G, H, a, wp, in_place, epi_at(s - 1));
    } else {
      backward_product<V, Cols>(p0, p1, B, G, H, a, wp, in_place, last);
    }
  });
  if (by_mm) at::mm_out(d_h0, dg, w);
  const Tensor none = at::empty({0}, go.options());
  if constexpr (std::is_same_v<S, E>) {
    if (weight_grads) {
      auto [d_w_hh, d_b_hh] =
          recurrent_weight_grads<V>(dg, output.contiguous(), h0.contiguous(), reverse, has_bias);
      return {dg.view({T, B, G}), d_h0, dc, d_w_hh, none, d_b_hh};
    }
  }
  return {dg.view({T, B, G}), d_h0, dc, none, none, none};
}

template <typename V, typename S = Elem<V>, typename Cols = ColumnPanels<V>>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_steps(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& output, const Tensor& gates,
    const Tensor& h0, const Tensor& w_hh, bool reverse, bool has_bias, bool weight_grads) {
  using E = Elem<V>;
  const int64_t T = grad_output.size(0), B = grad_output.size(1), H = w_hh.size(1);
  const int64_t G = kGruGates * H, Q = ceil_div(H, kColumnPanel<V>);
  const Steps st{T, reverse};
  const Tensor go = grad_output.contiguous(), gts = gates.contiguous(), h0c = h0.contiguous();
  const Tensor out = output.contiguous(), w = w_hh.contiguous();
  const bool one_step = std::is_same_v<S, E> && T == 1;  // as the LSTM's
  const bool in_place = one_step && B <= in_place_rows<V>();
  const bool by_mm = one_step && short_product_by_mm<V>(B);
  const Tensor packed = in_place || by_mm ? w : Cols::pack(w);
  Tensor dx = empty_for_steps({T * B, G}, go.options());
  Tensor dhh = empty_for_steps({T * B, G}, go.options());
  Tensor dh = grad_h_n.contiguous().clone();
  Tensor d_h0 = at::empty({B, H}, dh.options());
  const S *gop = go.data_ptr<S>(), *gtp = gts.data_ptr<S>(), *op = out.data_ptr<S>();
  const S* h0p = h0c.data_ptr<S>();
  const auto* wp = packed.data_ptr<typename Cols::Mma::Packed>();
  E* dhp = dh.data_ptr<E>();
  S *dxp = dx.data_ptr<S>(), *dhhp = dhh.data_ptr<S>();
  auto epi_at = [&](int64_t s) {
    const int64_t t = st.time_at(s);
    const S* h_prev = s == 0 ? h0p : op + st.time_at(s - 1) * B * H;
    return GruBackwardEpi<V, S>{H, gop + t * B * H, gtp + t * B * kGruSaved * H, h_prev, dhp,
                                dxp + t * B * G, dhhp + t * B * G};
  };
  // As for the LSTM: last step's pointwise, T-1 fused steps, then d_h0.
  const StoreEpi<V> last{H, dhp, d_h0.data_ptr<E>()};
  run_steps(by_mm ? 1 : T + 1, Q, [&](int64_t k, int64_t p0, int64_t p1) {
    if (k == 0) {
      epilogue_only<V>(p0, p1, B, nullptr, H, kColumnPanel<V>, epi_at(T - 1));
      return;
    }
    const int64_t s = T - k;
    const S* a = dhhp + st.time_at(s) * B * G;
    if (s >= 1) {
      backward_product<V, Cols>(p0, p1, B, G, H, a, wp, in_place, epi_at(s - 1));
    } else {
      backward_product<V, Cols>(p0, p1, B, G, H, a, wp, in_place, last);
    }
  });
  if (by_mm) at::addmm_out(d_h0, dh, dhh, w);  // last's sum: dh + dG_hh W_hh
  const Tensor none = at::empty({0}, go.options());
  if constexpr (std::is_same_v<S, E>) {
    if (weight_grads) {
      auto [d_w_hh, d_b_hh] = recurrent_weight_grads<V>(dhh, out, h0c, reverse, has_bias);
      return {dx.view({T, B, G}), d_h0, d_w_hh, d_b_hh, dhh};
    }
  }
  return {dx.view({T, B, G}), d_h0, none, none, dhh};
}

template <typename V>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_fused(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& output, const Tensor& gates, const Tensor& cells, const Tensor& h0,
    const Tensor& c0, const Tensor& w_hh, bool reverse, bool has_bias, bool weight_grads) {
  return lstm_backward_steps<V>(grad_output, grad_h_n, grad_c_n, output, gates, cells, h0, c0,
                                w_hh, reverse, has_bias, weight_grads);
}

template <typename V>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_fused(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& output, const Tensor& gates,
    const Tensor& h0, const Tensor& w_hh, bool reverse, bool has_bias, bool weight_grads) {
  return gru_backward_steps<V>(grad_output, grad_h_n, output, gates, h0, w_hh, reverse, has_bias,
                               weight_grads);
}

template <typename V>
Tensor linear_fused(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor y = empty_for_steps({M, N}, x.options());
  const Tensor bias = b.has_value() ? b->contiguous() : Tensor();
  const Elem<V>* bp = bias.defined() ? bias.data_ptr<Elem<V>>() : nullptr;
  const Elem<V>* wp = w.data_ptr<Elem<V>>();
  if (M <= dot_max_rows<V>()) {  // Note [dot products for a few rows]
    Elem<V>* yp = y.data_ptr<Elem<V>>();
    dot_gemm<V>(M, N, K, x.data_ptr<Elem<V>>(), K, wp, bp,
                [yp, N](int64_t m, int64_t n) -> Elem<V>& { return yp[m * N + n]; });
    return y;
  }
  if (M <= kInPlaceMaxRows && K >= kInPlaceMinDepth) {  // Note [w in place for a few rows]
    linear_w_in_place<V>(M, N, K, x.data_ptr<Elem<V>>(), wp, bp, y.data_ptr<Elem<V>>());
    return y;
  }
  if (M <= kRowBlock) {  // Note [packing panel by panel]
    const auto pack = [&](int64_t p, Elem<V>* panel) {
      pack_transposed_panel<V>(wp, N, K, p, panel);
    };
    gemm_panelwise<V>(M, N, K, x.data_ptr<Elem<V>>(), K, pack, bp, y.data_ptr<Elem<V>>(), N);
    return y;
  }
  const Tensor packed = pack_transposed_panels<V>(w);
  gemm_rows<V>(M, N, K, x.data_ptr<Elem<V>>(), K, packed.data_ptr<Elem<V>>(), bp,
               y.data_ptr<Elem<V>>(), N, false, true);
  return y;
}

template <typename V>
Tensor linear_input_grad_fused(const Tensor& dy, const Tensor& w) {
  const int64_t M = dy.size(0), N = w.size(0), K = w.size(1);
  Tensor dx = empty_for_steps({M, K}, dy.options());
  if (short_product_by_mm<V>(M)) return at::mm_out(dx, dy, w);
  const Elem<V>* wp = w.data_ptr<Elem<V>>();
  if (M <= in_place_rows<V>()) {  // Note [panels in place for one tile of rows]
    const StoreRowsEpi<V> epi{K, K, nullptr, dx.data_ptr<Elem<V>>(), false};
    const int64_t Q = ceil_div(K, kColumnPanel<V>);
    at::parallel_for(0, Q, ceil_div(Q, at::get_num_threads()), [&](int64_t q0, int64_t q1) {
      product_in_place<V>(q0, q1, M, N, dy.data_ptr<Elem<V>>(), N, wp, K, K, epi);
    });
    return dx;
  }
  if (M <= kRowBlock) {  // Note [packing panel by panel]
    const auto pack = [&](int64_t q, Elem<V>* panel) { pack_column_panel<V>(wp, N, K, q, panel); };
    gemm_panelwise<V>(M, K, N, dy.data_ptr<Elem<V>>(), N, pack, nullptr, dx.data_ptr<Elem<V>>(),
                      K);
    return dx;
  }
  const Tensor packed = pack_column_panels<V>(w);
  gemm_rows<V>(M, K, N, dy.data_ptr<Elem<V>>(), N, packed.data_ptr<Elem<V>>(), nullptr,
               dx.data_ptr<Elem<V>>(), K);
  return dx;
}

// The table fused.h declares, for one vector type; constant-initialised (no
// code of this unit runs before a CPU check has chosen it).
template <typename V>
constexpr FusedOps<Elem<V>> fused_ops() {
  return {&lstm_forward_fused<V>,  &lstm_backward_fused<V>,       &gru_forward_fused<V>,
          &gru_backward_fused<V>,  &linear_fused<V>,              &linear_input_grad_fused<V>,
          &weight_grad_fused<V>,   &weight_grad_blocks<V>,        &pack_rhs_fused<V>,
          &gemm_packed_fused<V>};
}

}  // namespace
}  // namespace cpu
}  // namespace fusedrnn
