// Arguments of one pointwise time step, shared by the CPU and CUDA kernels.
// All pointers are row-major and contiguous; `rows` is the number of batch rows
// active at this step (PackedSequence batch_sizes[t]) and H the hidden size.
// `acc_t` is the accumulation type: float for half/bfloat16, else scalar_t.
#pragma once

#include <cstdint>

namespace fusedrnn {

template <typename scalar_t, typename acc_t>
struct LstmForwardStep {
  int64_t rows = 0, H = 0;
  const scalar_t* x = nullptr;     // [rows, 4H] input projection (+ b_ih)
  const scalar_t* hh = nullptr;    // [rows, 4H] h_{t-1} @ W_hh^T
  const scalar_t* b_hh = nullptr;  // [4H] or null
  acc_t* c = nullptr;              // [rows, H] running cell state, in/out
  scalar_t* h = nullptr;           // [rows, H] new hidden state (before projection)
  scalar_t* out = nullptr;         // [rows, H] output rows, or null
  scalar_t* gates = nullptr;       // [rows, 4H] saved i, f, g, o, or null
  acc_t* cells = nullptr;          // [rows, H] saved c_t, or null
};

template <typename scalar_t, typename acc_t>
struct LstmBackwardStep {
  int64_t rows = 0, H = 0;
  const scalar_t* gates = nullptr;   // [rows, 4H] i, f, g, o
  const acc_t* cells = nullptr;      // [rows, H] c_t
  const acc_t* c_prev = nullptr;     // [prev_rows, H] c of the step before, or null
  int64_t prev_rows = 0;             // rows >= prev_rows start from c0
  const acc_t* c0 = nullptr;         // [B, H]
  const scalar_t* grad_h = nullptr;  // [rows, H] gradient reaching h_t from outside
  const acc_t* dh_rec = nullptr;     // [rows, H] gradient from step t+1, or null
  acc_t* dc = nullptr;               // [rows, H] dL/dc_t in, dL/dc_{t-1} out
  scalar_t* dgates = nullptr;        // [rows, 4H] pre-activation gradients
};

template <typename scalar_t, typename acc_t>
struct GruForwardStep {
  int64_t rows = 0, H = 0;
  const scalar_t* x = nullptr;     // [rows, 3H] input projection (+ b_ih)
  const scalar_t* hh = nullptr;    // [rows, 3H] h_{t-1} @ W_hh^T
  const scalar_t* b_hh = nullptr;  // [3H] or null
  scalar_t* h = nullptr;           // [rows, H] h_{t-1} in, h_t out
  scalar_t* out = nullptr;         // [rows, H] output rows
  scalar_t* gates = nullptr;       // [rows, 4H] saved r, z, n, hn, or null
  bool reset_after = true;         // false: hh's n part already is W_hn (r*h)
};

// Classic GRU, before the W_hn matmul.
template <typename scalar_t, typename acc_t>
struct GruResetStep {
  int64_t rows = 0, H = 0;
  const scalar_t* x = nullptr;     // [rows, 3H] input projection (+ b_ih)
  const scalar_t* hh = nullptr;    // [rows, 3H] h_{t-1} @ W_hh^T (r, z parts)
  const scalar_t* b_hh = nullptr;  // [3H]
  const scalar_t* h = nullptr;     // [rows, H] h_{t-1}
  scalar_t* rh = nullptr;          // [rows, H] r * h_{t-1}
};

// Classic GRU backward through r * h_{t-1}.
template <typename scalar_t, typename acc_t>
struct GruResetBackwardStep {
  int64_t rows = 0, H = 0;
  const scalar_t* gates = nullptr;   // [rows, 4H] r, z, n, hn
  const scalar_t* h_prev = nullptr;  // [prev_rows, H] or null
  int64_t prev_rows = 0;
  const scalar_t* h0 = nullptr;      // [B, H]
  const scalar_t* drh = nullptr;     // [rows, H] d(r h) = dhn W_hn
  acc_t* dh = nullptr;               // [rows, H] += drh * r
  scalar_t* dx = nullptr;            // [rows, 3H] r part written
  scalar_t* dhh = nullptr;           // [rows, 3H] r part written
};

template <typename scalar_t, typename acc_t>
struct GruBackwardStep {
  int64_t rows = 0, H = 0;
  const scalar_t* gates = nullptr;   // [rows, 4H] r, z, n, hn
  const scalar_t* h_prev = nullptr;  // [prev_rows, H] output of the step before, or null
  int64_t prev_rows = 0;             // rows >= prev_rows start from h0
  const scalar_t* h0 = nullptr;      // [B, H]
  const scalar_t* grad_h = nullptr;  // [rows, H] gradient reaching h_t from outside
  acc_t* dh = nullptr;               // [rows, H] from step t+1 in, dh * z out
  scalar_t* dx = nullptr;            // [rows, 3H] d x_proj: dr_pre, dz_pre, dn_pre
  scalar_t* dhh = nullptr;           // [rows, 3H] d(h W_hh^T + b_hh): dr_pre, dz_pre, dn_pre*r
  bool reset_after = true;           // false: r part left for GruResetBackwardStep
};

}  // namespace fusedrnn
