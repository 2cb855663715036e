// A small register-blocked GEMM for the recurrent step on the CPU, written once
// for the vector types of vec16.h (AVX-512) and vec8.h (AVX2). Include only
// from code compiled for that instruction set (Note [ISA translation units]
// in fused_ops.h).
//
// Note [why our own GEMM]
// On the 2-core AMD machines we are measured on, MKL's SGEMM is about 1.6x
// slower than a plain register-blocked AVX-512 kernel on the per-step shapes
// ([B, H] x [H, 4H], one thread); and owning the kernel lets each tile of gate
// pre-activations go through the pointwise update straight from L1, so it
// never travels through memory between the matmul and the gate math.
//
// Layout: B is packed once per call into panels of kPanel (= NV * lanes)
// columns, each panel stored k-major so the kernel streams it contiguously:
//
//   packed[p][k][c] = B[k][p * kPanel + c]     (0 beyond N)
//
// A tile of MR rows x NV vectors accumulates in registers (V::rows_per_tile:
// at most 24 of the 32 zmm, 12 of the 16 ymm), is stored to a small L1
// buffer and handed to an epilogue functor, which applies the gate math of
// gates.h and stores.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>


namespace fusedrnn {
namespace cpu {

// The MR x NV accumulators of a tile: from tile (accumulate) or zero, and back.
template <typename V, int MR, int NV>
inline void load_acc(typename V::Reg (&acc)[MR][NV], const typename V::T* tile, bool accumulate) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? V::loadu(tile + (r * NV + v) * V::kLanes) : V::zero();
}

template <typename V, int MR, int NV>
inline void store_acc(const typename V::Reg (&acc)[MR][NV], typename V::T* tile) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) V::storeu(tile + (r * NV + v) * V::kLanes, acc[r][v]);
}

// Cache lines to prefetch into L2 during tile products: `lines` of them from
// `at` on (Note [the next slice into L2]).
struct Ahead {
  const char* at = nullptr;
  int64_t lines = 0;
  // The first n lines (one product's share); the rest stays.
  Ahead take(int64_t n) {
    const Ahead share{at, std::min(lines, n)};
    at += share.lines * 64;
    lines -= share.lines;
    return share;
  }
};

// Note [operands of a k step]
// Each k step loads the NV panel vectors once and broadcasts each of the MR
// values of A once (vbroadcastss from memory: a load, no shuffle), for
// MR * NV FMAs: MR + NV loads, at most 2/3 of a load per FMA, which two load
// ports serve beside two FMA pipes. Where the accumulators, the NV panel
// vectors and a broadcast do not all fit in registers (AVX2's LSTM tile: 12 +
// 4 + 1 > 16 ymm), the MR broadcasts stay in registers instead and the panel
// vectors stream through one register (12 + 3 + 1): the same loads, no spill.

// Note [partial sums for a tile of few accumulators]
// An FMA waits for the one before it on the same accumulator (4 cycles on
// the cores measured), so a tile of MR x NV accumulators retires at most
// MR * NV / 4 of them a cycle: with fewer than the two FMA pipes' 8 (AVX2's
// backward tile of one row: 2 vectors), the product waits on latency, not on
// the panel's loads. Such a tile sums k in V::kMinChains / (MR * NV)
// interleaved partial sums, added at the end. 2-core AMD EPYC without
// AVX-512, one thread over 512 KB of 2-vector panels in L2, one row: 10.5 ->
// 7.1 us (19 -> 29 bytes a cycle of the L2's 32); T=100 B=1 H=256, medians
// of five alternating processes: LSTM training 4.16 -> 3.74 ms, GRU
// inference 1.01 -> 0.88 ms, training 3.17 -> 2.73 ms. AVX-512's vectors are
// twice as wide, so 4 accumulators already take the L2's 64 bytes a cycle:
// there kMinChains is 4. Only a product of one tile of rows (M <= MR: batch
// 1 to 3) takes them, where the time is all in that tile; a last tile of a
// few rows after full ones keeps one sum, so a single step's ways that
// follow the step loop's order of k (Note [a single step with w in place]
// in fused_ops.h) still give its results bit for bit.
template <typename V, int MR, int NV>
constexpr int partial_sums() {
  return MR * NV >= V::kMinChains ? 1 : V::kMinChains / (MR * NV);
}

// mma_tile's k loop for a tile of few accumulators: S interleaved partial
// sums of A[MR rows, K] * panel, added into acc.
template <typename V, int MR, int NV, int S, typename E>
inline void partial_sums_loop(typename V::Reg (&acc)[MR][NV], const E* a, int64_t sam,
                              int64_t sak, const E* panel, int64_t lp, int64_t K, Ahead ahead) {
  using Reg = typename V::Reg;
  Reg sums[S][MR][NV];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) sums[s][r][v] = V::zero();
  for (int64_t k0 = 0; k0 < K; k0 += S) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const int64_t k = k0 + s;
      if (k == K) break;
      if (k < ahead.lines) _mm_prefetch(ahead.at + k * 64, _MM_HINT_T1);
      Reg w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = V::loadu(panel + k * lp + v * V::kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const Reg av = V::set1(a[r * sam + k * sak]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) sums[s][r][v] = V::fmadd(av, w[v], sums[s][r][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = (V(acc[r][v]) + V(sums[s][r][v])).v;
}

// tile[MR][NV * lanes] (+)= A[MR rows, K] * panel[K][NV * lanes]; element
// (r, k) of A is a[r * sam + k * sak]; the panel's rows ldp apart (0: packed,
// NV * lanes). accumulate: add to what tile holds.
// ahead: lines to bring into L2 meanwhile, one a k step (Note [the next slice
// into L2]). kOneTile: the product's only tile of rows (Note [partial sums for
// a tile of few accumulators]).
// noinline: Note [activations inlined] in gates.h.
template <typename V, int MR, int NV, bool kOneTile = false, typename E = typename V::T>
__attribute__((noinline)) void mma_tile(const E* a, int64_t sam, int64_t sak, const E* panel,
                                        int64_t K, E* tile, bool accumulate, int64_t ldp = 0,
                                        Ahead ahead = {}) {
  using Reg = typename V::Reg;
  const int64_t lp = ldp ? ldp : NV * V::kLanes;
  Reg acc[MR][NV];
  load_acc<V, MR, NV>(acc, tile, accumulate);
  if constexpr (constexpr int S = kOneTile ? partial_sums<V, MR, NV>() : 1; S > 1) {
    partial_sums_loop<V, MR, NV, S>(acc, a, sam, sak, panel, lp, K, ahead);
  } else if constexpr (MR * NV + NV + 1 <= V::kRegs) {
    for (int64_t k = 0; k < K; ++k) {
      if (k < ahead.lines) _mm_prefetch(ahead.at + k * 64, _MM_HINT_T1);
      Reg w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = V::loadu(panel + k * lp + v * V::kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const Reg av = V::set1(a[r * sam + k * sak]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(av, w[v], acc[r][v]);
      }
    }
  } else {
    static_assert(MR * NV + MR + 1 <= V::kRegs, "tile too large for the registers");
    for (int64_t k = 0; k < K; ++k) {
      if (k < ahead.lines) _mm_prefetch(ahead.at + k * 64, _MM_HINT_T1);
      Reg av[MR];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) av[r] = V::set1(a[r * sam + k * sak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const Reg w = V::loadu(panel + k * lp + v * V::kLanes);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) acc[r][v] = V::fmadd(av[r], w, acc[r][v]);
      }
    }
  }
  store_acc<V, MR, NV>(acc, tile);
}

// The tile product for run_panels in V's own element type: mma_tile for a
// run-time row count mr <= MR. (fused_avx512_bf16.cpp has the bfloat16 one,
// on k-pair panels, with float32 tiles.)
template <typename V>
struct MmaVec {
  static constexpr int kStepsPerLine = 1;  // k steps for each line ahead
  using E = typename V::T;
  using A = E;
  using Packed = E;
  template <int MR, int NV, bool kOneTile = false>
  static void rows(int mr, const E* a, int64_t sam, int64_t sak, const E* panel, int64_t K,
                   E* tile, bool accumulate, int64_t ldp = 0, Ahead ahead = {}) {
    if constexpr (MR > 1) {
      if (mr < MR) {
        return rows<MR - 1, NV, kOneTile>(mr, a, sam, sak, panel, K, tile, accumulate, ldp,
                                          ahead);
      }
    }
    // One instantiation where the partial sums change nothing.
    constexpr bool kPartial = kOneTile && partial_sums<V, MR, NV>() > 1;
    mma_tile<V, MR, NV, kPartial>(a, sam, sak, panel, K, tile, accumulate, ldp, ahead);
  }
};

// Depth of one pass over a panel: 128 KiB (512 x 64 floats), which stays in
// L2 while every row block of A runs over it. Deeper panels (the backward's
// K = 4H) are cut into such slices, the tiles summed in a buffer. (Slices of
// 32 KiB, to stay in L1, measured no faster on the quick set.)
constexpr int64_t kPanelChunkBytes = 128 * 1024;
// A multiple of 16, so that chunks keep k-pairs (and cache lines) whole.
constexpr int64_t kDepthMultiple = 16;
template <typename V, int NV, typename Mma>
constexpr int64_t depth_block() {
  return kPanelChunkBytes /
         (NV * V::kLanes * static_cast<int64_t>(sizeof(typename Mma::Packed))) /
         kDepthMultiple * kDepthMultiple;
}

// For panels [p0, p1) and all M rows: the tile (V::T) of rows m0..m0+mr of
// A [M, K] (element (m, k) at a[m * sam + k * sak]) times the panel, then
// epi(tile, row stride, m0, mr, p). A panel holds K x NV * lanes values of
// Mma::Packed in the order Mma reads them.
//
// Note [prefetching the epilogue's rows]
// The epilogue reads rows of step buffers that are tens of MB (x_proj; in
// backward the saved gates and the output gradient), so they come from
// memory, and nothing brought them in ahead: each tile's epilogue waited for
// them after its product. epi.prefetch(m0, mr, p) asks for them just before
// the tile's last pass over the panel, whose thousands of cycles of FMAs then
// hide the misses. Measured on the 2-core AMD EPYC (the LSTM forward op,
// T=100, I=H=512): B=64 40 -> 31 ms (68% -> 88% of the FMA peak), B=16 10.6
// -> 8.3 ms. Prefetching also the rows the epilogue writes, or the running
// state (in L2 already), took the gain back: only what is read from memory.
// Rows m0..m0+mr of `rows` ([B, G*H]: gate g of unit u at g * H + u), units
// u0..u0+n of every gate, one prefetch per `step` units (one vector's worth).
template <typename T>
inline void prefetch_rows(const T* rows, int G, int64_t H, int64_t m0, int mr, int64_t u0,
                          int64_t n, int64_t step) {
  for (int64_t b = m0; b < m0 + mr; ++b) {
    for (int g = 0; g < G; ++g) {
      for (int64_t j = 0; j < n; j += step) __builtin_prefetch(rows + (b * G + g) * H + u0 + j, 0, 3);
    }
  }
}

// Note [panels in alternating order]
// A step reads all of a thread's panels of W_hh, and at H = 512 in float32
// (2 MB a thread on two cores) they fill its L2: taken in the same order every
// step, each panel had left L2 by the time the next step came back to it. So
// each call on a thread runs its panels in the opposite order to the call
// before, and a step starts with the panels the one before ended with, still
// in L2. The order changes no result: each panel's tiles are its own. 2-core
// Xeon with AMX, interleaved: the float32 LSTM forward op at T=100 B=16 H=512
// 17.5 -> 15.5 ms (training, the module: 92.1 -> 86.6 ms), at B=1 H=256
// (training) 5.93 -> 5.38 ms; at B=64 and at H=1024, within 3%; bfloat16 on
// AMX tiles (amx::run_panels) at T=25 B=16 H=1024 8.7 -> 7.7 ms.
struct PanelOrder {  // panel i of [p0, p1) in this call's order
  int64_t p0, p1;
  bool reverse;
  int64_t operator()(int64_t i) const { return reverse ? p0 + p1 - 1 - i : i; }
};
inline PanelOrder panel_order(int64_t p0, int64_t p1) {
  thread_local bool reverse = false;
  reverse = !reverse;
  return {p0, p1, reverse};
}

// Note [the next slice into L2]
// Where a thread's panels outgrow its L2 (W_hh at H = 1024 in float32: 8 MB a
// thread on two cores; the projection's W_ih), each slice of a panel
// (kDepthBlock deep) came from L3 on the first row block's pass, which waited
// on it while the other row blocks ran from L2. Now the row blocks of a slice
// bring the slice after it (the panel's next, or the next panel's first) into
// L2, one cache line a k step among the FMAs. In a one-thread micro-benchmark
// of the tile kernel over 8 MB of panels: 117 -> 133 GFLOP/s. 2-core Xeon with
// AMX, float32, interleaved: the LSTM forward op at T=25 B=64 H=1024 59.3 ->
// 55.7 ms; the modules' inference 6-10% faster and training 3-9% (LSTM and
// GRU, T=100 B=64 H=512, T=25 B=64 H=1024, T=100 B=16 H=512); where the
// panels fit L2, within the noise. A single row block reuses nothing, and
// the hardware prefetcher streams its panels as well, so it prefetches
// nothing. The vdpbf16ps tile product (MmaBf16) takes a line a k pair: 1-4%
// faster bfloat16 forward ops there (forced with FUSEDRNN_CPU_ISA=avx512).
// On AMX tiles (amx::run_panels) the same prefetch gained nothing at B=64
// and cost 7-20% at B=16, so the tiles take no lines.
//
// Note [a panel's stores after its products]
// A plain product's epilogue only stores the tile's rows (the input
// projection's output: tens of MB, so rows not in cache). Run after each
// tile, those stores held up the next tile's product (the likely cause:
// the store misses keep the L1's fill buffers that the panel's loads from
// L2 need); run over all of a panel's rows after its products, they do not.
// Such an epilogue sets kStoresRows, and run_panels keeps its tiles in the
// sums buffer until the panel is done. 2-core Xeon with AMX, float32,
// interleaved: linear at [1600, 256] x [768, 256]^T 7-10% faster, at [6400,
// 512] x [2048, 512]^T 8-10%, at [100, 256] x [1024, 256]^T 3% (K > 512
// took this way already); the regularised layers' step products 0-5%;
// float64 3-5%, bfloat16 on vdpbf16ps 0-2%. On AVX2's kernels it was 4-10%
// slower, so there, as in the recurrent steps (gate math on rows they read:
// 7% slower to 4% faster), a tile's epilogue runs right after it.
template <typename Epi, typename = void>
struct StoresRows : std::false_type {};
template <typename Epi>
struct StoresRows<Epi, std::void_t<decltype(Epi::kStoresRows)>>
    : std::bool_constant<Epi::kStoresRows> {};

// Note [the last rows over half panels]
// A step's last tile of 1-2 rows (B = 7, 8, 13, 14, ...: MR = 6) streams all
// of the thread's panels again for a few FMAs a k step, and costs a third to
// half of a full tile. So the last 7 or 8 rows run as one tile over each half
// of the panel's vectors (8 x NV/2 accumulators), each half streamed once.
// 2-core Xeon with AMX, float32, the LSTM forward op at T=100 H=256, per step,
// two alternating pairs: B=6 27.2-28.5 -> 27.6-27.8 us, B=7 38.8-40.4 ->
// 33.9-34.0, B=8 42.9-43.2 -> 39.6-40.6, B=13 66.6-67.3 -> 59.2-64.4, B=14
// 70.1-72.9 -> 65.8-67.1. Tried and slower or no faster: a 12-row tile of
// halves (B=12 as fast as two tiles of 6), tiles of even rows (B=7 as 4 + 3:
// slower), panel slices sized for L1 (B=8 5-8%, B=12 and 16 none). Taken
// where a panel is one depth block (the forward at H <= 512, the backward
// where G*H is; the GRU's forward tiles, over 3 vectors, have 8 rows already)
// and 8 x NV/2 accumulators fit the registers (not AVX2's 16 in the forward).
//
// Where a half is one vector (AVX2's backward and plain products: panels of 2
// vectors), a k step of the half tile loads 8 broadcasts and a vector for 8
// FMAs, more than the two load ports serve, and at the LSTM's rows of dG (4H
// floats apart: one L1 set at H = 256, 512, 1024) its 8 lines and the panel's
// overfill an 8-way L1 set. There the last 7 or 8 rows run as two tiles of 4
// and 3-4 rows (6 loads for 8 FMAs, 8 accumulators). 2-core AMD EPYC without
// AVX-512, the LSTM backward op at T=100, fastest of 30 calls, three pairs of
// processes alternating with the half tiles' build: B=8 H=512 22.5-23.0 ->
// 18.8-19.0 ms, B=8 H=256 5.9 -> 5.2 ms, B=7 H=512 18.9 -> 17.3-17.6 ms.
template <typename V, int NV, typename Mma>
struct HalfTiles {
  static constexpr int MR = V::rows_per_tile(NV);
  static constexpr int kHalfRows = 8;
  static constexpr bool kFits = std::is_same_v<Mma, MmaVec<V>> && NV % 2 == 0 &&
                                kHalfRows > MR &&
                                kHalfRows * (NV / 2) + NV / 2 + 1 <= V::kRegs;
  static constexpr bool kOn = kFits && NV / 2 > 1;
  static constexpr bool kSplit = kFits && NV / 2 == 1;  // two tiles of half the rows instead
  static constexpr int kRows = kOn ? kHalfRows : MR;  // a tile's most rows
  // The rows of the next tile, with `left` rows left.
  static int next_rows(int64_t left) {
    if (left > MR && left <= kHalfRows) {
      if (kOn) return static_cast<int>(left);
      if (kSplit) return static_cast<int>((left + 1) / 2);
    }
    return static_cast<int>(std::min<int64_t>(MR, left));
  }
  // tile[mr][NV * lanes] = A[mr rows, K] * panel, half of the vectors at a
  // time; only where next_rows gave mr > MR (A and P are Mma's operand types).
  template <typename A, typename P>
  static void run(int mr, const A* a, int64_t sam, int64_t sak, const P* panel, int64_t K,
                  typename V::T* tile) {
    if constexpr (kOn) {
      constexpr int64_t W = NV * V::kLanes, W2 = W / 2;
      alignas(64) typename V::T half[kHalfRows * W2];
      for (int h = 0; h < 2; ++h) {
        MmaVec<V>::template rows<kHalfRows, NV / 2>(mr, a, sam, sak, panel + h * W2, K, half,
                                                    false, W);
        for (int r = 0; r < mr; ++r) {
          std::copy(half + r * W2, half + (r + 1) * W2, tile + r * W + h * W2);
        }
      }
    }
  }
};

template <typename V, int NV, typename Mma = MmaVec<V>, typename Epi>
void run_panels(int64_t p0, int64_t p1, int64_t M, int64_t K, const typename Mma::A* a,
                int64_t sam, int64_t sak, const typename Mma::Packed* packed, const Epi& epi) {
  constexpr int MR = V::rows_per_tile(NV);
  constexpr int64_t W = NV * V::kLanes;
  constexpr int64_t kDepthBlock = depth_block<V, NV, Mma>();
  constexpr int64_t kLineValues = 64 / sizeof(typename Mma::Packed);
  const PanelOrder panel_at = panel_order(p0, p1);  // Note [panels in alternating order]
  const bool reuse = M > MR;  // more than one row block reads each slice
  // The slice after the one at depth k0 of panel i (in this call's order).
  const auto slice_after = [&](int64_t i, int64_t k0) -> Ahead {
    const int64_t next_k0 = k0 + kDepthBlock < K ? k0 + kDepthBlock : 0;
    if (!reuse || (next_k0 == 0 && i + 1 == p1)) return {};
    const int64_t p = next_k0 ? panel_at(i) : panel_at(i + 1);
    return {reinterpret_cast<const char*>(packed + (p * K + next_k0) * W),
            std::min(kDepthBlock, K - next_k0) * W / kLineValues};
  };
  // Note [a panel's stores after its products]
  constexpr bool kStoresAfter = StoresRows<Epi>::value;
  // One depth block, or one row block: no sums.
  if ((K <= kDepthBlock && !kStoresAfter) || M <= MR) {
    using Half = HalfTiles<V, NV, Mma>;  // Note [the last rows over half panels]
    constexpr bool kVecTiles = std::is_same_v<Mma, MmaVec<V>>;
    alignas(64) typename V::T tile[Half::kRows * W];
    for (int64_t i = p0; i < p1; ++i) {
      const int64_t p = panel_at(i);
      const auto* panel = packed + p * K * W;
      Ahead ahead = slice_after(i, 0);
      for (int64_t m0 = 0; m0 < M;) {
        const int64_t left = M - m0;
        const int mr = Half::next_rows(left);
        epi.prefetch(m0, mr, p);
        if (mr > MR) {
          Half::run(mr, a + m0 * sam, sam, sak, panel, K, tile);
        } else if (M <= MR && kVecTiles) {  // Note [partial sums for a tile of few accumulators]
          if constexpr (kVecTiles) {
            MmaVec<V>::template rows<MR, NV, true>(mr, a, sam, sak, panel, K, tile, false);
          }
        } else {
          Mma::template rows<MR, NV>(mr, a + m0 * sam, sam, sak, panel, K, tile, false, 0,
                                     ahead.take(K / Mma::kStepsPerLine));
        }
        epi(tile, W, m0, mr, p);
        m0 += mr;
      }
    }
    return;
  }
  thread_local std::vector<typename V::T> sums;
  sums.resize(static_cast<size_t>(M * W));
  for (int64_t i = p0; i < p1; ++i) {
    const int64_t p = panel_at(i);
    const auto* panel = packed + p * K * W;
    for (int64_t k0 = 0; k0 < K; k0 += kDepthBlock) {
      const int64_t kc = std::min(kDepthBlock, K - k0);
      Ahead ahead = slice_after(i, k0);
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
        if (k0 + kc == K) epi.prefetch(m0, mr, p);
        Mma::template rows<MR, NV>(mr, a + m0 * sam + k0 * sak, sam, sak, panel + k0 * W, kc,
                                   sums.data() + m0 * W, k0 > 0, 0,
                                   ahead.take(kc / Mma::kStepsPerLine));
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      epi(sums.data() + m0 * W, W, m0, static_cast<int>(std::min<int64_t>(MR, M - m0)), p);
    }
  }
}

}  // namespace cpu
}  // namespace fusedrnn
