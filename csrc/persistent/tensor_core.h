// The tensor-core product of the persistent kernel (phases.h): the staged
// chunk of A times the block's W slice in 16 x 16 wmma tiles, float
// accumulators; tf32 for float32 operands, fp16/bf16 natively. On the host
// (the emulator) the same tiles are summed in float with the operands
// rounded to tf32 as the hardware rounds them.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "layout.h"
#include "staging.h"

#if defined(__CUDACC__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace fusedrnn {
namespace persistent {

// Round-to-nearest (ties away) to tf32's 10-bit mantissa, as cvt.rna.tf32.f32.
inline float round_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &u, sizeof(u));
  return x;
}

#if defined(__CUDACC__)
// wmma operand types for each storage type.
template <typename scalar_t>
struct Wmma;
template <>
struct Wmma<float> {
  using frag_t = nvcuda::wmma::precision::tf32;
  using ptr_t = float;
  static constexpr int kK = 8;
};
template <>
struct Wmma<c10::Half> {
  using frag_t = __half;
  using ptr_t = __half;
  static constexpr int kK = 16;
};
template <>
struct Wmma<c10::BFloat16> {
  using frag_t = __nv_bfloat16;
  using ptr_t = __nv_bfloat16;
  static constexpr int kK = 16;
};
#endif

// K depth of one tensor-core step: 8 for tf32, 16 for fp16/bf16.
template <typename scalar_t>
FUSEDRNN_HOST_DEVICE constexpr int64_t tc_k() {
  return sizeof(scalar_t) == 4 ? 8 : 16;
}

// Warps that share one tile's K steps of a chunk in gemm_tensor_core: with
// fewer tiles than warps (small batch) each warp of a tile takes every
// split-th K step into its own accumulator tile in `part`.
FUSEDRNN_HOST_DEVICE int64_t tc_split(int64_t tiles, int warps, int64_t ksteps) {
  int64_t split = 1;
  while (split * 2 <= ksteps && tiles * split * 2 <= warps) split *= 2;
  return split;
}

// One 16 x 16 tile: c (row-major at `out`, stride ld) = (init ? c : 0) +
// A[m0.., kk] W[n0.., k0 + kk]^T over kk = first, first + step, ... < L.kc.
// The emulator rounds float operands to tf32 as the hardware does.
template <typename scalar_t>
FUSEDRNN_HOST_DEVICE void mma_tile(const Layout& L, const scalar_t* A, const scalar_t* W,
                                   int64_t m0, int64_t n0, int64_t k0, int64_t first, int64_t step,
                                   float* out, int64_t ld, bool init, int lane) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using W_ = Wmma<scalar_t>;
  using ptr_t = typename W_::ptr_t;
  wmma::fragment<wmma::accumulator, kTile, kTile, W_::kK, float> c;
  if (init) {
    wmma::load_matrix_sync(c, out, unsigned(ld), wmma::mem_row_major);
  } else {
    wmma::fill_fragment(c, 0.f);
  }
  for (int64_t kk = first; kk < L.kc; kk += step) {
    wmma::fragment<wmma::matrix_a, kTile, kTile, W_::kK, typename W_::frag_t, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, kTile, kTile, W_::kK, typename W_::frag_t, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, reinterpret_cast<const ptr_t*>(A + m0 * L.lda + kk),
                           unsigned(L.lda));
    wmma::load_matrix_sync(fb, reinterpret_cast<const ptr_t*>(W + n0 * L.ldw + k0 + kk),
                           unsigned(L.ldw));
    if constexpr (std::is_same<scalar_t, float>::value) {
      for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
      for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
    }
    wmma::mma_sync(c, fa, fb, c);
  }
  wmma::store_matrix_sync(out, c, unsigned(ld), wmma::mem_row_major);
#else
  __trap();  // the host never picks tensor cores below sm_80
#endif
#else
  if (lane != 0) return;
  constexpr int64_t kK = tc_k<scalar_t>();
  for (int64_t m = 0; m < kTile; ++m) {
    for (int64_t n = 0; n < kTile; ++n) {
      float s = init ? out[m * ld + n] : 0.f;
      for (int64_t kk = first; kk < L.kc; kk += step) {
        for (int64_t q = kk; q < kk + kK; ++q) {
          float x = float(A[(m0 + m) * L.lda + q]), y = float(W[(n0 + n) * L.ldw + k0 + q]);
          if (std::is_same<scalar_t, float>::value) {
            x = round_tf32(x);
            y = round_tf32(y);
          }
          s += x * y;
        }
      }
      out[m * ld + n] = s;
    }
  }
#endif
}

// wmma's rules for a tile in shared memory: the pointer 32-byte aligned, the
// stride a multiple of 16 bytes. The hardware's failure is undefined; the
// emulator (which has no such rule of its own) checks them for it. Offsets
// are from the block's base, which is 128-byte aligned on the device.
FUSEDRNN_HOST_DEVICE void check_wmma_tile(const unsigned char* smem, const void* tile,
                                                 int64_t ld, int64_t elt) {
#if !defined(__CUDA_ARCH__)
  const auto off = static_cast<const unsigned char*>(tile) - smem;
  if (off % 32 != 0 || ld * elt % 16 != 0) {
    throw std::logic_error("persistent emulator: a wmma tile breaks wmma's alignment rules");
  }
#endif
}

// The first K step's operand tiles of mma_tile and its accumulator tile; the
// later K steps are whole tiles (32 bytes) further along the same rows.
template <typename scalar_t>
FUSEDRNN_HOST_DEVICE void check_tiles(const Layout& L, const unsigned char* smem,
                                             const scalar_t* A, const scalar_t* W, int64_t m0,
                                             int64_t n0, int64_t k0, const float* out,
                                             int64_t ld) {
  check_wmma_tile(smem, A + m0 * L.lda, L.lda, sizeof(scalar_t));
  check_wmma_tile(smem, W + n0 * L.ldw + k0, L.ldw, sizeof(scalar_t));
  check_wmma_tile(smem, out, ld, sizeof(float));
}

// acc[b][n] += sum_kk A[b][kk] * W[n][k0 + kk] on tensor cores: each warp
// owns 16 x 16 tiles of acc in turn (only rows < rows are tiled), or with few
// tiles a share of one tile's K steps (tc_split), summed by
// reduce_split_tensor_core.
template <typename scalar_t>
FUSEDRNN_HOST_DEVICE void gemm_tensor_core(const Layout& L, unsigned char* smem, int64_t rows,
                                           int64_t k0, int tid, int nt) {
  constexpr int64_t kK = tc_k<scalar_t>();
  const int warp = tid / kWarpSize, warps = nt / kWarpSize, lane = tid % kWarpSize;
  const int64_t m_tiles = (rows + kTile - 1) / kTile, n_tiles = L.n_pad / kTile;
  const int64_t tiles = m_tiles * n_tiles, split = tc_split(tiles, warps, L.kc / kK);
  const scalar_t* A = chunk_buffer<scalar_t>(L, smem, k0);
  const scalar_t* W = smem_at<scalar_t>(smem, L.w_off);
  if (split == 1) {
    float* acc = smem_at<float>(smem, L.acc_off);
    for (int tile = warp; tile < int(tiles); tile += warps) {
      const int64_t m0 = tile / int(n_tiles) * kTile, n0 = tile % int(n_tiles) * kTile;
      check_tiles<scalar_t>(L, smem, A, W, m0, n0, k0, acc + m0 * L.ldacc + n0, L.ldacc);
      mma_tile(L, A, W, m0, n0, k0, 0, kK, acc + m0 * L.ldacc + n0, L.ldacc, true, lane);
    }
    return;
  }
  if (warp >= tiles * split) return;
  const int tile = warp / int(split);
  const int64_t m0 = tile / int(n_tiles) * kTile, n0 = tile % int(n_tiles) * kTile;
  float* part = smem_at<float>(smem, L.part_off) + warp * kTile * kTile;
  check_tiles<scalar_t>(L, smem, A, W, m0, n0, k0, part, kTile);
  mma_tile(L, A, W, m0, n0, k0, warp % split * kK, split * kK, part, kTile, k0 > 0, lane);
}

// After the last chunk: acc = the sum of gemm_tensor_core's split partial
// tiles, in order (nothing to do without a split).
template <typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void reduce_split_tensor_core(const Layout& L, unsigned char* smem,
                                                   int64_t rows, int tid, int nt) {
  acc_t* acc = smem_at<acc_t>(smem, L.acc_off);
  const acc_t* part = smem_at<acc_t>(smem, L.part_off);
  constexpr int64_t kTileElems = kTile * kTile;
  const int64_t n_tiles = L.n_pad / kTile, tiles = (rows + kTile - 1) / kTile * n_tiles;
  const int64_t split = tc_split(tiles, nt / kWarpSize, L.kc / tc_k<scalar_t>());
  if (split == 1) return;
  for (int e = tid; e < int(tiles * kTileElems); e += nt) {
    const int tile = e / int(kTileElems), r = e % int(kTileElems) / int(kTile), c = e % int(kTile);
    acc_t s = acc_t(0);
    for (int64_t i = 0; i < split; ++i) s += part[(tile * split + i) * kTileElems + r * kTile + c];
    acc[(tile / n_tiles * kTile + r) * L.ldacc + tile % n_tiles * kTile + c] = s;
  }
}

}  // namespace persistent
}  // namespace fusedrnn
