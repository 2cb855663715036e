// The persistent recurrence: one cooperative launch runs the whole time loop of
// one layer and direction, with each block's slice of W_hh resident in shared
// memory for all T steps. Written once for the GPU and for the CPU emulator
// that tests it where no GPU is visible (cpu/persistent_emulate.cpp).
//
// Note [Persistent kernel]
// Block `blk` owns hidden units [j0, j0 + units). Forward, per step:
//   1. stage h_{t-1} (all units, all active rows) into shared memory, in
//      one piece where it fits, else in K-chunks of L.kc columns (with two
//      buffers, the next chunk's copies in flight meanwhile), and accumulate
//        acc[b][g*units + jl] = sum_k h_{t-1}[b][k] W_hh[g*H + j0 + jl][k]
//      against the resident slice (its G*units rows of W_hh);
//   2. apply the gate math of gates.h to the block's own units and write
//      h_t's slice to `out` (plus the state and what backward saves);
//   3. meet every other block at one grid barrier.
// Backward runs the same pattern in reverse order: the block holds the
// columns j0..j0+units of W_hh (as rows, [units][G*H]), forms its slice of
// dh_{t} = dgates_{t+1} W_hh from the pre-activation gradients every block
// wrote at the step before, then the pointwise backward of its units.
//
// h_{t-1} is read from `out` (rows still active at the step before) or h0,
// never from the running state, which its owner overwrites during the step.
// Values written by other blocks inside the launch are read through L2 only
// (load_coherent, copy16_async): the read-only and L1 paths may hold stale
// lines.
//
// Each step is a fixed list of phases (stage and gemm per K-chunk, reduce,
// pointwise; backward also carry), none of which reads what another thread
// writes in the same phase. On the GPU all threads run a phase and meet at
// __syncthreads(); the emulator runs every thread of a phase in turn, block
// by block, and the end of a step is the grid barrier. Both call the same
// phase functions below.
//
// Shared memory of one block (byte offsets in Layout, each 128-byte aligned):
//
//   | W slice [n_pad][ldw] (T) | A chunk [b_pad][lda] (T) x buffers | acc [b_pad][ldacc] (acc_t) |
//   | split-K partial sums: [kThreads][4][4] (SIMT) or [warps][16][16] (tensor cores) (acc_t) |
//
// Rows and columns past the valid ones are zero, so the tensor-core tiles
// (16 x 16 x 8 tf32, 16 x 16 x 16 half/bf16) never need masking.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gates.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>
#endif

namespace fusedrnn {
namespace persistent {

// How a block forms its gate pre-activations.
enum MathMode : int {
  kSimt = 0,        // FMAs in acc_t on register tiles: strict fp32, fp64
  kTensorCore = 1,  // wmma: tf32 for float32 operands, fp16/bf16 natively
};

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kTile = 16;  // tensor-core tile edge, m and n
// K columns staged per pass come in multiples of this; each pass is a round
// trip to L2, so the layout takes the widest that fits (Layout::kc).
constexpr int64_t kChunk = 64;
constexpr int64_t kAlign = 128;  // shared-memory region alignment, bytes
// SIMT split-K: with fewer register tiles than threads (small batch), up to
// this many threads share one tile's K range; see gemm_simt.
constexpr int64_t kMaxSplit = 16;
// SIMT register tile: 4 batch rows x 4 slice rows per thread, read 4 K
// columns at a time (one 16-byte load for float).
constexpr int64_t kSimtTile = 4;
// Shared memory the emulator assumes: an H100's opt-in limit per block.
constexpr int64_t kEmulatedSmemBytes = 232448;
constexpr int64_t kEmulatedBlocks = 132;

FUSEDRNN_HOST_DEVICE int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }
FUSEDRNN_HOST_DEVICE int64_t min_(int64_t a, int64_t b) { return a < b ? a : b; }

struct Layout {
  int64_t blocks = 0;        // grid size
  int64_t units = 0;         // hidden units per block; the last block may have fewer
  int64_t n = 0, n_pad = 0;  // slice rows: G*units (forward) or units (backward)
  int64_t k = 0, k_pad = 0;  // reduction length: H (forward) or G*H (backward)
  int64_t kc = 0;            // K columns staged per pass: all of k_pad, or kChunk * 2^j dividing it
  int64_t chunks = 0;        // k_pad / kc
  int kc_shift = 0;          // ceil(log2(kc)): rows of a chunk are split off by this shift
  int64_t b_pad = 0;         // staged batch rows
  int64_t ldw = 0, lda = 0, ldacc = 0;        // row strides, elements
  int64_t w_off = 0, a_off = 0, acc_off = 0;  // region offsets, bytes
  int64_t a_bytes = 0;                        // one A chunk buffer, bytes
  int buffers = 1;       // 2: chunk c+1 is copied in while chunk c is multiplied
  int64_t part_off = 0;  // split-K partial sums
  int64_t bytes = 0;     // shared memory per block
  int mode = kSimt;
};

// Splits H units over at most max_blocks blocks and lays out one block's
// shared memory, staging the widest K chunk (at most max_chunk columns when
// max_chunk > 0) that keeps it within smem_limit bytes. `elt`/`acc_elt`:
// sizes of the storage and accumulation types. bytes > smem_limit: no fit.
inline Layout make_layout(int64_t H, int64_t B, int G, bool backward, int mode, int64_t elt,
                          int64_t acc_elt, int64_t max_blocks, int64_t smem_limit,
                          int64_t max_chunk = 0) {
  const bool tc = mode == kTensorCore;
  Layout L;
  L.mode = mode;
  int64_t u = (H + max_blocks - 1) / max_blocks;
  // Tensor cores: forward slices of 4 units are 16 LSTM rows; a backward
  // slice is one tile of units (fewer would be padding, not fewer blocks).
  if (tc) u = backward ? round_up(u, kTile) : round_up(u, kTile / 4);
  L.units = u;
  L.blocks = (H + u - 1) / u;
  L.n = backward ? u : G * u;
  L.k = backward ? G * H : H;
  const int64_t tile = tc ? kTile : kSimtTile;
  L.n_pad = round_up(L.n, tile);
  L.k_pad = round_up(L.k, kChunk);
  L.b_pad = round_up(B, tile);
  // Row padding: SIMT reads 4 consecutive elements at once, and 4 elements
  // of padding put the rows a warp reads at once in different banks (16
  // bytes for half types, for 16-byte staging stores); wmma wants 32-byte
  // aligned tiles, so pad by 32 bytes there.
  const int64_t pad = tc ? 32 / elt : (elt < 4 ? 16 / elt : kSimtTile);
  L.ldw = L.k_pad + pad;
  L.ldacc = L.n_pad + (tc ? 32 / acc_elt : 1);
  L.w_off = 0;
  L.a_off = round_up(L.n_pad * L.ldw * elt, kAlign);
  // Split-K partial sums: one register tile per thread (SIMT), one tile per
  // warp (tensor cores).
  const int64_t fixed = round_up(L.b_pad * L.ldacc * acc_elt, kAlign) +
                        round_up(tc ? kThreads / kWarpSize * kTile * kTile * acc_elt
                                    : kThreads * kSimtTile * kSimtTile * acc_elt,
                                 kAlign);
  // Chunks: all of K in one buffer where it fits. Otherwise the cheaper, by
  // the model below, of one buffer of the widest chunk that fits, or two
  // buffers (the next chunk's copies fly during this chunk's product) of a
  // narrower one. Both widths are kChunk * 2^j dividing k_pad, so that the
  // staging loop splits its index by shifts.
  const int64_t widest = max_chunk > 0 ? min_(max_chunk, L.k_pad) : L.k_pad;
  auto chunk_bytes = [&](int64_t kc) { return round_up(L.b_pad * (kc + pad) * elt, kAlign); };
  auto fits = [&](int64_t kc, int buffers) {
    return L.a_off + buffers * chunk_bytes(kc) + fixed <= smem_limit;
  };
  auto widest_fitting = [&](int buffers) {
    int64_t kc = kChunk;
    while (kc * 2 <= widest && L.k_pad % (kc * 2) == 0 && fits(kc * 2, buffers)) kc *= 2;
    return kc;
  };
  L.kc = kChunk;
  if (widest == L.k_pad && fits(L.k_pad, 1)) {
    L.kc = L.k_pad;
  } else {
    L.kc = widest_fitting(1);
    if (fits(kChunk, 2)) {
      // Modelled clocks per step: a chunk costs a round trip to L2 plus its
      // product plus two block barriers; with two buffers only the first
      // round trip is exposed where the product is longer. Constants
      // unmeasured (benchmarks/NOTES.md).
      const int64_t kc2 = widest_fitting(2);
      const double mac_per_clk = tc ? (elt == 4 ? 512.0 : 1024.0) : (elt == 8 ? 32.0 : 64.0);
      const double trip = 1000.0, sync = 100.0;
      auto product = [&](int64_t kc) { return double(L.b_pad * L.n_pad * kc) / mac_per_clk; };
      const double one = double(L.k_pad / L.kc) * (trip + product(L.kc) + sync);
      const double two = trip + double(L.k_pad / kc2) * (std::max(trip, product(kc2)) + sync);
      if (two < one) {
        L.kc = kc2;
        L.buffers = 2;
      }
    }
  }
  if (L.kc == L.k_pad) L.buffers = 1;
  L.chunks = L.k_pad / L.kc;
  L.kc_shift = 0;
  while ((int64_t(1) << L.kc_shift) < L.kc) ++L.kc_shift;
  L.lda = L.kc + pad;
  L.a_bytes = chunk_bytes(L.kc);
  L.acc_off = L.a_off + L.buffers * L.a_bytes;
  L.part_off = L.acc_off + round_up(L.b_pad * L.ldacc * acc_elt, kAlign);
  L.bytes = L.acc_off + fixed;
  return L;
}

FUSEDRNN_HOST_DEVICE int64_t num_chunks(const Layout& L) { return L.chunks; }

// One time step in processing order: its rows and those of the step whose
// state it reads (the schedule of checks.h, on the device).
struct StepInfo {
  int64_t t, rows, off, prev_rows, prev_off;
};

// sizes/offsets null: padded input, every step has all B rows.
FUSEDRNN_HOST_DEVICE StepInfo step_info(const int64_t* sizes, const int64_t* offsets, int64_t T,
                                        int64_t B, bool reverse, int64_t s) {
  StepInfo st;
  st.t = reverse ? T - 1 - s : s;
  const int64_t tp = reverse ? st.t + 1 : st.t - 1;
  const bool has_prev = tp >= 0 && tp < T;
  if (sizes == nullptr) {
    st.rows = B;
    st.off = st.t * B;
    st.prev_rows = has_prev ? B : 0;
    st.prev_off = has_prev ? tp * B : 0;
    return st;
  }
  st.rows = sizes[st.t];
  st.off = offsets[st.t];
  st.prev_rows = has_prev ? sizes[tp] : 0;
  st.prev_off = has_prev ? offsets[tp] : 0;
  return st;
}

// A load that sees what other blocks stored before the last grid barrier.
template <typename T>
FUSEDRNN_HOST_DEVICE T load_coherent(const T* p) {
#if defined(__CUDA_ARCH__)
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "unsupported element");
  T v;
  if constexpr (sizeof(T) == 2) {
    const unsigned short r = __ldcg(reinterpret_cast<const unsigned short*>(p));
    memcpy(&v, &r, sizeof(T));
  } else if constexpr (sizeof(T) == 4) {
    const unsigned int r = __ldcg(reinterpret_cast<const unsigned int*>(p));
    memcpy(&v, &r, sizeof(T));
  } else {
    const unsigned long long r = __ldcg(reinterpret_cast<const unsigned long long*>(p));
    memcpy(&v, &r, sizeof(T));
  }
  return v;
#else
  return *p;
#endif
}

// ------------------------------------------------------------------ arguments
// All pointers row-major, contiguous, on the device the kernel runs on.
template <typename T, typename acc_t>
struct ForwardArgs {
  Layout L;
  int64_t steps = 0, B = 0, H = 0;
  bool reverse = false;
  bool vec = false;                  // stage 16 bytes at a time: rows of out and h0 16-byte aligned
  const int64_t* sizes = nullptr;    // [T] rows per step (batch_sizes); null: padded
  const int64_t* offsets = nullptr;  // [T] first row of each step; null: padded
  const T* w_hh = nullptr;           // [G*H, H]
  const T* x = nullptr;              // [N, G*H] input projection (+ b_ih)
  const T* b_hh = nullptr;           // [G*H] (zeros without bias)
  const T* h0 = nullptr;             // [B, H]
  T* out = nullptr;                  // [N, H]
  T* h = nullptr;                    // [B, H] running state: h0 in, h_n out
  acc_t* c = nullptr;                // [B, H] LSTM cell state: c0 in, c_n out
  T* gates = nullptr;                // [N, 4H] saved for backward, or null
  acc_t* cells = nullptr;            // [N, H] LSTM saved c_t, or null
};

template <typename T, typename acc_t>
struct BackwardArgs {
  Layout L;
  int64_t steps = 0, B = 0, H = 0;
  bool reverse = false;
  bool vec = false;                // stage 16 bytes at a time: rows of dg / dhh 16-byte aligned
  const int64_t* sizes = nullptr;  // [T], or null: padded
  const int64_t* offsets = nullptr;
  const T* w_hh = nullptr;       // [G*H, H]
  const T* grad_out = nullptr;   // [N, H]
  const T* gates = nullptr;      // [N, 4H] as saved by forward
  const acc_t* cells = nullptr;  // [N, H] LSTM
  const acc_t* c0 = nullptr;     // [B, H] LSTM, accumulation dtype
  const T* out = nullptr;        // [N, H] GRU: forward output (h_{t-1})
  const T* h0 = nullptr;         // [B, H] GRU
  acc_t* dh = nullptr;           // [B, H] grad_h_n in, d h0 out
  acc_t* dc = nullptr;           // [B, H] LSTM: grad_c_n in, d c0 out
  T* dg = nullptr;               // [N, 4H] LSTM: d x_proj, also the next step's A
  T* dx = nullptr;               // [N, 3H] GRU: d x_proj
  T* dhh = nullptr;              // [N, 3H] GRU: d(h W_hh^T + b_hh), the next step's A
};

template <typename T>
FUSEDRNN_HOST_DEVICE T* smem_at(unsigned char* smem, int64_t off) {
  return reinterpret_cast<T*>(smem + off);
}

// ------------------------------------------------------------------ weights
// Forward slice: row g*units + jl = W_hh row g*H + j0 + jl. Row by row,
// threads along the row (coalesced), no division per element.
template <int G, typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void load_forward_weights(const ForwardArgs<T, acc_t>& a, int64_t blk,
                                               unsigned char* smem, int tid, int nt) {
  const Layout& L = a.L;
  T* w = smem_at<T>(smem, L.w_off);
  const int64_t j0 = blk * L.units, u = min_(L.units, a.H - j0);
  for (int64_t n = 0; n < L.n_pad; ++n) {
    const int64_t g = n / L.units, jl = n % L.units;
    const bool valid = g < G && jl < u;
    const T* src = a.w_hh + (g * a.H + j0 + jl) * a.H;
    for (int64_t k = tid; k < L.ldw; k += nt) {
      w[n * L.ldw + k] = (valid && k < a.H) ? src[k] : T(0.f);
    }
  }
}

// Backward slice: row jl = W_hh column j0 + jl, over all G*H gate rows.
// Element i = k * n_pad + n (n fastest: neighbouring threads read
// neighbouring columns of W_hh); (k, n) advance by counters, not division.
template <int G, typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void load_backward_weights(const BackwardArgs<T, acc_t>& a, int64_t blk,
                                                unsigned char* smem, int tid, int nt) {
  const Layout& L = a.L;
  T* w = smem_at<T>(smem, L.w_off);
  const int64_t j0 = blk * L.units, u = min_(L.units, a.H - j0);
  const int64_t dk = nt / L.n_pad, dn = nt % L.n_pad;
  int64_t k = tid / L.n_pad, n = tid % L.n_pad;
  for (; k < L.ldw; k += dk, n += dn) {
    if (n >= L.n_pad) {
      n -= L.n_pad;
      ++k;
      if (k >= L.ldw) break;
    }
    w[n * L.ldw + k] = (n < u && k < G * a.H) ? a.w_hh[k * a.H + j0 + n] : T(0.f);
  }
}

// ------------------------------------------------------------------ gemm
// The A buffer that holds the chunk starting at column k0 (with two buffers
// kc is a power of two).
template <typename T>
FUSEDRNN_HOST_DEVICE T* chunk_buffer(const Layout& L, unsigned char* smem, int64_t k0) {
  return smem_at<T>(smem, L.a_off + ((k0 >> L.kc_shift) & (L.buffers - 1)) * L.a_bytes);
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
// buffer, zero-padded to b_pad rows and past column L.k, as one commit group.
// src.row(b) points at row b of A (L.k elements). With `vec` (rows and their
// starts 16-byte aligned) each thread moves 16 bytes per copy, asynchronously;
// otherwise element by element, synchronously.
template <typename T, typename Src>
FUSEDRNN_HOST_DEVICE void issue_chunk(const Layout& L, unsigned char* smem, int64_t rows,
                                      int64_t k0, const Src& src, bool vec, int tid, int nt) {
  T* A = chunk_buffer<T>(L, smem, k0);
  // i runs over rows of a power-of-two length (>= the chunk's), so that it
  // splits into (row, column) by shifts; the columns past the chunk idle.
  if (vec) {
    constexpr int64_t V = 16 / sizeof(T);
    const int64_t per_row = L.kc / V;
    int shift = 0;
    while ((int64_t(1) << shift) < per_row) ++shift;
    for (int64_t i = tid; i < (L.b_pad << shift); i += nt) {
      const int64_t b = i >> shift, v = i & ((int64_t(1) << shift) - 1);
      if (v >= per_row) continue;
      const int64_t kk = v * V, k = k0 + kk;
      T* dst = A + b * L.lda + kk;
      if (b < rows && k < L.k) {
        copy16_async(dst, src.row(b) + k);
      } else {
        for (int64_t e = 0; e < V; ++e) dst[e] = T(0.f);
      }
    }
  } else {
    for (int64_t i = tid; i < (L.b_pad << L.kc_shift); i += nt) {
      const int64_t b = i >> L.kc_shift, kk = i & ((int64_t(1) << L.kc_shift) - 1), k = k0 + kk;
      if (kk >= L.kc) continue;
      A[b * L.lda + kk] = (b < rows && k < L.k) ? load_coherent(src.row(b) + k) : T(0.f);
    }
  }
  async_commit();
}

// The staging phase of chunk c: makes chunk c land in its buffer (issuing it
// here when it is the first, or with one buffer) and, with two buffers,
// issues chunk c + 1 into the other, whose product (chunk c - 1) finished at
// the last barrier; zeroes acc on the first chunk.
template <typename T, typename acc_t, typename Src>
FUSEDRNN_HOST_DEVICE void stage_chunk(const Layout& L, unsigned char* smem, int64_t rows, int64_t c,
                                      const Src& src, bool vec, int tid, int nt) {
  if (c == 0 || L.buffers == 1) issue_chunk<T>(L, smem, rows, c * L.kc, src, vec, tid, nt);
  const bool next = L.buffers == 2 && c + 1 < num_chunks(L);
  if (next) issue_chunk<T>(L, smem, rows, (c + 1) * L.kc, src, vec, tid, nt);
  async_wait(next ? 1 : 0);
  if (c == 0) {
    acc_t* acc = smem_at<acc_t>(smem, L.acc_off);
    for (int64_t i = tid; i < L.b_pad * L.ldacc; i += nt) acc[i] = acc_t(0);
  }
}

// Threads that share one register tile's K range in gemm_simt: a power of
// two with split * tiles <= nt, so each (tile, split) pair has its own thread.
FUSEDRNN_HOST_DEVICE int64_t simt_split(int64_t tiles, int nt) {
  int64_t split = 1;
  while (split * 2 <= kMaxSplit && tiles * split * 2 <= nt) split *= 2;
  return split;
}

// Four consecutive elements (16-byte aligned for float and double, 8 for
// half types) in the accumulation type.
template <typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void load4(const T* p, acc_t (&v)[kSimtTile]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, float>::value) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else if constexpr (std::is_same<T, double>::value) {
    const double2 q0 = reinterpret_cast<const double2*>(p)[0];
    const double2 q1 = reinterpret_cast<const double2*>(p)[1];
    v[0] = q0.x, v[1] = q0.y, v[2] = q1.x, v[3] = q1.y;
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    T t[kSimtTile];
    memcpy(t, &raw, sizeof(raw));
    for (int i = 0; i < kSimtTile; ++i) v[i] = acc_t(t[i]);
  }
#else
  for (int i = 0; i < kSimtTile; ++i) v[i] = acc_t(p[i]);
#endif
}

// acc[b][n] += sum_kk A[b][kk] * W[n][k0 + kk] in acc_t. Each thread owns a
// 4 x 4 register tile (batch rows x slice rows): per 4 K columns, 8 loads
// feed 64 FMAs. With fewer tiles than threads (small batch), `split`
// threads share a tile, each taking every split-th group of 4 columns and
// keeping its sums in `part` across chunks; reduce_split adds them up in a
// fixed order. Padded rows and columns are zero in shared memory.
template <typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void gemm_simt(const Layout& L, unsigned char* smem, int64_t rows, int64_t k0,
                                    int tid, int nt) {
  constexpr int64_t R = kSimtTile;
  const T* A = chunk_buffer<T>(L, smem, k0);
  const T* W = smem_at<T>(smem, L.w_off);
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
template <typename T>
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
template <typename T>
FUSEDRNN_HOST_DEVICE constexpr int64_t tc_k() {
  return sizeof(T) == 4 ? 8 : 16;
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
template <typename T>
FUSEDRNN_HOST_DEVICE void mma_tile(const Layout& L, const T* A, const T* W, int64_t m0, int64_t n0,
                                   int64_t k0, int64_t first, int64_t step, float* out, int64_t ld,
                                   bool init, int lane) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using W_ = Wmma<T>;
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
    if constexpr (std::is_same<T, float>::value) {
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
  constexpr int64_t kK = tc_k<T>();
  for (int64_t m = 0; m < kTile; ++m) {
    for (int64_t n = 0; n < kTile; ++n) {
      float s = init ? out[m * ld + n] : 0.f;
      for (int64_t kk = first; kk < L.kc; kk += step) {
        for (int64_t q = kk; q < kk + kK; ++q) {
          float x = float(A[(m0 + m) * L.lda + q]), y = float(W[(n0 + n) * L.ldw + k0 + q]);
          if (std::is_same<T, float>::value) {
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

// The same product on tensor cores, float accumulators: each warp owns 16 x
// 16 tiles of acc in turn (only rows < rows are tiled), or with few tiles a
// share of one tile's K steps (tc_split), summed by reduce_split.
template <typename T>
FUSEDRNN_HOST_DEVICE void gemm_tensor_core(const Layout& L, unsigned char* smem, int64_t rows,
                                           int64_t k0, int tid, int nt) {
  constexpr int64_t kK = tc_k<T>();
  const int warp = tid / kWarpSize, warps = nt / kWarpSize, lane = tid % kWarpSize;
  const int64_t m_tiles = (rows + kTile - 1) / kTile, n_tiles = L.n_pad / kTile;
  const int64_t tiles = m_tiles * n_tiles, split = tc_split(tiles, warps, L.kc / kK);
  const T* A = chunk_buffer<T>(L, smem, k0);
  const T* W = smem_at<T>(smem, L.w_off);
  if (split == 1) {
    float* acc = smem_at<float>(smem, L.acc_off);
    for (int tile = warp; tile < int(tiles); tile += warps) {
      const int64_t m0 = tile / int(n_tiles) * kTile, n0 = tile % int(n_tiles) * kTile;
      mma_tile(L, A, W, m0, n0, k0, 0, kK, acc + m0 * L.ldacc + n0, L.ldacc, true, lane);
    }
    return;
  }
  if (warp >= tiles * split) return;
  const int tile = warp / int(split);
  const int64_t m0 = tile / int(n_tiles) * kTile, n0 = tile % int(n_tiles) * kTile;
  float* part = smem_at<float>(smem, L.part_off) + warp * kTile * kTile;
  mma_tile(L, A, W, m0, n0, k0, warp % split * kK, split * kK, part, kTile, k0 > 0, lane);
}

// After the last chunk: acc = the sum of the split partial sums, in order.
template <typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void reduce_split(const Layout& L, unsigned char* smem, int64_t rows, int tid,
                                       int nt) {
  acc_t* acc = smem_at<acc_t>(smem, L.acc_off);
  const acc_t* part = smem_at<acc_t>(smem, L.part_off);
  if (L.mode == kSimt) {
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
    return;
  }
  constexpr int64_t kTileElems = kTile * kTile;
  const int64_t n_tiles = L.n_pad / kTile, tiles = (rows + kTile - 1) / kTile * n_tiles;
  const int64_t split = tc_split(tiles, nt / kWarpSize, L.kc / tc_k<T>());
  if (split == 1) return;
  for (int e = tid; e < int(tiles * kTileElems); e += nt) {
    const int tile = e / int(kTileElems), r = e % int(kTileElems) / int(kTile), c = e % int(kTile);
    acc_t s = acc_t(0);
    for (int64_t i = 0; i < split; ++i) s += part[(tile * split + i) * kTileElems + r * kTile + c];
    acc[(tile / n_tiles * kTile + r) * L.ldacc + tile % n_tiles * kTile + c] = s;
  }
}

template <int kMode, typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void gemm(const Layout& L, unsigned char* smem, int64_t rows, int64_t k0,
                               int tid, int nt) {
  // (The host never pairs float64 with tensor cores; this keeps it from compiling.)
  if constexpr (kMode == kTensorCore && !std::is_same<T, double>::value) {
    gemm_tensor_core<T>(L, smem, rows, k0, tid, nt);
  } else {
    gemm_simt<T, acc_t>(L, smem, rows, k0, tid, nt);
  }
}

// ------------------------------------------------------------------ forward
template <int G, typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void pointwise_forward(const ForwardArgs<T, acc_t>& a, int64_t blk,
                                            unsigned char* smem, const StepInfo& st, int tid,
                                            int nt) {
  const Layout& L = a.L;
  const acc_t* acc = smem_at<acc_t>(smem, L.acc_off);
  const int64_t H = a.H, j0 = blk * L.units, u = min_(L.units, H - j0);
  const int u32 = int(u);  // 32-bit: see gemm_simt
  for (int i = tid; i < int(st.rows * u); i += nt) {
    const int64_t b = i / u32, jl = i % u32, j = j0 + jl, k = b * H + j;
    const T* x = a.x + (st.off + b) * G * H;
    const acc_t* ac = acc + b * L.ldacc;
    // Recurrent pre-activation of gate g (b_hh included).
    acc_t rec[G];
    for (int g = 0; g < G; ++g) rec[g] = ac[g * L.units + jl] + acc_t(a.b_hh[g * H + j]);
    if constexpr (G == kLstmGates) {
      acc_t i_, f, g_, o, c, h;
      lstm_forward_point<acc_t>(acc_t(x[j]) + rec[0], acc_t(x[H + j]) + rec[1],
                                acc_t(x[2 * H + j]) + rec[2], acc_t(x[3 * H + j]) + rec[3], a.c[k],
                                i_, f, g_, o, c, h);
      a.c[k] = c;
      a.h[k] = T(h);
      a.out[(st.off + b) * H + j] = T(h);
      if (a.gates) {
        T* gs = a.gates + (st.off + b) * G * H;
        gs[j] = T(i_);
        gs[H + j] = T(f);
        gs[2 * H + j] = T(g_);
        gs[3 * H + j] = T(o);
        a.cells[(st.off + b) * H + j] = c;
      }
    } else {
      // a.h holds h_{t-1} of every active row (see gru_forward_impl).
      acc_t r, z, n, h;
      gru_forward_point<acc_t>(acc_t(x[j]), acc_t(x[H + j]), acc_t(x[2 * H + j]), rec[0], rec[1],
                               rec[2], acc_t(a.h[k]), r, z, n, h);
      a.h[k] = T(h);
      a.out[(st.off + b) * H + j] = T(h);
      if (a.gates) {
        T* gs = a.gates + (st.off + b) * kGruSaved * H;
        gs[j] = T(r);
        gs[H + j] = T(z);
        gs[2 * H + j] = T(n);
        gs[3 * H + j] = T(rec[2]);
      }
    }
  }
}

// Row b of h_{t-1}: the output of the step before where b was active there,
// else h0.
template <typename T, typename acc_t>
struct PrevState {
  const ForwardArgs<T, acc_t>* a;
  StepInfo st;
  FUSEDRNN_HOST_DEVICE const T* row(int64_t b) const {
    return b < st.prev_rows ? a->out + (st.prev_off + b) * a->H : a->h0 + b * a->H;
  }
};

// Phases of one forward step: (stage, gemm) per chunk, reduce, pointwise.
FUSEDRNN_HOST_DEVICE int64_t forward_phases(const Layout& L) { return 2 * num_chunks(L) + 2; }

template <int G, int kMode, typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void forward_phase(const ForwardArgs<T, acc_t>& a, int64_t blk,
                                        unsigned char* smem, int64_t s, int64_t phase, int tid,
                                        int nt) {
  const StepInfo st = step_info(a.sizes, a.offsets, a.steps, a.B, a.reverse, s);
  if (phase < 2 * num_chunks(a.L)) {
    const int64_t k0 = phase / 2 * a.L.kc;
    if (phase % 2 == 0) {
      stage_chunk<T, acc_t>(a.L, smem, st.rows, phase / 2, PrevState<T, acc_t>{&a, st}, a.vec, tid,
                            nt);
    } else {
      gemm<kMode, T, acc_t>(a.L, smem, st.rows, k0, tid, nt);
    }
  } else if (phase == 2 * num_chunks(a.L)) {
    reduce_split<T, acc_t>(a.L, smem, st.rows, tid, nt);
  } else {
    pointwise_forward<G>(a, blk, smem, st, tid, nt);
  }
}

// ------------------------------------------------------------------ backward
// Iteration i in [0, T] handles processing step T-1-i (when i < T) after
// forming, from the gradients of step T-i (when i > 0), the block's slice of
// their product with W_hh.
template <int G, typename T, typename acc_t>
struct StepGrad {  // A = the pre-activation gradients of the step handled before
  const BackwardArgs<T, acc_t>* a;
  StepInfo st;
  FUSEDRNN_HOST_DEVICE const T* row(int64_t b) const {
    return (G == kLstmGates ? a->dg : a->dhh) + (st.off + b) * G * a->H;
  }
};

// dh for the rows of the step handled before: the product (LSTM), or the
// product added to dh * z, kept there by that step (GRU).
template <int G, typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void carry_backward(const BackwardArgs<T, acc_t>& a, int64_t blk,
                                         unsigned char* smem, const StepInfo& st, int tid, int nt) {
  const Layout& L = a.L;
  const acc_t* acc = smem_at<acc_t>(smem, L.acc_off);
  const int64_t H = a.H, j0 = blk * L.units, u = min_(L.units, H - j0);
  const int u32 = int(u);
  for (int i = tid; i < int(st.rows * u); i += nt) {
    const int64_t b = i / u32, jl = i % u32;
    const acc_t m = acc[b * L.ldacc + jl];
    acc_t& dh = a.dh[b * H + j0 + jl];
    dh = G == kLstmGates ? m : dh + m;
  }
}

template <int G, typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void pointwise_backward(const BackwardArgs<T, acc_t>& a, int64_t blk,
                                             const StepInfo& st, int tid, int nt) {
  const Layout& L = a.L;
  const int64_t H = a.H, j0 = blk * L.units, u = min_(L.units, H - j0);
  const int u32 = int(u);
  for (int i = tid; i < int(st.rows * u); i += nt) {
    const int64_t b = i / u32, j = j0 + i % u32, k = b * H + j, row = st.off + b;
    const acc_t dh = acc_t(a.grad_out[row * H + j]) + a.dh[k];
    if constexpr (G == kLstmGates) {
      const T* gs = a.gates + row * G * H;
      const acc_t c_prev = b < st.prev_rows ? a.cells[(st.prev_off + b) * H + j] : a.c0[k];
      acc_t di, df, dg, d_o, dcp;
      lstm_backward_point<acc_t>(acc_t(gs[j]), acc_t(gs[H + j]), acc_t(gs[2 * H + j]),
                                 acc_t(gs[3 * H + j]), a.cells[row * H + j], c_prev, dh, a.dc[k],
                                 di, df, dg, d_o, dcp);
      T* d = a.dg + row * G * H;
      d[j] = T(di);
      d[H + j] = T(df);
      d[2 * H + j] = T(dg);
      d[3 * H + j] = T(d_o);
      a.dc[k] = dcp;
    } else {
      const T* gs = a.gates + row * kGruSaved * H;
      const acc_t h_prev = acc_t(b < st.prev_rows ? a.out[(st.prev_off + b) * H + j] : a.h0[k]);
      acc_t dr, dz, dn, dhn, dh_direct;
      gru_backward_point<acc_t>(acc_t(gs[j]), acc_t(gs[H + j]), acc_t(gs[2 * H + j]),
                                acc_t(gs[3 * H + j]), h_prev, dh, dr, dz, dn, dhn, dh_direct);
      T* dx = a.dx + row * G * H;
      T* dhh = a.dhh + row * G * H;
      dx[j] = dhh[j] = T(dr);
      dx[H + j] = dhh[H + j] = T(dz);
      dx[2 * H + j] = T(dn);
      dhh[2 * H + j] = T(dhn);
      a.dh[k] = dh_direct;
    }
  }
}

FUSEDRNN_HOST_DEVICE int64_t backward_phases(const Layout& L, int64_t i, int64_t T) {
  return (i > 0 ? 2 * num_chunks(L) + 2 : 0) + (i < T ? 1 : 0);
}

template <int G, int kMode, typename T, typename acc_t>
FUSEDRNN_HOST_DEVICE void backward_phase(const BackwardArgs<T, acc_t>& a, int64_t blk,
                                         unsigned char* smem, int64_t i, int64_t phase, int tid,
                                         int nt) {
  const int64_t nc = num_chunks(a.L);
  if (i > 0 && phase <= 2 * nc + 1) {
    const StepInfo before = step_info(a.sizes, a.offsets, a.steps, a.B, a.reverse, a.steps - i);
    if (phase == 2 * nc + 1) {
      carry_backward<G>(a, blk, smem, before, tid, nt);
    } else if (phase == 2 * nc) {
      reduce_split<T, acc_t>(a.L, smem, before.rows, tid, nt);
    } else if (phase % 2 == 0) {
      stage_chunk<T, acc_t>(a.L, smem, before.rows, phase / 2, StepGrad<G, T, acc_t>{&a, before},
                            a.vec, tid, nt);
    } else {
      gemm<kMode, T, acc_t>(a.L, smem, before.rows, phase / 2 * a.L.kc, tid, nt);
    }
    return;
  }
  const StepInfo st = step_info(a.sizes, a.offsets, a.steps, a.B, a.reverse, a.steps - 1 - i);
  pointwise_backward<G>(a, blk, st, tid, nt);
}

}  // namespace persistent
}  // namespace fusedrnn
