// Staging for the persistent kernel (phases.h): each block's slice of W_hh
// into shared memory once per launch, and per step the rows of A (h_{t-1}
// forward, the pre-activation gradients backward) in K chunks, with the next
// chunk's copies in flight during this chunk's product where the layout has
// two buffers (layout.h). A holds values other blocks wrote during the
// launch, so it is read through L2 only (Note [Persistent kernel]).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "args.h"
#include "layout.h"

#if defined(__CUDACC__)
#include <cuda_pipeline_primitives.h>
#endif

namespace fusedrnn {
namespace persistent {

// A load that sees what other blocks stored before the last grid barrier.
template <typename elt_t>
FUSEDRNN_HOST_DEVICE elt_t load_coherent(const elt_t* p) {
#if defined(__CUDA_ARCH__)
  static_assert(sizeof(elt_t) == 2 || sizeof(elt_t) == 4 || sizeof(elt_t) == 8,
                "unsupported element");
  elt_t v;
  if constexpr (sizeof(elt_t) == 2) {
    const unsigned short r = __ldcg(reinterpret_cast<const unsigned short*>(p));
    memcpy(&v, &r, sizeof(elt_t));
  } else if constexpr (sizeof(elt_t) == 4) {
    const unsigned int r = __ldcg(reinterpret_cast<const unsigned int*>(p));
    memcpy(&v, &r, sizeof(elt_t));
  } else {
    const unsigned long long r = __ldcg(reinterpret_cast<const unsigned long long*>(p));
    memcpy(&v, &r, sizeof(elt_t));
  }
  return v;
#else
  return *p;
#endif
}

// ------------------------------------------------------------------ weights
// Where the layout stages the step's inputs (L.in_bytes), the block's slice of
// b_hh as well, [G][units], zero without a bias: it is the same at every step.
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void load_forward_bias(const ForwardArgs<scalar_t, acc_t>& a, int64_t blk,
                                            unsigned char* smem, int tid, int nt) {
  const Layout& L = a.L;
  if (L.in_bytes == 0) return;
  scalar_t* bias = smem_at<scalar_t>(smem, L.in_off[kInBias]);
  const int64_t j0 = blk * L.units;
  const int u = int(min_(L.units, a.H - j0));
  for (int i = tid; i < G * u; i += nt) {
    const int g = i / u, jl = i - g * u;
    bias[g * L.units + jl] = a.b_hh != nullptr ? a.b_hh[g * a.H + j0 + jl] : scalar_t(0.f);
  }
}

// Forward slice: row g*units + jl = W_hh row g*H + j0 + jl. Row by row,
// threads along the row (coalesced), no division per element. Then b_hh's.
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void load_forward_weights(const ForwardArgs<scalar_t, acc_t>& a, int64_t blk,
                                               unsigned char* smem, int tid, int nt) {
  const Layout& L = a.L;
  scalar_t* w = smem_at<scalar_t>(smem, L.w_off);
  const int64_t j0 = blk * L.units, u = min_(L.units, a.H - j0);
  for (int64_t n = 0; n < L.n_pad; ++n) {
    const int64_t g = n / L.units, jl = n % L.units;
    const bool valid = g < G && jl < u;
    const scalar_t* src = a.w_hh + (g * a.H + j0 + jl) * a.H;
    for (int64_t k = tid; k < L.ldw; k += nt) {
      w[n * L.ldw + k] = (valid && k < a.H) ? src[k] : scalar_t(0.f);
    }
  }
  load_forward_bias<G>(a, blk, smem, tid, nt);
}

// Backward slice: row jl = W_hh column j0 + jl, over all G*H gate rows.
// Element i = k * n_pad + n (n fastest: neighbouring threads read
// neighbouring columns of W_hh); (k, n) advance by counters, not division.
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void load_backward_weights(const BackwardArgs<scalar_t, acc_t>& a, int64_t blk,
                                                unsigned char* smem, int tid, int nt) {
  const Layout& L = a.L;
  scalar_t* w = smem_at<scalar_t>(smem, L.w_off);
  const int64_t j0 = blk * L.units, u = min_(L.units, a.H - j0);
  const int64_t dk = nt / L.n_pad, dn = nt % L.n_pad;
  int64_t k = tid / L.n_pad, n = tid % L.n_pad;
  for (; k < L.ldw; k += dk, n += dn) {
    if (n >= L.n_pad) {
      n -= L.n_pad;
      ++k;
      if (k >= L.ldw) break;
    }
    w[n * L.ldw + k] = (n < u && k < G * a.H) ? a.w_hh[k * a.H + j0 + n] : scalar_t(0.f);
  }
}

// ------------------------------------------------------------------ A chunks
// The A buffer that holds the chunk starting at column k0 (with two buffers
// kc is a power of two).
template <typename scalar_t>
FUSEDRNN_HOST_DEVICE scalar_t* chunk_buffer(const Layout& L, unsigned char* smem, int64_t k0) {
  return smem_at<scalar_t>(smem, L.a_off + ((k0 >> L.kc_shift) & (L.buffers - 1)) * L.a_bytes);
}

// 16 bytes from global memory into shared memory, asynchronously where the
// hardware can (cp.async.cg: through L2 only, so it sees other blocks' stores
// like load_coherent). Complete after async_wait and a block barrier.
FUSEDRNN_HOST_DEVICE void copy16_async(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
  __pipeline_memcpy_async(dst, src, 16);
#else
  std::memcpy(dst, src, 16);
#endif
}

// The same for 4 or 8 bytes (cp.async.ca: through L1, for what no other block
// writes during the launch).
template <int kBytes>
FUSEDRNN_HOST_DEVICE void copy_async(void* dst, const void* src) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__)
  __pipeline_memcpy_async(dst, src, kBytes);
#else
  std::memcpy(dst, src, kBytes);
#endif
}

FUSEDRNN_HOST_DEVICE void async_commit() {
#if defined(__CUDA_ARCH__)
  __pipeline_commit();
#endif
}

// Waits until at most `pending` of this thread's committed copy groups are
// still in flight.
FUSEDRNN_HOST_DEVICE void async_wait(int pending) {
#if defined(__CUDA_ARCH__)
  __pipeline_wait_prior(pending);
#else
  (void)pending;
#endif
}

// Issues the copies of columns [k0, k0 + kc) of `rows` rows of A into their
// buffer, zero-padded past column L.k, as one commit group. Rows past `rows`
// are left as they are: the product reads some of them (its last row tile),
// but a row of the product depends only on its own row of A, and rows past
// `rows` are never read back, so zeroing them (15 of 16 rows at B = 1, every
// step) would buy nothing. The emulator poisons them to check this.
// src.row(b) points at row b of A (L.k elements). With `vec` (rows and their
// starts 16-byte aligned) each thread moves 16 bytes per copy, asynchronously;
// otherwise element by element, synchronously.
template <typename scalar_t, typename Src>
FUSEDRNN_HOST_DEVICE void issue_chunk(const Layout& L, unsigned char* smem, int64_t rows,
                                      int64_t k0, const Src& src, bool vec, int tid, int nt) {
  scalar_t* A = chunk_buffer<scalar_t>(L, smem, k0);
  // i runs over rows of a power-of-two length (>= the chunk's), so that it
  // splits into (row, column) by shifts; the columns past the chunk idle.
  if (vec) {
    constexpr int64_t V = 16 / sizeof(scalar_t);
    const int64_t per_row = L.kc / V;
    int shift = 0;
    while ((int64_t(1) << shift) < per_row) ++shift;
    for (int64_t i = tid; i < (rows << shift); i += nt) {
      const int64_t b = i >> shift, v = i & ((int64_t(1) << shift) - 1);
      if (v >= per_row) continue;
      const int64_t kk = v * V, k = k0 + kk;
      scalar_t* dst = A + b * L.lda + kk;
      if (k < L.k) {
        copy16_async(dst, src.row(b) + k);
      } else {
        for (int64_t e = 0; e < V; ++e) dst[e] = scalar_t(0.f);
      }
    }
  } else {
    for (int64_t i = tid; i < (rows << L.kc_shift); i += nt) {
      const int64_t b = i >> L.kc_shift, kk = i & ((int64_t(1) << L.kc_shift) - 1), k = k0 + kk;
      if (kk >= L.kc) continue;
      A[b * L.lda + kk] = k < L.k ? load_coherent(src.row(b) + k) : scalar_t(0.f);
    }
  }
  async_commit();
}

// ------------------------------------------------------------------ inputs
// Copies `segs` segments of `len` elements, segment i from src(i) to
// dst + i * ld, kBytes at a time, asynchronously.
// Indices are 32-bit here (a 64-bit division is a long subroutine on the GPU):
// segs * len is at most a block's b_pad * G * units elements.
template <int kBytes, typename elt_t, typename Src>
FUSEDRNN_HOST_DEVICE void copy_segments_by(elt_t* dst, int ld, int segs, int len, const Src& src,
                                           int tid, int nt) {
  constexpr int V = kBytes / int(sizeof(elt_t));
  const int per = len / V;
  for (int i = tid; i < segs * per; i += nt) {
    const int seg = i / per, e = (i - seg * per) * V;
    copy_async<kBytes>(dst + seg * ld + e, src(seg) + e);
  }
}

// The same, `bytes` (16, 8 or 4, and at least one element) at a time, where
// the caller made sure that every segment start is aligned to `bytes` and
// len * sizeof(elt_t) is a multiple of it; 0: element by element,
// synchronously.
template <typename elt_t, typename Src>
FUSEDRNN_HOST_DEVICE void copy_segments(elt_t* dst, int ld, int segs, int len, const Src& src,
                                        int bytes, int tid, int nt) {
  if (bytes == 16) {
    copy_segments_by<16>(dst, ld, segs, len, src, tid, nt);
  } else if (bytes == 8) {
    copy_segments_by<8>(dst, ld, segs, len, src, tid, nt);
  } else if (bytes == 4) {
    if constexpr (sizeof(elt_t) <= 4) copy_segments_by<4>(dst, ld, segs, len, src, tid, nt);
  } else {
    for (int i = tid; i < segs * len; i += nt) {
      const int seg = i / len, e = i - seg * len;
      dst[seg * ld + e] = src(seg)[e];
    }
  }
}

// Gate-major rows: segment g * rows + b of [n][rows][u] from row b, gate g of
// a [rows][n * H] tensor whose block slice (row 0, gate 0) starts at src.
template <typename elt_t>
FUSEDRNN_HOST_DEVICE void copy_gate_rows(elt_t* dst, int ld, int n, int rows, int u,
                                         const elt_t* src, int64_t H, int bytes, int tid,
                                         int nt) {
  copy_segments(dst, ld, n * rows, u,
                [&](int i) {
                  const int g = i / rows, b = i - g * rows;
                  return src + (int64_t(b) * n + g) * H;
                },
                bytes, tid, nt);
}

// Plain rows: segment b of [rows][u] from row b of a [rows][H] tensor whose
// block slice starts at src; from `first` instead (same layout) for rows at
// or past `from_src` (the state entering a step: the step before's row where
// it was active there, else the initial state's).
template <typename elt_t>
FUSEDRNN_HOST_DEVICE void copy_rows(elt_t* dst, int ld, int rows, int u, const elt_t* src,
                                    int64_t H, int bytes, int tid, int nt,
                                    int64_t from_src = -1, const elt_t* first = nullptr) {
  copy_segments(dst, ld, rows, u,
                [&](int b) {
                  return (from_src < 0 || b < from_src ? src : first) + int64_t(b) * H;
                },
                bytes, tid, nt);
}

// Issues the copies of what forward step st's pointwise phase reads besides
// the product, for the block's units [j0, j0 + u): x [G][rows][u] (row b,
// gate g of the step's x_proj) and the state [rows][u] (LSTM c_{t-1}, GRU
// h_{t-1}, both last written by this block), as one commit group. Rows are
// those of the step: the pieces' rows past them are not read.
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void issue_inputs(const ForwardArgs<scalar_t, acc_t>& a, int64_t blk,
                                       unsigned char* smem, const StepInfo& st, int tid, int nt) {
  const Layout& L = a.L;
  const int64_t H = a.H, j0 = blk * L.units;
  const int u = int(min_(L.units, H - j0)), rows = int(st.rows), ld = int(L.units);
  copy_gate_rows(smem_at<scalar_t>(smem, L.in_off[kInX]), ld, G, rows, u,
                 a.x + st.off * G * H + j0, H, a.in_copy[kInX], tid, nt);
  const auto* state = running_state<G>(a);
  using state_t = std::remove_const_t<std::remove_pointer_t<decltype(state)>>;
  copy_rows(smem_at<state_t>(smem, L.in_off[kInState]), ld, rows, u,
            static_cast<const state_t*>(state + j0), H, a.in_copy[kInState], tid, nt);
  async_commit();
}

// The same for backward step st: the saved gates [4][rows][u], the state
// entering the step [rows][u] (LSTM c_{t-1}, GRU h_{t-1}: the step before's
// row where it was active there, else c0 / h0), grad_h [rows][u] and the
// LSTM's c_t [rows][u]. Nothing of it is written during the launch.
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE void issue_inputs(const BackwardArgs<scalar_t, acc_t>& a, int64_t blk,
                                       unsigned char* smem, const StepInfo& st, int tid, int nt) {
  constexpr int Gs = G == kLstmGates ? kLstmGates : kGruSaved;
  const Layout& L = a.L;
  const int64_t H = a.H, j0 = blk * L.units;
  const int u = int(min_(L.units, H - j0)), rows = int(st.rows), ld = int(L.units);
  copy_gate_rows(smem_at<scalar_t>(smem, L.in_off[kInGates]), ld, Gs, rows, u,
                 a.gates + st.off * Gs * H + j0, H, a.in_copy[kInGates], tid, nt);
  copy_rows(smem_at<scalar_t>(smem, L.in_off[kInGrad]), ld, rows, u,
            a.grad_out + st.off * H + j0, H, a.in_copy[kInGrad], tid, nt);
  if constexpr (G == kLstmGates) {
    copy_rows(smem_at<acc_t>(smem, L.in_off[kInPrev]), ld, rows, u,
              a.cells + st.prev_off * H + j0, H, a.in_copy[kInPrev], tid, nt, st.prev_rows,
              a.c0 + j0);
    copy_rows(smem_at<acc_t>(smem, L.in_off[kInCell]), ld, rows, u, a.cells + st.off * H + j0,
              H, a.in_copy[kInCell], tid, nt);
  } else {
    copy_rows(smem_at<scalar_t>(smem, L.in_off[kInPrev]), ld, rows, u,
              a.out + st.prev_off * H + j0, H, a.in_copy[kInPrev], tid, nt, st.prev_rows,
              a.h0 + j0);
  }
  async_commit();
}

// The staging phase of chunk c: makes chunk c land in its buffer (issuing it
// here when it is the first, or with one buffer) and, with two buffers,
// issues chunk c + 1 into the other, whose product (chunk c - 1) finished at
// the last barrier; zeroes acc on the first chunk. At the first chunk,
// issue_more() issues more copies (one commit group) after chunk 0's, which
// land with it.
template <typename scalar_t, typename acc_t, typename Src, typename More>
FUSEDRNN_HOST_DEVICE void stage_chunk(const Layout& L, unsigned char* smem, int64_t rows, int64_t c,
                                      const Src& src, bool vec, int tid, int nt,
                                      const More& issue_more) {
  if (c == 0 || L.buffers == 1) issue_chunk<scalar_t>(L, smem, rows, c * L.kc, src, vec, tid, nt);
  if (c == 0) issue_more();
  const bool next = L.buffers == 2 && c + 1 < num_chunks(L);
  if (next) issue_chunk<scalar_t>(L, smem, rows, (c + 1) * L.kc, src, vec, tid, nt);
  async_wait(next ? 1 : 0);
  if (c == 0) {
    acc_t* acc = smem_at<acc_t>(smem, L.acc_off);
    for (int64_t i = tid; i < L.b_pad * L.ldacc; i += nt) acc[i] = acc_t(0);
  }
}

}  // namespace persistent
}  // namespace fusedrnn
