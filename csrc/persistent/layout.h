// The layout planner of the persistent kernel (phases.h): how the hidden units
// split over blocks, and where each region of a block's shared memory lies.
// Host and device code; no ATen, so ops.cpp can expose make_layout to tests.
//
// Shared memory of one block (byte offsets in Layout, each 128-byte aligned):
//
//   | W slice [n_pad][ldw] | A chunk [b_pad][lda] x buffers | acc [b_pad][ldacc] |
//   | split-K partial sums: [kThreads][4][4] (SIMT) or [warps][16][16] (tensor cores) |
//   | where it fits, the pointwise phase's inputs: pieces [segs][units] (InPiece) |
//
// The W slice and the A chunks hold scalar_t; acc and the partial sums
// acc_t; the pieces each their tensor's type.
// Rows and columns past the valid ones are zero, so the tensor-core tiles
// (16 x 16 x 8 tf32, 16 x 16 x 16 half/bf16) never need masking.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../gates.h"

namespace fusedrnn {
namespace persistent {

// How a block forms its gate pre-activations.
enum MathMode : int {
  kSimt = 0,        // FMAs in acc_t on register tiles: strict fp32, fp64
  kTensorCore = 1,  // wmma: tf32 for float32 operands, fp16/bf16 natively
};

// The tuning arguments of the _persistent_* ops, left to the kernel: as many
// blocks as the device holds, the widest K chunk that fits, and the mode that
// the dtype and the TF32 setting call for (host.h, resolve_mode).
constexpr int64_t kDeviceBlocks = 0;
constexpr int64_t kWidestChunk = 0;
constexpr int64_t kAutoMode = -1;

// The pieces of the pointwise phase's inputs (Layout::in_off), each
// [segs][units] with segments of b_pad rows (gate-major for G of them).
// Forward: the step's x_proj [G][b_pad], the state entering it (LSTM c in
// acc_t, GRU h) [b_pad], b_hh [G]. Backward: the saved gates [4][b_pad], the
// state entering the step [b_pad], grad_h [b_pad], LSTM c_t (acc_t) [b_pad].
enum InPiece : int {
  kInX = 0, kInState = 1, kInBias = 2,
  kInGates = 0, kInPrev = 1, kInGrad = 2, kInCell = 3,
  kInPieces = 4
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
  // The pointwise phase's inputs (InPiece), staged with the first chunk so
  // that it waits on no load of its own (Note [inputs staged with the chunk]
  // in phases.h). in_bytes 0: it reads them from global memory (no room left).
  int64_t in_off[kInPieces] = {};
  int64_t in_bytes = 0;
  int64_t bytes = 0;     // shared memory per block
  int mode = kSimt;
};

// Bytes of the first `n` input pieces (InPiece), each 128-byte aligned.
inline int64_t in_piece_bytes(int G, bool backward, int64_t b_pad, int64_t units, int64_t elt,
                              int64_t acc_elt, int n) {
  const bool lstm = G == kLstmGates;
  // Segments and element size of each piece; 0 segments: not used.
  const int64_t saved = lstm ? kLstmGates : kGruSaved;
  const int64_t segs[kInPieces] = {backward ? saved * b_pad : G * b_pad, b_pad,
                                   backward ? b_pad : G, backward && lstm ? b_pad : 0};
  const int64_t size[kInPieces] = {elt, lstm ? acc_elt : elt, elt, acc_elt};
  int64_t bytes = 0;
  for (int p = 0; p < n; ++p) bytes += round_up(segs[p] * units * size[p], kAlign);
  return bytes;
}

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
  // bytes for half types, for 16-byte staging stores). wmma wants 32-byte
  // aligned tile pointers and a stride that is a multiple of 16 bytes: tiles
  // start every 16 rows and every 32 bytes along K, so 16 bytes of padding
  // keeps them aligned, and rows 16 bytes apart modulo 128 spread a tile's
  // rows over 8 bank groups (32 bytes would repeat every 4 rows).
  const int64_t pad = tc || elt < 4 ? 16 / elt : kSimtTile;
  L.ldw = L.k_pad + pad;
  L.ldacc = L.n_pad + (tc ? 16 / acc_elt : 1);
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
  // The inputs go last, only into room the chunks left: they save one round
  // trip per step, a narrower chunk would cost at least one.
  const int64_t pieces = in_piece_bytes(G, backward, L.b_pad, u, elt, acc_elt, kInPieces);
  if (L.bytes + pieces <= smem_limit) {
    for (int p = 0; p < kInPieces; ++p) {
      L.in_off[p] = L.bytes + in_piece_bytes(G, backward, L.b_pad, u, elt, acc_elt, p);
    }
    L.in_bytes = pieces;
    L.bytes += pieces;
  }
  return L;
}

FUSEDRNN_HOST_DEVICE int64_t num_chunks(const Layout& L) { return L.chunks; }

// The region of a block's shared memory at byte offset `off`.
template <typename elt_t>
FUSEDRNN_HOST_DEVICE elt_t* smem_at(unsigned char* smem, int64_t off) {
  return reinterpret_cast<elt_t*>(smem + off);
}

}  // namespace persistent
}  // namespace fusedrnn
