// The SIMT product of the persistent kernel (phases.h): the staged chunk of A
// times the block's W slice, FMAs in acc_t on 4 x 4 register tiles. Strict
// fp32 and fp64, and half types where tensor cores are not asked for.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "layout.h"
#include "staging.h"

namespace fusedrnn {
namespace persistent {

// Threads that share one register tile's K range in gemm_simt: a power of
// two with split * tiles <= nt, so each (tile, split) pair has its own thread.
FUSEDRNN_HOST_DEVICE int64_t simt_split(int64_t tiles, int nt) {
  int64_t split = 1;
  while (split * 2 <= kMaxSplit && tiles * split * 2 <= nt) split *= 2;
  return split;
}

// Four consecutive elements (16-byte aligned for float and double, 8 for
// half types) in the accumulation type.
template <typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void load4(const scalar_t* p, acc_t (&v)[kSimtTile]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else if constexpr (std::is_same<scalar_t, double>::value) {
    const double2 q0 = reinterpret_cast<const double2*>(p)[0];
    const double2 q1 = reinterpret_cast<const double2*>(p)[1];
    v[0] = q0.x, v[1] = q0.y, v[2] = q1.x, v[3] = q1.y;
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    scalar_t e[kSimtTile];
    memcpy(e, &raw, sizeof(raw));
    for (int i = 0; i < kSimtTile; ++i) v[i] = acc_t(e[i]);
  }
#else
  for (int i = 0; i < kSimtTile; ++i) v[i] = acc_t(p[i]);
#endif
}

// acc[b][n] += sum_kk A[b][kk] * W[n][k0 + kk] in acc_t. Each thread owns a
// 4 x 4 register tile (batch rows x slice rows): per 4 K columns, 8 loads
// feed 64 FMAs. With fewer tiles than threads (small batch), `split`
// threads share a tile, each taking every split-th group of 4 columns and
// keeping its sums in `part` across chunks; reduce_split_simt adds them up
// in a fixed order. Padded columns are zero in shared memory; batch rows
// past `rows` hold anything (issue_chunk), and only their own sums see them.
template <typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void gemm_simt(const Layout& L, unsigned char* smem, int64_t rows, int64_t k0,
                                    int tid, int nt) {
  constexpr int64_t R = kSimtTile;
  const scalar_t* A = chunk_buffer<scalar_t>(L, smem, k0);
  const scalar_t* W = smem_at<scalar_t>(smem, L.w_off);
  const int64_t tn = L.n_pad / R, tiles = (rows + R - 1) / R * tn;
  const int64_t split = simt_split(tiles, nt), groups = L.kc / R;
  // Block-local indices in 32 bits: 64-bit division is a long subroutine on the GPU.
  const int tn32 = int(tn), split32 = int(split);
  for (int item = tid; item < int(tiles * split); item += nt) {
    const int tile = item / split32, first = item % split32;
    const int64_t b0 = tile / tn32 * R, n0 = tile % tn32 * R;
    acc_t sum[R][R] = {};
    for (int64_t g = first; g < groups; g += split) {
      acc_t a[R][R], w[R][R];
      for (int i = 0; i < R; ++i) load4(A + (b0 + i) * L.lda + g * R, a[i]);
      for (int j = 0; j < R; ++j) load4(W + (n0 + j) * L.ldw + k0 + g * R, w[j]);
      for (int q = 0; q < R; ++q) {
        for (int i = 0; i < R; ++i) {
          for (int j = 0; j < R; ++j) sum[i][j] += a[i][q] * w[j][q];
        }
      }
    }
    if (split == 1) {
      acc_t* acc = smem_at<acc_t>(smem, L.acc_off);
      for (int i = 0; i < R; ++i) {
        for (int j = 0; j < R; ++j) acc[(b0 + i) * L.ldacc + n0 + j] += sum[i][j];
      }
    } else {
      acc_t* part = smem_at<acc_t>(smem, L.part_off) + item * R * R;
      for (int i = 0; i < R; ++i) {
        for (int j = 0; j < R; ++j) {
          part[i * R + j] = (k0 == 0 ? acc_t(0) : part[i * R + j]) + sum[i][j];
        }
      }
    }
  }
}

// After the last chunk: acc = the sum of gemm_simt's split partial sums, in
// order (nothing to do without a split).
template <typename acc_t>
FUSEDRNN_HOST_DEVICE void reduce_split_simt(const Layout& L, unsigned char* smem, int64_t rows,
                                            int tid, int nt) {
  acc_t* acc = smem_at<acc_t>(smem, L.acc_off);
  const acc_t* part = smem_at<acc_t>(smem, L.part_off);
  constexpr int64_t R = kSimtTile;
  const int64_t tn = L.n_pad / R, tiles = (rows + R - 1) / R * tn;
  const int64_t split = simt_split(tiles, nt);
  if (split == 1) return;
  const int n32 = int(L.n);
  for (int o = tid; o < int(rows * L.n); o += nt) {
    const int b = o / n32, n = o % n32;
    const int64_t tile = b / R * tn + n / R, e = b % R * R + n % R;
    acc_t s = acc_t(0);
    for (int64_t i = 0; i < split; ++i) s += part[(tile * split + i) * R * R + e];
    acc[b * L.ldacc + n] = s;
  }
}

}  // namespace persistent
}  // namespace fusedrnn
