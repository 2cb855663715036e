// The persistent kernel's arguments (phases.h), filled by the host side
// (host.h), and the time-step schedule as the kernel reads it.
#pragma once

#include <cstdint>

#include "layout.h"

namespace fusedrnn {
namespace persistent {

// One time step in processing order: its rows and those of the step whose
// state it reads (the schedule of checks.h, on the device).
struct StepInfo {
  int64_t t, rows, off, prev_rows, prev_off;
};

// sizes/offsets null: padded input, every step has all B rows.
FUSEDRNN_HOST_DEVICE StepInfo step_info(const int64_t* sizes, const int64_t* offsets,
                                        int64_t steps, int64_t B, bool reverse, int64_t s) {
  StepInfo st;
  st.t = reverse ? steps - 1 - s : s;
  const int64_t tp = reverse ? st.t + 1 : st.t - 1;
  const bool has_prev = tp >= 0 && tp < steps;
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

// All pointers row-major, contiguous, on the device the kernel runs on.
template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  Layout L;
  int64_t steps = 0, B = 0, H = 0;
  bool reverse = false;
  bool vec = false;                  // stage 16 bytes at a time: rows of out and h0 16-byte aligned
  int in_copy[kInPieces] = {};       // bytes per copy staging each InPiece: 16, 8, 4; 0: by element
  const int64_t* sizes = nullptr;    // [T] rows per step (batch_sizes); null: padded
  const int64_t* offsets = nullptr;  // [T] first row of each step; null: padded
  const scalar_t* w_hh = nullptr;    // [G*H, H]
  const scalar_t* x = nullptr;       // [N, G*H] input projection (+ b_ih)
  const scalar_t* b_hh = nullptr;    // [G*H]; null: no bias
  const scalar_t* h0 = nullptr;      // [B, H]
  scalar_t* out = nullptr;           // [N, H]
  scalar_t* h = nullptr;             // [B, H] running state: h0 in, h_n out
  acc_t* c = nullptr;                // [B, H] LSTM cell state: c0 in, c_n out
  scalar_t* gates = nullptr;         // [N, 4H] saved for backward, or null
  acc_t* cells = nullptr;            // [N, H] LSTM saved c_t, or null
};

// The state a forward step reads and writes per unit: the LSTM's c, the GRU's h.
template <int G, typename scalar_t, typename acc_t>
FUSEDRNN_HOST_DEVICE auto running_state(const ForwardArgs<scalar_t, acc_t>& a) {
  if constexpr (G == kLstmGates) {
    return a.c;
  } else {
    return a.h;
  }
}

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  Layout L;
  int64_t steps = 0, B = 0, H = 0;
  bool reverse = false;
  bool vec = false;                  // stage 16 bytes at a time: rows of dg / dhh 16-byte aligned
  int in_copy[kInPieces] = {};       // bytes per copy staging each InPiece: 16, 8, 4; 0: by element
  const int64_t* sizes = nullptr;    // [T], or null: padded
  const int64_t* offsets = nullptr;
  const scalar_t* w_hh = nullptr;      // [G*H, H]
  const scalar_t* grad_out = nullptr;  // [N, H]
  const scalar_t* gates = nullptr;     // [N, 4H] as saved by forward
  const acc_t* cells = nullptr;        // [N, H] LSTM
  const acc_t* c0 = nullptr;           // [B, H] LSTM, accumulation dtype
  const scalar_t* out = nullptr;       // [N, H] GRU: forward output (h_{t-1})
  const scalar_t* h0 = nullptr;        // [B, H] GRU
  acc_t* dh = nullptr;                 // [B, H] grad_h_n in, d h0 out
  acc_t* dc = nullptr;                 // [B, H] LSTM: grad_c_n in, d c0 out
  scalar_t* dg = nullptr;              // [N, 4H] LSTM: d x_proj, also the next step's A
  scalar_t* dx = nullptr;              // [N, 3H] GRU: d x_proj
  scalar_t* dhh = nullptr;             // [N, 3H] GRU: d(h W_hh^T + b_hh), the next step's A
};

}  // namespace persistent
}  // namespace fusedrnn
