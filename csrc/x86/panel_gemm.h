// A small AVX-512 GEMM for the recurrent step on the CPU. Include only from
// code compiled for AVX-512 (see Note [AVX-512 translation unit]).
//
// Note [why our own GEMM]
// On the 2-core AMD machines we are measured on, MKL's SGEMM is about 1.6x
// slower than a plain register-blocked AVX-512 kernel on the per-step shapes
// ([B, H] x [H, 4H], one thread); and owning the kernel lets each tile of gate
// pre-activations go through the pointwise update straight from L1, so it
// never travels through memory between the matmul and the gate math.
//
// Layout: B is packed once per call into panels of kPanel (= NV * 16) columns,
// each panel stored k-major so the kernel streams it contiguously:
//
//   packed[p][k][c] = B[k][p * kPanel + c]     (0 beyond N)
//
// A tile of MR rows x NV vectors accumulates in registers (MR * NV <= 24 of
// the 32 zmm registers), is stored to a small L1 buffer and handed to an
// epilogue functor, which applies the gate math of gates.h and stores.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>


namespace fusedrnn {
namespace cpu {

constexpr int kLanes = 16;  // floats per zmm register

// The MR x NV accumulators of a tile: from tile (accumulate) or zero, and back.
template <int MR, int NV>
inline void load_acc(__m512 (&acc)[MR][NV], const float* tile, bool accumulate) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(tile + (r * NV + v) * kLanes) : _mm512_setzero_ps();
}

template <int MR, int NV>
inline void store_acc(const __m512 (&acc)[MR][NV], float* tile) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(tile + (r * NV + v) * kLanes, acc[r][v]);
}

// tile[MR][NV * 16] (+)= A[MR rows, K] * panel[K][NV * 16]; element (r, k) of
// A is a[r * sam + k * sak]. accumulate: add to what tile holds.
template <int MR, int NV>
inline void mma_tile(const float* a, int64_t sam, int64_t sak, const float* panel, int64_t K,
                     float* tile, bool accumulate) {
  __m512 acc[MR][NV];
  load_acc<MR, NV>(acc, tile, accumulate);
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(panel + (k * NV + v) * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * sam + k * sak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, w[v], acc[r][v]);
    }
  }
  store_acc<MR, NV>(acc, tile);
}

// The float32 tile product for run_panels: mma_tile for a run-time row count
// mr <= MR. (fused_avx512_bf16.cpp has the bfloat16 one, on k-pair panels.)
struct MmaF32 {
  using A = float;
  using Packed = float;
  template <int MR, int NV>
  static void rows(int mr, const float* a, int64_t sam, int64_t sak, const float* panel,
                   int64_t K, float* tile, bool accumulate) {
    if constexpr (MR > 1) {
      if (mr < MR) return rows<MR - 1, NV>(mr, a, sam, sak, panel, K, tile, accumulate);
    }
    mma_tile<MR, NV>(a, sam, sak, panel, K, tile, accumulate);
  }
};

// Rows per tile for NV vectors per row: at most 24 accumulators.
template <int NV>
constexpr int rows_per_tile() {
  return NV >= 4 ? 6 : 8;
}

// Depth of one pass over a panel: 128 KiB (512 x 64 floats), which stays in
// L2 while every row block of A runs over it. Deeper panels (the backward's
// K = 4H) are cut into such slices, the tiles summed in a buffer. (Slices of
// 32 KiB, to stay in L1, measured no faster on the quick set.)
constexpr int64_t kPanelChunkBytes = 128 * 1024;
template <int NV, typename Mma>
constexpr int64_t depth_block() {
  // A multiple of 16, so that chunks keep k-pairs (and cache lines) whole.
  return kPanelChunkBytes / (NV * kLanes * static_cast<int64_t>(sizeof(typename Mma::Packed))) /
         kLanes * kLanes;
}

// For panels [p0, p1) and all M rows: the float32 tile of rows m0..m0+mr of
// A [M, K] (element (m, k) at a[m * sam + k * sak]) times the panel, then
// epi(tile, row stride, m0, mr, p). A panel holds K x NV * 16 values of
// Mma::Packed in the order Mma reads them.
template <int NV, typename Mma = MmaF32, typename Epi>
void run_panels(int64_t p0, int64_t p1, int64_t M, int64_t K, const typename Mma::A* a,
                int64_t sam, int64_t sak, const typename Mma::Packed* packed, const Epi& epi) {
  constexpr int MR = rows_per_tile<NV>();
  constexpr int64_t W = NV * kLanes;
  constexpr int64_t kDepthBlock = depth_block<NV, Mma>();
  if (K <= kDepthBlock || M <= MR) {  // one row block: nothing to reuse across
    alignas(64) float tile[MR * W];
    for (int64_t p = p0; p < p1; ++p) {
      const auto* panel = packed + p * K * W;
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
        Mma::template rows<MR, NV>(mr, a + m0 * sam, sam, sak, panel, K, tile, false);
        epi(tile, W, m0, mr, p);
      }
    }
    return;
  }
  thread_local std::vector<float> sums;
  sums.resize(static_cast<size_t>(M * W));
  for (int64_t p = p0; p < p1; ++p) {
    const auto* panel = packed + p * K * W;
    for (int64_t k0 = 0; k0 < K; k0 += kDepthBlock) {
      const int64_t kc = std::min(kDepthBlock, K - k0);
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
        Mma::template rows<MR, NV>(mr, a + m0 * sam + k0 * sak, sam, sak, panel + k0 * W, kc,
                                   sums.data() + m0 * W, k0 > 0);
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      epi(sums.data() + m0 * W, W, m0, static_cast<int>(std::min<int64_t>(MR, M - m0)), p);
    }
  }
}

}  // namespace cpu
}  // namespace fusedrnn
